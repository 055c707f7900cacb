"""OpenAI's shapes, built in one place: the error body (every error of the server uses it), the chat completion,
its stream chunks and usage, finish reasons and image content parts (the model list, which reads the server's state,
is built by its route: ``routes_admin.model_list``, so this module stays below ``state.py``). The routes decide what to
answer; this module decides how it looks on the wire (the pydantic models in ``protocol.py`` document the same
shapes in the schema; these builders keep the key order the server has always sent)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from transfusion.serving.protocol import image_payload

if TYPE_CHECKING:
    from transfusion.serving.scheduler import Event
    from transfusion.serving.sse import Frame

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the scheduler's finish reason -> OpenAI's


def error_body(status: int, message: str) -> dict:
    """``ErrorBody``: ``{"error": {"message", "code"}}``."""
    return {"error": {"message": message, "code": status}}


def validation_error_body(errors: Iterable[dict]) -> dict:
    """``ErrorBody`` of a 422: the first problem as the message, up to 20 in ``detail`` (location, message, type:
    never the input, which may be huge or a NaN that JSON cannot carry)."""
    detail = [{"loc": [str(x) for x in err.get("loc", ())], "msg": str(err.get("msg", "")),
               "type": str(err.get("type", ""))} for err in list(errors)[:20]]
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    message = f"{'.'.join(first['loc'][1:]) or 'body'}: {first['msg']}"
    return {"error": {"message": message, "code": 422, "detail": detail}}


def usage(d: dict) -> dict:
    """OpenAI's usage from the ``done`` event's (plus images and seconds)."""
    return {"prompt_tokens": d["prompt_tokens"], "completion_tokens": d["tokens"],
            "total_tokens": d["prompt_tokens"] + d["tokens"], "images": d["images"], "seconds": round(d["seconds"], 4)}


def image_part(event: Event) -> dict:
    """An image event as an ``image_url`` content part (a PNG data URI)."""
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_payload(event)["png"]}}


@dataclass(frozen=True, slots=True)
class Reply:
    """What every object of one chat completion repeats: its id, creation time, model, and seed."""

    id: str
    created: int
    model: str
    seed: int

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, parts: list[dict], done: dict) -> dict:
        """``chat.completion``: content a string when only text came, else the parts in order."""
        text_only = all(p["type"] == "text" for p in parts)
        content = "".join(p["text"] for p in parts) if text_only else parts
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": FINISH[done["finish_reason"]]}],
                "usage": usage(done), "seed": self.seed}

    def chunk(self, delta: dict, reason: str | None = None) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], "seed": self.seed}

    def usage_chunk(self, done: dict) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(done), "seed": self.seed}

    def first_chunk(self) -> dict:
        return self.chunk({"role": "assistant", "content": ""})


async def chat_frames(reply: Reply, include_usage: bool, event: Event) -> list[Frame]:
    """One event of a streamed chat completion as SSE frames (all unnamed, OpenAI's way): text and image deltas, the
    finish chunk (and the usage chunk), or an error object when the stream cannot finish."""
    if event.kind == "text":
        return [(None, reply.chunk({"content": event.data}))]
    if event.kind == "image":
        return [(None, reply.chunk({"content": [await asyncio.to_thread(image_part, event)]}))]
    if event.kind == "done":
        last = [(None, reply.usage_chunk(event.data))] if include_usage else []
        return [(None, reply.chunk({}, FINISH[event.data["finish_reason"]])), *last]
    if event.kind == "failed":
        return [(None, error_body(500, event.data))]
    if event.kind == "shutdown":
        return [(None, error_body(503, event.data))]
    return []
