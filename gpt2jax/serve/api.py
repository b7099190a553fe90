"""An OpenAI-compatible HTTP API over the engine (FastAPI): completions, models, health, metrics.

    POST /v1/completions   prompt (string, strings, token ids, lists of ids), max_tokens,
                           temperature, top_p, top_k (extension), n, stop, seed, stream
    GET  /v1/models        the one served model (the checkpoint folder's name)
    GET  /health           200 while serving
    GET  /metrics          Prometheus text: queue depth, live slots, cache bytes in use,
                           tokens generated, request latency and time to first token

Errors are OpenAI's: HTTP 4xx with {"error": {"message", "type", "param", "code"}}; a full
queue is 429 with Retry-After. Stop strings are cut on the host: text that could begin a
stop string is held back until it cannot, so the stream and the whole text agree.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict

from gpt2jax import tokenizer
from gpt2jax.serve import engine as engine_lib

EOT = 50256  # <|endoftext|>: a completion ends there, as OpenAI's GPT-2-era models did
MAX_STOP_STRINGS = 4
MAX_N = 16
RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)
        self.headers = headers


def _error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that this server reads; others (user,
    logit_bias, ...) are accepted and ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None


class StopText:
    """A choice's text as its tokens arrive, cut before the first stop string."""

    def __init__(self, stops: list[str]):
        self.ids: list[int] = []
        self.stops = stops
        self.sent = 0  # characters already handed out
        self.final: str | None = None  # the whole text, once a stop string ended it

    def add(self, token: int) -> str:
        """The new text that is safe to send; sets `final` when a stop string appears."""
        self.ids.append(token)
        text = tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.final = text[:min(hits)]
            return self._take(self.final)
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = text[:len(text) - hold] if hold else text
        return self._take(safe.rstrip("\ufffd"))  # half a UTF-8 character waits

    def finish(self) -> str:
        return self._take(self.final if self.final is not None else tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        new = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return new


class Metrics:
    """The Prometheus registry of one server: engine gauges read at scrape time, plus the
    request histograms observed by the handlers."""

    def __init__(self, engine: engine_lib.Engine):
        self.registry = prometheus_client.CollectorRegistry()
        self.engine = engine
        self.registry.register(self)
        self.latency = prometheus_client.Histogram(
            "gpt2jax_request_latency_seconds", "Completion request latency",
            registry=self.registry, buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.ttft = prometheus_client.Histogram(
            "gpt2jax_time_to_first_token_seconds", "Time to a request's first token",
            registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))
        self.requests = prometheus_client.Counter(
            "gpt2jax_requests", "Completion requests by outcome", ["outcome"],
            registry=self.registry)

    def collect(self):
        e = self.engine
        for name, doc, value in (
                ("gpt2jax_queue_depth", "Requests waiting for a slot", e.queue_depth),
                ("gpt2jax_live_slots", "Slots holding a request", e.live),
                ("gpt2jax_slots", "Cache slots", e.slots),
                ("gpt2jax_cache_bytes_in_use", "Cache bytes of the live slots",
                 e.cache_bytes_in_use()),
                ("gpt2jax_cache_bytes", "Cache bytes of all slots", e.slots * e.bytes_per_slot)):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("gpt2jax_tokens_generated", "Tokens generated",
                                  value=e.tokens_generated)
        yield CounterMetricFamily("gpt2jax_steps", "Decode calls", value=e.steps)
        for name, doc, value in (
                ("gpt2jax_step_rows_computed", "Slot rows the decode calls computed",
                 e.rows_computed),
                ("gpt2jax_step_rows_live", "Slot rows that held a request", e.rows_live)):
            yield CounterMetricFamily(name, doc, value=value)
        seconds = CounterMetricFamily("gpt2jax_engine_seconds",
                                      "The engine thread's time by phase", labels=["phase"])
        for phase in ("prefill", "step", "hand_out"):
            seconds.add_metric([phase], e.seconds[phase])
        yield seconds
        finished = CounterMetricFamily("gpt2jax_requests_finished",
                                       "Requests the engine ended, by reason", labels=["reason"])
        for reason in ("length", "stop", "cancelled", "error"):
            finished.add_metric([reason], e.finished[reason])
        yield finished


def create_app(engine: engine_lib.Engine, model_id: str) -> FastAPI:
    """The FastAPI app serving `engine` as `model_id`; starts and stops the engine's thread
    with the app's lifespan (stop finishes what is in flight)."""
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="gpt2jax", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(_error_body(e.message, e.type, e.param, e.code), e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            return JSONResponse(_error_body(message, "invalid_request_error"), 400)
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(_error_body(f"{param}: {first.get('msg')}", "invalid_request_error",
                                        param), 400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": engine.slots, "live": engine.live}

    @app.get("/metrics")
    async def metrics_text():
        return Response(prometheus_client.generate_latest(metrics.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "gpt2jax"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        started = time.perf_counter()
        if body.model != model_id:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves "
                                f"{model_id!r}", param="model", code="model_not_found")
        prompts, choices = _requests(body, engine)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in choices]
        submitted = []
        try:
            for (prompt, sampling), queue in zip(choices, queues, strict=True):
                put = lambda item, q=queue: loop.call_soon_threadsafe(q.put_nowait, item)
                request = engine_lib.Request(prompt, sampling, lambda t, p=put: p(("token", t)),
                                             lambda r, p=put: p(("finish", r)))
                engine.submit(request)
                submitted.append(request)
        except engine_lib.QueueFull as e:
            for request in submitted:
                engine.cancel(request)
            metrics.requests.labels("rejected").inc()
            raise APIError(429, f"the server is at capacity ({e}): retry after "
                                f"{RETRY_AFTER_S} s", type="rate_limit_error",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        stops = _stop_strings(body.stop)
        prompt_tokens = sum(len(p) for p, _ in choices) // max(1, body.n)
        head = {"id": completion_id, "object": "text_completion", "created": created,
                "model": model_id}

        texts = [StopText(stops) for _ in choices]
        delivered = lambda: sum(len(t.ids) for t in texts)  # the tokens the texts are made of

        async def choice_events(index: int) -> AsyncIterator[tuple[str, str | None]]:
            """(text piece, finish_reason or None) as the choice's tokens arrive."""
            text = texts[index]
            while True:
                kind, value = await queues[index].get()
                if kind == "token":
                    if index == 0 and not text.ids:
                        metrics.ttft.observe(time.perf_counter() - started)
                    piece = text.add(value)
                    if text.final is not None:  # a stop string: end it now
                        engine.cancel(submitted[index])
                        yield piece, None
                        yield "", "stop"
                        return
                    if piece:
                        yield piece, None
                else:
                    yield text.finish(), {"cancelled": "stop"}.get(value, value)
                    return

        def usage(completion_tokens: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        if not body.stream:
            try:
                results = await asyncio.gather(*(_collect(choice_events(i))
                                                 for i in range(len(choices))))
            finally:
                for request in submitted:
                    engine.cancel(request)  # a no-op for finished ones; frees a dropped client's
            metrics.latency.observe(time.perf_counter() - started)
            metrics.requests.labels("ok").inc()
            return {**head, "choices": [
                {"text": (prompts[i // body.n] if body.echo else "") + text, "index": i,
                 "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(results)], "usage": usage(delivered())}

        async def events():
            try:
                merged = _merge([choice_events(i) for i in range(len(choices))])
                async for index, piece, reason in merged:
                    chunk = {**head, "choices": [{"text": piece, "index": index,
                                                  "logprobs": None, "finish_reason": reason}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                if (body.stream_options or {}).get("include_usage"):
                    chunk = {**head, "choices": [],
                             "usage": usage(delivered())}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
                metrics.requests.labels("ok").inc()
            finally:  # also when the client went away mid-stream: free the slots
                for request in submitted:
                    engine.cancel(request)
                metrics.latency.observe(time.perf_counter() - started)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def _collect(events) -> tuple[str, str]:
    pieces, last = [], None
    async for piece, reason in events:
        pieces.append(piece)
        last = reason
    return "".join(pieces), last


async def _merge(streams):
    """(index, piece, finish_reason) from several async streams as each produces them."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        async for piece, reason in stream:
            await queue.put((index, piece, reason))
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _stop_strings(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are "
                            f"allowed", param="stop")
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return stops


def _requests(body: CompletionRequest, engine: engine_lib.Engine):
    """(prompt texts for echo, [(token ids, Sampling)] one per choice), every field checked
    with OpenAI's message shape before anything is queued."""
    _stop_strings(body.stop)
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise APIError(400, f"temperature={body.temperature} is outside [0, 2]",
                       param="temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise APIError(400, f"top_p={body.top_p} is outside (0, 1]", param="top_p")
    if body.top_k is not None and not 0 <= body.top_k <= engine.config.vocab_size:
        raise APIError(400, f"top_k={body.top_k} is outside [0, {engine.config.vocab_size}]",
                       param="top_k")
    if not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n={body.n} is outside [1, {MAX_N}]", param="n")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise APIError(400, f"seed={body.seed} must be in [0, 2^63)", param="seed")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens < 1:
        raise APIError(400, f"max_tokens={max_tokens} must be at least 1", param="max_tokens")
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty: send a string or a list of token ids",
                       param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    ids = [tokenizer.encode(p) or [EOT] if isinstance(p, str) else list(p) for p in prompt]
    seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "big")
    choices = []
    for p, tokens in enumerate(ids):
        for j in range(body.n):
            sampling = engine_lib.Sampling(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
                seed=(seed + p * body.n + j) % 2**63,
                stop_ids=(EOT,) if EOT < engine.config.vocab_size else ())
            try:
                engine.check(tokens, sampling)
            except ValueError as e:
                code = "context_length_exceeded" if "context" in str(e) else None
                param = "max_tokens" if "max_tokens" in str(e) else "prompt"
                raise APIError(400, str(e), param=param, code=code) from None
            choices.append((tokens, sampling))
    # echo's prompt text, decoded once every id is known to be in the vocabulary
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt]
    return texts, choices
