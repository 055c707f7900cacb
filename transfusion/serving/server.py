"""The HTTP server: FastAPI over the engine thread (``EngineWorker``) and its continuous-batching scheduler.
``create_app`` only assembles it; the parts live beside it:

    state.py            ServerState (engine, worker, limits, metrics, drain; app.state.serving), the token check
    routes_admin.py     /, /health, /metrics, /v1/models
    routes_generate.py  /v1/generate (and its SSE events)
    routes_openai.py    /v1/chat/completions
    submit.py           a validated request -> prompt, sampling parameters, a queued handle (with its seed)
    stream.py           a queued request's events (cancel on disconnect, drain deadline), non-streamed answers
    sse.py              the one SSE writer of every streaming route
    openai_format.py    OpenAI's shapes: the error body, chat completions, chunks, usage, finish reasons, models
    errors.py           exceptions -> the error body;  schema.py: documented statuses, SSE events, security
    middleware.py       Drain and Gate (graceful shutdown, status counts), BodyLimit (413);  metrics.py: Prometheus

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

Shutdown (``middleware.Drain``, ``app.state.drain``): ``drain.begin(timeout)`` (``tools/serve.py`` calls it on
SIGTERM) makes new /v1 requests 503 with Retry-After and /health 503 "draining", while requests in flight go on; at
the deadline those still running end (a stream with a final ``error`` event, code 503; a JSON request with 503).
``drain.finished()`` says when nothing is in flight any more.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from transfusion.serving import routes_admin, routes_generate, routes_openai
from transfusion.serving.errors import install_error_handlers
from transfusion.serving.middleware import BodyLimit, Gate
from transfusion.serving.protocol import ServeLimits
from transfusion.serving.schema import openapi_of
from transfusion.serving.state import ServerState
from transfusion.serving.worker import EngineWorker


@asynccontextmanager
async def lifespan(app: FastAPI):
    """The engine thread starts with the app (unless the caller runs it: ``start_worker=False``) and stops with it."""
    state: ServerState = app.state.serving
    if state.start_worker and not state.worker.alive:
        state.worker.start()
    yield
    state.worker.stop()


def create_app(engine, *, model_name: str = "default", limits: ServeLimits | None = None, token: str | None = None,
               worker: EngineWorker | None = None, start_worker: bool = True) -> FastAPI:
    """The app for one engine. With ``start_worker`` its engine thread starts with the app and stops with it
    (lifespan); without, the caller runs ``app.state.worker.run()`` itself (``tools/serve.py``, on the main thread)."""
    state = ServerState.build(engine, model_name=model_name, limits=limits or ServeLimits(), token=token,
                              worker=worker, start_worker=start_worker)
    app = FastAPI(title="transfusion", version="0.1.0", lifespan=lifespan,
                  description="Interleaved text and image generation with continuous batching.")
    app.state.serving = state
    app.state.worker, app.state.metrics, app.state.drain = state.worker, state.metrics, state.drain
    app.openapi = lambda: openapi_of(app)
    install_error_handlers(app)
    for router in (routes_admin.router, routes_generate.router, routes_openai.router):  # the schema's path order
        app.include_router(router)
    app.add_middleware(BodyLimit, limit=state.limits.max_body_bytes)
    app.add_middleware(Gate, drain=state.drain, metrics=state.metrics)  # outermost: a draining server refuses first
    return app
