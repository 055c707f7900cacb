#!/usr/bin/env python
"""Time the hybrid-mask attention backends, forward + backward, against pure-causal SDPA at the same shape.

    python tools/bench_attention.py                                   # CUDA: seq 4096 and 8192, 1-4 images per row
    python tools/bench_attention.py --device cpu                      # toy sizes on the CPU (tested in the suite)
    python tools/bench_attention.py --seq 8192 --images 4 --heads 16 --head-dim 128

Each row of the batch is one document of ``seq`` tokens holding ``images`` image blocks of ``seq / 8`` tokens,
evenly spaced, text between them. Backends: ``causal`` (SDPA with is_causal: the bar, it ignores the images),
``sdpa`` (dense boolean mask), ``flex`` (FlexAttention with the block mask as the trainer configures it:
``transfusion/attention/flex.py``; ``flex/triton`` and ``flex/flash`` force its kernel; compiled on CUDA; on the CPU
forward only, it has no CPU backward), and ``split/<kernel>`` for every usable varlen kernel (flash_attn, torch_varlen,
xformers; ``split/sdpa`` is the per-segment reference, timed at toy sizes only). Mask / plan building is timed apart
(it happens once per batch, shared by all layers). Reported: ms per forward + backward (median), the ratio to causal,
peak memory on CUDA. The header names the device (card or CPU capability and flags) and torch version.

``--flex-sweep`` adds one ``flex/triton`` row per candidate kernel-option set (``SWEEP``) and ends with the line to
put in ``transfusion/attention/flex.py``'s ``TUNED`` table when a candidate beats torch's defaults on every shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

# Candidate Triton flex options for --flex-sweep (tile sizes, warps, stages, TMA on Hopper+); {} = torch's defaults
SWEEP = [
    {},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2},
    {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_warps": 8},
    {"USE_TMA": True},
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--seq", type=int, nargs="+", default=None, help="sequence lengths (cuda: 4096 8192; cpu: 512)")
    p.add_argument("--images", type=int, nargs="+", default=[1, 2, 4], help="image blocks per row (default 1 2 4)")
    p.add_argument("--batch", type=int, default=None, help="rows (cuda: 2; cpu: 1)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (cuda: 16; cpu: 4)")
    p.add_argument("--head-dim", type=int, default=None, help="cuda: 128; cpu: 32")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (cuda: 20; cpu: 3)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="subset of: causal sdpa flex flex/triton flex/flash split/flash_attn split/torch_varlen "
                        "split/xformers split/sdpa")
    p.add_argument("--flex-sweep", action="store_true",
                   help="also time every candidate flex kernel-option set (SWEEP) and print the best as a TUNED line")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.seq = args.seq or ([4096, 8192] if gpu else [512])
    args.batch = args.batch or (2 if gpu else 1)
    args.heads = args.heads or (16 if gpu else 4)
    args.head_dim = args.head_dim or (128 if gpu else 32)
    args.repeats = args.repeats or (20 if gpu else 3)
    if min(args.seq) < 64 or min(args.images) < 0 or max(args.images) > 7:
        p.error("--seq must be >= 64 and --images between 0 and 7 (images are seq / 8 tokens each)")
    return args


def layout(batch: int, seq: int, images: int):
    import torch

    doc = torch.zeros(batch, seq, dtype=torch.long)
    img = torch.full((batch, seq), -1, dtype=torch.long)
    size, gap = seq // 8, seq // (images + 1) if images else seq
    for r in range(batch):
        for i in range(images):
            start = (i + 1) * gap - size // 2
            img[r, start:start + size] = r * images + i
    return doc, img


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    from transfusion.precision import cpu_features

    feats = cpu_features()
    return (f"{platform.machine()} CPU, capability {feats['capability']} (flags: {' '.join(feats['flags'])}), "
            f"torch {torch.__version__}, {feats['threads']} threads")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from transfusion.attention.backends import attend, available_split_kernels, build_attention_mask
    from transfusion.attention.flex import FlexTuning, flex_tuning
    from transfusion.attention.flex import probe as probe_flex

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --device cpu for the toy run", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    kernels = [k for k in available_split_kernels(device) if gpu or k == "sdpa"]
    if gpu:
        kernels = [k for k in kernels if k != "sdpa"]  # the per-segment reference is a test kernel, not a contender
    names = args.backends or (["causal", "sdpa", "flex"] + [f"split/{k}" for k in kernels])
    tunings: dict[str, FlexTuning] = {}
    for name in names:
        if name.startswith("flex"):
            try:
                tuning = flex_tuning(device, name.partition("/")[2] or "auto")
                tunings[name] = probe_flex(tuning, device, dtype, args.head_dim,
                                           fallback=flex_tuning(device, "triton"))[0] if gpu else tuning
            except ValueError as e:
                tunings[name] = e  # reported in its rows
    if args.flex_sweep:
        for i, opts in enumerate(SWEEP):
            kind = "triton" if gpu else "cpu"  # the candidates alone, not merged with a TUNED entry
            tunings[f"flex/sweep{i}"] = FlexTuning(kernel=kind, options=dict(opts), source="sweep")
            names = [*names, f"flex/sweep{i}"]
    sweep_ms: dict[str, list[float]] = {}
    # one compiled flex per (options, length): more than dynamo's default recompile limit (8) in a sweep, past which
    # it would silently fall back to the unfused eager kernel and time that; fail loudly instead
    dyn = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"  # the torch < 2.7 name
    setattr(dyn, limit, max(getattr(dyn, limit), 256))
    if hasattr(dyn, "fail_on_recompile_limit_hit"):
        dyn.fail_on_recompile_limit_hit = True

    def sync():
        if gpu:
            torch.cuda.synchronize()

    print(f"# bench_attention on {device_name(device)}; {dtype}, batch {args.batch}, {args.heads} heads x "
          f"{args.head_dim}, images of seq/8 tokens; forward + backward, median of {args.repeats}")
    print("\n| seq | images | backend | mask build ms | fwd+bwd ms | vs causal | peak MiB |\n|---|---|---|---|---|---|---|")
    for seq in args.seq:
        for n_img in args.images:
            doc, img = layout(args.batch, seq, n_img)
            doc, img = doc.to(device), img.to(device)
            g = torch.Generator(device=device).manual_seed(0)
            shape = (args.batch, args.heads, seq, args.head_dim)
            q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3))
            base = None
            for name in names:
                backend, _, kernel = name.partition("/")
                backward = not (backend == "flex" and not gpu)
                try:
                    t0 = time.perf_counter()
                    tuning = tunings.get(name)
                    if isinstance(tuning, Exception):
                        raise tuning
                    mask = None if backend == "causal" else build_attention_mask(doc, img, backend,
                                                                                split_kernel=kernel or "auto",
                                                                                flex=tuning)
                    sync()
                    build_ms = (time.perf_counter() - t0) * 1e3

                    qq, kk, vv = (q, k, v) if backward else (q.detach(), k.detach(), v.detach())

                    def step():
                        with torch.set_grad_enabled(backward):
                            if backend == "causal":
                                out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                            else:
                                out = attend(qq, kk, vv, mask)
                        if backward:
                            out.sum().backward()
                        else:
                            out.sum().item()

                    step()  # warm-up (compiles flex on CUDA)
                    if gpu:
                        torch.cuda.reset_peak_memory_stats(device)
                    times = []
                    for _ in range(args.repeats):
                        sync()
                        t0 = time.perf_counter()
                        step()
                        sync()
                        times.append((time.perf_counter() - t0) * 1e3)
                    ms = statistics.median(times)
                except Exception as e:  # a kernel that does not run here: say so in its row
                    print(f"| {seq} | {n_img} | {name} | - | failed: {type(e).__name__}: {str(e)[:80]} | - | - |")
                    continue
                finally:
                    for t in (q, k, v):
                        t.grad = None
                if backend == "causal":
                    base = ms
                if name.startswith("flex/sweep"):
                    sweep_ms.setdefault(name, []).append(ms)
                peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if gpu else "-"
                ratio = f"{ms / base:.2f}x" if base else "-"
                label = name + ("" if backward else " (fwd only)")
                if isinstance(tunings.get(name), FlexTuning) and name != "flex":
                    label += f" [{tunings[name].kernel}{': ' if tunings[name].options else ''}" + ", ".join(
                        f"{k}={v}" for k, v in tunings[name].options.items()) + "]"
                print(f"| {seq} | {n_img} | {label} | {build_ms:.1f} | {ms:.2f} | {ratio} | {peak} |", flush=True)
    if args.flex_sweep and gpu:
        print(sweep_verdict(sweep_ms, SWEEP, device))
    elif args.flex_sweep:
        print("\nsweep on the CPU: the options are the Triton kernel's (the CPU kernel ignores most); these rows only "
              "test the script, TUNED is for CUDA cards")
    return 0


def sweep_verdict(sweep_ms: dict[str, list[float]], candidates: list[dict], device) -> str:
    """The TUNED line for the candidate that beats the defaults (sweep0) on every shape, by its total time."""
    import torch

    default = sweep_ms.get("flex/sweep0")
    complete = {n: t for n, t in sweep_ms.items() if default and len(t) == len(default)}
    winners = {n: sum(t) for n, t in complete.items()
               if n != "flex/sweep0" and all(a < b for a, b in zip(t, default))}
    if not winners:
        return "\nsweep: no candidate beats torch's default flex options on every shape; TUNED stays as it is"
    best = min(winners, key=winners.get)
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else ("cpu",)
    opts = candidates[int(best.removeprefix("flex/sweep"))]
    return (f"\nsweep: best {best} ({winners[best]:.2f} ms total vs {sum(default):.2f} ms default); for "
            f"transfusion/attention/flex.py:\nTUNED[{tuple(cap)}] = {opts!r}")


if __name__ == "__main__":
    sys.exit(main())
