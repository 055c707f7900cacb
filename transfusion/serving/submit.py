"""Turning a validated request into scheduler input: the prompt (text and decoded images, or a chat rendered by the
checkpoint's chat template; checked against the server's limits), the sampling parameters (the request's options over
the model's defaults), and the queueing itself (``start``: 503 when the engine is down, 429 when the queue is full).
Every request runs with a seed: its own, or a fresh one that the answer reports so the client can replay it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import HTTPException

from transfusion.serving.protocol import (BadRequest, ImageSegment, Options, TextPart, check_options, decode_image,
                                          fresh_seed)
from transfusion.serving.scheduler import SamplingParams, TemplatedPrompt
from transfusion.serving.state import ServerState
from transfusion.serving.worker import Handle, QueueFull


@dataclass(frozen=True)
class Conversation:
    """Text-only chat messages (``{"role", "content"}``) for the checkpoint's chat template; ``prompt_of`` renders
    them off the event loop."""

    messages: list[dict]


def conversation(state: ServerState, messages) -> Conversation | None:
    """The chat as the checkpoint's template takes it: None when the tokenizer has no template or a message holds an
    image (the template knows no images: such a chat is laid out as segments after BOS, as before)."""
    if not getattr(state.engine.tok, "chat_template", None):
        return None
    plain = []
    for m in messages:
        parts = [m.content] if isinstance(m.content, str) else m.content
        if not all(isinstance(p, (str, TextPart)) for p in parts):
            return None
        plain.append({"role": m.role, "content": "".join(p if isinstance(p, str) else p.text for p in parts)})
    return Conversation(plain)


def templated_prompt(state: ServerState, chat: Conversation) -> TemplatedPrompt:
    """The template's ids; 400 when the template refuses the chat (its ``raise_exception``) or it is too long."""
    import jinja2

    limit = state.limits.max_prompt_tokens
    if sum(len(m["content"]) for m in chat.messages) > 4 * limit + 16:
        raise BadRequest(f"prompt longer than {limit} tokens")
    try:
        ids = state.engine.tok.encode_chat(chat.messages)
    except jinja2.TemplateError as e:
        raise BadRequest(f"the model's chat template refused these messages: {' '.join(str(e).split())[:200]}") \
            from None
    if len(ids) > limit:
        raise BadRequest(f"prompt of {len(ids)} tokens is longer than this server's {limit}")
    return TemplatedPrompt(tuple(ids))


def prompt_of(state: ServerState, segments) -> list | TemplatedPrompt:
    """Text stays text, images become pixels; 400 above the image count or the prompt length (in tokens, BOS and
    each image's BOI / patches / EOI included). A ``Conversation`` becomes its template's ids."""
    if isinstance(segments, Conversation):
        return templated_prompt(state, segments)
    limits, engine = state.limits, state.engine
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


def params_of(state: ServerState, o: Options, seed: int) -> SamplingParams:
    """The scheduler's parameters: 400 for options above the server's limits; unset steps / guidance: the model's."""
    check_options(o, state.limits, state.samplers)
    return SamplingParams(max_tokens=o.max_tokens, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                          stop=tuple(o.stop), max_images=o.max_images, steps=o.steps or state.default_steps,
                          guidance=state.default_guidance if o.guidance is None else o.guidance, sampler=o.sampler,
                          guidance_schedule=o.guidance_schedule, seed=seed, preview_every=o.preview_every,
                          start_with_image=o.start_with_image, ignore_eos=o.ignore_eos)


async def start(state: ServerState, segments, options: Options) -> tuple[Handle, int]:
    """Queue the request; (its handle, the seed it runs with: the request's own, else a fresh one)."""
    worker = state.worker
    if not worker.alive:
        raise HTTPException(503, f"the engine is not running ({worker.error or 'stopped'})")
    seed = fresh_seed() if options.seed is None else options.seed
    params = params_of(state, options, seed)
    prompt = await asyncio.to_thread(prompt_of, state, segments)  # image decoding off the event loop
    try:
        return worker.submit(prompt, params, asyncio.get_running_loop()), seed
    except QueueFull as e:
        raise HTTPException(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from None
