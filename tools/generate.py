#!/usr/bin/env python
"""Generate with an exported model: text -> image, image -> caption, or a prompt grid.

    python tools/generate.py --export runs/shapes_tiny/export --prompt "a red circle on the left" --out samples/
    python tools/generate.py --export runs/shapes_tiny/export --caption-image samples/000.png
    python tools/generate.py --export runs/shapes_tiny/export --grid runs/shapes_tiny/samples/grid.png
    python tools/generate.py --export runs/fashion_latents/export --grid grid.png --num-per-prompt 8 \
        --prompt "a photo of a sneaker" --prompt "a bag"          # one row of 8 samples per prompt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transfusion.cli import fail_cleanly


def parse_args(argv=None) -> argparse.Namespace:
    from transfusion.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="export directory (model.safetensors + config.json)")
    p.add_argument("--prompt", action="append", default=[], help="text -> image prompt (repeatable)")
    p.add_argument("--caption-image", action="append", default=[], metavar="PNG", help="image -> text (repeatable)")
    p.add_argument("--grid", metavar="PNG", help="write a captioned grid for the prompts (default: the export's "
                   "sample.prompts, else 16 held-out captions of its data.eval_shards)")
    p.add_argument("--out", default="samples", help="directory for text -> image PNGs (default: samples/)")
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--sampler", choices=("ddim", "ddpm", "euler", "heun"), default=None,
                   help="default: the export's sample.sampler (ddim|ddpm for epsilon and v, euler|heun for flow)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the export's sample.steps)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, 1 = off (default: export's)")
    p.add_argument("--guidance-schedule", choices=("constant", "linear", "interval"), default=None,
                   help="constant CFG scale, rising linearly from 1, or only at middle noise levels (interval; "
                        "default: sample.guidance_schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=48, help="caption length limit")
    p.add_argument("--caption-guidance", type=float, default=None,
                   help="weight of the image against the text prior when captioning, 1 = plain greedy decoding "
                        "(default: the export's eval.caption_guidance)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision on this machine: auto (bf16 on CUDA; on CPU bf16 only where a short probe "
                        "shows it faster than fp32), bf16 or fp32")
    args = p.parse_args(argv)
    if not (args.prompt or args.caption_image or args.grid):
        p.error("nothing to do: give --prompt, --caption-image or --grid")
    if args.num_per_prompt < 1 or (args.steps is not None and args.steps < 1):
        p.error("--num-per-prompt and --steps must be positive")
    if args.caption_guidance is not None and not 0 <= args.caption_guidance < float("inf"):
        p.error("--caption-guidance must be a finite number >= 0")
    return args


@fail_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from transfusion.generation.engine import Engine
    from transfusion.generation.grid import make_grid, to_uint8

    engine = Engine.from_export(args.export, device=args.device, precision=args.precision)
    sample_cfg = engine.cfg.sample
    opts = dict(steps=args.steps or sample_cfg.steps, sampler=args.sampler or sample_cfg.sampler,
                guidance=sample_cfg.guidance if args.guidance is None else args.guidance, seed=args.seed,
                guidance_schedule=args.guidance_schedule or sample_cfg.guidance_schedule)

    if args.prompt:
        prompts = [p for p in args.prompt for _ in range(args.num_per_prompt)]
        images = engine.text_to_image(prompts, **opts)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, (prompt, img) in enumerate(zip(prompts, to_uint8(images))):
            path = out / f"{i:03d}.png"
            Image.fromarray(img).save(path)
            print(f"{path}\t{prompt}")

    if args.grid:
        from transfusion.training.outputs import grid_prompts

        base = args.prompt or grid_prompts(engine.cfg)
        n = args.num_per_prompt  # > 1: one row per prompt, its caption under the row's first image
        prompts = [p for p in base for _ in range(n)]
        images = engine.text_to_image(prompts, **opts)
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        captions = [p if i % n == 0 else "" for i, p in enumerate(prompts)]
        make_grid(images, captions, cols=n if n > 1 else 8).save(args.grid)
        print(f"wrote {args.grid} ({len(base)} prompts x {n})")

    if args.caption_image:
        size = engine.cfg.data.image_size
        cap_g = engine.cfg.eval.caption_guidance if args.caption_guidance is None else args.caption_guidance
        batch = []
        for path in args.caption_image:
            try:
                img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
            except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
                raise FileNotFoundError(f"cannot read image {path}: {e}") from None
            batch.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        for path, text in zip(args.caption_image, engine.caption(torch.stack(batch), args.max_tokens, guidance=cap_g)):
            print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
