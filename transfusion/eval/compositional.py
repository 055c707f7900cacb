"""Report v2: evaluation on the compositional shapes world (v3), every metric for seen and unseen compositions apart.

Sections of ``<run>/eval/report.json`` (and ``report.md``):

    geneval     text -> image from the held-out prompts, judged by the strict judge (``transfusion/eval/geneval.py``):
                ``geneval.{tag}.{seen,unseen}``; ``geneval.overall_shared.{seen,unseen}``, the mean of the accuracies
                of the tags that have both seen and unseen prompts (the headline: seen and unseen over the same
                tags), and ``geneval.overall_all_tags.*`` over every tag of a split; ``geneval.se`` the standard error
                of each; ``geneval.by_kind.{kind}`` the pass rate of unseen prompts per held-out kind (object,
                count_shape, relation, object_pair)
    caption     greedy captions of held-out images against every complete description of the scene (the full
                caption, and for two objects "A and B", "B and A" and each relation that holds, both ways):
                ``complete_description`` (the caption is one of them), ``exact_match`` (complete, and for an image
                of an unseen composition it also states the unseen part: "A and B" of a held-out relation is
                complete but not exact), per-attribute accuracy (count, shapes, colors bound to shapes, a stated
                relation that holds), BLEU-4 and CIDEr over those references; seen / unseen by the full caption's
                composition, and unseen per held-out kind (``unseen_by_kind``). Wrong captions are split into
                ``omission`` (true of the scene but leaving something out, such as the held-out part) and, for
                unseen images, ``seen_substitution`` (false, naming only compositions seen in training); every rate
                has its binomial standard error as ``<rate>_se``
    caption_nll image-conditioned NLL of the full caption (its tokens and EOS) in bits per caption
    diffusion   the objective's loss on held-out images per noise-level bucket (quarters of the schedule)
    fid         FID (with a 95 % bootstrap interval) and KID (mean and std over subsets smaller than n) between
                generated images and held-out renders of the same prompts, with the sample count and the real-vs-real floor (two
                disjoint sets of held-out renders of the same size)

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

from data_pipelines.scenes import TAGS, UNSEEN_KINDS, Prompt, is_unseen, make_prompt, parse_prompt, unseen_kinds
from data_pipelines.shapes import Scene
from transfusion.eval.geneval import CHECKS, judge, summarise
from transfusion.eval.scores import bits_per_caption, bleu, cider
from transfusion.eval.scoring import teacher_forced
from transfusion.eval.stats import binomial_se, mean_of_rates_se
from transfusion.generation.grid import make_grid, to_uint8
from transfusion.generation.images import decode_images

# Raised when a number of the report changes meaning (3: issue 26's fair report: overall_shared, exact_match that
# states the unseen part, omissions apart, the extra-object judge, standard errors), so that tools reusing old
# reports (tools/synergy.py) can tell them from current ones.
REPORT_VERSION = 3
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


def caption_references(record: dict) -> list[Prompt]:
    """Every complete, correct description of a held-out scene in the world's grammar, the full caption first: a
    two-object scene is "A and B", "B and A", and "A r B" / "B r' A" for every relation r that holds between the
    objects under GenEval's rule (the judge's)."""
    from data_pipelines.scenes import INVERSE, object_relations

    full = full_caption(record)
    objs = Scene.from_dict(record).objects
    if len(objs) != 2 or objs[0].shape == objs[1].shape:
        return [full]
    a, b = ((o.color, o.shape) for o in objs)
    refs = [full, make_prompt("color_attr", (a, b)), make_prompt("color_attr", (b, a))]
    for rel in sorted(object_relations(objs[0], objs[1])):
        refs += [make_prompt("position", (a, b), rel), make_prompt("position", (b, a), INVERSE[rel])]
    return list(dict.fromkeys(refs))  # unique, full caption first


def _relations_that_hold(refs: list[Prompt]) -> set[tuple[str, str, str]]:
    """(shape a, relation, shape b) of every relation the references state: those that hold in the scene."""
    return {(r.objects[0][1], r.relation, r.objects[1][1]) for r in refs if r.relation}


def _states_holding_relation(got: Prompt, refs: list[Prompt]) -> bool:
    triple = (got.objects[0][1], got.relation, got.objects[-1][1])
    return got.relation is not None and triple in _relations_that_hold(refs)


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
        out["relation"] = _states_holding_relation(got, refs)
    return out


def normalise_caption(text: str) -> str:
    """A caption as the world's grammar writes it (lower case, no final period) when it parses, else stripped."""
    try:
        return parse_prompt(text).text
    except ValueError:
        return text.strip()


def names_seen_composition(text: str) -> bool:
    """Whether a caption is in the world's grammar and names only compositions that occur in training. For an image
    of an unseen composition, a wrong caption of this kind that is not an omission (``is_true_of``) is a
    substitution by a memorised one ("a blue square" captioned "a purple square"): the report's
    ``seen_substitution``."""
    try:
        return not is_unseen(parse_prompt(text))
    except ValueError:
        return False


def states_unseen_part(text: str, full: Prompt) -> bool:
    """Whether a caption states every held-out composition of its scene's full caption (``unseen_kinds``): the held-out
    object with its color, the held-out count of a shape, the held-out relation (either phrasing), the held-out pair.
    "a red circle and a blue square" states no relation, so it does not state a held-out one."""
    try:
        return unseen_kinds(full) <= unseen_kinds(parse_prompt(text))
    except ValueError:
        return False


def is_true_of(text: str, refs: list[Prompt]) -> bool:
    """Whether a caption in the world's grammar is true of the scene that ``refs`` describe (``caption_references``),
    complete or not: the right number of objects and shapes (``caption_attributes``), any colors it states bound to
    the right shapes, any relation it states one that holds. "a square" of a blue square is true but omits the color."""
    try:
        got = parse_prompt(text)
    except ValueError:
        return False
    attrs = caption_attributes(text, refs)
    colors_ok = got.objects[0][0] is None or attrs["colors"]
    return attrs["count"] and attrs["shapes"] and colors_ok and (got.relation is None
                                                                 or _states_holding_relation(got, refs))


def _split(values: Sequence, unseen: Sequence[bool]) -> dict[str, list]:
    return {"seen": [v for v, u in zip(values, unseen) if not u], "unseen": [v for v, u in zip(values, unseen) if u],
            "all": list(values)}


def _mean(xs) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _rate(sec: dict, name: str, values: Sequence[bool]) -> None:
    """``sec[name]``: the share of true values, and ``sec[name + "_se"]`` its binomial standard error."""
    sec[name] = _mean(values)
    sec[f"{name}_se"] = binomial_se(sec[name], len(values)) if values else None


def _chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def evaluate_v3(engine, samples: list, *, num_t2i: int, num_caption: int, num_fid: int, batch_size: int, steps: int,
                guidance: float, sampler: str, guidance_schedule: str, seed: int, max_caption_tokens: int,
                out_dir: Path | None, progress: bool, latents: bool, caption_guidance: float = 1.0) -> dict:
    report: dict = {"world": 3, "report_version": REPORT_VERSION}
    timings: dict[str, float] = {}

    # text -> image, judged strictly
    t0 = time.perf_counter()
    t2i = samples[:num_t2i]
    img_dir = out_dir / "t2i" if out_dir is not None else None
    if img_dir is not None:
        img_dir.mkdir(parents=True, exist_ok=True)
    results, generated, grid_by_tag, prompts_json = judge_t2i(
        engine, t2i, batch_size=batch_size, steps=steps, guidance=guidance, sampler=sampler,
        guidance_schedule=guidance_schedule, seed=seed, img_dir=img_dir, progress=progress)
    timings["t2i_seconds_per_image"] = (time.perf_counter() - t0) / max(len(t2i), 1)
    if results:
        report["geneval"] = geneval_section(results)
    if img_dir is not None and prompts_json:
        save_judged(out_dir, img_dir, prompts_json, results, grid_by_tag)

    # image -> caption, against the full description
    t0 = time.perf_counter()
    cap = samples[:num_caption]
    all_refs = [caption_references(rec) for _, _, _, rec in cap]
    texts: list[str] = []
    bar = tqdm(total=len(cap), desc="eval captions", unit="img", disable=not progress)
    for chunk in _chunks(cap, batch_size):
        texts += engine.caption(torch.stack([im for _, im, _, _ in chunk]), max_caption_tokens, latents=latents,
                                guidance=caption_guidance)
        bar.update(len(chunk))
    bar.close()
    timings["caption_seconds_per_image"] = (time.perf_counter() - t0) / max(len(cap), 1)
    if cap:
        report |= caption_report(engine, cap, texts, all_refs, out_dir=out_dir, batch_size=batch_size,
                                 latents=latents)

    report["diffusion"] = diffusion_loss_by_noise(engine, samples, batch_size=batch_size, seed=seed, latents=latents)
    if num_fid and generated:
        report["fid"] = fid_report(engine, samples, torch.cat(generated), num_fid, latents=latents)
    report["timings"] = timings
    return report


def judge_t2i(engine, t2i: list, *, batch_size: int, steps: int, guidance: float, sampler: str,
              guidance_schedule: str, seed: int, img_dir: Path | None, progress: bool
              ) -> tuple[list[dict], list[torch.Tensor], dict[str, list], dict[str, dict]]:
    """Images from the held-out prompts, judged strictly: (one result per image, the generated chunks, grid items
    per tag, ``prompts.json`` entries); each image is saved under ``img_dir`` when given."""
    results, generated, grid_by_tag, prompts_json = [], [], {}, {}
    bar = tqdm(total=len(t2i), desc="eval t2i", unit="img", disable=not progress)
    for i, chunk in enumerate(_chunks(t2i, batch_size)):
        images = engine.text_to_image([rec["caption"] for _, _, _, rec in chunk], steps=steps, guidance=guidance,
                                      sampler=sampler, seed=seed + i, guidance_schedule=guidance_schedule)
        generated.append(images)
        for (key, _, _, rec), img, pixels in zip(chunk, to_uint8(images), images):
            prompt = Prompt.from_dict(rec["prompt"])
            verdict = judge(img, prompt)
            results.append({"key": key, "prompt": prompt.text, "tag": prompt.tag, "unseen": bool(rec["unseen"]),
                            "unseen_kinds": sorted(unseen_kinds(prompt)), "pass": verdict.passed,
                            "failed": verdict.failed, "check": verdict.check})
            grid_by_tag.setdefault(prompt.tag, []).append((pixels, prompt.text))
            if img_dir is not None:
                Image.fromarray(img).save(img_dir / f"{key}.png")
                prompts_json[f"{key}.png"] = {"text": prompt.text, "unseen": bool(rec["unseen"])}
        bar.update(len(chunk))
    bar.close()
    return results, generated, grid_by_tag, prompts_json


def geneval_section(results: list[dict]) -> dict:
    """The geneval section of the report (see the module docstring) from the judge's results."""
    summary = summarise(results)
    section = {k.removeprefix("geneval."): v for k, v in summary.items() if k.startswith("geneval.")}
    section["counts"] = summary["counts"]
    section["failures"] = summary["failures"]
    section["shared_tags"] = summary.get("shared_tags", [])
    section.update(geneval_uncertainty(results, summary))
    return section


def save_judged(out_dir: Path, img_dir: Path, prompts_json: dict, results: list[dict],
                grid_by_tag: dict[str, list]) -> None:
    """``prompts.json`` beside the images (so ``tools/judge.py`` can re-judge them), the verdicts, a grid per tag."""
    (img_dir / "prompts.json").write_text(json.dumps(prompts_json, indent=1) + "\n")
    (out_dir / "judged.json").write_text(json.dumps({"images": results}, indent=1) + "\n")
    for tag, items in grid_by_tag.items():
        make_grid(torch.stack([p for p, _ in items[:16]]), [t for _, t in items[:16]]).save(
            out_dir / f"t2i_{tag}.png")


def caption_report(engine, cap: list, texts: list[str], all_refs: list[list[Prompt]], *, out_dir: Path | None,
                   batch_size: int, latents: bool) -> dict:
    """The caption, caption_examples and caption_nll sections for the held-out rows ``cap`` and their generated
    ``texts``; every caption with its references goes to ``captions.json`` (so the scores can be audited)."""
    refs = [r[0] for r in all_refs]  # the full caption: decides seen / unseen, and is the NLL's target
    unseen = [is_unseen(r) for r in refs]
    report = {"caption": caption_scores(texts, all_refs)}
    if out_dir is not None:  # every caption with its references, so the scores can be recomputed and audited
        (out_dir / "captions.json").write_text(json.dumps(
            {"captions": [{"key": k, "generated": t, "references": [r.text for r in rs]}
                          for (k, _, _, _), t, rs in zip(cap, texts, all_refs)]}, indent=1) + "\n")
    report["caption_examples"] = [{"key": k, "reference": r.text, "generated": t, "unseen": u}
                                  for (k, _, _, _), r, t, u in list(zip(cap, refs, texts, unseen))[:12]]
    report["caption_nll"] = caption_nll_bits(engine, cap, refs, unseen, batch_size=batch_size, latents=latents)
    return report


def caption_scores(texts: list[str], all_refs: list[list[Prompt]]) -> dict:
    """The caption section of the report (see the module docstring): per split (seen / unseen / all, by each scene's
    full caption ``all_refs[i][0]``) and per held-out kind of the unseen images."""
    fulls = [rs[0] for rs in all_refs]
    unseen = [is_unseen(r) for r in fulls]
    complete = [normalise_caption(t) in {r.text for r in rs} for t, rs in zip(texts, all_refs)]
    exact = [c and states_unseen_part(t, r) for c, t, r in zip(complete, texts, fulls)]
    omission = [not e and is_true_of(t, rs) for e, t, rs in zip(exact, texts, all_refs)]
    attrs = [caption_attributes(t, rs) for t, rs in zip(texts, all_refs)]
    caption: dict = {}
    for split, idx in _split(list(range(len(texts))), unseen).items():
        if not idx:
            continue
        sec: dict = {"n": len(idx)}
        _rate(sec, "exact_match", [exact[i] for i in idx])
        _rate(sec, "complete_description", [complete[i] for i in idx])
        _rate(sec, "omission", [omission[i] for i in idx])
        for a in ("count", "shapes", "colors", "relation"):
            vals = [attrs[i][a] for i in idx if a in attrs[i]]
            if vals:
                _rate(sec, f"{a}_accuracy", vals)
        if split == "unseen":  # false captions that fall back on a composition seen in training
            _rate(sec, "seen_substitution", [not exact[i] and not omission[i] and names_seen_composition(texts[i])
                                             for i in idx])
        ref_texts = [[r.text for r in all_refs[i]] for i in idx]
        b4 = bleu([texts[i] for i in idx], ref_texts)[3]
        sec["bleu4"] = None if b4 != b4 else b4  # NaN (no 4-gram at all) -> null in JSON
        sec["cider"] = cider([texts[i] for i in idx], ref_texts) if len(idx) > 1 else None
        caption[split] = sec
    by_kind = {}
    for kind in UNSEEN_KINDS:
        idx = [i for i, r in enumerate(fulls) if kind in unseen_kinds(r)]
        if idx:
            by_kind[kind] = {"n": len(idx)}
            _rate(by_kind[kind], "exact_match", [exact[i] for i in idx])
            _rate(by_kind[kind], "complete_description", [complete[i] for i in idx])
    if by_kind:
        caption["unseen_by_kind"] = by_kind
    return caption


def geneval_uncertainty(results: list[dict], summary: dict) -> dict:
    """Standard errors of the GenEval accuracies in ``summary`` (binomial per tag, and of the unweighted mean of tag
    accuracies for the overalls), and the pass rate of unseen prompts per held-out kind."""
    counts = summary["counts"]
    se = {}
    for key, acc in summary.items():
        if not key.startswith("geneval.") or not isinstance(acc, float):
            continue
        name, split = key.removeprefix("geneval.").rsplit(".", 1)
        if not name.startswith("overall"):
            se[f"{name}.{split}"] = binomial_se(acc, counts[f"{name}.{split}"])
    shared = set(summary.get("shared_tags", ()))
    for name, tags in (("overall_shared", shared), ("overall_all_tags", None)):
        for split in ("seen", "unseen", "all"):
            if f"geneval.{name}.{split}" in summary:
                pairs = [(summary[f"geneval.{t}.{split}"], counts[f"{t}.{split}"]) for t in TAGS
                         if counts.get(f"{t}.{split}") and (tags is None or t in tags)]
                se[f"{name}.{split}"] = mean_of_rates_se(pairs)
    by_kind = {}
    for kind in UNSEEN_KINDS:
        passed = [r["pass"] for r in results if kind in r.get("unseen_kinds", ())]
        if passed:
            by_kind[kind] = {"n": len(passed), "pass_rate": _mean(passed),
                             "pass_rate_se": binomial_se(_mean(passed), len(passed))}
    return {"se": se, "by_kind": by_kind}


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
    from transfusion.eval.scores import feature_scores

    n = min(num_fid, len(generated), len(samples) // 2)
    if n < 2:
        return {"skipped": f"needs at least 2 x 2 held-out samples, have {len(samples)}"}

    def real(rows):
        imgs = torch.stack([im for _, im, _, _ in rows])
        if latents:
            imgs = decode_images(engine.codec, imgs.to(engine.device))
        return imgs

    feats = InceptionFeatures()
    return feature_scores(feats(generated[:n]), feats(real(samples[:n])), feats(real(samples[n:2 * n])), seed=0)


def _pm(value: float | None, se: float | None) -> str:
    """``0.450 ± 0.052``; ``-`` for a missing value."""
    if value is None:
        return "-"
    return f"{value:.3f}" + ("" if se is None else f" ± {se:.3f}")


def _geneval_markdown(g: dict) -> list[str]:
    se = g.get("se", {})
    shared = ", ".join(g.get("shared_tags", [])) or "none"
    lines = ["GenEval (strict judge): accuracy ± standard error per tag. **overall_shared** averages the tags that "
             f"have both seen and unseen prompts ({shared}), so seen and unseen are compared on the same tags; "
             "overall_all_tags averages every tag of a split (seen has tags unseen lacks).", "",
             "| tag | seen | unseen | n seen | n unseen |", "| --- | --- | --- | --- | --- |"]
    for tag in (*TAGS, "overall_shared", "overall_all_tags"):
        cells = [_pm(g.get(f"{tag}.{s}"), se.get(f"{tag}.{s}")) for s in ("seen", "unseen")]
        counts = [g["counts"].get(f"{tag}.{s}", "") for s in ("seen", "unseen")] if tag in TAGS else ["", ""]
        name = f"**{tag}**" if tag == "overall_shared" else tag
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {counts[0]} | {counts[1]} |")
    lines.append("")
    if g.get("by_kind"):
        lines += ["Unseen prompts per held-out kind (pass rate over images):", "", "| kind | pass rate | n |",
                  "| --- | --- | --- |"]
        lines += [f"| {k} | {_pm(v['pass_rate'], v['pass_rate_se'])} | {v['n']} |" for k, v in g["by_kind"].items()]
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
    return lines


def _caption_markdown(c: dict) -> list[str]:
    keys = ["exact_match", "complete_description", "omission", "count_accuracy", "shapes_accuracy",
            "colors_accuracy", "relation_accuracy"]
    lines = ["| caption | " + " | ".join(keys) + " | bleu4 | cider |", "| --- " * (len(keys) + 3) + "|"]
    for split in ("seen", "unseen", "all"):
        if split in c:
            sec = c[split]
            rates = [_pm(sec.get(k), sec.get(f"{k}_se")) for k in keys]
            scores = ["-" if sec.get(k) is None else f"{sec[k]:.3f}" for k in ("bleu4", "cider")]
            lines.append(f"| {split} (n={sec['n']}) | " + " | ".join(rates + scores) + " |")
    lines += ["", "exact_match: the caption is a complete description of the scene and, for an image of an unseen "
              "composition, states the unseen part (\"A and B\" of a held-out relation is complete but states no "
              "relation: it counts in complete_description, not in exact_match). omission: a wrong caption that is "
              "true of the scene but leaves something out. relation_accuracy counts only scenes captioned by a "
              "relation.", ""]
    if c.get("unseen_by_kind"):
        lines += ["| unseen kind | exact_match | complete_description | n |", "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {_pm(v['exact_match'], v['exact_match_se'])} | "
                  f"{_pm(v['complete_description'], v['complete_description_se'])} | {v['n']} |"
                  for k, v in c["unseen_by_kind"].items()]
        lines.append("")
    u = c.get("unseen", {})
    if u.get("seen_substitution") is not None:
        sub = _pm(u["seen_substitution"], u["seen_substitution_se"])
        lines += [f"Of the {u['n']} images of unseen compositions, {sub} get a false caption that names only compositions seen in training (seen_substitution, the "
                  f"memorised fallback) and {_pm(u['omission'], u['omission_se'])} a true caption that leaves "
                  "something out (omission).", ""]
    return lines


def markdown(report: dict) -> str:
    """A short human-readable report: every rate with its standard error."""
    lines = ["# Evaluation report (compositional shapes world)", ""]
    if report.get("geneval"):
        lines += _geneval_markdown(report["geneval"])
    if report.get("caption"):
        lines += _caption_markdown(report["caption"])
    if "caption_nll" in report:
        lines.append("caption NLL (bits per caption): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                   report["caption_nll"].items()))
    if "diffusion" in report:
        lines.append("diffusion loss by noise level: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                   report["diffusion"].items()))
    f = report.get("fid", {})
    if "fid" in f:
        ci = f.get("fid_interval")
        lines.append(f"FID {f['fid']:.2f}" + (f" (95 % bootstrap interval {ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
                     + f", real-vs-real floor {f['fid_floor']:.2f}; KID {f['kid']:.4f} ± {f['kid_std']:.4f} "
                     f"(std over subsets of {f.get('kid_subset', f['n'])}), floor {f['kid_floor']:.4f}; n = {f['n']}")
    return "\n".join(lines) + "\n"
