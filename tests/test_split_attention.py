"""The flash split: the hybrid mask as varlen calls (causal text runs, non-causal image blocks) equals dense masked
attention, forward and gradients, on packed rows with several documents, several images per document and padding;
hidden spans are refused; backend and kernel selection with fake packages."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from transfusion.attention.backends import (
    SplitMask,
    attend,
    available_split_kernels,
    build_attention_mask,
    resolve_backend,
    resolve_split_kernel,
)
from transfusion.attention.masks import dense_mask
from transfusion.attention.split import SplitUnsupported, sdpa_kernel, split_attention, split_plan

CUDA = torch.device("cuda")  # only its type is read: selection logic, no CUDA needed


def packed_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of length 40: row 0 = doc A (text, image 0 (4), text, image 1 (3), text) + doc B (text, image 2,
    trailing text) + padding; row 1 = doc C starting with an image right after BOS, then doc D (text only), padding."""
    doc = torch.full((2, 40), -1)
    img = torch.full((2, 40), -1)
    doc[0, 0:22] = 0
    img[0, 3:7] = 0
    img[0, 10:13] = 1
    doc[0, 22:35] = 1
    img[0, 25:29] = 2
    doc[1, 0:12] = 2
    img[1, 2:8] = 3
    doc[1, 12:30] = 3
    return doc, img


def qkv(seed: int = 0, length: int = 40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, length, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_split_equals_dense_forward_and_gradients(bidirectional):
    doc, img = packed_ids()
    dense = dense_mask(doc, img, bidirectional)[:, None]
    plan = split_plan(doc, img, bidirectional)
    q, k, v = qkv()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    out = split_attention(q, k, v, plan, sdpa_kernel)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    calls = {c.causal: c for c in plan.calls}
    if bidirectional:  # 4 images -> 4 non-causal segments; text runs: A has 3, B 2, C 2, D 1
        assert len(calls[False].cu_q) - 1 == 4 and len(calls[True].cu_q) - 1 == 8
        assert int(calls[False].cu_k[-1]) == (7 + 13 + 7 + 8)  # each image's keys: its document's prefix + itself
    else:
        assert list(calls) == [True] and len(calls[True].cu_q) - 1 == 4  # one causal run per document
    assert plan.pad_idx.tolist() == list(range(35, 40)) + list(range(70, 80))


def test_every_query_is_computed_once():
    doc, img = packed_ids()
    plan = split_plan(doc, img)
    q_all = torch.cat([c.q_idx for c in plan.calls] + [plan.pad_idx])
    assert sorted(q_all.tolist()) == list(range(80))


def test_hidden_spans_are_refused():
    doc, img = packed_ids()
    hidden = torch.full_like(doc, -1)
    hidden[0, 2:7] = 0
    with pytest.raises(SplitUnsupported, match="hidden spans"):
        split_plan(doc, img, hidden_ids=hidden)
    split_plan(doc, img, hidden_ids=torch.full_like(doc, -1))  # none hidden: fine
    with pytest.raises(ValueError, match="clean_copy"):
        resolve_backend("split", CUDA, hidden_spans=True)


def test_model_forward_and_backward_through_the_split_backend():
    """The whole model with the split backend (reference kernel) equals the sdpa backend on a packed batch."""
    from helpers import make_batch, tiny_model

    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = make_batch([["a red", 0, "circle", 1], ["x", 2], [3, "tail"]], 64, images)
    outs = []
    for backend in ("sdpa", "split"):
        model = tiny_model(0).double()
        mask = build_attention_mask(batch.doc_ids, batch.image_ids, backend, split_kernel="sdpa")
        assert isinstance(mask, SplitMask) == (backend == "split")
        t0 = torch.zeros(len(batch.images), dtype=torch.long)
        img_tokens = model.embed_images(batch.images.double(), t0)
        h = model.embed(batch.tokens, img_tokens, batch.image_rows, batch.image_starts)
        h, _ = model.trunk(h, batch.positions, mask)
        loss = h.pow(2).mean()
        loss.backward()
        outs.append((h.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


# -- selection -----------------------------------------------------------------------------------------------------
def fake_find_spec(installed: set[str]):
    return lambda name: object() if name in installed else None


@pytest.mark.parametrize("installed,backend,kernel", [
    ({"flash_attn", "xformers", "torch.nn.attention.varlen"}, "split", "flash_attn"),
    ({"xformers"}, "split", "xformers"),
    ({"torch.nn.attention.varlen"}, "flex", "sdpa"),  # torch's varlen only when asked for
    (set(), "flex", "sdpa"),
])
def test_auto_selection_on_cuda(installed, backend, kernel):
    fs = fake_find_spec(installed)
    assert resolve_backend("auto", CUDA, find_spec=fs) == backend
    assert resolve_split_kernel("auto", CUDA, find_spec=fs) == kernel
    assert resolve_backend("auto", CUDA, hidden_spans=True, find_spec=fs) == "flex"  # clean copies: never the split


def test_selection_on_cpu_and_explicit_kernels():
    cpu = torch.device("cpu")
    everything = fake_find_spec({"flash_attn", "xformers", "torch.nn.attention.varlen"})
    assert resolve_backend("auto", cpu, find_spec=everything) == "sdpa"
    assert available_split_kernels(cpu, everything) == ["sdpa"]  # the fast kernels need CUDA
    assert resolve_split_kernel("torch_varlen", CUDA, find_spec=everything) == "torch_varlen"
    with pytest.raises(ValueError, match="not usable"):
        resolve_split_kernel("flash_attn", cpu, find_spec=everything)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("nope", cpu)


def test_flash_attn_and_torch_varlen_kernels_are_called_with_flash_conventions(monkeypatch):
    """Fake packages whose varlen functions run the reference kernel: the split through each wrapper equals dense
    attention, so the wrappers pass cumulative lengths, max lengths and the causal flag the way flash-attn reads them."""
    from transfusion.attention import split

    seen = []

    def fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        seen.append(("flash", cu_q.dtype, max_q, max_k, causal))
        return sdpa_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal)

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1)):
        seen.append(("varlen", window_size))
        return sdpa_kernel(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0))

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_flash))
    varlen_mod = types.ModuleType("torch.nn.attention.varlen")
    varlen_mod.varlen_attn = fake_varlen
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", varlen_mod)
    doc, img = packed_ids()
    plan = split_plan(doc, img)
    q, k, v = qkv(1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc, img)[:, None])
    for kernel in (split.flash_attn_kernel, split.torch_varlen_kernel):
        torch.testing.assert_close(split_attention(q, k, v, plan, kernel), ref, rtol=1e-10, atol=1e-10)
    assert ("flash", torch.int32, 18, 22, True) in seen and ("flash", torch.int32, 6, 13, False) in seen
    assert ("varlen", (-1, 0)) in seen and ("varlen", (-1, -1)) in seen
    mask = SplitMask(plan, split.flash_attn_kernel)
    torch.testing.assert_close(attend(q, k, v, mask), ref, rtol=1e-10, atol=1e-10)


def test_bench_attention_runs_on_cpu():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "tools/bench_attention.py", "--device", "cpu", "--seq", "128", "--images",
                          "1", "3", "--repeats", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| 128 |")]
    assert len(rows) == 8 and not any("failed" in r for r in rows)
    assert {r.split("|")[3].strip() for r in rows} == {"causal", "sdpa", "flex (fwd only)", "split/sdpa"}
    assert "CPU, capability" in out.stdout
    out = subprocess.run([sys.executable, "tools/bench_attention.py", "--device", "cpu", "--seq", "128", "--images",
                          "1", "--repeats", "1", "--backends", "causal", "flex/triton", "flex/flash", "--flex-sweep"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| 128 |")]
    assert "failed: ValueError: model.flex_kernel = 'flash' needs a CUDA device" in rows[2]
    assert len(rows) == 3 + 6 and "[cpu: USE_TMA=True]" in rows[-1] and "sweep on the CPU" in out.stdout
    gpu = subprocess.run([sys.executable, "tools/bench_attention.py"], cwd=root, capture_output=True, text=True,
                         timeout=120)
    if not __import__("torch").cuda.is_available():
        assert gpu.returncode == 1 and gpu.stderr.startswith("error: no CUDA")


def test_fp32_never_picks_flash_kernels():
    fs = fake_find_spec({"flash_attn", "torch.nn.attention.varlen"})
    assert resolve_backend("auto", CUDA, fp32=True, find_spec=fs) == "flex"
    assert resolve_split_kernel("auto", CUDA, fp32=True, find_spec=fs) == "sdpa"
    with_x = fake_find_spec({"flash_attn", "xformers"})
    assert resolve_backend("auto", CUDA, fp32=True, find_spec=with_x) == "split"
    assert resolve_split_kernel("auto", CUDA, fp32=True, find_spec=with_x) == "xformers"
