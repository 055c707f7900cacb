"""What runs around every request, before any route: the graceful-shutdown state (``Drain``) and its gate (``Gate``,
outermost: a draining server refuses new /v1 requests with 503 and Retry-After, counts what is in flight, and counts
every status in /metrics by route), and the body-size limit (``BodyLimit``: 413 before a byte reaches pydantic).

Both middlewares are raw ASGI rather than FastAPI middleware: they answer before routing (so a refused request never
reaches validation or the engine), and BodyLimit has to see the body as it streams in."""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING

from transfusion.serving.openai_format import error_body

if TYPE_CHECKING:
    from transfusion.serving.metrics import Metrics

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

    def __init__(self, app, drain: Drain, metrics: Metrics) -> None:
        self.app, self.drain, self.metrics = app, drain, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"  # never the raw path: labels must stay a bounded set
        if self.drain.draining and path.startswith("/v1/"):
            self.metrics.requests.labels(route, "503").inc()
            retry = str(max(1, math.ceil(self.drain.remaining())))
            return await send_json(send, 503, "the server is shutting down; retry later (another instance)",
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
            return await send_json(send, 413, f"request body above {self.limit} bytes")
        chunks, size = [], 0  # read the body here (chunked bodies declare no length), at most limit bytes
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await send_json(send, 413, f"request body above {self.limit} bytes")
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


async def send_json(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """The one error body, sent from ASGI (no app, no Response object: this runs before routing)."""
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
