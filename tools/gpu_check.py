"""GPU check: a few real training steps with FSDP2 + bf16 + torch.compile + FlexAttention, reported as one table.

    python tools/gpu_check.py                                   # one GPU (a 1-rank FSDP2 mesh over NCCL)
    torchrun --standalone --nproc-per-node=8 tools/gpu_check.py # every GPU of a node
    python tools/gpu_check.py --dim 2048 --layers 20 --seq-len 4096 --rows 8   # the 1B recipe's shapes

It runs the trainer's own step (``Trainer.train_step``: AC -> compiled blocks -> FSDP2 with bf16 parameters and
fp32 reductions, FlexAttention block masks, AdamW, EMA) on synthetic packed batches: random captions and random
images laid out exactly like the data pipeline's rows. No shards, PIL, webdataset or torchdata are needed: only
torch and the pure-Python packages the training step imports (tqdm; diffusers for the noise schedule). On the lent
GPU machine (torch preinstalled) those travel as wheels: ``pip install --no-index --find-links WHEELS tqdm diffusers``
(diffusers' own pure-Python dependencies included in WHEELS).

Output (stdout): one markdown table with card, torch version, git commit (``--commit`` or ``$GIT_COMMIT`` where the
tree has no .git), world size, model size, tokens/s per GPU (all / text / image), MFU against the card's dense bf16
peak, peak memory and the first (compiling) step's time. Without CUDA it prints one line and exits 1;
``--device cpu`` runs the same code on CPU (gloo, SDPA, no compile, fp32) to test the script itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # for git provenance only

import torch


def parse_args(argv=None) -> argparse.Namespace:
    from transfusion.config import PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=4, help="packed rows per GPU and step")
    p.add_argument("--image-size", type=int, default=64, help="pixels; with 4x4 patches: 256 tokens per image")
    p.add_argument("--ac", default="selective", choices=("none", "selective", "full"))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--attention", default="auto", choices=("auto", "flex", "sdpa", "split"),
                   help="attention backend (auto: the trainer's choice; flex on CUDA unless flash-attn / xformers "
                        "are installed, then the varlen split); run once per backend to compare")
    p.add_argument("--flex-kernel", default="auto", choices=("auto", "triton", "flash"),
                   help="flex's kernel (auto: FlexAttention's Flash backend on sm90+ when flash_attn.cute is "
                        "installed and its probe passes, else Triton)")
    p.add_argument("--split-kernel", default="auto", choices=("auto", "flash_attn", "torch_varlen", "xformers", "sdpa"),
                   help="the split backend's kernel")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="compute precision (auto: bf16 on CUDA with bf16 support; measured on CPU)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", ""))
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return (out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _single_process_env() -> None:
    """Without torchrun: a 1-rank job, so the FSDP2 path (process group, mesh, sharded parameters) still runs."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class SyntheticData:
    """Packed rows of documents ``BOS caption BOI <P image slots> EOI EOS`` (captions of 16..96 random byte tokens,
    random images); one Batch per consumer and step."""

    def __init__(self, cfg, tokenizer, patch_grid: tuple[int, int], consumers: list[int]) -> None:
        self.cfg, self.tok, self.grid, self.consumers, self.seed = cfg, tokenizer, patch_grid, consumers, 0
        self.calls = 0

    def layout(self) -> dict:
        return {"consumers": len(self.consumers), "grad_accum": 1, "num_workers": 0, "seed": 0}

    def state_dict(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def next_step(self):
        self.calls += 1
        return [(v, self.batch(torch.Generator().manual_seed(self.calls * 1000 + v))) for v in self.consumers]

    def batch(self, g: torch.Generator):
        """One packed Batch of text -> image documents built by the data pipeline's own sequence builder and packer
        (the training row layout and target rule, from ``transfusion/sequence.py``); filled until a document no
        longer fits."""
        from data_pipelines.packing import Packer
        from data_pipelines.samples import T2I, build_sequence

        cfg, size = self.cfg.data, self.cfg.data.image_size
        packer = Packer(cfg.seq_len, cfg.batch_rows, self.tok.pad_id, self.grid, (3, size, size))
        for i in range(cfg.batch_rows * cfg.seq_len):
            caption = torch.randint(32, 127, (int(torch.randint(16, 97, (1,), generator=g)),), generator=g).tolist()
            image = torch.randn((3, size, size), generator=g).clamp_(-1, 1)
            if not packer.add(build_sequence(self.tok, f"synthetic-{i}", image, caption, patch_grid=self.grid,
                                             layout=T2I)):
                break
        return packer.emit()


def build_config(args, run_dir: str):
    from transfusion.config import load_config

    gpu = args.device == "cuda"
    return load_config(None, [
        f"--run.dir={run_dir}", f"--run.device={args.device}", "--data.format=pixels",
        f"--data.image_size={args.image_size}", f"--data.seq_len={args.seq_len}", f"--data.batch_rows={args.rows}",
        "--data.num_workers=0", f"--model.dim={args.dim}", f"--model.n_layers={args.layers}",
        f"--model.n_heads={args.heads}", "--model.patch_size=4", f"--model.attention={args.attention}",
        f"--model.split_kernel={args.split_kernel}", f"--model.flex_kernel={args.flex_kernel}",
        "--diffusion.objective=flow", "--diffusion.timestep_sampling=logit_normal", "--sample.sampler=euler",
        f"--train.steps={args.warmup + args.steps + 10}", "--train.warmup_steps=10", "--train.lr=1e-4",
        f"--train.autocast={args.precision}", f"--parallel.activation_checkpointing={args.ac}",
        f"--parallel.compile={str(gpu and not args.no_compile).lower()}",
        f"--parallel.param_dtype={'bf16' if gpu else 'fp32'}", "--parallel.timeout_s=1800",
        "--sample.prompts=['a synthetic prompt']",  # no data set here: the grid prompts must not come from one
    ])


def attention_label(trainer) -> str:
    from transfusion.attention.backends import resolve_split_kernel

    if trainer.backend == "flex" and trainer.flex_tuning is not None:
        return f"flex/{trainer.flex_tuning.kernel}"
    if trainer.backend != "split":
        return trainer.backend
    return f"split/{resolve_split_kernel(trainer.cfg.model.split_kernel, trainer.device)}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible (torch {torch.__version__}); run it on a GPU machine "
              f"(or --device cpu to test the script)", file=sys.stderr)
        return 1
    _single_process_env()
    from transfusion.distributed.env import shutdown
    from transfusion.training.metrics import Window
    from transfusion.training.trainer import Trainer, token_counts

    class CheckTrainer(Trainer):
        def build_data(self, seed: int) -> SyntheticData:
            return SyntheticData(self.cfg, self.tokenizer, self.patch_grid, [self.env.dp_rank])

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as run_dir:
        trainer = CheckTrainer(build_config(args, run_dir), progress=False)
        dev = trainer.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        window, first_s = Window(), 0.0
        for i in range(args.warmup + args.steps):
            micro = trainer.data.next_step()
            text, image = token_counts(micro)
            micro = [(v, trainer.prepare(b)) for v, b in micro]
            sync()
            t0 = time.perf_counter()
            metrics = trainer.train_step(micro)
            sync()
            dt = time.perf_counter() - t0
            trainer.step += 1
            if i == 0:
                first_s = dt
            if i >= args.warmup:
                window.add(step_s=dt, data_s=0.0, text_tokens=text, image_tokens=image, metrics=metrics)
        s = window.summary(trainer.flops, dev, trainer.measured_peak)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        if trainer.env.is_main:
            card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
            mfu = f"{100 * s['mfu']:.1f}%" if "mfu" in s else "n/a"
            head = ["card", "torch", "commit", "GPUs", "params", "rows x seq", "attention", "compile", "AC",
                    "precision", "tokens/s/GPU", "text tok/s", "image tok/s", "MFU (bf16 dense)", "TFLOP/s/GPU",
                    "share of measured peak",
                    "peak mem GiB", "first step s", "loss"]
            row = [card, torch.__version__, args.commit or git_commit(), str(trainer.env.world_size),
                   f"{n_params / 1e6:.1f}M", f"{args.rows} x {args.seq_len}", attention_label(trainer),
                   str(trainer.cfg.parallel.compile).lower(), args.ac, trainer.precision.name,
                   f"{s['tokens_per_s']:.0f}", f"{s['text_tokens_per_s']:.0f}", f"{s['image_tokens_per_s']:.0f}", mfu,
                   f"{s['tflops_per_s']:.1f}", f"{100 * s['peak_share']:.0f}%", f"{s['peak_memory_gib']:.1f}",
                   f"{first_s:.1f}", f"{s['loss']:.3f}"]
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            print("| " + " | ".join(row) + " |")
        trainer.close()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
