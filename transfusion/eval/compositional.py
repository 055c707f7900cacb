"""Report v2: evaluation on the compositional shapes world (v3), every metric for seen and unseen compositions apart.

Sections of ``<run>/eval/report.json`` (and ``report.md``):

    geneval     text -> image from the held-out prompts, judged by the strict judge (``transfusion/eval/geneval.py``):
                ``geneval.{tag}.{seen,unseen}``, ``geneval.overall.{seen,unseen}`` (mean of tag accuracies)
    caption     greedy captions of held-out images against every complete description of the scene (the full
                caption, and for two objects "A and B", "B and A" and each relation that holds, both ways):
                exact match (any of them), per-attribute accuracy (count, shapes, colors bound to shapes, a stated
                relation that holds), BLEU-4 and CIDEr over those references; seen / unseen by the full caption's
                composition
    caption_nll image-conditioned NLL of the full caption (its tokens and EOS) in bits per caption
    diffusion   the objective's loss on held-out images per noise-level bucket (quarters of the schedule)
    fid         FID and KID between generated images and held-out renders of the same prompts, with the sample count
                and the real-vs-real floor (two disjoint sets of held-out renders of the same size)

Generated images are written to ``<out>/t2i/`` with ``prompts.json``, so ``tools/judge.py`` can re-judge them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data_pipelines.scenes import Prompt, is_unseen, make_prompt, parse_prompt
from data_pipelines.shapes import Scene
from transfusion.eval.geneval import CHECKS, judge, summarise
from transfusion.eval.scores import bits_per_caption, bleu, cider
from transfusion.generation.grid import make_grid, to_uint8

FULL_TAG = {"single_object": "colors", "colors": "colors", "two_object": "color_attr", "color_attr": "color_attr",
            "counting": "counting", "position": "position"}
NOISE_BUCKETS = 4


def is_v3_record(record) -> bool:
    return isinstance(record, dict) and record.get("world") == 3 and isinstance(record.get("prompt"), dict)


def full_caption(record: dict) -> Prompt:
    """The complete description of a held-out scene (every object's color), in the world's grammar."""
    prompt = Prompt.from_dict(record["prompt"])
    scene = Scene.from_dict(record)
    objects = tuple((o.color, o.shape) for o in scene.objects)
    return make_prompt(FULL_TAG[prompt.tag], objects, prompt.relation)


class _Box:
    """A scene object as the judge's relative-position rule sees it (centre and size, unit coordinates)."""

    def __init__(self, o) -> None:
        self.center, self.size = (o.cx, o.cy), (2 * o.half_size, 2 * o.half_size)


def caption_references(record: dict) -> list[Prompt]:
    """Every complete, correct description of a held-out scene in the world's grammar, the full caption first: a
    two-object scene is "A and B", "B and A", and "A r B" / "B r' A" for every relation r that holds between the
    objects under GenEval's rule (the judge's)."""
    from data_pipelines.scenes import INVERSE
    from transfusion.eval.geneval import relative_position

    full = full_caption(record)
    objs = Scene.from_dict(record).objects
    if len(objs) != 2 or objs[0].shape == objs[1].shape:
        return [full]
    a, b = ((o.color, o.shape) for o in objs)
    refs = [full, make_prompt("color_attr", (a, b)), make_prompt("color_attr", (b, a))]
    for rel in sorted(relative_position(_Box(objs[0]), _Box(objs[1]))):
        refs += [make_prompt("position", (a, b), rel), make_prompt("position", (b, a), INVERSE[rel])]
    return list(dict.fromkeys(refs))  # unique, full caption first


def caption_attributes(text: str, refs: list[Prompt]) -> dict[str, bool]:
    """Per-attribute correctness of a generated caption against a scene's references (``caption_references``):
    count, shapes, colors (bound to shapes), and for scenes captioned by a relation, whether the caption states a
    relation that holds. A caption outside the grammar is wrong on every attribute."""
    ref = refs[0]
    try:
        got = parse_prompt(text)
    except ValueError:
        return {"count": False, "shapes": False, "colors": False} | ({"relation": False} if ref.relation else {})
    out = {"count": len(got.objects) == len(ref.objects),
           "shapes": sorted(s for _, s in got.objects) == sorted(s for _, s in ref.objects),
           "colors": sorted(got.objects, key=str) == sorted(ref.objects, key=str)}
    if ref.relation:
        holds = {(r.objects[0][1], r.relation, r.objects[1][1]) for r in refs if r.relation}
        out["relation"] = got.relation is not None and (got.objects[0][1], got.relation, got.objects[1][1]) in holds
    return out


def names_seen_composition(text: str) -> bool:
    """Whether a caption is in the world's grammar and names only compositions that occur in training. For an image
    of an unseen composition, a wrong caption of this kind is a substitution by a memorised one ("a blue square"
    captioned "a purple square"): the report's ``seen_substitution``."""
    try:
        return not is_unseen(parse_prompt(text))
    except ValueError:
        return False


def _split(values: Sequence, unseen: Sequence[bool]) -> dict[str, list]:
    return {"seen": [v for v, u in zip(values, unseen) if not u], "unseen": [v for v, u in zip(values, unseen) if u],
            "all": list(values)}


def _mean(xs) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def evaluate_v3(engine, samples: list, *, num_t2i: int, num_caption: int, num_fid: int, batch_size: int, steps: int,
                guidance: float, sampler: str, guidance_schedule: str, seed: int, max_caption_tokens: int,
                out_dir: Path | None, progress: bool, latents: bool, caption_guidance: float = 1.0) -> dict:
    report: dict = {"world": 3}
    timings: dict[str, float] = {}

    # text -> image, judged strictly
    t0 = time.perf_counter()
    t2i = samples[:num_t2i]
    results, generated, grid_by_tag = [], [], {}
    img_dir = out_dir / "t2i" if out_dir is not None else None
    if img_dir is not None:
        img_dir.mkdir(parents=True, exist_ok=True)
    prompts_json = {}
    bar = tqdm(total=len(t2i), desc="eval t2i", unit="img", disable=not progress)
    for i, chunk in enumerate(_chunks(t2i, batch_size)):
        images = engine.text_to_image([rec["caption"] for _, _, _, rec in chunk], steps=steps, guidance=guidance,
                                      sampler=sampler, seed=seed + i, guidance_schedule=guidance_schedule)
        generated.append(images)
        for (key, _, _, rec), img, pixels in zip(chunk, to_uint8(images), images):
            prompt = Prompt.from_dict(rec["prompt"])
            verdict = judge(img, prompt)
            results.append({"key": key, "prompt": prompt.text, "tag": prompt.tag, "unseen": bool(rec["unseen"]),
                            "pass": verdict.passed, "failed": verdict.failed, "check": verdict.check})
            grid_by_tag.setdefault(prompt.tag, []).append((pixels, prompt.text))
            if img_dir is not None:
                Image.fromarray(img).save(img_dir / f"{key}.png")
                prompts_json[f"{key}.png"] = {"text": prompt.text, "unseen": bool(rec["unseen"])}
        bar.update(len(chunk))
    bar.close()
    timings["t2i_seconds_per_image"] = (time.perf_counter() - t0) / max(len(t2i), 1)
    if results:
        summary = summarise(results)
        report["geneval"] = {k.removeprefix("geneval."): v for k, v in summary.items()
                             if k not in ("counts", "failures")}
        report["geneval"]["counts"] = summary["counts"]
        report["geneval"]["failures"] = summary["failures"]
    if img_dir is not None and prompts_json:
        (img_dir / "prompts.json").write_text(json.dumps(prompts_json, indent=1) + "\n")
        (out_dir / "judged.json").write_text(json.dumps({"images": results}, indent=1) + "\n")
        for tag, items in grid_by_tag.items():
            make_grid(torch.stack([p for p, _ in items[:16]]), [t for _, t in items[:16]]).save(
                out_dir / f"t2i_{tag}.png")

    # image -> caption, against the full description
    t0 = time.perf_counter()
    cap = samples[:num_caption]
    all_refs = [caption_references(rec) for _, _, _, rec in cap]
    refs = [r[0] for r in all_refs]  # the full caption: decides seen / unseen, and is the NLL's target
    unseen = [is_unseen(r) for r in refs]
    texts: list[str] = []
    bar = tqdm(total=len(cap), desc="eval captions", unit="img", disable=not progress)
    for chunk in _chunks(cap, batch_size):
        texts += engine.caption(torch.stack([im for _, im, _, _ in chunk]), max_caption_tokens, latents=latents,
                                guidance=caption_guidance)
        bar.update(len(chunk))
    bar.close()
    timings["caption_seconds_per_image"] = (time.perf_counter() - t0) / max(len(cap), 1)
    if cap:
        caption: dict = {}
        exact = [t.strip() in {r.text for r in rs} for t, rs in zip(texts, all_refs)]
        attrs = [caption_attributes(t, rs) for t, rs in zip(texts, all_refs)]
        for split, idx in _split(list(range(len(cap))), unseen).items():
            if not idx:
                continue
            sec = {"n": len(idx), "exact_match": _mean([exact[i] for i in idx])}
            for a in ("count", "shapes", "colors", "relation"):
                vals = [attrs[i][a] for i in idx if a in attrs[i]]
                if vals:
                    sec[f"{a}_accuracy"] = _mean(vals)
            if split == "unseen":  # wrong captions that fall back on a composition seen in training
                sec["seen_substitution"] = _mean([not exact[i] and names_seen_composition(texts[i]) for i in idx])
            ref_texts = [[r.text for r in all_refs[i]] for i in idx]
            b4 = bleu([texts[i] for i in idx], ref_texts)[3]
            sec["bleu4"] = None if b4 != b4 else b4  # NaN (no 4-gram at all) -> null in JSON
            sec["cider"] = cider([texts[i] for i in idx], ref_texts) if len(idx) > 1 else None
            caption[split] = sec
        report["caption"] = caption
        report["caption_examples"] = [{"key": k, "reference": r.text, "generated": t, "unseen": u}
                                      for (k, _, _, _), r, t, u in list(zip(cap, refs, texts, unseen))[:12]]
        report["caption_nll"] = caption_nll_bits(engine, cap, refs, unseen, batch_size=batch_size, latents=latents)

    report["diffusion"] = diffusion_loss_by_noise(engine, samples, batch_size=batch_size, seed=seed, latents=latents)
    if num_fid and generated:
        report["fid"] = fid_report(engine, samples, torch.cat(generated), num_fid, latents=latents)
    report["timings"] = timings
    return report


def teacher_forced(engine, seqs: list, batch_size: int, gen: torch.Generator, schedule=None,
                    latents: bool = False) -> list[tuple[float, float, float, float]]:
    """(text_sum, text_count, image_sum, image_count) per packed batch of ``seqs``."""
    from data_pipelines.packing import Packer
    from transfusion.attention.backends import build_attention_mask
    from transfusion.latents.prepare import prepare_batch
    from transfusion.training.losses import compute_loss_terms

    cfg, tok = engine.cfg, engine.tok
    rows = max(1, batch_size * max(len(s) for s in seqs) // cfg.data.seq_len)
    batches, packer = [], Packer(cfg.data.seq_len, rows, tok.pad_id, engine.patch_grid, latents=latents)
    for seq in seqs:
        if not packer.add(seq):
            batches.append(packer.emit())
            packer.add(seq)
    if len(packer):
        batches.append(packer.emit())
    out = []
    with torch.no_grad():
        for batch in batches:
            batch = prepare_batch(batch, engine.codec, engine.device, engine.patch_grid, cfg.model.patch_size)
            mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa",
                                        bidirectional_images=engine.bidirectional_images)
            with engine.autocast():
                t = compute_loss_terms(engine.model, batch, mask, schedule or engine.schedule, cfg.loss, gen)
            out.append((float(t.text_sum), float(t.text_count), float(t.image_sum), float(t.image_count)))
    return out


def caption_nll_bits(engine, samples: list, refs: list[Prompt], unseen: list[bool], *, batch_size: int,
                     latents: bool) -> dict:
    """Mean NLL of each reference caption (its tokens and EOS) given its image, in bits, seen / unseen / all."""
    from data_pipelines.samples import CAPTION, build_sequence
    from transfusion.batch import IGNORE_INDEX

    tok = engine.tok
    out: dict = {}
    for split, idx in _split(list(range(len(samples))), unseen).items():
        if not idx:
            continue
        seqs = []
        for i in idx:
            key, image, _, _ = samples[i]
            seq = build_sequence(tok, key, image, tok.encode(refs[i].text), patch_grid=engine.patch_grid,
                                 layout=CAPTION)
            eoi = seq.tokens.index(tok.eoi_id)  # targets from EOI on: the caption's tokens and EOS
            seq.text_targets = [IGNORE_INDEX] * eoi + seq.text_targets[eoi:]
            seqs.append(seq)
        parts = teacher_forced(engine, seqs, batch_size, torch.Generator().manual_seed(0), latents=latents)
        out[split] = bits_per_caption(sum(p[0] for p in parts), len(seqs))
    return out


class _BucketSchedule:
    """The engine's schedule with training timesteps drawn uniformly inside one noise-level bucket."""

    def __init__(self, schedule, lo: float, hi: float) -> None:
        self._s, self.lo, self.hi = schedule, lo, hi

    def __getattr__(self, name):
        return getattr(self._s, name)

    def sample_timesteps(self, n: int, generator, device):
        u = torch.rand(n, generator=generator)
        t = self.lo + (self.hi - self.lo) * u
        return (t if self._s.is_flow else t.floor().long()).to(device)


def diffusion_loss_by_noise(engine, samples: list, *, batch_size: int, seed: int, latents: bool) -> dict:
    """The image objective's loss on held-out images (text -> image layout, no caption dropout) per quarter of the
    schedule: ``t{lo}-{hi}`` buckets of the training timestep range, fixed seeds."""
    from data_pipelines.samples import T2I, build_sequence

    tok, T = engine.tok, engine.schedule.num_train_timesteps
    seqs = [build_sequence(tok, key, image, tok.encode(caption), patch_grid=engine.patch_grid, layout=T2I)
            for key, image, caption, _ in samples]
    out = {}
    for b in range(NOISE_BUCKETS):
        lo, hi = b * T / NOISE_BUCKETS, (b + 1) * T / NOISE_BUCKETS
        parts = teacher_forced(engine, seqs, batch_size, torch.Generator().manual_seed(seed + b),
                                _BucketSchedule(engine.schedule, lo, hi), latents=latents)
        out[f"t{int(lo)}-{int(hi)}"] = sum(p[2] for p in parts) / max(sum(p[3] for p in parts), 1.0)
    return out


def fid_report(engine, samples: list, generated: torch.Tensor, num_fid: int, *, latents: bool) -> dict:
    """FID / KID of ``num_fid`` generated images against the held-out renders of the same prompts, and the floor:
    those renders against ``num_fid`` other held-out renders (needs 2 x num_fid held-out samples)."""
    from transfusion.eval.inception import InceptionFeatures
    from transfusion.eval.scores import frechet_distance, kernel_inception_distance

    n = min(num_fid, len(generated), len(samples) // 2)
    if n < 2:
        return {"skipped": f"needs at least 2 x 2 held-out samples, have {len(samples)}"}

    def real(rows):
        imgs = torch.stack([im for _, im, _, _ in rows])
        if latents:
            with torch.no_grad():
                imgs = engine.codec.decode(imgs.to(engine.device)).clamp(-1, 1).float().cpu()
        return imgs

    feats = InceptionFeatures()
    gen_f, real_a, real_b = feats(generated[:n]), feats(real(samples[:n])), feats(real(samples[n:2 * n]))
    kid, kid_std = kernel_inception_distance(gen_f, real_a, subset_size=min(n, 1000))
    floor_kid, _ = kernel_inception_distance(real_b, real_a, subset_size=min(n, 1000))
    return {"n": n, "fid": frechet_distance(gen_f, real_a), "fid_floor": frechet_distance(real_b, real_a),
            "kid": kid, "kid_std": kid_std, "kid_floor": floor_kid}


def markdown(report: dict) -> str:
    """A short human-readable report."""
    lines = ["# Evaluation report (compositional shapes world)", ""]
    g = report.get("geneval")
    if g:
        lines += ["| tag | seen | unseen | n seen | n unseen |", "| --- | --- | --- | --- | --- |"]
        for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"):
            cells = [g.get(f"{tag}.{s}") for s in ("seen", "unseen")]
            counts = [g["counts"].get(f"{tag}.{s}", "") for s in ("seen", "unseen")] if tag != "overall" else ["", ""]
            lines.append(f"| {tag} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
                         + f" | {counts[0]} | {counts[1]} |")
        lines.append("")
        fails = g.get("failures") or {}
        if fails:
            lines += ["Why generated images fail (each failed image counted once, at the first check it fails; "
                      "`transfusion.eval.geneval.CHECKS`):", "",
                      "| check | seen | unseen | what it means |", "| --- | --- | --- | --- |"]
            for check, meaning in (*CHECKS.items(), ("unknown", "no check recorded")):
                n = [fails.get(f"{check}.{s}", 0) for s in ("seen", "unseen")]
                if any(n):
                    lines.append(f"| {check} | {n[0]} | {n[1]} | {meaning} |")
            lines.append("")
    c = report.get("caption")
    if c:
        keys = ["exact_match", "count_accuracy", "shapes_accuracy", "colors_accuracy", "relation_accuracy", "bleu4",
                "cider"]
        lines += ["| caption | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
        for split in ("seen", "unseen", "all"):
            if split in c:
                lines.append(f"| {split} (n={c[split]['n']}) | " + " | ".join(
                    "-" if c[split].get(k) is None else f"{c[split][k]:.3f}" for k in keys) + " |")
        lines += ["", "relation_accuracy counts only scenes captioned by a relation: the share whose caption states "
                  "a relation that holds (\"A and B\" is a complete, exact caption of such a scene, but states none).",
                  ""]
        sub = c.get("unseen", {}).get("seen_substitution")
        if sub is not None:
            lines += [f"seen_substitution: {sub:.3f} of the {c['unseen']['n']} images of unseen compositions get a "
                      "wrong caption that names only compositions seen in training (the memorised fallback).", ""]
    if "caption_nll" in report:
        lines.append("caption NLL (bits per caption): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                   report["caption_nll"].items()))
    if "diffusion" in report:
        lines.append("diffusion loss by noise level: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                   report["diffusion"].items()))
    if "fid" in report and "fid" in report["fid"]:
        f = report["fid"]
        lines.append(f"FID {f['fid']:.2f} (real-vs-real floor {f['fid_floor']:.2f}), KID {f['kid']:.4f} "
                     f"(floor {f['kid_floor']:.4f}), n = {f['n']}")
    return "\n".join(lines) + "\n"
