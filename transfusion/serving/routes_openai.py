"""``POST /v1/chat/completions``: OpenAI's chat completion (text and ``image_url`` data-URI parts in and out; with
``"stream": true``, unnamed SSE chunks, an error object if the stream cannot finish, then ``[DONE]``). The shapes are
built in ``openai_format``; this route checks the model name, turns the chat fields into options, lays the messages
out (through the checkpoint's chat template when its tokenizer has one and the chat is text only), and queues."""

from __future__ import annotations

import time
import uuid
from functools import partial

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from transfusion.serving.errors import error
from transfusion.serving.openai_format import Reply, chat_frames, image_part
from transfusion.serving.protocol import BadRequest, ChatCompletion, ChatRequest, Options
from transfusion.serving.schema import CHAT_SSE, documented
from transfusion.serving.sse import sse_response
from transfusion.serving.state import authorised, state_of
from transfusion.serving.stream import collect, events
from transfusion.serving.submit import conversation, start

router = APIRouter()


def options_of(body: ChatRequest) -> Options:
    """The sampling options the chat fields make; 400 (not 422: the body matched the schema) when they make none."""
    try:
        return body.options()
    except ValidationError as e:
        raise BadRequest(f"invalid options: {' '.join(str(e).split())[:300]}") from None


@router.post("/v1/chat/completions", dependencies=[Depends(authorised)],
             responses=documented((400, 401, 404, 413, 422, 429, 499, 500, 503), ChatCompletion,
                                  "OpenAI's chat.completion (content: a string, or parts when images are in it), "
                                  "plus the seed", CHAT_SSE))
async def chat(body: ChatRequest, request: Request):
    state = state_of(request)
    if body.model not in (state.model_name, "default"):
        return error(404, f"model {body.model!r} is not served here (serving {state.model_name!r}, alias 'default')")
    options = options_of(body)  # before segments(): a request wrong in both gets the options' 400, as it always did
    prompt = conversation(state, body.messages) or body.segments()  # the checkpoint's chat template when it has one
    handle, seed = await start(state, prompt, options)
    reply = Reply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), state.model_name, seed)
    stream = events(state, handle, request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(stream, partial(chat_frames, reply, include_usage),
                            first=[(None, reply.first_chunk())], last=[(None, "[DONE]")])
    answer = await collect(stream, image_part)
    if isinstance(answer, JSONResponse):
        return answer
    parts, done = answer
    return reply.completion(parts, done)
