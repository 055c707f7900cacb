#!/usr/bin/env python
"""Import a pretrained language model (a local Hugging Face directory or a .gguf file) as an export that
``Engine.from_export`` and ``tools/serve.py`` load:

    python tools/import_llm.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2/export
    python tools/import_llm.py path/to/hf_model_dir --out EXPORT --recipe recipes/shapes3_tiny.toml
    python tools/serve.py --export runs/smollm2/export      # chat in its own template

The text decoder (embeddings, layers, norm, output head) carries the checkpoint's weights; the image modules have no
pretrained counterpart and are freshly initialised (``TransfusionModel.init_weights``): until trained, the export
chats like the checkpoint and draws noise. The recipe (``--recipe``, ``--set section.key=value``) decides the
non-text parts (image size, patch size, latents, diffusion); its decoder shape keys are replaced by the checkpoint's
(each replacement is logged), while a ``--set model.KEY`` contradicting the checkpoint is an error. The export carries the checkpoint's tokenizer (tokenizer.json + tokenizer_meta.json:
special ids and chat template) and a config with ``model.pretrained = ""`` and the shape keys filled in, so it needs
neither the checkpoint nor transformers. Bad input is one ``error:`` line, exit 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

from transfusion.cli import fail_cleanly

log = logging.getLogger("import_llm")
DEFAULT_RECIPE = "recipes/shapes3_latents.toml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a local Hugging Face model directory (config.json + safetensors + tokenizer.json) "
                   "or a .gguf file")
    p.add_argument("--out", required=True, help="the export directory to write (replaced if it is an export)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help=f"recipe for the non-text parts: image size, patch size, latents (default {DEFAULT_RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a recipe override (repeatable), e.g. --set model.attention=sdpa")
    return p.parse_args(argv)


def import_config(src: Path, recipe: str, overrides: list[str]):
    """(config, checkpoint): the recipe with the checkpoint's decoder shape in place of the recipe's."""
    from transfusion.config import ConfigError, ModelConfig, load_config
    from transfusion.pretrained.checkpoint import open_checkpoint
    from transfusion.pretrained.config import resolve_model_config

    if not Path(recipe).is_file():
        raise FileNotFoundError(f"recipe not found: {recipe}")
    ckpt = open_checkpoint(src)
    sets = [s if s.startswith("--") else f"--{s}" for s in overrides]
    cfg = load_config(recipe, [*sets, f"--model.pretrained={src}", "--data.tokenizer=pretrained"])
    defaults = ModelConfig()
    named = {s.lstrip("-").split("=", 1)[0].split(".")[1] for s in sets if s.lstrip("-").startswith("model.")}
    for key in ckpt.model:  # the recipe was written for a model of its own size: the checkpoint decides the shape
        ours, default = getattr(cfg.model, key), getattr(defaults, key)
        if key in named:  # asked for on the command line: kept, so a contradiction is an error
            continue
        if ours != default:
            log.info("recipe model.%s = %r replaced by the checkpoint's", key, ours)
        setattr(cfg.model, key, dataclasses.replace(default) if dataclasses.is_dataclass(default) else default)
    if cfg.latents.kind == "vae" and not Path(cfg.latents.vae_path).is_dir():
        raise ConfigError(f"the recipe {recipe} needs its VAE at {cfg.latents.vae_path} (make vae-shapes3), or pass "
                          "a pixel recipe: --recipe recipes/shapes3_tiny.toml")
    return resolve_model_config(cfg, ckpt), ckpt


@fail_cleanly
def main(argv=None) -> int:
    import torch

    from transfusion.checkpoint.export import ExportError, carry_tokenizer, export_model
    from transfusion.components import build_components
    from transfusion.config import to_dict

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise FileNotFoundError(f"no such checkpoint: {src}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model.safetensors").is_file())):
        raise ExportError(f"--out {out} exists and is not an export; refusing to replace it")
    cfg, ckpt = import_config(src, args.recipe, args.set)
    parts = build_components(cfg, torch.device("cpu"), pretrained=ckpt)
    tok = parts.tokenizer
    log.info("%s (%s, %s): %d layers, dim %d, %d rows + %d new special ids; text weights loaded, image modules "
             "freshly initialised (train before generating images)", src, ckpt.format, ckpt.family,
             cfg.model.n_layers, cfg.model.dim, ckpt.vocab_rows, tok.vocab_size - ckpt.vocab_rows)
    config = to_dict(cfg)
    with tempfile.TemporaryDirectory() as scratch:
        files = carry_tokenizer(config, tok, scratch)
        export_model(out, parts.model.state_dict(), config,
                     {"source": str(src), "source_format": ckpt.format, "family": ckpt.family,
                      "weights": "pretrained text decoder; image modules freshly initialised"}, files=files)
    log.info("chat template: %s", "yes" if tok.chat_template else "none (chat prompts are laid out after BOS)")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
