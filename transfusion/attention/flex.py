"""FlexAttention for the hybrid mask: how its BlockMask is built and how its kernel is configured.

    tuning = flex_tuning(device, cfg.model.flex_kernel, cfg.model.flex_options)   # once per run (logged)
    mask   = flex_mask(doc_ids, image_ids, tuning, ...)                           # once per batch
    out    = flex_attend(q, k, v, mask)                                           # per layer

- **Built once per batch, by a compiled and cached builder.** On CUDA ``create_block_mask`` is compiled once per
  process (eager, it materialises the dense [L, L] mask; compiled, it evaluates the mask function block by block); the
  id tensors are graph inputs, so a new batch of the same shape reuses the graph.
- **Lengths padded to buckets.** A length that is not a multiple of ``pad_multiple`` (128) is padded to the next one
  with padding ids (-1: padding keys are invisible to real queries, each padding query sees only itself; see
  masks.py), and q / k / v are padded to match and the output cut back, so the kernel and the BlockMask only ever see
  whole blocks and every length in a bucket shares one compiled mask builder and kernel. Training rows have the fixed
  length ``data.seq_len`` (one bucket; a ``seq_len`` off the grid costs the padded compute), so this matters for
  callers with varying lengths; generation and evaluation use SDPA today. The padded result equals the unpadded one
  (tests/test_flex.py).
- **Kernel per architecture.** ``flex_kernel = "auto"`` uses the Flash backend of FlexAttention (``kernel_options=
  {"BACKEND": "FLASH"}``: flash-attention 4's CuTe kernels, torch >= 2.9) on compute capability 9.0 and newer
  (Hopper, Blackwell) when the ``flash_attn.cute`` package is installed, and the Triton kernel otherwise; a probe
  (one small forward and backward with the run's own mask variant, agreed by every rank) confirms the Flash path
  before a run commits to it, and falls back to the Triton tuning with the reason logged. Tile sizes of the Triton
  kernel are torch's own per-architecture defaults (inductor's flex heuristics for sm8x / sm90 / sm10x) unless
  ``TUNED`` holds a measured entry for the card or ``model.flex_options`` sets them. ``TUNED`` is empty until a sweep
  on a card (``tools/bench_attention.py --flex-sweep``) shows an option set beating the defaults; nothing unmeasured
  goes in it.

Shapes: q/k/v ``[B, H, L, Dh]``; ids ``[B, L]``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from transfusion.attention.masks import hybrid_mask_mod
from transfusion.config import flex_kernel_option_names

log = logging.getLogger(__name__)

PAD_MULTIPLE = 128
FLEX_KERNELS = ("auto", "triton", "flash")
# Measured kernel options per CUDA capability (major, minor) for the Triton kernel: filled from sweeps on real cards
# (tools/bench_attention.py --flex-sweep prints the candidate line); empty = torch's own per-architecture defaults.
TUNED: dict[tuple[int, int], dict[str, Any]] = {}


@dataclass(frozen=True)
class FlexTuning:
    """How FlexAttention runs on one device: BlockMask granularity, length bucket, kernel and its options."""

    kernel: str = "triton"  # "triton" (torch's default flex kernel), "flash" (FA4 via BACKEND) or "cpu"
    block_size: int = 128  # BlockMask block (create_block_mask BLOCK_SIZE): the sparsity granularity
    pad_multiple: int = PAD_MULTIPLE  # lengths are padded up to a multiple of this (1 = no padding)
    options: dict[str, Any] = field(default_factory=dict)  # flex_attention kernel_options
    source: str = "torch defaults"  # where the options came from (logged)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items())) or "none"
        return (f"flex kernel {self.kernel}, block {self.block_size}, lengths padded to x{self.pad_multiple}, "
                f"kernel options: {opts} ({self.source})")


def _spec(name: str, find_spec: Callable):
    try:
        return find_spec(name)
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return None


def flex_tuning(device: torch.device, kernel: str = "auto", options: dict[str, Any] | None = None, *,
                capability: tuple[int, int] | None = None, find_spec: Callable = importlib.util.find_spec,
                known_options: set[str] | None = None) -> FlexTuning:
    """The FlexAttention configuration for ``device``: ``kernel`` in FLEX_KERNELS, ``options`` (model.flex_options)
    override the tuned / default kernel options. ``capability``, ``find_spec`` and ``known_options`` are for tests."""
    if kernel not in FLEX_KERNELS:
        raise ValueError(f"unknown flex kernel {kernel!r} (known: {', '.join(FLEX_KERNELS)})")
    known = flex_kernel_option_names() if known_options is None else known_options
    options = dict(options or {})
    unknown = sorted(k for k in options if known and k not in known)
    if unknown:
        raise ValueError(f"unknown flex kernel option(s) {', '.join(unknown)} for this torch build "
                         f"(see torch.nn.attention.flex_attention.FlexKernelOptions)")
    if "BACKEND" in options:
        raise ValueError("choose flex's kernel with model.flex_kernel, not a BACKEND kernel option")
    if device.type != "cuda":
        if kernel == "flash":
            raise ValueError("model.flex_kernel = 'flash' needs a CUDA device (FlexAttention's Flash backend)")
        return FlexTuning(kernel="cpu", options=options, source="torch's CPU flex kernel" + (
            ", model.flex_options" if options else ""))
    cap = capability if capability is not None else torch.cuda.get_device_capability(device)
    flash_ok = cap[0] >= 9 and "BACKEND" in known and _spec("flash_attn.cute", find_spec) is not None
    if kernel == "flash" and not flash_ok:
        raise ValueError(f"model.flex_kernel = 'flash' needs compute capability >= 9.0 (this card: "
                         f"{cap[0]}.{cap[1]}), a torch with FlexAttention's BACKEND option and flash-attention 4 "
                         f"(flash_attn.cute) installed")
    if kernel == "flash" or (kernel == "auto" and flash_ok):
        return FlexTuning(kernel="flash", options={"BACKEND": "FLASH"} | options,
                          source=f"sm{cap[0]}{cap[1]}: flash-attention 4 via FlexAttention")
    tuned = TUNED.get(tuple(cap), {})
    source = f"sm{cap[0]}{cap[1]}: " + ("measured table" if tuned else "torch defaults")
    return FlexTuning(kernel="triton", options=tuned | options, source=source + (", model.flex_options"
                                                                                if options else ""))


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _pad_ids(ids: Tensor | None, length: int) -> Tensor | None:
    if ids is None or ids.shape[1] == length:
        return ids
    return F.pad(ids, (0, length - ids.shape[1]), value=-1)


@dataclass
class FlexMask:
    """The flex backend's per-batch mask object: the BlockMask (over the padded length) and the kernel options."""

    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask
    length: int  # the real (unpadded) length
    options: dict[str, Any]

    @property
    def padded(self) -> int:
        return self.block_mask.seq_lengths[0]


def flex_mask(doc_ids: Tensor, image_ids: Tensor, tuning: FlexTuning, bidirectional_images: bool = True, *,
              hidden_ids: Tensor | None = None) -> FlexMask:
    """[B, L] ids -> a FlexMask over L padded to ``tuning.pad_multiple`` (padding ids -1)."""
    bsz, length = doc_ids.shape
    total = padded_length(length, tuning.pad_multiple)
    mod = hybrid_mask_mod(_pad_ids(doc_ids, total), _pad_ids(image_ids, total), bidirectional_images,
                          hidden_ids=_pad_ids(hidden_ids, total))
    block = _block_mask_fn(doc_ids.device.type == "cuda")(mod, bsz, None, total, total, device=doc_ids.device,
                                                          BLOCK_SIZE=tuning.block_size)
    return FlexMask(block, length, dict(tuning.options))


def flex_attend(q: Tensor, k: Tensor, v: Tensor, mask: FlexMask) -> Tensor:
    """Self-attention of q over k/v ([B, H, L, Dh], L = mask.length) under a FlexMask; padded and cut back."""
    length, total = q.shape[-2], mask.padded
    if k.shape[-2] != length or length != mask.length:
        raise ValueError(f"flex attention is built for self-attention over {mask.length} tokens, got q {length} "
                         f"and k {k.shape[-2]} (KV-cached attention uses sdpa)")
    if total != length:
        pad = (0, 0, 0, total - length)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    out = _flex_fn(q.device.type == "cuda")(q, k, v, block_mask=mask.block_mask,
                                            **({"kernel_options": mask.options} if mask.options else {}))
    return out[..., :length, :] if total != length else out


@functools.cache
def _block_mask_fn(compiled: bool):
    """``create_block_mask``, compiled once per process on CUDA (as torchtitan does); eager elsewhere."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask) if compiled else create_block_mask


@functools.cache
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def probe(tuning: FlexTuning, device: torch.device, dtype: torch.dtype, head_dim: int, *,
          fallback: FlexTuning | None = None, bidirectional_images: bool = True, hidden_spans: bool = False,
          run: Callable[..., None] | None = None,
          agree: Callable[[bool], bool] = lambda ok: ok) -> tuple[FlexTuning, str]:
    """Confirm the Flash kernel with one small forward + backward of the run's mask variant (``bidirectional_images``,
    ``hidden_spans``) before a run commits to it; on failure, or when any rank failed (``agree``: every rank's
    verdict, e.g. ``all_ranks_true``; called on every rank), return ``fallback`` (the Triton tuning) and say why.
    Other tunings pass through untouched (``agree`` is still called, so every rank makes the same calls)."""
    ok, reason = True, ""
    if tuning.kernel == "flash":
        try:
            (run or _probe_run)(tuning, device, dtype, head_dim, bidirectional_images, hidden_spans)
        except Exception as exc:  # noqa: BLE001 - any failure of the experimental kernel means: do not use it
            ok = False
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    if agree(ok) or tuning.kernel != "flash":
        return tuning, ""
    fallback = fallback or FlexTuning(kernel="triton", block_size=tuning.block_size,
                                      pad_multiple=tuning.pad_multiple, source="torch defaults")
    return fallback, reason or "another rank's probe failed"


def probe_rows(length: int, device: torch.device, hidden_spans: bool = False):
    """The probe's ids: two packed rows of ``length`` with three documents, three images, padding, and a hidden span
    when the run has them -> (doc_ids, image_ids, hidden_ids or None), each [2, length]."""
    doc = torch.full((2, length), -1, dtype=torch.long, device=device)
    img = torch.full((2, length), -1, dtype=torch.long, device=device)
    half = length // 2
    doc[0, :half], doc[0, half:length - 9], doc[1, :length - 3] = 0, 1, 2
    img[0, 8:half - 8], img[0, half + 4:length - 20], img[1, 1:half + 1] = 0, 1, 2
    hid = None
    if hidden_spans:
        hid = torch.full((2, length), -1, dtype=torch.long, device=device)
        hid[1, 0:half + 2] = 0
    return doc, img, hid


def _probe_run(tuning: FlexTuning, device: torch.device, dtype: torch.dtype, head_dim: int,
               bidirectional_images: bool = True, hidden_spans: bool = False) -> None:
    length = 2 * tuning.pad_multiple
    doc, img, hid = probe_rows(length, device, hidden_spans)
    q, k, v = (torch.randn(2, 2, length, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    out = flex_attend(q, k, v, flex_mask(doc, img, tuning, bidirectional_images, hidden_ids=hid))
    out.float().sum().backward()
    if not torch.isfinite(q.grad).all():
        raise FloatingPointError("non-finite gradients")
