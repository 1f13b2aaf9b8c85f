"""Dynamic batching for the serving runtime: a bounded queue, one scheduler thread, batched ``generate``.

HTTP handlers :meth:`Batcher.submit` a :class:`GenerationRequest` (one prompt, ``n`` choices) and read
its events from an asyncio queue. The scheduler thread takes every waiting request (up to
``max_batch_size`` sequences), waits up to ``max_wait_s`` for more when the server is busy, splits
them into groups that one ``generate`` call can serve (all LoRA adapters and the base together
through PEFT's mixed-adapter batches; any other adapter on its own) and runs the groups one after
the other. A new request waits at most one batch for its turn: this is dynamic batching, not
continuous batching (sequences do not join a batch that is already decoding).

Requests in one batch keep their own sampling settings. ``generate`` runs greedy, and
:class:`_RowSampler`, a logits processor, draws each sampled row's token itself (temperature, top-p,
its own seeded generator), so a seeded request gives the same text whatever it is batched with.
:class:`_RowTracker`, a stopping criterion, sees each new token first: it counts tokens, finds EOS
and stop sequences, streams text deltas and ends each row on its own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubetune.worker.serving import ServingError, step_timer

if TYPE_CHECKING:
    from kubetune.worker.serving import ModelServer

logger = logging.getLogger("kubetune.serve.batching")


class QueueFull(ServingError):
    """The bounded queue is full: the client should retry later (429, as OpenAI's rate limit)."""

    status, kind, code = 429, "rate_limit_error", "queue_full"


class NotReady(ServingError):
    """The server cannot take requests (starting or stopping): 503."""

    status, kind, code = 503, "service_unavailable", "not_ready"


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (OpenAI's names). ``temperature`` 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (for benchmarks)


@dataclass(eq=False)
class GenerationRequest:
    """A prompt (token ids) for one served adapter, ``n`` choices; events go to ``events``.

    Events, in order per choice: ``("delta", index, text)`` (only when ``stream``), then
    ``("finish", index, reason, completion_tokens, text)``; after every choice ``("done",)``; or
    ``("error", ServingError)`` instead of all of these.
    """

    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)

    def emit(self, *event: Any) -> None:
        if self.loop is None:
            self.events.put_nowait(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        """The client went away: its rows stop at the next token."""
        self.cancelled = True


class _Row:
    """One choice being decoded: its tokens, its text and what it has streamed so far."""

    def __init__(self, request: GenerationRequest, index: int, decode: Callable[[list[int]], str]) -> None:
        self.request, self.index, self._decode = request, index, decode
        params = request.params
        self.token_ids: list[int] = []
        self.completion_tokens = 0
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finished = False
        # Text is decoded every step only when someone looks at it before the end.
        self.needs_text = request.stream or bool(params.stop)
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self.generator: Any = None
        if params.temperature > 0:
            import torch

            seed = params.seed + index if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)

    def append(self, token: int, eos_ids: frozenset[int]) -> None:
        if self.request.cancelled:
            self._finish("cancelled")
            return
        self.completion_tokens += 1
        if token in eos_ids:
            self._finish("stop")
            return
        self.token_ids.append(token)
        if self.needs_text:
            self.text = self._decode(self.token_ids)
            stop = self._find_stop()
            if stop is not None:
                self.text = self.text[:stop]
                self._finish("stop")
                return
            # Hold back what could be the start of a stop sequence, and half a UTF-8 character.
            visible = len(self.text) - self._holdback
            while visible > self.sent and self.text[visible - 1] == "\ufffd":
                visible -= 1
            self._flush(visible)
        if self.completion_tokens >= self.request.params.max_tokens:
            self._finish("length")

    def _find_stop(self) -> int | None:
        start = max(0, self.sent - self._holdback - 1)
        found = [i for s in self.request.params.stop if s and (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _flush(self, upto: int) -> None:
        if self.request.stream and upto > self.sent:
            self.request.emit("delta", self.index, self.text[self.sent : upto])
            self.sent = upto

    def _finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        if not self.needs_text:
            self.text = self._decode(self.token_ids)
        self._flush(len(self.text))
        self.request.emit("finish", self.index, reason, self.completion_tokens, self.text)


def _row_tracker(rows: list[_Row], eos_ids: frozenset[int]) -> Any:
    from transformers import StoppingCriteria

    class _RowTracker(StoppingCriteria):
        """Per-row stopping: returns one flag per row (transformers stops each row on its own)."""

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            for row, token in zip(rows, input_ids[:, -1].tolist(), strict=True):
                if not row.finished:
                    row.append(int(token), eos_ids)
            return torch.tensor([row.finished for row in rows], dtype=torch.bool, device=input_ids.device)

    return _RowTracker()


def _row_sampler(rows: list[_Row], eos_ids: frozenset[int]) -> Any:
    from transformers import LogitsProcessor

    no_eos = [i for i, row in enumerate(rows) if row.request.params.ignore_eos]
    eos = sorted(eos_ids)

    class _RowSampler(LogitsProcessor):
        """Samples each non-greedy row with its own settings and generator; generate then takes the
        argmax, which is that token. Greedy rows pass through untouched."""

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            import torch

            if no_eos and eos:
                scores[torch.tensor(no_eos)[:, None], torch.tensor(eos)[None, :]] = float("-inf")
            for i, row in enumerate(rows):
                params = row.request.params
                if row.generator is None or row.finished:
                    continue
                logits = scores[i].float() / params.temperature
                if params.top_p < 1.0:
                    ordered, order = torch.sort(logits, descending=True)
                    cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
                    # Keep the smallest prefix whose mass reaches top_p (always the first token).
                    drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p
                    logits[order[drop]] = float("-inf")
                probs = torch.softmax(logits, dim=-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=row.generator))
                scores[i] = float("-inf")
                scores[i, token] = 0.0
            return scores

    return _RowSampler()


class Batcher:
    """The bounded request queue and the scheduler thread that serves it in batches.

    ``max_batch_size``: sequences (choices) per ``generate`` call, default 16. ``max_queue``: requests
    waiting beyond the running batch before :class:`QueueFull` (429), default 256. ``max_wait_s``:
    how long a batch may wait for the demand seen when the previous one ended (its sequences plus
    those queued then), default 100 ms and never more than a quarter of the previous batch's
    duration: clients that come back together are served together, and a lone client pays no wait.
    """

    def __init__(
        self,
        server: ModelServer,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_wait_s: float = 0.100,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        self.server = server
        self.max_batch_size, self.max_queue, self.max_wait_s = max_batch_size, max_queue, max_wait_s
        self._queue: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._last_batch_rows = 0
        self._demand = 0  # sequences of the last batch plus those queued when it ended
        self._last_batch_seconds = 0.0
        self.batches = 0  # generate calls made, for metrics and tests
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        #: Called after every generate with (sequences, seconds, group), e.g. to feed metrics.
        self.observer: Callable[[int, float, Hashable], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="kubetune-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._running = False
            pending, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for request in pending:
            request.emit("error", NotReady("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, request: GenerationRequest) -> None:
        """Queue ``request``; raises :class:`QueueFull` or :class:`NotReady` instead of waiting."""
        if request.n > self.max_batch_size:
            raise ServingError(f"n={request.n} exceeds this server's batch size {self.max_batch_size}")
        with self._cond:
            if not self._running:
                raise NotReady("the server is not accepting requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued; retry later")
            self._queue.append(request)
            self._cond.notify()

    # -- the scheduler thread -------------------------------------------------------------------

    def _take(self) -> list[GenerationRequest]:
        """Whole requests, oldest first, up to ``max_batch_size`` sequences; blocks for the first."""
        with self._cond:
            while self._running and not self._queue:
                self._cond.wait()
            if not self._running:
                return []
            # Wait for the demand seen when the previous batch ended (its clients, which tend to come
            # back at once, plus those already waiting), never longer than max_wait_s: without it
            # 8 clients settle into two alternating batches of 4. A lone client never waits.
            # The wait is also at most a quarter of the previous batch's duration: worth it to grow
            # a batch, never a large share of a request's latency.
            target = min(self.max_batch_size, self._demand)
            wait = min(self.max_wait_s, self._last_batch_seconds / 4)
            if target > 1 and wait > 0:
                deadline = time.monotonic() + wait
                while self._running and sum(r.n for r in self._queue) < target:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                logger.debug(
                    "batch: waited %.1f ms of %.1f for %d sequences, %d queued",
                    1000 * (time.monotonic() - deadline + wait),
                    1000 * wait,
                    target,
                    sum(r.n for r in self._queue),
                )
            taken: list[GenerationRequest] = []
            rows = 0
            while self._queue and rows + self._queue[0].n <= self.max_batch_size:
                request = self._queue.popleft()
                if request.cancelled:
                    continue
                taken.append(request)
                rows += request.n
            return taken

    def _loop(self) -> None:
        while True:
            requests = self._take()
            if not requests:
                if not self._running:
                    return
                continue
            self._last_batch_rows = sum(r.n for r in requests)
            groups: dict[Hashable, list[GenerationRequest]] = {}
            for request in requests:
                try:
                    key = self.server.batch_group(request.adapter)
                except ServingError as exc:
                    request.emit("error", exc)
                    continue
                groups.setdefault(key, []).append(request)
            started = time.monotonic()
            for key, members in groups.items():
                self._run(key, members)
            with self._cond:
                self._last_batch_seconds = time.monotonic() - started
                self._demand = self._last_batch_rows + sum(r.n for r in self._queue)

    def _run(self, key: Hashable, requests: list[GenerationRequest]) -> None:
        server = self.server
        rows = [_Row(r, i, server.decode) for r in requests for i in range(r.n)]
        started = time.monotonic()
        timer = step_timer()
        try:
            server.generate_rows(
                key,
                adapters=[row.request.adapter for row in rows],
                prompts=[row.request.prompt_ids for row in rows],
                max_new_tokens=max(row.request.params.max_tokens for row in rows),
                logits_processor=_row_sampler(rows, server.eos_ids),
                stopping_criteria=[timer, _row_tracker(rows, server.eos_ids)],
            )
        except ServingError as exc:
            for request in requests:
                request.emit("error", exc)
            return
        except Exception as exc:  # one bad batch must not stop the scheduler
            logger.exception("batch for %s failed", key)
            error = ServingError(f"generation failed: {type(exc).__name__}: {exc}")
            error.status, error.kind, error.code = 500, "server_error", "generation_failed"
            for request in requests:
                request.emit("error", error)
            return
        finally:
            self.batches += 1
            self.batch_sizes[len(rows)] += 1
            if self.observer is not None:
                self.observer(len(rows), time.monotonic() - started, key)
        if (ms := timer.ms_per_token()) is not None:
            server.observe_decode({row.request.adapter for row in rows}, ms)
        for row in rows:
            if not row.finished:  # generate hit its own limit first
                row._finish("length")
        for request in requests:
            request.emit("done")
