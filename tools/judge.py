#!/usr/bin/env python
"""Judge images of the compositional shapes world with the strict GenEval-style judge (transfusion/eval/geneval.py).

DIR holds PNG files and ``prompts.json`` mapping file name -> prompt (the caption text, e.g. "two blue squares",
or a record ``{"text": ..., "unseen": ...}``). Writes a verdict per image (pass, detected objects, the first check
that failed: ``failed`` in words, ``check`` by name) and a summary: GenEval tag accuracies and two overall scores
(means of tag accuracies: ``overall_shared`` over the tags with both seen and unseen images, comparable between the
splits, and ``overall_all_tags`` over every tag with images in the split), seen / unseen apart (``unseen`` from the
record, else from the world's held-out compositions), and the failed images per check.

    python tools/judge.py --images runs/x/eval/t2i --out runs/x/eval/judged.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transfusion.cli import fail_cleanly


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", required=True, help="directory of PNG files with prompts.json")
    p.add_argument("--out", required=True, help="where to write the judged JSON")
    return p


def load_prompts(images: Path) -> dict[str, dict]:
    path = images / "prompts.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the images directory needs prompts.json (file name -> prompt)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path} must map file names to prompts")
    out = {}
    for name, value in raw.items():
        entry = value if isinstance(value, dict) else {"text": value}
        if not isinstance(entry.get("text"), str):
            raise ValueError(f"{path}: the prompt of {name!r} must be a string or a record with 'text'")
        out[name] = entry
    return out


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    from data_pipelines.scenes import is_unseen, parse_prompt
    from transfusion.eval.geneval import judge, summarise

    images = Path(args.images)
    if not images.is_dir():
        raise FileNotFoundError(f"--images {images} is not a directory")
    try:
        prompts = load_prompts(images)
        parsed = {name: parse_prompt(e["text"]) for name, e in prompts.items()}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdicts = {}
    for name in tqdm(sorted(prompts), desc="judge", unit="img", file=sys.stderr, disable=None):
        path = images / name
        if not path.is_file():
            print(f"error: {path} is listed in prompts.json but does not exist", file=sys.stderr)
            return 2
        try:
            with Image.open(path) as img:
                verdict = judge(img.convert("RGB"), parsed[name])
        except (UnidentifiedImageError, OSError) as e:
            print(f"error: {path} is not a readable image ({e})", file=sys.stderr)
            return 2
        p = parsed[name]
        unseen = bool(prompts[name].get("unseen", is_unseen(p)))
        verdicts[name] = {"prompt": p.text, "tag": p.tag, "unseen": unseen, **verdict.to_dict()}
    summary = summarise(verdicts.values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"summary": summary, "images": verdicts}, indent=2) + "\n")
    tmp.replace(out)
    scores = {k.removeprefix("geneval."): round(v, 3) for k, v in summary.items()
              if k.startswith(("geneval.overall_shared.", "geneval.overall_all_tags."))}
    shared = ", ".join(summary["shared_tags"]) or "none"
    print(f"judged {len(verdicts)} images -> {out}: {scores}; shared tags: {shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
