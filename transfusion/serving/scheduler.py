"""A continuous-batching scheduler over the generation engine: many requests, each in its own phase, one engine step at
a time. The HTTP server (issue 12) drives it; it is usable on its own:

    sched = Scheduler(Engine.from_export("runs/shapes_tiny/export"), max_batch=16)
    rid = sched.submit("a red circle on the left", SamplingParams(max_tokens=32, seed=1))
    while sched.busy():
        for event in sched.step():
            print(event)          # Event(rid, "text", "..."), Event(rid, "image_start"), Event(rid, "image", ...), ...

Phases of a request::

    queued --admit (prefill its prompt)--> text --BOI sampled--> image --(denoised, clean image appended, EOI)--> text
    text --EOS / max_tokens / stop string--> done          any phase --cancel()--> cancelled (leaves at the next step)

Every step: admit queued requests up to ``max_batch``; all text-phase requests share one forward pass (their KV caches
are stacked, left-padded, and split again); each image-phase request denoises its image against its own frozen prefix
cache. Every random draw of a request comes from its own generator seeded with ``SamplingParams.seed``, so its output
does not depend on its batch-mates; what can differ is float round-off between a batched and an unbatched forward
(``tests/test_serving.py`` bounds it). Text sampling: temperature (0 = greedy), top-k, top-p; special ids (PAD, BOS,
the image placeholder, EOI outside an image) are never sampled as text, and BOI only while the request may still
emit an image.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from transfusion.generation.engine import Engine, Prefix, concat_prefixes
from transfusion.sequence import caption_prompt_tokens


@dataclass
class SamplingParams:
    max_tokens: int = 64  # text tokens, EOS excluded
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    max_images: int = 1
    steps: int = 50
    guidance: float = 2.0
    sampler: str | None = None
    guidance_schedule: str | None = None
    seed: int = 0


@dataclass
class Event:
    request_id: int
    kind: str  # "text" | "image_start" | "image" | "done" | "cancelled" | "failed"
    data: Any = None


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    phase: str = "queued"  # queued | text | image | done | cancelled | failed
    prefix: Prefix | None = None
    uncond: Prefix | None = None
    tokens: list[int] = field(default_factory=list)  # sampled text ids (no specials)
    text: str = ""  # decoded text so far (cut at a stop string)
    emitted: int = 0  # characters of ``text`` already sent as events
    images: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


def _split_prefix(stacked: Prefix, lengths: list[int]) -> list[Prefix]:
    """Undo ``concat_prefixes``: row i keeps its last ``lengths[i]`` cache columns (its own, unpadded keys)."""
    out = []
    for i, n in enumerate(lengths):
        kv = [(k[i:i + 1, :, -n:], v[i:i + 1, :, -n:]) for k, v in stacked.kv]
        out.append(Prefix(kv, stacked.key_valid[i:i + 1, -n:], stacked.next_pos[i:i + 1], stacked.last_h[i:i + 1]))
    return out


def sample_next(logits_V: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from fp32 logits [V] (banned ids already at -inf): greedy at temperature 0, else top-k / top-p
    filtered sampling from this request's generator."""
    if params.temperature <= 0:
        return int(logits_V.argmax())
    logits = logits_V / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 16) -> None:
        self.engine, self.max_batch = engine, max_batch
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        tok = engine.tok
        self._never = [tok.pad_id, tok.bos_id, tok.image_id, tok.eoi_id]

    # -- requests --------------------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        tok = self.engine.tok
        ids = [tok.bos_id] + (tok.encode(prompt) if isinstance(prompt, str) else list(prompt))
        rid = next(self._ids)
        self.requests[rid] = Request(rid, ids, params, torch.Generator().manual_seed(params.seed))
        return rid

    def cancel(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is not None and req.phase not in ("done", "failed"):
            req.phase = "cancelled"

    def busy(self) -> bool:
        return any(r.phase in ("queued", "text", "image", "cancelled") for r in self.requests.values())

    def running(self) -> list[Request]:
        return [r for r in self.requests.values() if r.phase in ("text", "image")]

    # -- one engine step -------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        for req in list(self.requests.values()):  # cancelled requests leave now and free their slot
            if req.phase == "cancelled":
                events.append(Event(req.id, "cancelled"))
                self._finish(req)
        self._admit()
        text = [r for r in self.running() if r.phase == "text"]
        if text:
            events += self._text_step(text)
        for req in [r for r in self.running() if r.phase == "image"]:
            events += self._image_step(req)
        return events

    def _admit(self) -> None:
        free = self.max_batch - len(self.running())
        for req in [r for r in self.requests.values() if r.phase == "queued"][:max(free, 0)]:
            req.prefix = self.engine.prefill([req.prompt_ids])
            if req.params.guidance != 1.0:
                req.uncond = self.engine.prefill([caption_prompt_tokens(self.engine.tok)])
            req.phase = "text"

    def _text_step(self, reqs: list[Request]) -> list[Event]:
        eng, tok = self.engine, self.engine.tok
        with torch.no_grad():
            last_h = torch.cat([r.prefix.last_h for r in reqs])
            logits = eng.model.text_logits(last_h).float().cpu()  # [N, V]
        logits[:, self._never] = float("-inf")
        chosen, events = [], []
        for i, req in enumerate(reqs):
            row = logits[i].clone()
            if req.images >= req.params.max_images:
                row[tok.boi_id] = float("-inf")
            chosen.append(sample_next(row, req.params, req.generator))
        stepping = []
        for req, token in zip(reqs, chosen):
            if req.first_token_at is None:
                req.first_token_at = time.perf_counter()
            if token == tok.eos_id or len(req.tokens) >= req.params.max_tokens:
                events += self._emit(req, len(req.text))  # whatever was held back for a stop string
                events.append(self._done(req, "eos" if token == tok.eos_id else "length"))
                continue
            stepping.append((req, token))
        if not stepping:
            return events
        stacked = concat_prefixes(*(r.prefix for r, _ in stepping))
        stacked = eng.step_tokens(stacked, torch.tensor([t for _, t in stepping]))
        lengths = [r.prefix.key_valid.shape[1] + 1 for r, _ in stepping]
        for (req, token), prefix in zip(stepping, _split_prefix(stacked, lengths)):
            req.prefix = prefix
            if token == tok.boi_id:
                events += self._emit(req, len(req.text))
                req.phase = "image"
                events.append(Event(req.id, "image_start"))
                continue
            req.tokens.append(token)
            full = tok.decode(req.tokens)
            cut = min((full.index(s) for s in req.params.stop if s and s in full), default=None)
            req.text = full if cut is None else full[:cut]  # a stop string and what follows it are not returned
            # hold back a tail that may still grow into a stop string
            held = 0 if cut is not None else max((n for s in req.params.stop for n in range(1, len(s))
                                                  if req.text.endswith(s[:n])), default=0)
            held = max(held, len(req.text) - len(req.text.rstrip("\ufffd")))  # an unfinished UTF-8 character
            events += self._emit(req, len(req.text) - held)
            if cut is not None:
                events.append(self._done(req, "stop"))
        return events

    def _emit(self, req: Request, upto: int) -> list[Event]:
        if upto <= req.emitted:
            return []
        delta, req.emitted = req.text[req.emitted:upto], upto
        return [Event(req.id, "text", delta)]

    def _image_step(self, req: Request) -> list[Event]:
        eng, p = self.engine, req.params
        z = eng.denoise(req.prefix, uncond=req.uncond, guidance=p.guidance, sampler=p.sampler, steps=p.steps,
                        generator=req.generator, guidance_schedule=p.guidance_schedule)
        with torch.no_grad():
            image = eng.codec.decode(z)[0].clamp(-1, 1).float().cpu()
        req.prefix = eng.append_image(req.prefix, z)
        req.prefix = eng.step_tokens(req.prefix, torch.tensor([eng.tok.eoi_id]))
        req.images += 1
        req.phase = "text"
        return [Event(req.id, "image", image)]

    def _done(self, req: Request, reason: str) -> Event:
        usage = {"tokens": len(req.tokens), "images": req.images, "finish_reason": reason,
                 "seconds": time.perf_counter() - req.submitted,
                 "time_to_first_token": None if req.first_token_at is None else req.first_token_at - req.submitted}
        self._finish(req)
        req.phase = "done"
        return Event(req.id, "done", usage)

    def _finish(self, req: Request) -> None:
        req.prefix = req.uncond = None  # free the caches
        if req.phase == "cancelled":
            req.phase = "cancelled-done"  # reported; no longer counted as busy
