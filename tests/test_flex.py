"""FlexAttention as configured by transfusion/attention/flex.py: lengths padded to buckets give the same result as
dense masked attention (CPU forward: FlexAttention has no CPU backward), lengths in one bucket share one mask shape
(one compile), and the kernel / options chosen per architecture, with fake packages and capabilities."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from transfusion.attention import flex
from transfusion.attention.backends import attend, build_attention_mask
from transfusion.attention.flex import FlexMask, FlexTuning, flex_tuning, padded_length, probe
from transfusion.attention.masks import dense_mask
from transfusion.config import ConfigError, dumps_toml, load_config

CUDA = torch.device("cuda")  # only its type is read: selection logic, no CUDA needed
CPU = torch.device("cpu")
KNOWN = {"BLOCK_M", "BLOCK_N", "num_warps", "BACKEND", "fwd_BLOCK_M", "USE_TMA"}


def ids(length: int):
    """Two packed rows of ``length`` (>= 60): documents with images, a hidden span, trailing padding."""
    doc = torch.full((2, length), -1)
    img = torch.full((2, length), -1)
    hid = torch.full((2, length), -1)
    doc[0, :30], img[0, 3:9], doc[0, 30:length - 7], img[0, 33:41] = 0, 0, 1, 1
    doc[1, :length - 3], img[1, 1:10], img[1, 20:26] = 2, 2, 3
    hid[1, 19:26] = 0  # a hidden span (a noisy copy): later tokens do not see it
    return doc, img, hid


def qkv(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, length, 16, generator=g) for _ in range(3)]


@pytest.mark.parametrize("length", [100, 128, 200])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_padded_flex_equals_dense(length, bidirectional):
    doc, img, hid = ids(length)
    q, k, v = qkv(length)
    dense = dense_mask(doc, img, bidirectional, hidden_ids=hid)[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    mask = build_attention_mask(doc, img, "flex", bidirectional, hidden_ids=hid)
    assert isinstance(mask, FlexMask) and mask.length == length and mask.padded == padded_length(length, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex warns that it is unfused on CPU
        out = attend(q, k, v, mask)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_lengths_in_one_bucket_share_one_mask_shape():
    shapes = set()
    for length in (70, 100, 127, 128):
        doc, img, _ = ids(length)
        shapes.add(tuple(build_attention_mask(doc, img, "flex").block_mask.shape))
    assert shapes == {(2, 1, 128, 128)}  # one compiled builder / kernel serves all four lengths
    doc, img, _ = ids(129)
    assert build_attention_mask(doc, img, "flex").block_mask.shape[-1] == 256
    mask = build_attention_mask(doc, img, "flex", flex=FlexTuning(pad_multiple=1))
    assert mask.padded == 129  # no bucketing when asked


def test_flex_refuses_cross_attention_shapes():
    doc, img, _ = ids(100)
    mask = build_attention_mask(doc, img, "flex")
    q, k, v = qkv(100)
    with pytest.raises(ValueError, match="self-attention over 100"):
        attend(q[..., :10, :], k, v, mask)


def test_tuning_per_device_and_installed_packages():
    assert flex_tuning(CPU).kernel == "cpu" and flex_tuning(CPU).options == {}
    with pytest.raises(ValueError, match="needs a CUDA device"):
        flex_tuning(CPU, "flash")
    cute = {"flash_attn.cute"}
    fs = lambda present: (lambda name: object() if name in present else None)  # noqa: E731
    hopper = flex_tuning(CUDA, capability=(9, 0), find_spec=fs(cute), known_options=KNOWN)
    assert hopper.kernel == "flash" and hopper.options == {"BACKEND": "FLASH"}
    blackwell = flex_tuning(CUDA, capability=(10, 0), find_spec=fs(cute), known_options=KNOWN)
    assert blackwell.kernel == "flash"
    ampere = flex_tuning(CUDA, capability=(8, 0), find_spec=fs(cute), known_options=KNOWN)
    assert ampere.kernel == "triton" and "BACKEND" not in ampere.options  # FA4 needs sm90+
    no_pkg = flex_tuning(CUDA, capability=(9, 0), find_spec=fs(set()), known_options=KNOWN)
    assert no_pkg.kernel == "triton" and no_pkg.source == "sm90: torch defaults"
    old_torch = flex_tuning(CUDA, capability=(9, 0), find_spec=fs(cute), known_options=KNOWN - {"BACKEND"})
    assert old_torch.kernel == "triton"  # a torch without the BACKEND option
    assert flex_tuning(CUDA, "triton", capability=(9, 0), find_spec=fs(cute), known_options=KNOWN).kernel == "triton"
    with pytest.raises(ValueError, match="capability >= 9.0"):
        flex_tuning(CUDA, "flash", capability=(8, 6), find_spec=fs(cute), known_options=KNOWN)
    with pytest.raises(ValueError, match="model.flex_kernel, not a BACKEND"):
        flex_tuning(CUDA, options={"BACKEND": "FLASH"}, capability=(9, 0), find_spec=fs(cute), known_options=KNOWN)
    with pytest.raises(ValueError, match="unknown flex kernel option"):
        flex_tuning(CUDA, options={"BLOCK_Q": 64}, capability=(9, 0), find_spec=fs(set()), known_options=KNOWN)


def test_measured_table_and_user_options(monkeypatch):
    monkeypatch.setitem(flex.TUNED, (9, 0), {"fwd_BLOCK_M": 128, "num_warps": 8})
    fs = lambda name: None  # noqa: E731
    t = flex_tuning(CUDA, capability=(9, 0), find_spec=fs, known_options=KNOWN)
    assert t.options == {"fwd_BLOCK_M": 128, "num_warps": 8} and t.source == "sm90: measured table"
    t = flex_tuning(CUDA, options={"num_warps": 4}, capability=(9, 0), find_spec=fs, known_options=KNOWN)
    assert t.options == {"fwd_BLOCK_M": 128, "num_warps": 4} and "model.flex_options" in t.source
    assert flex_tuning(CUDA, capability=(8, 0), find_spec=fs, known_options=KNOWN).options == {}  # other cards


def test_probe_falls_back_to_the_triton_tuning_with_the_reason():
    flash = FlexTuning(kernel="flash", options={"BACKEND": "FLASH", "num_warps": 4})
    triton = FlexTuning(kernel="triton", options={"num_warps": 4}, source="sm90: measured table")
    calls = []

    def broken(*args):
        calls.append(args[4:])
        raise RuntimeError("BACKEND='FLASH' but flash attention cannot be used: no sm90 build\nmore detail")

    t, why = probe(flash, CUDA, torch.bfloat16, 64, fallback=triton, bidirectional_images=False, hidden_spans=True,
                   run=broken)
    assert t is triton and why.startswith("RuntimeError: BACKEND=") and "\n" not in why
    assert calls == [(False, True)]  # the run's own mask variant is probed
    t, why = probe(flash, CUDA, torch.bfloat16, 64, fallback=triton, run=lambda *_: None)
    assert t is flash and why == ""
    # a probe that passed here but failed on another rank: every rank falls back together
    t, why = probe(flash, CUDA, torch.bfloat16, 64, fallback=triton, run=lambda *_: None, agree=lambda ok: False)
    assert t is triton and why == "another rank's probe failed"
    votes = []
    plain = FlexTuning()
    assert probe(plain, CUDA, torch.bfloat16, 64, run=broken, agree=lambda ok: votes.append(ok) or ok) == (plain, "")
    assert votes == [True] and len(calls) == 1  # the Triton path is not probed, but every rank still votes


@pytest.mark.parametrize("bidirectional,hidden", [(True, False), (False, True)])
def test_the_probe_rows_through_flex_equal_dense_attention(bidirectional, hidden):
    """What the probe runs (its rows: documents, images, padding, a hidden span; a length off the bucket grid) is the
    real mask: flex equals dense SDPA there (forward; the CPU has no flex backward)."""
    doc, img, hid = flex.probe_rows(100, CPU, hidden)
    assert doc.min() == -1 and img.max() == 2 and (hid is not None) == hidden
    q, k, v = qkv(100, seed=3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc, img, bidirectional,
                                                                       hidden_ids=hid)[:, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = flex.flex_attend(q, k, v, flex.flex_mask(doc, img, FlexTuning(), bidirectional, hidden_ids=hid))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_config_keys(tmp_path):
    cfg = load_config(None, ["--model.flex_kernel=triton", "--model.flex_options.fwd_BLOCK_M=64",
                             "--model.flex_options.USE_TMA=true", "--model.flex_options.kpack=2"])
    want = {"fwd_BLOCK_M": 64, "USE_TMA": True, "kpack": 2}
    assert cfg.model.flex_options == want
    again = tmp_path / "c.toml"
    again.write_text(dumps_toml(cfg))
    assert load_config(again).model.flex_options == want
    with pytest.raises(ConfigError, match="unknown model.flex_options key"):
        load_config(None, ["--model.flex_options.BLOCK_Q=64"])
    with pytest.raises(ConfigError, match="choose flex's kernel with model.flex_kernel"):
        load_config(None, ["--model.flex_options.BACKEND=FLASH"])
    with pytest.raises(ConfigError, match="unknown value 'fast'"):
        load_config(None, ["--model.flex_kernel=fast"])
