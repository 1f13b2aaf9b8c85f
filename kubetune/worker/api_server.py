"""The OpenAI-compatible HTTP API over a :class:`~kubetune.worker.serving.ModelServer` (FastAPI).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (non-streaming),
``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (the vLLM/AIBrix hot-swap contract; any
kubetune artifact format loads through them, not only LoRA; ``lora_path`` may be a URI),
``PUT /v1/routes`` (replace the weighted aliases), ``GET /v1/adapters``, ``GET /health``
(readiness: the base is loaded) and ``GET /metrics`` (Prometheus). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from kubetune.worker.serving import ModelServer, ServingError, describe
from kubetune.worker.serving_plan import RouteEntry


class _Request(BaseModel):
    # Clients send many optional OpenAI fields we do not use (logprobs, user...); accept and ignore them.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Request):
    prompt: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=63)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    lora_name: str


class RoutesRequest(BaseModel):
    routes: list[RouteEntry]


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": status}},
    )


def create_app(server: ModelServer) -> FastAPI:
    app = FastAPI(title="kubetune serving", version="v1")
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

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.kind)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "base": server.base_name, "adapters": len(server.adapters)}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        created = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "kubetune",
                "root": server.base_name,
            }
            for name in server.model_names()
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    def adapters() -> dict[str, Any]:
        return describe(server)

    def _complete(request: _Request, prompt: str) -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        try:
            result = server.generate(
                request.model,
                prompt,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=request.stops(),
                seed=request.seed,
            )
        except ServingError as exc:
            requests_total.labels(request.model, "", str(exc.status)).inc()
            raise
        elapsed = time.monotonic() - started
        requests_total.labels(request.model, result["served_by"], "200").inc()
        tokens_total.labels(result["served_by"]).inc(result["completion_tokens"])
        latency.labels(result["served_by"]).observe(elapsed)
        return result, elapsed

    def _usage(result: dict[str, Any]) -> dict[str, int]:
        return {
            "prompt_tokens": result["prompt_tokens"],
            "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        }

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> JSONResponse:
        result, _ = _complete(request, request.prompt)
        body = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "text": result["text"],
                    "finish_reason": result["finish_reason"],
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
        }
        return JSONResponse(body, headers={"x-kubetune-adapter": result["served_by"]})

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest) -> JSONResponse:
        prompt = server.render_chat([m.model_dump() for m in request.messages])
        result, _ = _complete(request, prompt)
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["text"].strip()},
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": _usage(result),
        }
        return JSONResponse(body, headers={"x-kubetune-adapter": result["served_by"]})

    @app.post("/v1/load_lora_adapter")
    def load_adapter(request: LoadAdapterRequest) -> dict[str, Any]:
        loaded = server.load_adapter(request.lora_name, request.lora_path)
        return {"name": loaded.name, "sha256": loaded.sha256, "method": loaded.method, "state": "Loaded"}

    @app.post("/v1/unload_lora_adapter")
    def unload_adapter(request: UnloadAdapterRequest) -> dict[str, Any]:
        server.unload_adapter(request.lora_name)
        return {"name": request.lora_name, "state": "Unloaded"}

    @app.put("/v1/routes")
    def put_routes(request: RoutesRequest) -> dict[str, Any]:
        server.replace_routes({r.name: [(b.adapter, b.weight) for b in r.backends] for r in request.routes})
        return describe(server)

    return app
