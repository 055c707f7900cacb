"""The generation engine: text with a KV cache; on BOI the image block is denoised against the frozen prefix cache.

    engine = Engine.from_export("runs/shapes_tiny/export")
    images = engine.text_to_image(["a red circle on the left"], steps=50, guidance=3.0)   # [N, C, H, W] in [-1, 1]
    texts  = engine.caption(images)

Prompts of different lengths are left-padded into one batch (padding keys are masked, positions restart per prompt),
and classifier-free guidance runs the conditional and the unconditional prefix (``[BOS][BOI]``, the layout caption
dropout trains) as one batch of 2N, with a constant or linearly rising scale (``guidance_schedule``).

The model's image head (``model.head``) decides which sampling job produces an image block
(``transfusion/generation/image_sampling.py``); the job takes the head and this engine's facts (``job_setup``), never
the engine, and asks for one block pass at a time (``image_block``): the whole-image head denoises the block with the
run's sampler (``denoise.py``: DDIM / DDPM for epsilon and v, Euler / Heun for flow, all from the one schedule
object), one ``image_block_prediction`` per step; the MAR head reveals the block's patches over K steps in random
order (``mar_sampling.py``), each step one ``image_block_condition`` pass over the block (known patches clean, the
rest the mask embedding) against the same prefix cache, then its per-token denoiser samples the patches revealed at
that step. Revealed patches are never changed again.

Legend: N requests, S cached key length, P patches per image, D model dim, C/H/W image channels/height/width.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from transfusion.attention.plan import AttentionPlan, inference_plan
from transfusion.batch import IGNORE_INDEX
from transfusion.generation.image_job import ImageJob, JobSetup
from transfusion.generation.image_sampling import run_image_job, start_image_job
from transfusion.generation.images import decode_images
from transfusion.generation.prefix import Prefix, concat_prefixes
from transfusion.generation.sampling import choose
from transfusion.precision import PROBE_ROWS, Precision, model_matmul_shapes, resolve_precision
from transfusion.sequence import Sequence, caption_prompt_tokens, never_text_ids, rows_to_batch, t2i_prompt_tokens


class Engine:
    """Serves a plain (unwrapped) single-device model: the sampling jobs call the head's modules outside ``forward``.
    ``precision``: a ``transfusion.precision.Precision``, or "auto" / "bf16" / "fp32" to resolve for the machine
    the engine runs on (``auto`` probes this machine's matmuls, whatever the model was trained with). ``attention``:
    the attention plan (``transfusion/attention/plan.py``): an SDPA plan, since the KV cache reads dense masks
    (default: the inference plan of ``model.cfg``)."""

    def __init__(self, model, tokenizer, schedule, codec, patch_grid: tuple[int, int], device: torch.device,
                 precision: Precision | str = "auto", cfg=None, attention: AttentionPlan | None = None) -> None:
        self.model, self.tok, self.schedule, self.codec = model.eval(), tokenizer, schedule, codec
        self.cfg = cfg  # the run config (Config) when built from an export
        self.patch_grid, self.device = patch_grid, torch.device(device)
        self.num_patches = patch_grid[0] * patch_grid[1]
        if not isinstance(precision, Precision):
            shapes = model_matmul_shapes(model.cfg, model.vocab_size, model.image_channels, PROBE_ROWS)
            precision = resolve_precision(precision, self.device, shapes)
        self.precision = precision
        self.attention = attention or inference_plan(model.cfg)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the pixel images this engine reads and writes."""
        f = self.model.cfg.patch_size * self.codec.downsample
        return self.patch_grid[0] * f, self.patch_grid[1] * f

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_export(cls, export_dir: str, device: str | torch.device = "cpu", precision: str = "auto") -> "Engine":
        from transfusion.checkpoint.export import load_export
        from transfusion.components import build_inference_components

        state, cfg_dict = load_export(export_dir)
        model, tokenizer, schedule, codec, grid, cfg, attention = build_inference_components(cfg_dict, device,
                                                                                            export_dir)
        model.load_state_dict(state)
        return cls(model, tokenizer, schedule, codec, grid, torch.device(device), precision, cfg, attention)

    def _ctx(self):
        return self.precision.autocast(self.device)

    # -- prefix / cache --------------------------------------------------------------------------------------
    def prefill(self, seqs: list[list[int]], images: Tensor | None = None,
                image_spans: list[tuple[int, int]] | None = None) -> Prefix:
        """Run token lists through the model, one prompt per row, left-padded (``transfusion.sequence.rows_to_batch``,
        the training row builder) so every prompt ends at the last column. ``images`` [M, C, H, W] are clean images
        placed at ``image_spans`` (row, start of the P slots, in unpadded coordinates)."""
        dev = self.device
        rows = [[Sequence(f"prompt-{i}", list(x), [IGNORE_INDEX] * len(x))] for i, x in enumerate(seqs)]
        for j, (r, st) in enumerate(image_spans if images is not None and len(images) else []):
            seq = rows[r][0]
            seq.image_spans.append((st, st + self.num_patches))
            seq.images.append(images[j])
            seq.image_is_target.append(False)
        batch = rows_to_batch(rows, max(len(x) for x in seqs), self.tok.pad_id, self.patch_grid, left_pad=True)
        mask = self.attention.mask(batch.doc_ids.to(dev), batch.image_ids.to(dev))
        img_tokens = rows_ = starts = None
        with torch.no_grad(), self._ctx():
            if len(batch.images):
                t0 = torch.zeros(len(batch.images), dtype=torch.long, device=dev)
                img_tokens = self.model.embed_images(batch.images.to(dev), t0)
                rows_, starts = batch.image_rows.to(dev), batch.image_starts.to(dev)
            h = self.model.embed(batch.tokens.to(dev), img_tokens, rows_, starts)
            h, kv = self.model.trunk(h, batch.positions.to(dev), mask, use_cache=True,
                                     image_mask_BL=batch.image_ids.to(dev) >= 0)
        lengths = torch.tensor([len(x) for x in seqs], device=dev)
        return Prefix(kv, batch.doc_ids.to(dev) >= 0, lengths, h[:, -1])

    def text_logits(self, ids_BT: Tensor) -> Tensor:
        """Next-token logits [B, T, V] at every position of plain-text rows (no images, no padding), one causal pass
        without a cache: the reference the cached decoding and a pretrained checkpoint's own logits are held to."""
        ids_BT = torch.as_tensor(ids_BT, device=self.device)
        B, T = ids_BT.shape
        doc_ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        mask = self.attention.mask(doc_ids, torch.full_like(doc_ids, -1))
        positions = torch.arange(T, device=self.device).expand(B, T)
        with torch.no_grad(), self._ctx():
            h, _ = self.model.trunk(self.model.embed(ids_BT), positions, mask)
            return self.model.text_logits(h)

    def step_tokens(self, prefix: Prefix, tokens_N: Tensor) -> Prefix:
        """Append one token per sequence to the cache."""
        dev = self.device
        valid = torch.cat((prefix.key_valid, torch.ones_like(prefix.key_valid[:, :1])), dim=1)
        mask = valid[:, None, None, :]
        with torch.no_grad(), self._ctx():
            h = self.model.embed(tokens_N.to(dev)[:, None])
            h, kv = self.model.trunk(h, prefix.next_pos[:, None], mask, past_kv=prefix.kv)
        return Prefix(kv, valid, prefix.next_pos + 1, h[:, -1])

    # -- images ----------------------------------------------------------------------------------------------
    def resolve_guidance_schedule(self, name: str | None) -> str:
        if name is not None:
            return name
        return self.cfg.sample.guidance_schedule if self.cfg is not None else "constant"

    @property
    def guidance_data_std(self) -> float:
        """The std of the data the model denoises, in which the ``interval`` guidance window is measured
        (``schedule.guidance_sigmas``): the run's ``sample.guidance_data_std`` where set (> 0), else the codec's."""
        chosen = self.cfg.sample.guidance_data_std if self.cfg is not None else 0.0
        return chosen if chosen > 0 else codec_data_std(self.codec)

    def _block_mask(self, key_valid: Tensor) -> Tensor:
        """[M, 1, P, S + P]: an image block's queries see the valid prefix keys and the block itself (all of it, or
        causally under the attention ablation)."""
        return self.attention.cached_mask(key_valid, self.num_patches)

    @property
    def job_setup(self) -> JobSetup:
        """What an image job needs to know of this engine (it never holds the engine itself)."""
        return JobSetup(self.model.image_head, self.schedule, self.patch_grid, self.device, self.autocast,
                        self.guidance_data_std)

    def start_image(self, n: int, *, guided: bool, guidance: float, sampler: str | None, steps: int,
                    generator: torch.Generator, guidance_schedule: str | None = None) -> ImageJob:
        """Begin sampling ``n`` images with the model's head's job (its initial randomness drawn now);
        ``guidance_schedule`` None = the run config's."""
        return start_image_job(self.job_setup, n, guided=guided, guidance=guidance, sampler=sampler, steps=steps,
                               generator=generator, guidance_schedule=self.resolve_guidance_schedule(guidance_schedule))

    def denoise(self, prefix: Prefix, *, uncond: Prefix | None, guidance: float, sampler: str | None, steps: int,
                generator: torch.Generator, guidance_schedule: str | None = None, trace: list | None = None) -> Tensor:
        """Sample one image per prefix (each ending in BOI) -> latents [N, C, h, w]: the head's job run to the end
        against ``prefix`` (stacked with ``uncond`` under classifier-free guidance), its passes by ``image_block``.
        ``trace`` (a list) receives ``job.snapshot()`` after every pass."""
        guided = uncond is not None and guidance != 1.0
        job = self.start_image(prefix.next_pos.shape[0], guided=guided, guidance=guidance, sampler=sampler,
                               steps=steps, generator=generator, guidance_schedule=guidance_schedule)
        return run_image_job(job, prefix, uncond, self.image_block, trace)

    def denoise_recomputing(self, seqs: list[list[int]], *, guidance: float, sampler: str | None, steps: int,
                            generator: torch.Generator, guidance_schedule: str | None = None,
                            images: Tensor | None = None, image_spans: list[tuple[int, int]] | None = None) -> Tensor:
        """``denoise`` without the prefix cache: before every pass the prompts ``seqs`` (each ending in BOI; clean
        ``images`` at ``image_spans`` as in ``prefill``), and the unconditional prefix under guidance, go through the
        model again. The naive reference that prefix reuse is tested against and measured by
        (``tools/bench_serve.py``)."""
        guided = guidance != 1.0
        job = self.start_image(len(seqs), guided=guided, guidance=guidance, sampler=sampler, steps=steps,
                               generator=generator, guidance_schedule=guidance_schedule)
        while not job.done:
            pre = self.prefill(seqs, images, image_spans)
            if job.pass_guided:
                pre = concat_prefixes(pre, self.prefill([caption_prompt_tokens(self.tok)] * len(seqs)))
            x, t, mask = job.block_input()
            job.advance(self.image_block(pre, job.block_pass, job.rows(x), t, job.rows(mask)))
        return job.result()

    def autocast(self):
        """The engine's precision context (bf16 autocast or nothing), for the jobs' calls of the head's modules. Held
        open around a whole generation (``text_to_image``, ``caption``, ``generate``, the server's engine thread), it
        makes the bf16 copies of the weights once: autocast caches its casts of parameters until the outermost
        context exits (measured on the tiny recipe, AVX512 + AMX: 7.7 -> 3.2 ms per single-request text step). The
        weights must not change while it is open."""
        return self._ctx()

    def image_block(self, pre: Prefix, block_pass: str, x: Tensor, t, patch_mask: Tensor | None) -> Tensor:
        """The transformer pass an ``ImageJob`` asks for (``job.block_pass``) over image blocks after each prefix."""
        if block_pass == "prediction":
            return self.image_block_prediction(pre, x, t)
        if block_pass == "condition":
            return self.image_block_condition(pre, x, patch_mask)
        raise ValueError(f"unknown image block pass {block_pass!r}")

    def image_block_prediction(self, pre: Prefix, x_t: Tensor, t) -> Tensor:
        """The image head's output for noisy images ``x_t`` [N, C, H, W] at timestep ``t`` (one for all, or [N]),
        placed right after each prefix; image tokens attend to the (frozen) prefix cache and bidirectionally to each
        other."""
        m, P = x_t.shape[0], self.num_patches
        pos = pre.next_pos[:, None] + torch.arange(P, device=self.device)[None]
        t = torch.as_tensor(t)
        t_m = t.to(self.device, torch.float32).expand(m) if t.ndim == 0 else t.to(self.device, torch.float32)
        with torch.no_grad(), self._ctx():
            enc = self.model.encode_images(x_t.to(self.device), t_m)
            h, _ = self.model.trunk(enc.tokens, pos, self._block_mask(pre.key_valid), past_kv=pre.kv,
                                    image_mask_BL=torch.ones_like(pos, dtype=torch.bool))
            return self.model.image_prediction(h, self.patch_grid, enc)

    def image_block_condition(self, pre: Prefix, images: Tensor, patch_mask: Tensor) -> Tensor:
        """One transformer pass over clean image blocks (masked patches -> the head's mask embedding) after each
        prefix -> the normalised hidden states z [M, P, D] the head reads (MAR's per-token conditions).
        ``images`` / ``patch_mask`` cover the N conditional rows of ``pre`` (repeated for the unconditional ones)."""
        m, P = pre.next_pos.shape[0], self.num_patches
        reps = m // images.shape[0]
        pos = pre.next_pos[:, None] + torch.arange(P, device=self.device)[None]
        t0 = torch.zeros(m, dtype=torch.long, device=self.device)
        with torch.no_grad(), self._ctx():
            h = self.model.embed_images(images.repeat(reps, 1, 1, 1), t0, patch_mask.repeat(reps, 1))
            h, _ = self.model.trunk(h, pos, self._block_mask(pre.key_valid), past_kv=pre.kv,
                                    image_mask_BL=torch.ones_like(pos, dtype=torch.bool))
            return self.model.image_condition(h).float()

    def text_to_image(self, prompts: list[str], *, steps: int = 50, guidance: float = 3.0, sampler: str | None = None,
                      seed: int = 0, guidance_schedule: str | None = None) -> Tensor:
        """Prompts -> decoded images [N, C, H, W] in [-1, 1] (pixels), on the CPU. ``sampler`` (whole-image head;
        the MAR head uses ``model.mar.sampler``) None = the objective's first sampler; ``guidance_schedule`` None =
        the run config's (constant without one). Random draws come from a CPU generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        with self._ctx():  # weights cast once for the whole loop
            cond = self.prefill([t2i_prompt_tokens(self.tok, p) for p in prompts])
            uncond = self.prefill([caption_prompt_tokens(self.tok)] * len(prompts)) if guidance != 1.0 else None
            z = self.denoise(cond, uncond=uncond, guidance=guidance, sampler=sampler, steps=steps, generator=gen,
                             guidance_schedule=guidance_schedule)
        return decode_images(self.codec, z)

    # -- text ------------------------------------------------------------------------------------------------
    def caption(self, images: Tensor, max_tokens: int = 48, *, latents: bool = False,
                guidance: float = 1.0) -> list[str]:
        """Greedy captions for pixel images [N, 3, H, W] in [-1, 1], or with ``latents`` for images already in the
        codec's space [N, c, h, w] (latent shards). ``guidance`` > 1 weighs the image's evidence against the text
        prior (``decode_text``'s caption guidance; 1 = plain greedy decoding, with the same banned ids)."""
        with torch.no_grad():
            z = images.to(self.device) if latents else self.codec.encode(images.to(self.device))
        head = caption_prompt_tokens(self.tok)  # [BOS][BOI]
        seq = head + [self.tok.image_id] * self.num_patches + [self.tok.eoi_id]
        n = len(images)
        with self._ctx():  # weights cast once for the whole loop
            prefix = self.prefill([seq] * n, z, [(i, len(head)) for i in range(n)])
            prior = self.prefill([[self.tok.bos_id]] * n) if guidance != 1.0 else None
            out = self.decode_text(prefix, max_tokens, prior=prior, guidance=guidance)
        return [self.tok.decode(ids) for ids in out]

    def decode_text(self, prefix: Prefix, max_tokens: int, temperature: float = 0.0,
                    generator: torch.Generator | None = None, *, prior: Prefix | None = None,
                    guidance: float = 1.0) -> list[list[int]]:
        """Sample (greedy at temperature 0) until EOS for every sequence; returns the ids before EOS. The text holds no
        special id but EOS (``text_banned_ids``), at every guidance: guidance 1 with a ``prior`` chooses as without.

        Caption guidance (classifier-free guidance on text, as in Sanchez et al. 2023, "Stay on topic with CFG"):
        with a ``prior`` prefix batch (the same text without the image, ``[BOS]``: the layout of a text -> image
        prompt, so the model's prior over captions) the next token is chosen from
        ``log p_prior + guidance * (log p_image - log p_prior)``; both prefixes take the same tokens."""
        n = prefix.next_pos.shape[0]
        done = torch.zeros(n, dtype=torch.bool)
        out: list[list[int]] = [[] for _ in range(n)]
        for _ in range(max_tokens):
            if prior is None:
                nxt = self._next_token(prefix.last_h, temperature, generator, self.text_banned_ids())
            else:
                nxt = self._next_token_guided(prefix.last_h, prior.last_h, guidance, temperature, generator)
            for i, tok in enumerate(nxt.tolist()):
                if not done[i]:
                    if tok == self.tok.eos_id:
                        done[i] = True
                    else:
                        out[i].append(tok)
            if bool(done.all()):
                break
            prefix = self.step_tokens(prefix, nxt)
            if prior is not None:
                prior = self.step_tokens(prior, nxt)
        return out

    def _next_token_guided(self, h_ND: Tensor, prior_h_ND: Tensor, guidance: float, temperature: float,
                           generator: torch.Generator | None) -> Tensor:
        tok = self.tok
        with torch.no_grad():
            logp = self.model.text_logits(torch.cat((h_ND, prior_h_ND))).float().cpu().log_softmax(-1)
        cond, prior = logp.chunk(2)
        # In the prior's layout ([BOS] caption [BOI] image) a caption ends with BOI, not EOS: its end-of-caption
        # probability is the two together, else guidance would reward EOS by (g - 1) times EOS's tiny prior.
        prior[:, tok.eos_id] = torch.logaddexp(prior[:, tok.eos_id], prior[:, tok.boi_id])
        return choose(prior + guidance * (cond - prior), temperature, generator, self.text_banned_ids())

    def text_banned_ids(self) -> list[int]:
        """Ids ``decode_text`` never chooses, guided or not: PAD, BOS, the image placeholder, EOI, and BOI (a
        caption holds no image). EOS stays allowed."""
        return never_text_ids(self.tok) + [self.tok.boi_id]

    def _next_token(self, h_ND: Tensor, temperature: float, generator: torch.Generator | None,
                    banned: list[int] | None = None) -> Tensor:
        with torch.no_grad():
            logits = self.model.text_logits(h_ND).float().cpu()
        return choose(logits, temperature, generator, banned)

    # -- interleaved -----------------------------------------------------------------------------------------
    def generate(self, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0, steps: int = 50,
                 guidance: float = 3.0, sampler: str | None = None, seed: int = 0,
                 max_images: int = 4, guidance_schedule: str | None = None) -> Iterator[tuple[str, object]]:
        """Stream an interleaved continuation of ``prompt``: yields ("text", str) pieces and ("image", [C,H,W])
        whenever the model emits BOI; the clean image is appended to the cache, then EOI, and text goes on. PAD, BOS,
        the image placeholder and EOI are never sampled; BOI only while fewer than ``max_images`` were made."""
        gen = torch.Generator().manual_seed(seed)
        tok = self.tok
        ids = [tok.bos_id] + tok.encode(prompt)
        prefix = self.prefill([ids])
        uncond = self.prefill([caption_prompt_tokens(tok)]) if guidance != 1.0 else None
        images = 0
        never = never_text_ids(tok)  # BOI only while images are allowed
        for _ in range(max_tokens):
            nxt = self._next_token(prefix.last_h, temperature, gen, never + ([tok.boi_id] if images >= max_images
                                                                             else []))
            token = int(nxt[0])
            if token == tok.eos_id:
                return
            prefix = self.step_tokens(prefix, nxt)
            if token != tok.boi_id:
                yield "text", tok.decode([token])
                continue
            images += 1
            z = self.denoise(prefix, uncond=uncond, guidance=guidance, sampler=sampler, steps=steps, generator=gen,
                             guidance_schedule=guidance_schedule)
            yield "image", decode_images(self.codec, z)[0]
            prefix = self.append_image(prefix, z)
            prefix = self.step_tokens(prefix, torch.tensor([tok.eoi_id]))

    def append_image(self, prefix: Prefix, z: Tensor) -> Prefix:
        """Append clean image tokens (t = 0) to the cache; the block attends to the prefix and to itself."""
        n, P = z.shape[0], self.num_patches
        pos = prefix.next_pos[:, None] + torch.arange(P, device=self.device)[None]
        mask = self._block_mask(prefix.key_valid)
        with torch.no_grad(), self._ctx():
            h = self.model.embed_images(z.to(self.device), torch.zeros(n, dtype=torch.long, device=self.device))
            h, kv = self.model.trunk(h, pos, mask, past_kv=prefix.kv,
                                     image_mask_BL=torch.ones_like(pos, dtype=torch.bool))
        valid = torch.cat((prefix.key_valid, torch.ones(n, P, dtype=torch.bool, device=self.device)), dim=1)
        return Prefix(kv, valid, prefix.next_pos + P, h[:, -1])


LATENT_DATA_STD = 1.0  # VAE latents are normalised by the VAE config's scaling to unit std (tools/train_autoencoder.py)
PIXEL_DATA_STD = 0.5  # pixels in [-1, 1]: EDM's sigma_data for images (the 32x32 shapes renders measure 0.42)


def codec_data_std(codec) -> float:
    """The data std an engine assumes for its codec's space when the run names none: ``PIXEL_DATA_STD`` for pixels
    (the codec that clips samples to [-1, 1]), ``LATENT_DATA_STD`` for latents."""
    return PIXEL_DATA_STD if getattr(codec, "clip_sample", False) else LATENT_DATA_STD
