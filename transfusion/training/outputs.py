"""What a run leaves besides checkpoints: sample grids and the safetensors export, both drawn from the EMA weights.

    outputs = RunOutputs(cfg, run_dir, env, parts, precision)   # grid prompts are checked here, before training
    state = outputs.consolidated_state(model, ema)               # collective; full tensors on rank 0 only
    outputs.sample_grid(state, step, writer)                     # rank 0 samples, every rank waits
    outputs.export(state, step)

Grid prompts are the recipe's ``sample.prompts``, else the first held-out captions (``data.eval_shards``), so a grid
always shows the run's own domain.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from transfusion.config import Config, to_dict
from transfusion.distributed.env import DistEnv, barrier
from transfusion.precision import Precision

log = logging.getLogger("transfusion")


def grid_prompts(cfg: Config, n: int = 16) -> list[str]:
    """Prompts for sample grids: the recipe's ``sample.prompts``, else the first ``n`` held-out captions
    (``data.eval_shards``). Raises DataError when there are neither."""
    from data_pipelines.errors import DataError, new_counts
    from data_pipelines.shards import ShardSpecError, iter_captions

    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    why = "no prompts for the sample grid: sample.prompts is empty and data.eval_shards"
    counts = new_counts()
    try:
        prompts = list(iter_captions(cfg.data.eval_shards, cfg.data.caption_field, n, counts=counts,
                                     segments_field=cfg.data.segments_field, retries=cfg.data.shard_retries,
                                     backoff_s=cfg.data.shard_retry_backoff_s)) if cfg.data.eval_shards else []
    except ShardSpecError as e:  # the file is not there: say so, not that it holds no captions
        raise DataError(f"{why}: {e}") from None
    if not prompts:
        broken = counts["missing_shard"] + counts["corrupt_shard"]
        cause = (f"could not be read ({counts['missing_shard']} shard(s) missing, {counts['corrupt_shard']} "
                 f"corrupt)" if broken and not counts["seen"] else "has no captions")
        raise DataError(f"{why} ({cfg.data.eval_shards!r}) {cause}")
    return prompts


class RunOutputs:
    def __init__(self, cfg: Config, run_dir: Path, env: DistEnv, parts, precision: Precision) -> None:
        self.cfg, self.run_dir, self.env, self.parts, self.precision = cfg, Path(run_dir), env, parts, precision
        self.prompts = grid_prompts(cfg)  # a run without grid prompts fails before training, on every rank

    def consolidated_state(self, model: torch.nn.Module, ema) -> dict[str, Tensor]:
        """The EMA weights as full CPU tensors under clean parameter names, on rank 0 (empty on other ranks).
        Collective: parameters are gathered one at a time, so no rank but 0 ever holds more than one in full."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for name, shadow in ema.shadow_state_dict().items():
            full = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
            if self.env.is_main:
                state[name] = full.detach().to("cpu", state[name].dtype, copy=True)
        return state if self.env.is_main else {}

    def inference_model(self, state: dict[str, Tensor]) -> torch.nn.Module:
        """A plain single-device model holding ``state`` (for sampling: no FSDP hooks, no compiled blocks)."""
        from transfusion.model import build_model

        with torch.device(self.env.device):
            model = build_model(self.cfg.model, self.parts.tokenizer.vocab_size, self.parts.codec.channels)
        model.load_state_dict(state)
        return model.eval()

    def sample_grid(self, state: dict[str, Tensor], step: int, writer=None) -> Path | None:
        """A grid of EMA samples drawn on rank 0 (collective: every rank waits)."""
        from transfusion.generation.engine import Engine
        from transfusion.generation.grid import make_grid

        out = None
        if self.env.is_main:
            p, s = self.parts, self.cfg.sample
            engine = Engine(self.inference_model(state), p.tokenizer, p.schedule, p.codec, p.patch_grid,
                            self.env.device, precision=self.precision, cfg=self.cfg)
            images = engine.text_to_image(self.prompts, steps=s.steps, guidance=s.guidance, sampler=s.sampler,
                                          seed=s.seed)
            grid = make_grid(images, self.prompts)
            out = self.run_dir / "samples" / f"step_{step:08d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            grid.save(out)
            if writer is not None:
                import numpy as np

                writer.add_image("samples/t2i", np.asarray(grid), step, dataformats="HWC")
            log.info("wrote sample grid %s", out)
        barrier()
        return out

    def export(self, state: dict[str, Tensor], step: int) -> Path | None:
        """Consolidated EMA weights + config as safetensors, written by rank 0 (collective); the metadata records
        the step and the precision the run trained in."""
        from transfusion.checkpoint.export import carry_tokenizer, export_model

        out = None
        if self.env.is_main:
            config = to_dict(self.cfg)
            with tempfile.TemporaryDirectory() as scratch:  # the export carries its tokenizer: it loads from anywhere
                files = carry_tokenizer(config, self.parts.tokenizer, scratch)
                out = export_model(self.run_dir / "export", state, config,
                                   {"step": str(step), "weights": "ema", "trained_precision": self.precision.name},
                                   files=files)
            log.info("exported EMA weights to %s", out)
        barrier()
        return out
