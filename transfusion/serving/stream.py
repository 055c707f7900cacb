"""A queued request's events as the HTTP layer sees them: ``events`` (cancels the request when its client goes away,
ends it with a ``shutdown`` event at the drain deadline, feeds the latency histograms), and ``collect`` (the whole
answer of a non-streamed request, or the error response that ends it early). Streamed requests go through
``sse.sse_response`` instead."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from transfusion.serving.errors import error
from transfusion.serving.scheduler import Event
from transfusion.serving.state import ServerState
from transfusion.serving.worker import Handle

SHUTTING_DOWN = "the server shut down before this request finished"


async def events(state: ServerState, handle: Handle, request: Request) -> AsyncIterator[Event]:
    """The request's events; cancels it if the client goes away (streams end by cancellation of this
    generator; a non-streamed wait polls the connection), and ends it with a ``shutdown`` event when the drain
    deadline passes."""
    try:
        while not handle.finished:
            if state.drain.expired():
                yield Event(handle.request_id, "shutdown", SHUTTING_DOWN)
                return
            try:
                event = await asyncio.wait_for(handle.__anext__(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if event.kind == "image":
                state.metrics.image_s.observe(event.data["seconds"])
            elif event.kind == "done" and event.data["time_to_first_token"] is not None:
                state.metrics.ttft.observe(event.data["time_to_first_token"])
            yield event
    finally:
        if not handle.finished:
            state.worker.cancel(handle)


def append_text(parts: list[dict], delta: str) -> None:
    """Collect streamed text into content parts: consecutive deltas join one text part."""
    if parts and parts[-1]["type"] == "text":
        parts[-1]["text"] += delta
    else:
        parts.append({"type": "text", "text": delta})


async def collect(stream: AsyncIterator[Event],
                  image_part: Callable[[Event], dict]) -> tuple[list[dict], dict] | JSONResponse:
    """A non-streamed answer: (its parts in order -- text joined, each image as ``image_part`` makes it --, the
    ``done`` event's usage), or the error response that ends it: 500 engine failure, 503 drain deadline (with
    Retry-After), 499 client gone."""
    parts: list[dict] = []
    async for event in stream:
        if event.kind == "text":
            append_text(parts, event.data)
        elif event.kind == "image":
            parts.append(image_part(event))
        elif event.kind == "done":
            return parts, event.data
        elif event.kind == "failed":
            return error(500, f"generation failed: {event.data}")
        elif event.kind == "shutdown":
            return error(503, event.data, headers={"Retry-After": "1"})
    return error(499, "client closed the request")
