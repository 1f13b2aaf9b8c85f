"""The OpenAI-compatible HTTP API over a :class:`~kubetune.worker.serving.ModelServer` (FastAPI).

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``stream: true`` answers server-sent events, ending in
``data: [DONE]``, with a usage chunk when ``stream_options.include_usage``), ``POST
/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (the vLLM/AIBrix hot-swap contract; any
kubetune artifact format loads through them, not only LoRA; ``lora_path`` may be a URI; an optional
``sha256`` is the recorded hash of the artifact's ``kubetune.json``), ``PUT /v1/routes`` (replace the
weighted aliases), ``GET /v1/adapters`` (every adapter's state and decode latency per token, and the
base's), ``GET /health`` (liveness: the base
is loaded), ``GET /ready`` (every declared adapter has been tried) and ``GET /metrics`` (Prometheus).

Requests are batched by :class:`~kubetune.worker.batching.Batcher`: 429 when its queue is full, 503
while a model is not ready. The admin endpoints (load, unload, routes) require ``Authorization:
Bearer <token>`` when the server has an admin token file; the inference endpoints require one of the
API keys when it has an API key file. Every error has OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubetune.worker.batching import Batcher, GenerationRequest, SamplingParams
from kubetune.worker.serving import AdapterLoadError, ModelServer, ServingError, describe
from kubetune.worker.serving_plan import RouteEntry

logger = logging.getLogger("kubetune.serve.api")

#: Completion tokens of a chat request that sets no max_tokens (OpenAI's own default is the context).
CHAT_DEFAULT_MAX_TOKENS = 256


class Unauthorized(ServingError):
    status, kind, code = 401, "invalid_request_error", "invalid_api_key"


class SecretFile:
    """Bearer tokens read from a file, one per line, re-read when the file changes (a mounted Secret is
    updated in place). Compared in constant time; never logged."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._key: tuple[int, int, int] | None = None
        self._tokens: tuple[bytes, ...] = ()

    def tokens(self) -> tuple[bytes, ...]:
        try:
            stat = self.path.stat()
            key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if key != self._key:
                lines = self.path.read_bytes().splitlines()
                self._tokens = tuple(line.strip() for line in lines if line.strip())
                self._key = key
        except OSError as exc:
            # Fail closed: a missing Secret lets nobody in.
            logger.warning("token file %s unreadable: %s", self.path, exc.strerror or exc)
            self._key, self._tokens = None, ()
        return self._tokens

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, presented = (authorization or "").partition(" ")
        candidate = presented.strip().encode()
        accepted = False
        for token in self.tokens():  # no early exit: the time taken does not say which one matched
            accepted |= hmac.compare_digest(candidate, token)
        return accepted and scheme.lower() == "bearer" and bool(candidate)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    # Clients send many optional OpenAI fields we do not use (logprobs, user...); accept and ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="vLLM's extension: generate max_tokens tokens.")

    @model_validator(mode="after")
    def _check_stop(self) -> _Request:
        if len(self.stops()) > 4:
            raise ValueError("stop: at most 4 sequences")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(s for s in self.stops() if s),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Request):
    prompt: str | list[str]

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: one prompt per request")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def rendered(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # content parts: only text is understood
            content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=63)
    lora_path: str = Field(min_length=1)
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="Recorded sha256 of the artifact's kubetune.json (a FineTuneJob's status.result.sha256).",
    )


class UnloadAdapterRequest(BaseModel):
    lora_name: str


class RoutesRequest(BaseModel):
    routes: list[RouteEntry]


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, kind, param, code), headers=headers)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _DecodeLatency(Collector):
    """``kubetune_serve_ms_per_token{model, measure}``: decode latency per token in milliseconds,
    ``measure`` ``probe`` (one sequence alone, after the load), ``served`` (moving average over the
    batches that served it) or ``unmerged_probe`` (mergeAdapter: the probe before merging)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "kubetune_serve_ms_per_token",
            "Decode latency per token, milliseconds, by served model and measure",
            labels=["model", "measure"],
        )
        for name, latency in list(self.server.latency.items()):
            for measure, value in (
                ("probe", latency.probe_ms),
                ("served", latency.served_ms),
                ("unmerged_probe", latency.unmerged_probe_ms),
            ):
                if value is not None:
                    family.add_metric([name, measure], value)
        yield family


def create_app(
    server: ModelServer,
    *,
    batcher: Batcher | None = None,
    admin_token_file: str | Path | None = None,
    api_key_file: str | Path | None = None,
    background: bool = True,
) -> FastAPI:
    """The FastAPI app. ``background``: load declared adapters and retry failed ones on a thread."""
    batcher = batcher or Batcher(server)
    admin_tokens = SecretFile(admin_token_file) if admin_token_file else None
    api_keys = SecretFile(api_key_file) if api_key_file else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        if background:
            server.start_background()
        try:
            yield
        finally:
            batcher.stop()
            server.stop_background()

    app = FastAPI(title="kubetune serving", version="v1", lifespan=lifespan)
    registry = CollectorRegistry()
    requests_total = Counter(
        "kubetune_serve_requests_total",
        "Requests by model and outcome",
        ["model", "served_by", "code"],
        registry=registry,
    )
    tokens_total = Counter(
        "kubetune_serve_generated_tokens_total",
        "Completion tokens by adapter",
        ["served_by"],
        registry=registry,
    )
    latency = Histogram(
        "kubetune_serve_request_seconds", "Generation latency by adapter", ["served_by"], registry=registry
    )
    queue_depth = Gauge("kubetune_serve_queue_depth", "Requests waiting for a batch", registry=registry)
    queue_depth.set_function(lambda: batcher.queued)
    batch_size = Histogram(
        "kubetune_serve_batch_size",
        "Sequences per batched generate call",
        ["group"],
        buckets=(1, 2, 4, 8, 16, 32, 64),
        registry=registry,
    )
    batch_seconds = Histogram(
        "kubetune_serve_batch_seconds", "Duration of batched generate calls", ["group"], registry=registry
    )

    def observe_batch(rows: int, seconds: float, group: Any) -> None:
        label = group if isinstance(group, str) else "per-adapter"
        batch_size.labels(label).observe(rows)
        batch_seconds.labels(label).observe(seconds)

    batcher.observer = observe_batch
    registry.register(_DecodeLatency(server))
    adapters_failed = Gauge("kubetune_serve_adapters_failed", "Adapters in state Failed", registry=registry)
    adapters_failed.set_function(lambda: sum(s.state == "Failed" for s in list(server.states.values())))

    def guard(secret: SecretFile | None, what: str) -> Callable[[Request], None]:
        def check(request: Request) -> None:
            if secret is not None and not secret.accepts(request.headers.get("authorization")):
                raise Unauthorized(f"{what} needs a valid 'Authorization: Bearer' token")

        return check

    admin = Depends(guard(admin_tokens, "this admin endpoint"))
    client = Depends(guard(api_keys, "this endpoint"))

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> JSONResponse:
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        retry_after = getattr(exc, "retry_after", None)
        if exc.status in (429, 503) or retry_after:
            headers["Retry-After"] = str(max(1, round(retry_after or 1)))
        return _error(exc.status, str(exc), exc.kind, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        return _error(400, message, "invalid_request_error", param, None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind, None, None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "base": server.base_name, "adapters": len(server.adapters)}

    @app.get("/ready")
    def ready() -> JSONResponse:
        is_ready, waiting = server.ready()
        failed = [s.name for s in list(server.states.values()) if s.state == "Failed"]
        body = {"ready": is_ready, "waiting": waiting, "failed": failed}
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def _model_card(name: str, created: int) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "kubetune",
            "root": server.base_name,
        }

    @app.get("/v1/models", dependencies=[client])
    def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [_model_card(name, created) for name in server.model_names()]}

    @app.get("/v1/models/{model_id}", dependencies=[client])
    def model(model_id: str) -> dict[str, Any]:
        if model_id not in server.model_names():
            server.resolve(model_id)  # raises the right error (404, or 503 for a declared one)
        return _model_card(model_id, int(time.time()))

    @app.get("/v1/adapters")
    def adapters() -> dict[str, Any]:
        return describe(server)

    def _submit(request: _Request, prompt: str, default_max_tokens: int) -> GenerationRequest:
        served = ""
        try:
            served = server.resolve(request.model)
            prompt_ids = server.encode(prompt)
            params = request.sampling(default_max_tokens)
            if server.max_positions and len(prompt_ids) + params.max_tokens > server.max_positions:
                error = ServingError(
                    f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                    f"exceeds the model's context of {server.max_positions} tokens"
                )
                error.param, error.code = "max_tokens", "context_length_exceeded"
                raise error
            job = GenerationRequest(
                adapter=served,
                prompt_ids=prompt_ids,
                params=params,
                n=request.n,
                stream=request.stream,
                loop=asyncio.get_running_loop(),
            )
            batcher.submit(job)
        except ServingError as exc:
            requests_total.labels(request.model, served, str(exc.status)).inc()
            raise
        return job

    def _record(request: _Request, job: GenerationRequest, completion_tokens: int) -> None:
        requests_total.labels(request.model, job.adapter, "200").inc()
        tokens_total.labels(job.adapter).inc(completion_tokens)
        latency.labels(job.adapter).observe(time.monotonic() - job.submitted_at)

    async def _collect(request: _Request, job: GenerationRequest) -> list[tuple[str, str, int]]:
        """(text, finish_reason, completion_tokens) per choice, once all are done."""
        results: dict[int, tuple[str, str, int]] = {}
        try:
            while True:
                event = await job.events.get()
                if event[0] == "finish":
                    results[event[1]] = (event[4], event[2], event[3])
                elif event[0] == "done":
                    break
                elif event[0] == "error":
                    requests_total.labels(request.model, job.adapter, str(event[1].status)).inc()
                    raise event[1]
        except asyncio.CancelledError:
            job.cancel()
            raise
        choices = [results[i] for i in range(job.n)]
        _record(request, job, sum(c[2] for c in choices))
        return choices

    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def _stream(
        request: _Request, job: GenerationRequest, chat: bool, response_id: str
    ) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None}
            choice["finish_reason"] = finish
            return _sse(
                {
                    "id": response_id,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": request.model,
                    "system_fingerprint": None,
                    "choices": [choice],
                    **extra,
                }
            )

        completion_tokens = 0
        started = [False] * job.n  # chat: leading whitespace of a reply is dropped, as without stream
        try:
            if chat:
                for index in range(job.n):
                    yield chunk(index, None, None, role=True)
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    text = event[2]
                    if chat and not started[event[1]]:
                        text = text.lstrip()
                        started[event[1]] = bool(text)
                    if text:
                        yield chunk(event[1], text, None)
                elif event[0] == "finish":
                    completion_tokens += event[3]
                    finish = "stop" if event[2] == "cancelled" else event[2]
                    yield chunk(event[1], None if chat else "", finish)
                elif event[0] == "done":
                    break
                else:
                    exc = event[1]
                    requests_total.labels(request.model, job.adapter, str(exc.status)).inc()
                    yield _sse(error_body(str(exc), exc.kind, exc.param, exc.code))
                    yield "data: [DONE]\n\n"
                    return
            _record(request, job, completion_tokens)
            if include_usage:
                usage = _usage(len(job.prompt_ids), completion_tokens)
                yield _sse(
                    {
                        "id": response_id,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": request.model,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away, or everything is sent: either way, stop decoding

    def _streaming(body: AsyncIterator[str], served_by: str) -> StreamingResponse:
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"x-kubetune-adapter": served_by, "Cache-Control": "no-cache"},
        )

    @app.post("/v1/completions", dependencies=[client])
    async def completions(request: CompletionRequest) -> Any:
        job = _submit(request, request.text(), 16)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        if request.stream:
            return _streaming(_stream(request, job, False, response_id), job.adapter)
        choices = await _collect(request, job)
        body = {
            "id": response_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": None,
            "choices": [
                {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                for i, (text, finish, _) in enumerate(choices)
            ],
            "usage": _usage(len(job.prompt_ids), sum(c[2] for c in choices)),
        }
        return JSONResponse(body, headers={"x-kubetune-adapter": job.adapter})

    @app.post("/v1/chat/completions", dependencies=[client])
    async def chat(request: ChatRequest) -> Any:
        prompt = server.render_chat([m.rendered() for m in request.messages])
        if request.max_completion_tokens and not request.max_tokens:
            request.max_tokens = request.max_completion_tokens
        job = _submit(request, prompt, CHAT_DEFAULT_MAX_TOKENS)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            return _streaming(_stream(request, job, True, response_id), job.adapter)
        choices = await _collect(request, job)
        body = {
            "id": response_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text.strip()},
                    "finish_reason": finish,
                    "logprobs": None,
                }
                for i, (text, finish, _) in enumerate(choices)
            ],
            "usage": _usage(len(job.prompt_ids), sum(c[2] for c in choices)),
        }
        return JSONResponse(body, headers={"x-kubetune-adapter": job.adapter})

    @app.post("/v1/load_lora_adapter", dependencies=[admin])
    def load_adapter(request: LoadAdapterRequest) -> dict[str, Any]:
        loaded = server.load_adapter(request.lora_name, request.lora_path, sha256=request.sha256)
        return {"name": loaded.name, "sha256": loaded.sha256, "method": loaded.method, "state": "Loaded"}

    @app.post("/v1/unload_lora_adapter", dependencies=[admin])
    def unload_adapter(request: UnloadAdapterRequest) -> dict[str, Any]:
        server.unload_adapter(request.lora_name)
        return {"name": request.lora_name, "state": "Unloaded"}

    @app.put("/v1/routes", dependencies=[admin])
    def put_routes(request: RoutesRequest) -> dict[str, Any]:
        server.replace_routes({r.name: [(b.adapter, b.weight) for b in r.backends] for r in request.routes})
        return describe(server)

    return app


__all__ = ["AdapterLoadError", "SecretFile", "create_app"]
