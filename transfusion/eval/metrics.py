"""Offline evaluation on held-out shards: text -> image judged from pixels, captioning, perplexity, diffusion loss.

Held-out shards of real images (Fashion-MNIST, ``transfusion/eval/fashion.py``) get CAS, caption accuracy and FID /
KID against the test split. Held-out shards of the compositional world (v3) get report v2 (``transfusion/eval/compositional.py``: GenEval tags,
caption scores, caption NLL in bits, loss per noise level, FID / KID; seen and unseen compositions apart). Report keys
for the single-object world (v2) (``<run>/eval/report.json``):
    t2i.{color,shape,position,all}_accuracy    images generated from held-out captions, judged by eval.judge
    caption.exact_match, caption.{color,shape,position}_accuracy   greedy captions of held-out images
    text.perplexity                            teacher-forced, text targets of the text -> image layout
    diffusion.val_loss                         the objective's loss (epsilon, v or velocity MSE) on held-out images, fixed seeds
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipelines.shapes import Scene
from transfusion.eval.compositional import evaluate_v3, is_v3_record
from transfusion.eval.fashion import evaluate_fashion, is_fashion_record
from transfusion.eval.judge import accuracy, judge_image, score_caption, score_scene
from transfusion.eval.scoring import scoring_metrics
from transfusion.generation.grid import make_grid, to_uint8


def _chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def evaluate(engine, *, shards: str, num_t2i: int, num_caption: int, batch_size: int, steps: int, guidance: float,
             sampler: str, seed: int, max_caption_tokens: int, out_dir: Path | None = None,
             progress: bool = True, guidance_schedule: str | None = None, num_fid: int = 0,
             caption_guidance: float = 1.0) -> dict:
    from data_pipelines.loader import resolve_format
    from data_pipelines.shards import expand_shard_spec, iter_decoded_samples

    cfg = engine.cfg
    latents, _ = resolve_format(expand_shard_spec(shards), cfg.data.format, cfg.data.image_size, engine.patch_grid)
    samples = list(iter_decoded_samples(shards, cfg.data.image_size, cfg.data.caption_field,
                                        limit=max(num_t2i, num_caption), resize=cfg.data.resize, latents=latents))
    if not samples:
        raise FileNotFoundError(f"no usable held-out samples in {shards}")
    schedule = engine.resolve_guidance_schedule(guidance_schedule)  # None -> the run's sample.guidance_schedule
    report: dict = {"num_samples": len(samples), "held_out_format": "latents" if latents else "pixels",
                    "settings": {"steps": steps, "guidance": guidance, "sampler": sampler,
                                 "guidance_schedule": schedule, "seed": seed,
                                 "caption_guidance": caption_guidance}}
    kw = dict(num_t2i=num_t2i, num_caption=num_caption, num_fid=num_fid, batch_size=batch_size, steps=steps,
              guidance=guidance, sampler=sampler, guidance_schedule=schedule, seed=seed,
              max_caption_tokens=max_caption_tokens, caption_guidance=caption_guidance, out_dir=out_dir,
              progress=progress, latents=latents)
    if is_fashion_record(samples[0][3]):  # real images: CAS, caption accuracy, FID / KID against the test split
        want = 2 * max(num_t2i, num_caption, 2 * num_fid)  # each test image is held out twice (two template kinds)
        if len(samples) < want:
            samples = list(iter_decoded_samples(shards, cfg.data.image_size, cfg.data.caption_field, limit=want,
                                                resize=cfg.data.resize, latents=latents))
        report["num_samples"] = len(samples)
        return report | evaluate_fashion(engine, samples, **kw)
    if is_v3_record(samples[0][3]):  # the compositional world: report v2, seen / unseen apart
        return report | evaluate_v3(engine, samples, **kw)
    return report | evaluate_v2(engine, samples, **kw)


def evaluate_v2(engine, samples: list, *, num_t2i: int, num_caption: int, batch_size: int, steps: int,
                guidance: float, sampler: str, guidance_schedule: str, seed: int, max_caption_tokens: int,
                caption_guidance: float, out_dir: Path | None, progress: bool, latents: bool, **_) -> dict:
    """The single-object world's report (the module docstring's keys); ``num_fid`` is not used here."""
    report, timings = {}, {}
    t0 = time.perf_counter()
    report["t2i"], grid_imgs, grid_caps = t2i_scores(engine, samples[:num_t2i], batch_size=batch_size, steps=steps,
                                                     guidance=guidance, sampler=sampler, seed=seed,
                                                     guidance_schedule=guidance_schedule, progress=progress)
    timings["t2i_seconds_per_image"] = (time.perf_counter() - t0) / max(min(num_t2i, len(samples)), 1)
    t0 = time.perf_counter()
    report["caption"], report["caption_examples"] = caption_scores(
        engine, samples[:num_caption], batch_size=batch_size, max_caption_tokens=max_caption_tokens,
        caption_guidance=caption_guidance, latents=latents, progress=progress)
    timings["caption_seconds_per_image"] = (time.perf_counter() - t0) / max(min(num_caption, len(samples)), 1)

    # teacher-forced text perplexity and diffusion validation loss
    report |= scoring_metrics(engine, samples, batch_size=batch_size, seed=seed, latents=latents)
    report["timings"] = timings

    if out_dir is not None and grid_imgs:
        out_dir.mkdir(parents=True, exist_ok=True)
        make_grid(torch.cat(grid_imgs)[:32], grid_caps[:32]).save(out_dir / "t2i_grid.png")
    return report


def t2i_scores(engine, t2i: list, *, batch_size: int, steps: int, guidance: float, sampler: str, seed: int,
               guidance_schedule: str, progress: bool) -> tuple[dict, list, list]:
    """Text -> image from held-out captions, judged from pixels: (report section, grid images, grid captions)."""
    scores, grid_imgs, grid_caps = [], [], []
    bar = tqdm(total=len(t2i), desc="eval t2i", unit="img", disable=not progress)
    for i, chunk in enumerate(_chunks(t2i, batch_size)):
        images = engine.text_to_image([c for _, _, c, _ in chunk], steps=steps, guidance=guidance, sampler=sampler,
                                      seed=seed + i, guidance_schedule=guidance_schedule)
        for (key, _, cap, record), img in zip(chunk, to_uint8(images)):
            if Scene.is_record(record):  # the judge scores shapes-world scenes only
                scores.append(score_scene(judge_image(img), record))
        if len(grid_imgs) < 32:
            grid_imgs.append(images[:32])
            grid_caps += [c for _, _, c, _ in chunk][:32]
        bar.update(len(chunk))
    bar.close()
    return {f"{k}_accuracy": v for k, v in accuracy(scores).items()} | {"n": len(scores)}, grid_imgs, grid_caps


def caption_scores(engine, cap: list, *, batch_size: int, max_caption_tokens: int, caption_guidance: float,
                   latents: bool, progress: bool) -> tuple[dict, list[dict]]:
    """Greedy captions of held-out images: (report section, the first 10 examples)."""
    exact, cap_scores, examples = [], [], []
    bar = tqdm(total=len(cap), desc="eval captions", unit="img", disable=not progress)
    for chunk in _chunks(cap, batch_size):
        texts = engine.caption(torch.stack([im for _, im, _, _ in chunk]), max_caption_tokens, latents=latents,
                               guidance=caption_guidance)
        for (key, _, ref, record), text in zip(chunk, texts):
            exact.append(text.strip() == ref.strip())
            if Scene.is_record(record):  # the judge scores shapes-world scenes only
                cap_scores.append(score_caption(text, record))
            if len(examples) < 10:
                examples.append({"key": key, "reference": ref, "generated": text})
        bar.update(len(chunk))
    bar.close()
    section = {"exact_match": sum(exact) / max(len(exact), 1), "n": len(exact)}
    return section | {f"{k}_accuracy": v for k, v in accuracy(cap_scores).items()}, examples
