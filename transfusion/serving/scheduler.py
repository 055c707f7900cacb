"""A continuous-batching scheduler over the generation engine: many requests, each in its own phase, one engine step at
a time. The HTTP server (``transfusion/serving/server.py``) drives it from one thread; it is usable on its own:

    sched = Scheduler(Engine.from_export("runs/shapes_tiny/export"), max_batch=16)
    rid = sched.submit("a red circle on the left", SamplingParams(max_tokens=32, seed=1))
    while sched.busy():
        for event in sched.step():
            print(event)          # Event(rid, "text", "..."), Event(rid, "image_start"), Event(rid, "image", ...), ...

Phases of a request::

    queued --admit (prefill its prompt)--> text --BOI sampled--> image --(denoised, clean image appended, EOI)--> text
    text --EOS / max_tokens / stop string--> done          any phase --cancel()--> cancelled (leaves at the next step)

One ``step()``: admit queued requests up to ``max_batch`` (their prompts, text and images, prefilled); every
text-phase request samples one token and all of them share one forward pass (their caches stay stacked, left-padded,
while the text batch keeps its members, and are split only when it changes); every image-phase request advances its
image by one transformer pass (``ImageJob``): jobs needing the same pass are stacked into one forward against their
frozen prefix caches, each row at its own timestep, classifier-free guidance rows against one shared unconditional
prefix. A request therefore leaves, or is cancelled, within one step, and may ask for previews while it denoises.

Every random draw of a request comes from its own generator seeded with ``SamplingParams.seed``, so its output does
not depend on its batch-mates; what can differ is float round-off between a batched and an unbatched forward
(``tests/test_serving.py`` bounds it). Text sampling: temperature (0 = greedy), top-k, top-p; special ids (PAD, BOS,
the image placeholder, EOI outside an image) are never sampled as text, and BOI only while the request may still
emit an image. The scheduler only schedules: tokens are drawn by ``transfusion/generation/sampling.py``, text is cut
at stop strings by ``generation/detok.py``, prefixes are stacked and split by ``generation/prefix.py`` and images are
sampled by the model's head's job (``generation/image_sampling.py``), all shared with the engine.

Legend: N requests, S cached key length, V vocabulary, C/H/W image channels/height/width.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from transfusion.generation.detok import detokenize
from transfusion.generation.engine import Engine
from transfusion.generation.image_job import ImageJob
from transfusion.generation.images import decode_images
from transfusion.generation.prefix import Prefix, concat_prefixes, select_rows, split_prefix
from transfusion.generation.sampling import ban, sample_next
from transfusion.sequence import caption_prompt_tokens, never_text_ids

Segment = Union[str, Tensor]  # text, or a pixel image [C, H, W] in [-1, 1] at the model's resolution


@dataclass(frozen=True)
class TemplatedPrompt:
    """A prompt a checkpoint's chat template wrote, as token ids used as they are: no BOS is added (the template
    writes one where the checkpoint wants it, as transformers' ``apply_chat_template`` leaves it)."""

    ids: tuple[int, ...]


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
    preview_every: int = 0  # a "preview" event every this many image passes (0 = none)
    start_with_image: bool = False  # the prompt is closed with BOI: the answer begins with an image (text -> image)
    ignore_eos: bool = False  # never sample EOS: exactly max_tokens text tokens (benchmarks)


@dataclass
class Event:
    request_id: int
    kind: str  # "text" | "image_start" | "preview" | "image" | "done" | "cancelled" | "failed"
    data: Any = None


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    prompt_images: list[Tensor]  # pixels [C, H, W], one per image block of the prompt
    image_starts: list[int]  # where each prompt image's slots start in ``prompt_ids``
    params: SamplingParams
    generator: torch.Generator
    phase: str = "queued"  # queued | text | image | done | cancelled | cancelled-done | failed
    prefix: Prefix | None = None  # its own cache (None while it is part of the stacked text batch)
    cache_len: int = 0  # key columns that are its own (the rest of a stacked row is left padding)
    job: ImageJob | None = None
    tokens: list[int] = field(default_factory=list)  # sampled text ids (no specials)
    text: str = ""  # decoded text so far (cut at a stop string)
    emitted: int = 0  # characters of ``text`` already sent as events
    images: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    image_started_at: float = 0.0


@dataclass
class Stats:
    """Counters since the scheduler started (the server's /metrics reads them)."""

    tokens: int = 0
    images: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    peak_batch: int = 0  # most requests running at once


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 16) -> None:
        self.engine, self.max_batch = engine, max_batch
        self.requests: dict[int, Request] = {}
        self.stats = Stats()
        self._ids = itertools.count()
        tok = engine.tok
        self._never = never_text_ids(tok)
        self._uncond: Prefix | None = None  # [BOS][BOI], the unconditional prefix every guided image shares
        self._text: list[Request] = []  # members of the stacked text batch, in row order
        self._text_prefix: Prefix | None = None
        self._image_stacks: dict[str, tuple[tuple, Prefix]] = {}  # block pass -> (members key, stacked prefixes)

    # -- requests --------------------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int] | list[Segment] | TemplatedPrompt,
               params: SamplingParams | None = None) -> int:
        """Queue a request; ``prompt`` is text, token ids, or a list of segments (text and pixel images
        [C, H, W] in [-1, 1] at the model's resolution), each after BOS; or a ``TemplatedPrompt``. Returns its id."""
        params = params or SamplingParams()
        tok = self.engine.tok
        ids, images, starts = [tok.bos_id], [], []
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, TemplatedPrompt):
            ids = list(prompt.ids)
        elif prompt and isinstance(prompt[0], int):
            ids += list(prompt)
        else:
            for seg in prompt:
                if isinstance(seg, str):
                    ids += tok.encode(seg)
                    continue
                ids.append(tok.boi_id)
                starts.append(len(ids))
                images.append(seg)
                ids += [tok.image_id] * self.engine.num_patches + [tok.eoi_id]
        if params.start_with_image:
            ids.append(tok.boi_id)
        rid = next(self._ids)
        self.requests[rid] = Request(rid, ids, images, starts, params, torch.Generator().manual_seed(params.seed))
        return rid

    def cancel(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is not None and req.phase in ("queued", "text", "image"):
            req.phase = "cancelled"

    def forget(self, request_id: int) -> None:
        """Drop a finished request's record (the server does, once its events are delivered)."""
        req = self.requests.get(request_id)
        if req is not None and req.phase in ("done", "cancelled-done", "failed"):
            del self.requests[request_id]

    def busy(self) -> bool:
        return any(r.phase in ("queued", "text", "image", "cancelled") for r in self.requests.values())

    def running(self) -> list[Request]:
        return [r for r in self.requests.values() if r.phase in ("text", "image")]

    def queued(self) -> int:
        return sum(r.phase == "queued" for r in self.requests.values())

    # -- one engine step -------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        for req in list(self.requests.values()):  # cancelled requests leave now and free their slot
            if req.phase == "cancelled":
                events.append(Event(req.id, "cancelled"))
                self.stats.cancelled += 1
                self._release(req, "cancelled-done")
        events += self._admit()
        text = [r for r in self.running() if r.phase == "text"]
        if text:
            events += self._text_step(text)
        imaging = [r for r in self.running() if r.phase == "image"]
        if imaging:
            events += self._image_step(imaging)
        else:
            self._image_stacks.clear()  # no image in flight: drop the stacked prefix copies
        self.stats.steps += 1
        self.stats.peak_batch = max(self.stats.peak_batch, len(text) + len(imaging))
        return events

    def _admit(self) -> list[Event]:
        free = self.max_batch - len(self.running())
        events = []
        for req in [r for r in self.requests.values() if r.phase == "queued"][:max(free, 0)]:
            try:
                req.prefix = self._prefill(req)
            except (ValueError, RuntimeError) as e:  # e.g. an image the codec cannot take: this request fails alone
                events.append(self._fail(req, e))
                continue
            req.cache_len = len(req.prompt_ids)
            req.phase = "text"
            if req.params.start_with_image and req.params.max_images > 0:
                req.phase = "image"
                try:
                    events.append(self._start_image(req))
                except (RuntimeError, ValueError) as e:
                    events.append(self._fail(req, e))
        return events

    def _prefill(self, req: Request) -> Prefix:
        eng = self.engine
        if not req.prompt_images:
            return eng.prefill([req.prompt_ids])
        with torch.no_grad():
            z = eng.codec.encode(torch.stack(req.prompt_images).to(eng.device))
        return eng.prefill([req.prompt_ids], z, [(0, s) for s in req.image_starts])

    # -- text ------------------------------------------------------------------------------------------------
    def _stack_text(self, reqs: list[Request]) -> Prefix:
        """The stacked cache of ``reqs`` (re-stacked only when the text batch's members change)."""
        if [r.id for r in reqs] != [r.id for r in self._text]:
            self._unstack_text()
            self._text = list(reqs)
            self._text_prefix = concat_prefixes(*(r.prefix for r in reqs))
            for r in reqs:
                r.prefix = None
        return self._text_prefix

    def _unstack_text(self) -> None:
        """Give every member of the stacked text batch its own cache back."""
        if self._text_prefix is not None:
            live = [(i, r) for i, r in enumerate(self._text) if r.prefix is None and r.phase in ("text", "image")]
            if live:
                sub = select_rows(self._text_prefix, torch.tensor([i for i, _ in live]))
                for (_, r), own in zip(live, split_prefix(sub, [r.cache_len for _, r in live])):
                    r.prefix = own
        self._text, self._text_prefix = [], None

    def _text_step(self, reqs: list[Request]) -> list[Event]:
        eng, tok = self.engine, self.engine.tok
        stacked = self._stack_text(reqs)
        chosen = self._sample_tokens(reqs, stacked)
        events: list[Event] = []
        leaving = []
        for req, token in zip(reqs, chosen):
            if req.first_token_at is None:
                req.first_token_at = time.perf_counter()
            if token == tok.eos_id or len(req.tokens) >= req.params.max_tokens:
                events += self._emit(req, len(req.text))  # whatever was held back for a stop string
                events.append(self._done(req, "eos" if token == tok.eos_id else "length"))
                leaving.append(req)
        stepping = [(r, t) for r, t in zip(reqs, chosen) if r not in leaving]
        if leaving:  # the batch changes: continue with the members that step
            self._unstack_text()
            if not stepping:
                return events
            stacked = self._stack_text([r for r, _ in stepping])
        self._text_prefix = eng.step_tokens(stacked, torch.tensor([t for _, t in stepping]))
        for req, _ in stepping:  # every member's cache grew: before any of them leaves and the batch is split
            req.cache_len += 1
        for req, token in stepping:
            events += self._take_token(req, token)
        if any(r.phase != "text" for r, _ in stepping):
            self._unstack_text()  # requests that began an image (or stopped) take their caches out
        for req, _ in stepping:
            if req.phase == "image":
                try:
                    events.append(self._start_image(req))
                except (RuntimeError, ValueError) as e:  # e.g. a sampler this model's objective does not have
                    events.append(self._fail(req, e))
        return events

    def _sample_tokens(self, reqs: list[Request], stacked: Prefix) -> list[int]:
        """One token per member of the text batch, each from its request's generator and sampling parameters."""
        tok = self.engine.tok
        with torch.no_grad():
            logits = self.engine.model.text_logits(stacked.last_h).float().cpu()  # [N, V]
        ban(logits, self._never)
        chosen = []
        for i, req in enumerate(reqs):
            closed = [tok.boi_id] if req.images >= req.params.max_images else []
            row = ban(logits[i].clone(), closed + ([tok.eos_id] if req.params.ignore_eos else []))
            chosen.append(sample_next(row, req.params, req.generator))
        return chosen

    def _take_token(self, req: Request, token: int) -> list[Event]:
        """A stepping request's new token: BOI begins its image; text goes out as far as no stop string can still
        claim it (``transfusion.generation.detok``), and a stop string ends the request."""
        if token == self.engine.tok.boi_id:
            events = self._emit(req, len(req.text))
            req.phase = "image"
            return events
        self.stats.tokens += 1
        req.tokens.append(token)
        view = detokenize(self.engine.tok, req.tokens, req.params.stop)
        req.text = view.text  # a stop string and what follows it are not returned
        events = self._emit(req, view.ready)
        if view.stopped:
            events.append(self._done(req, "stop"))
        return events

    def _emit(self, req: Request, upto: int) -> list[Event]:
        if upto <= req.emitted:
            return []
        delta, req.emitted = req.text[req.emitted:upto], upto
        return [Event(req.id, "text", delta)]

    # -- images ----------------------------------------------------------------------------------------------
    def _start_image(self, req: Request) -> Event:
        eng, p = self.engine, req.params
        guided = p.guidance != 1.0
        if guided and self._uncond is None:
            self._uncond = eng.prefill([caption_prompt_tokens(eng.tok)])
        req.job = eng.start_image(1, guided=guided, guidance=p.guidance, sampler=p.sampler, steps=p.steps,
                                  generator=req.generator, guidance_schedule=p.guidance_schedule)
        req.image_started_at = time.perf_counter()
        return Event(req.id, "image_start", {"index": req.images, "passes": req.job.total})

    def _stack_images(self, block_pass: str, reqs: list[Request]) -> Prefix:
        """[conditional prefixes of ``reqs``; the unconditional prefix once per guided request], cached while the
        group keeps its members."""
        key = tuple((r.id, r.images, r.job.pass_guided) for r in reqs)  # r.images: a new image, a new prefix
        cached = self._image_stacks.get(block_pass)
        if cached is None or cached[0] != key:
            guided = [self._uncond] * sum(r.job.pass_guided for r in reqs)
            cached = (key, concat_prefixes(*(r.prefix for r in reqs), *guided))
            self._image_stacks[block_pass] = cached
        return cached[1]

    def _image_step(self, reqs: list[Request]) -> list[Event]:
        eng = self.engine
        events: list[Event] = []
        groups: dict[str, list[Request]] = {}
        for req in reqs:
            groups.setdefault(req.job.block_pass, []).append(req)
        for block_pass in list(self._image_stacks):
            if block_pass not in groups:
                del self._image_stacks[block_pass]
        for block_pass, group in groups.items():
            pre = self._stack_images(block_pass, group)
            inputs = [r.job.block_input() for r in group]
            guided = [i for i, r in enumerate(group) if r.job.pass_guided]
            order = list(range(len(group))) + guided  # row order: every conditional row, then unconditional ones
            x = torch.cat([inputs[i][0] for i in order])
            ts = [inputs[i][1] for i in order]
            same_t = all(bool(t == ts[0]) for t in ts)
            t = ts[0] if same_t else torch.stack([torch.as_tensor(t, dtype=torch.float32) for t in ts])
            masks = [inputs[i][2] for i in order]
            mask = None if masks[0] is None else torch.cat(masks)
            out = eng.image_block(pre, block_pass, x, t, mask)
            n_cond = len(group)
            for i, req in enumerate(group):
                rows = [i] + ([n_cond + guided.index(i)] if i in guided else [])
                try:  # a failure of one request's own work fails that request alone
                    req.job.advance(out[rows])
                    every = req.params.preview_every
                    if req.job.done:
                        events += self._finish_image(req)
                    elif every and req.job.index % every == 0:
                        preview = decode_images(eng.codec, req.job.preview())[0]
                        events.append(Event(req.id, "preview", {"image": preview, "pass": req.job.index,
                                                                "passes": req.job.total}))
                except (RuntimeError, ValueError) as e:
                    events.append(self._fail(req, e))
        return events

    def _fail(self, req: Request, error: Exception) -> Event:
        self.stats.failed += 1
        self._release(req, "failed")
        return Event(req.id, "failed", f"{type(error).__name__}: {error}")

    def _finish_image(self, req: Request) -> list[Event]:
        eng = self.engine
        z = req.job.result()
        image = decode_images(eng.codec, z)[0]
        req.prefix = eng.append_image(req.prefix, z)
        req.prefix = eng.step_tokens(req.prefix, torch.tensor([eng.tok.eoi_id]))
        req.cache_len += eng.num_patches + 1
        seconds = time.perf_counter() - req.image_started_at
        req.images += 1
        self.stats.images += 1
        req.job, req.phase = None, "text"
        return [Event(req.id, "image", {"image": image, "index": req.images - 1, "seconds": seconds})]

    # -- leaving -----------------------------------------------------------------------------------------------
    def _done(self, req: Request, reason: str) -> Event:
        usage = {"prompt_tokens": len(req.prompt_ids), "tokens": len(req.tokens), "images": req.images,
                 "finish_reason": reason, "seconds": time.perf_counter() - req.submitted,
                 "time_to_first_token": None if req.first_token_at is None else req.first_token_at - req.submitted}
        self.stats.finished += 1
        self._release(req, "done")
        return Event(req.id, "done", usage)

    def _release(self, req: Request, phase: str) -> None:
        if req in self._text:
            self._unstack_text()  # the text batch changes at the next step anyway
        req.phase = phase
        req.prefix = req.job = None  # free the caches
