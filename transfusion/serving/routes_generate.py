"""``POST /v1/generate``: segments in (text, images), the answer out as JSON, or as Server-Sent Events with
``"stream": true``: ``text`` {"text"}, ``image_start`` {"index", "passes"}, ``preview`` {"png", "pass", "passes"}
(when ``preview_every`` > 0), ``image`` {"png", "width", "height", "index", "seconds"}, ``done`` {"id",
"finish_reason", "usage", "seed"}, ``error`` {"error", "code"} (the last event of a stream that cannot finish)."""

from __future__ import annotations

import asyncio
import uuid
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from transfusion.serving.protocol import GenerateRequest, GenerateResponse, image_payload
from transfusion.serving.scheduler import Event
from transfusion.serving.schema import GENERATE_SSE, documented
from transfusion.serving.sse import Frame, sse_response
from transfusion.serving.state import authorised, state_of
from transfusion.serving.stream import collect, events
from transfusion.serving.submit import start

router = APIRouter()


async def generate_frames(rid: str, seed: int, event: Event) -> list[Frame]:
    """One event as this route's named SSE events (``image_start`` of a request without previews is sent too)."""
    if event.kind == "text":
        return [("text", {"text": event.data})]
    if event.kind == "image_start":
        return [("image_start", event.data)]
    if event.kind in ("preview", "image"):
        return [(event.kind, await asyncio.to_thread(image_payload, event))]
    if event.kind == "done":
        return [("done", {"id": rid, "finish_reason": event.data["finish_reason"], "usage": event.data, "seed": seed})]
    if event.kind == "failed":
        return [("error", {"error": event.data, "code": 500})]
    if event.kind == "shutdown":
        return [("error", {"error": event.data, "code": 503})]
    return []


@router.post("/v1/generate", dependencies=[Depends(authorised)],
             responses=documented((400, 401, 413, 422, 429, 499, 500, 503), GenerateResponse,
                                  "the answer: text and image segments in order", GENERATE_SSE))
async def generate(body: GenerateRequest, request: Request):
    state = state_of(request)
    handle, seed = await start(state, body.segments, body)
    rid = f"gen-{uuid.uuid4().hex[:16]}"
    stream = events(state, handle, request)
    if body.stream:
        return sse_response(stream, partial(generate_frames, rid, seed))
    answer = await collect(stream, lambda event: {"type": "image", **image_payload(event)})
    if isinstance(answer, JSONResponse):
        return answer
    output, done = answer
    return {"id": rid, "output": output, "finish_reason": done["finish_reason"], "usage": done, "seed": seed}
