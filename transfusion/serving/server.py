"""The HTTP server: FastAPI over the engine thread (``EngineWorker``) and its continuous-batching scheduler.

    python tools/serve.py --export runs/shapes_tiny/export            # http://127.0.0.1:8000/

Routes:
    GET  /                      the web page (prompt, image upload, streamed answer with previews, stop button)
    POST /v1/generate           segments in; JSON, or Server-Sent Events with "stream": true
    POST /v1/chat/completions   OpenAI-shaped (text and image_url data-URI parts in and out; SSE chunks when streamed)
    GET  /v1/models             the served export ("default" is accepted as its alias)
    GET  /health                200 while the engine thread lives and the server is not draining, else 503
    GET  /metrics               Prometheus: queue depth, running batch, tokens/s, images/s, TTFT and per-image
                                latency histograms, requests by route and status, cancellations
    GET  /openapi.json, /docs   the schema: every route's statuses and bodies (requests strict, with examples)

SSE events of /v1/generate: ``text`` {"text"}, ``image_start`` {"index", "passes"}, ``preview`` {"png", "pass",
"passes"} (when ``preview_every`` > 0), ``image`` {"png", "width", "height", "index", "seconds"}, ``done``
{"id", "finish_reason", "usage", "seed"}, ``error`` {"error", "code"} (the last event of a stream that cannot finish).
A client that disconnects cancels its request; its slot is free at the next engine step. Errors are one JSON object
``{"error": {"message", "code"[, "detail"]}}`` (``ErrorBody``): 400 / 413 limits, 401 token, 404 model, 422 shape
(strict types), 429 queue full (with Retry-After), 500 engine failure, 503 engine stopped or draining. The OpenAPI
schema (``/openapi.json``) lists every status of every route with its body, and the SSE events (``x-sse-events``).

Every answer carries the seed it ran with: a request without one gets a fresh seed, and sending that seed back
replays it.

Shutdown (``Drain``): ``drain.begin(timeout)`` (``tools/serve.py`` calls it on SIGTERM) makes new /v1 requests 503
with Retry-After and /health 503 "draining", while requests in flight go on; at the deadline those still running end
(a stream with a final ``error`` event, code 503; a JSON request with 503). ``drain.finished()`` says when nothing
is in flight any more.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfusion.serving.protocol import (
    GENERATE_EVENTS,
    BadRequest,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Health,
    ImageSegment,
    ModelList,
    Options,
    ServeLimits,
    check_options,
    decode_image,
    fresh_seed,
    png_payload,
)
from transfusion.serving.scheduler import Event, SamplingParams, Scheduler
from transfusion.serving.worker import EngineWorker, Handle, QueueFull

STATIC = Path(__file__).parent / "static"
ROUTES = ("/v1/generate", "/v1/chat/completions", "/v1/models")  # the /metrics label of a request (else "other")


class Drain:
    """Graceful shutdown. ``begin(timeout)``: from now on new /v1 requests get 503 (Retry-After) and /health says
    "draining"; requests in flight go on until ``timeout`` seconds from now, then end (``expired``). ``active`` counts
    HTTP requests in flight (kept by ``Gate``); ``finished()`` is true once draining and none is left."""

    def __init__(self) -> None:
        self.deadline: float | None = None  # time.monotonic() at which requests in flight are ended
        self.active = 0  # written on the event loop only

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self, timeout: float) -> None:
        """Start draining (a second call can only bring the deadline closer: a second SIGTERM ends things now)."""
        deadline = time.monotonic() + max(0.0, timeout)
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)

    def remaining(self) -> float:
        return math.inf if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def finished(self, grace: float = math.inf) -> bool:
        """Draining, and no request in flight (or ``grace`` seconds past the deadline, whatever is still open)."""
        if self.deadline is None:
            return False
        return self.active == 0 or time.monotonic() >= self.deadline + grace


class Gate:
    """ASGI middleware, outermost: while draining, a /v1 request gets 503 with Retry-After before anything else runs;
    every other request is counted in flight (``Drain.active``) until its answer is sent, and its status is counted in
    /metrics by route."""

    def __init__(self, app, drain: Drain, metrics: "Metrics") -> None:
        self.app, self.drain, self.metrics = app, drain, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"  # never the raw path: labels must stay a bounded set
        if self.drain.draining and path.startswith("/v1/"):
            self.metrics.requests.labels(route, "503").inc()
            retry = str(max(1, math.ceil(self.drain.remaining())))
            return await _send_json(send, 503, "the server is shutting down; retry later (another instance)",
                                    headers=[(b"retry-after", retry.encode())])
        status = {"code": 0}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.drain.active += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.drain.active -= 1
            if status["code"]:
                self.metrics.requests.labels(route, str(status["code"])).inc()


class BodyLimit:
    """ASGI middleware: a request body above ``limit`` bytes gets 413 before the app reads it (declared or streamed).
    Only methods with a body are looked at (the GET routes read none)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_json(send, 413, f"request body above {self.limit} bytes")
        chunks, size = [], 0  # read the body here (chunked bodies declare no length), at most limit bytes
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_json(send, 413, f"request body above {self.limit} bytes")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnects

        await self.app(scope, replay, send)


async def _send_json(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": {"message": message, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def append_text(parts: list[dict], delta: str) -> None:
    """Collect streamed text into content parts: consecutive deltas join one text part."""
    if parts and parts[-1]["type"] == "text":
        parts[-1]["text"] += delta
    else:
        parts.append({"type": "text", "text": delta})


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The one error body (``ErrorBody``)."""
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status, headers=headers)


# -- what the OpenAPI schema says each route answers -----------------------------------------------------------------
ERRORS = {
    400: "the request is well-formed but cannot be served as asked: above a server limit (max_tokens, steps, "
         "max_images, guidance, prompt length, input images), a sampler this model cannot use, an undecodable image",
    401: "missing or wrong bearer token (only when the server runs with --token)",
    404: "the model named is not served here (the served id and 'default' are)",
    413: "the request body, or an image's declared size, is above the server's limit",
    422: "the body does not match this schema: unknown fields, values out of bounds, or of another JSON type than "
         "declared (types are strict: 0 is not false, \"5\" is not 5); 'detail' lists where",
    429: "the queue is full: retry after Retry-After seconds",
    499: "the client closed the connection before the answer was ready (logged; that client never reads it)",
    500: "the engine failed while generating this request",
    503: "the engine is not running, or the server is shutting down (then with Retry-After)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
SSE_NOTE = ("; with \"stream\": true, Server-Sent Events (text/event-stream) whose events and data are listed in "
            "x-sse-events")


def documented(codes: tuple[int, ...], ok: type[BaseModel], description: str,
               events: dict[str, dict] | None = None) -> dict[int | str, dict]:
    """FastAPI ``responses=``: 200 with ``ok`` (and SSE ``events`` when the route streams), and every error status in
    ``codes`` with ``ErrorBody``."""
    out: dict[int | str, dict] = {200: {"model": ok, "description": description + (SSE_NOTE if events else "")}}
    if events:
        out[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}, "x-sse-events": events}}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": ERRORS[code]}
        if code in (429, 503):
            out[code]["headers"] = RETRY_AFTER
    return out


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


GENERATE_SSE = {name: ref(model) for name, model in GENERATE_EVENTS.items()}
CHAT_SSE = {"message": {"anyOf": [ref(ChatCompletionChunk), ref(ErrorBody), {"const": "[DONE]"}],
                        "description": "chunks, an error object if the stream cannot finish, then [DONE]"}}


def add_event_schemas(schema: dict, models: list[type[BaseModel]]) -> None:
    """Put the SSE event models (named in x-sse-events, which FastAPI does not read) into the schema's components."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in js.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, js)


class Metrics:
    """Prometheus metrics in the app's own registry (no process-global state)."""

    def __init__(self, worker: EngineWorker) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = r = CollectorRegistry()
        self.worker = worker
        Gauge("transfusion_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: worker.load()["queued"])
        Gauge("transfusion_running_requests", "requests in the running batch", registry=r).set_function(
            lambda: worker.load()["running"])
        Gauge("transfusion_tokens_per_second", "text tokens sampled per second (last 10 s)", registry=r).set_function(
            lambda: worker.tokens_window.rate(time.perf_counter()))
        Gauge("transfusion_images_per_second", "images finished per second (last 10 s)", registry=r).set_function(
            lambda: worker.images_window.rate(time.perf_counter()))
        self.ttft = Histogram("transfusion_time_to_first_token_seconds", "submit to first sampled token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.image_s = Histogram("transfusion_image_seconds", "BOI to decoded image",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.requests = Counter("transfusion_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)

        class SchedulerCounters:
            def collect(self):
                s = worker.scheduler.stats
                for name, value, doc in (("tokens", s.tokens, "text tokens sampled"),
                                         ("images", s.images, "images generated"),
                                         ("finished", s.finished, "requests finished"),
                                         ("cancellations", s.cancelled, "requests cancelled (client gone)"),
                                         ("failed", s.failed, "requests failed"),
                                         ("engine_steps", s.steps, "scheduler steps")):
                    yield CounterMetricFamily(f"transfusion_{name}", doc, value=value)
                yield GaugeMetricFamily("transfusion_peak_batch", "most requests running at once", value=s.peak_batch)

        r.register(SchedulerCounters())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def create_app(engine, *, model_name: str = "default", limits: ServeLimits | None = None, token: str | None = None,
               worker: EngineWorker | None = None, start_worker: bool = True) -> FastAPI:
    """The app for one engine. With ``start_worker`` its engine thread starts with the app and stops with it
    (lifespan); without, the caller runs ``app.state.worker.run()`` itself (``tools/serve.py``, on the main thread)."""
    from contextlib import asynccontextmanager

    limits = limits or ServeLimits()
    worker = worker or EngineWorker(Scheduler(engine, max_batch=limits.max_batch), max_queue=limits.max_queue)
    metrics = Metrics(worker)
    drain = Drain()
    sample_cfg = getattr(engine.cfg, "sample", None)
    default_steps = getattr(sample_cfg, "steps", 50)
    default_guidance = getattr(sample_cfg, "guidance", 2.0)
    samplers = tuple(engine.schedule.samplers)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        if start_worker and not worker.alive:
            worker.start()
        yield
        worker.stop()

    app = FastAPI(title="transfusion", version="0.1.0", lifespan=lifespan,
                  description="Interleaved text and image generation with continuous batching.")
    app.state.worker, app.state.metrics, app.state.drain = worker, metrics, drain

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            add_event_schemas(schema, [*GENERATE_EVENTS.values(), ChatCompletionChunk, ErrorBody])
            if token is not None:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, item in schema["paths"].items():
                    if path.startswith("/v1/"):
                        for operation in item.values():
                            operation["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        """401 / 429 / 503 raised by the routes, and 404 / 405 of unknown routes: the one error body."""
        return error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest):
        return error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        """422 with where and what, never echoing the input (it may be huge, or NaN / inf that JSON cannot carry)."""
        detail = [{"loc": [str(x) for x in err.get("loc", ())], "msg": str(err.get("msg", "")),
                   "type": str(err.get("type", ""))} for err in e.errors()[:20]]
        first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
        message = f"{'.'.join(first['loc'][1:]) or 'body'}: {first['msg']}"
        return JSONResponse({"error": {"message": message, "code": 422, "detail": detail}}, status_code=422)

    async def authorised(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    # -- turning a request into scheduler input ----------------------------------------------------------------------
    def prompt_of(segments) -> list:
        images = sum(isinstance(s, ImageSegment) for s in segments)
        if images > limits.max_input_images:
            raise BadRequest(f"{images} input images; this server takes at most {limits.max_input_images}")
        out, length = [], 1  # BOS
        for seg in segments:
            if isinstance(seg, ImageSegment):
                out.append(decode_image(seg.image, engine.image_size, limits))
                length += engine.num_patches + 2
            else:
                if len(seg.text) > 4 * limits.max_prompt_tokens + 16:
                    raise BadRequest(f"prompt longer than {limits.max_prompt_tokens} tokens")
                out.append(seg.text)
                length += len(engine.tok.encode(seg.text))
        if length > limits.max_prompt_tokens:
            raise BadRequest(f"prompt of {length} tokens is longer than this server's {limits.max_prompt_tokens}")
        return out

    def params_of(o: Options, seed: int) -> SamplingParams:
        check_options(o, limits, samplers)
        return SamplingParams(max_tokens=o.max_tokens, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                              stop=tuple(o.stop), max_images=o.max_images, steps=o.steps or default_steps,
                              guidance=default_guidance if o.guidance is None else o.guidance, sampler=o.sampler,
                              guidance_schedule=o.guidance_schedule, seed=seed, preview_every=o.preview_every,
                              start_with_image=o.start_with_image, ignore_eos=o.ignore_eos)

    async def start(segments, options: Options) -> tuple[Handle, int]:
        """Queue the request; (its handle, the seed it runs with: the request's own, else a fresh one)."""
        if not worker.alive:
            raise HTTPException(503, f"the engine is not running ({worker.error or 'stopped'})")
        seed = fresh_seed() if options.seed is None else options.seed
        params = params_of(options, seed)
        prompt = await asyncio.to_thread(prompt_of, segments)  # image decoding off the event loop
        try:
            return worker.submit(prompt, params, asyncio.get_running_loop()), seed
        except QueueFull as e:
            raise HTTPException(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from None

    shutting_down = "the server shut down before this request finished"

    async def events(handle: Handle, request: Request) -> AsyncIterator[Event]:
        """The request's events; cancels it if the client goes away (streams end by cancellation of this
        generator; a non-streamed wait polls the connection), and ends it with a ``shutdown`` event when the drain
        deadline passes."""
        try:
            while not handle.finished:
                if drain.expired():
                    yield Event(handle.request_id, "shutdown", shutting_down)
                    return
                try:
                    event = await asyncio.wait_for(handle.__anext__(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event.kind == "image":
                    metrics.image_s.observe(event.data["seconds"])
                elif event.kind == "done" and event.data["time_to_first_token"] is not None:
                    metrics.ttft.observe(event.data["time_to_first_token"])
                yield event
        finally:
            if not handle.finished:
                worker.cancel(handle)

    def sse(name: str | None, data: Any) -> bytes:
        head = f"event: {name}\n" if name else ""
        return f"{head}data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()

    def image_payload(event: Event) -> dict:
        d = event.data
        if event.kind == "preview":
            return png_payload(d["image"], **{"pass": d["pass"], "passes": d["passes"]})
        return png_payload(d["image"], index=d["index"], seconds=round(d["seconds"], 4))

    sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    # -- routes ----------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", responses={200: {"model": Health, "description": "the engine thread runs"},
                                   503: {"model": Health, "description": "the engine stopped, or the server drains"}})
    async def health():
        status = "engine stopped" if not worker.alive else "draining" if drain.draining else "ok"
        body = {"status": status, **worker.load(), "model": model_name}
        if worker.error:
            body["error"] = worker.error
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    auth = (401,) if token is not None else ()

    @app.get("/v1/models", dependencies=[Depends(authorised)],
             responses=documented((*auth, 503), ModelList, "the served model"))
    async def models():
        h, w = engine.image_size
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "transfusion", "aliases": ["default"],
                                            "image_size": [h, w], "max_batch": limits.max_batch,
                                            "samplers": list(samplers), "default_steps": default_steps,
                                            "default_guidance": default_guidance}]}

    @app.post("/v1/generate", dependencies=[Depends(authorised)],
              responses=documented((400, *auth, 413, 422, 429, 499, 500, 503), GenerateResponse,
                                   "the answer: text and image segments in order", GENERATE_SSE))
    async def generate(body: GenerateRequest, request: Request):
        handle, seed = await start(body.segments, body)
        rid = f"gen-{uuid.uuid4().hex[:16]}"
        if body.stream:
            async def stream():
                async for event in events(handle, request):
                    if event.kind == "text":
                        yield sse("text", {"text": event.data})
                    elif event.kind == "image_start":
                        yield sse("image_start", event.data)
                    elif event.kind in ("preview", "image"):
                        yield sse(event.kind, await asyncio.to_thread(image_payload, event))
                    elif event.kind == "done":
                        yield sse("done", {"id": rid, "finish_reason": event.data["finish_reason"],
                                           "usage": event.data, "seed": seed})
                    elif event.kind == "failed":
                        yield sse("error", {"error": event.data, "code": 500})
                    elif event.kind == "shutdown":
                        yield sse("error", {"error": event.data, "code": 503})
            return StreamingResponse(stream(), media_type="text/event-stream", headers=sse_headers)
        output: list[dict] = []
        async for event in events(handle, request):
            if event.kind == "text":
                append_text(output, event.data)
            elif event.kind == "image":
                output.append({"type": "image", **image_payload(event)})
            elif event.kind == "done":
                return {"id": rid, "output": output, "finish_reason": event.data["finish_reason"],
                        "usage": event.data, "seed": seed}
            elif event.kind == "failed":
                return error(500, f"generation failed: {event.data}")
            elif event.kind == "shutdown":
                return error(503, event.data, headers={"Retry-After": "1"})
        return error(499, "client closed the request")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)],
              responses=documented((400, *auth, 404, 413, 422, 429, 499, 500, 503), ChatCompletion,
                                   "OpenAI's chat.completion (content: a string, or parts when images are in it), "
                                   "plus the seed", CHAT_SSE))
    async def chat(body: ChatRequest, request: Request):
        if body.model not in (model_name, "default"):
            return error(404, f"model {body.model!r} is not served here (serving {model_name!r}, alias 'default')")
        try:
            options = body.options()
        except ValidationError as e:  # the chat fields did not make valid options
            raise BadRequest(f"invalid options: {' '.join(str(e).split())[:300]}") from None
        handle, seed = await start(body.segments(), options)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        finish = {"eos": "stop", "stop": "stop", "length": "length"}

        def usage(d: dict) -> dict:
            return {"prompt_tokens": d["prompt_tokens"], "completion_tokens": d["tokens"],
                    "total_tokens": d["prompt_tokens"] + d["tokens"], "images": d["images"],
                    "seconds": round(d["seconds"], 4)}

        def image_part(event: Event) -> dict:
            return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_payload(event)["png"]}}

        if body.stream:
            def chunk(delta: dict, reason: str | None = None, **extra) -> bytes:
                return sse(None, {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                                  "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], "seed": seed,
                                  **extra})

            async def stream():
                yield chunk({"role": "assistant", "content": ""})
                async for event in events(handle, request):
                    if event.kind == "text":
                        yield chunk({"content": event.data})
                    elif event.kind == "image":
                        yield chunk({"content": [await asyncio.to_thread(image_part, event)]})
                    elif event.kind == "done":
                        yield chunk({}, finish[event.data["finish_reason"]])
                        if body.stream_options and body.stream_options.include_usage:
                            yield sse(None, {"id": rid, "object": "chat.completion.chunk", "created": now,
                                             "model": model_name, "choices": [], "usage": usage(event.data),
                                             "seed": seed})
                    elif event.kind == "failed":
                        yield sse(None, {"error": {"message": event.data, "code": 500}})
                    elif event.kind == "shutdown":
                        yield sse(None, {"error": {"message": event.data, "code": 503}})
                yield b"data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream", headers=sse_headers)
        parts: list[dict] = []
        async for event in events(handle, request):
            if event.kind == "text":
                append_text(parts, event.data)
            elif event.kind == "image":
                parts.append(image_part(event))
            elif event.kind == "done":
                text_only = all(p["type"] == "text" for p in parts)
                content = "".join(p["text"] for p in parts) if text_only else parts
                return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": finish[event.data["finish_reason"]]}],
                        "usage": usage(event.data), "seed": seed}
            elif event.kind == "failed":
                return error(500, f"generation failed: {event.data}")
            elif event.kind == "shutdown":
                return error(503, event.data, headers={"Retry-After": "1"})
        return error(499, "client closed the request")

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(Gate, drain=drain, metrics=metrics)  # outermost: a draining server refuses before anything
    return app
