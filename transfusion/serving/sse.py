"""The one Server-Sent Events writer of the server: every streaming route hands ``sse_response`` its request's events
and an ``encode`` that turns one event into frames (``(event name or None, data)``); the framing, the headers and the
loop are here once. A client that disconnects cancels the stream's task, which closes ``events`` and so cancels the
request (``stream.events``)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

from fastapi.responses import StreamingResponse

from transfusion.serving.scheduler import Event

Frame = tuple[str | None, Any]  # (the SSE event name, None for unnamed "message" events; a dict, or a str sent as-is)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(name: str | None, data: Any) -> bytes:
    """One frame: ``event: name`` (when named), ``data: json`` (a str verbatim, e.g. OpenAI's ``[DONE]``)."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


async def frames(events: AsyncIterator[Event], encode: Callable[[Event], Awaitable[Iterable[Frame]]],
                 first: Iterable[Frame] = (), last: Iterable[Frame] = ()) -> AsyncIterator[bytes]:
    """``first``, then each event's frames, then ``last`` once the events end (a cancelled stream ends earlier)."""
    for name, data in first:
        yield sse(name, data)
    async for event in events:
        for name, data in await encode(event):
            yield sse(name, data)
    for name, data in last:
        yield sse(name, data)


def sse_response(events: AsyncIterator[Event], encode: Callable[[Event], Awaitable[Iterable[Frame]]],
                 first: Iterable[Frame] = (), last: Iterable[Frame] = ()) -> StreamingResponse:
    """The streamed answer of a request (text/event-stream, not cached, not buffered by a proxy)."""
    return StreamingResponse(frames(events, encode, first, last), media_type="text/event-stream",
                             headers=SSE_HEADERS)
