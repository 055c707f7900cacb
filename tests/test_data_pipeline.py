"""Data pipeline: shard specs, rank x worker split, decoding, layouts, packing, exact resume, error accounting."""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import color_sample, make_shards, png_bytes, write_tar
from PIL import Image

from data_pipelines.loader import MIN_SAMPLES_FOR_SKIP_RATE, PackedDataset, build_loader, data_counts
from data_pipelines.packing import Packer, pack_sequences
from data_pipelines.samples import CAPTION, T2I, build_sequence, choose_layout
from data_pipelines.documents import decode_image
from data_pipelines.shards import (DataError, ShardSpecError, ShardStream, assign_shards, expand_shard_spec,
                                   iter_decoded_samples, iter_tar)
from transfusion.batch import IGNORE_INDEX as IGN
from transfusion.sequence import caption_prompt_tokens, t2i_prompt_tokens
from transfusion.batch import Batch
from transfusion.config import DataConfig
from transfusion.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PAD, BOS, EOS, BOI, EOI, IMG = TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.boi_id, TOK.eoi_id, TOK.image_id
A, B, C = ord("a"), ord("b"), ord("c")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _cfg(shards: str, **kw) -> DataConfig:
    base = dict(shards=shards, image_size=8, seq_len=64, batch_rows=2, num_workers=0, shuffle_buffer=4,
                repeat=True, t2i_ratio=0.7, caption_dropout=0.2, max_text_tokens=16, shard_retry_backoff_s=0.01)
    return DataConfig(**(base | kw))


def _take(loader, n: int) -> tuple[list[Batch], dict]:
    it = iter(loader)
    batches = [next(it) for _ in range(n)]
    state = loader.state_dict()
    del it
    return batches, state


def _assert_same(a: Batch, b: Batch) -> None:
    for f in fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


# ---------------------------------------------------------------------------------------------------------------
# shard specs and splitting


def test_expand_shard_spec(tmp_path: Path) -> None:
    for name in ("a-0.tar", "a-1.tar", "a-2.tar", "a-3.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    d = str(tmp_path)
    spec = (f"{d}/a-{{0..1}}.tar, {d}/a-[23].tar,{d}/a-{{3,0}}.tar,{d}/b.tar,pipe:cat {d}/a-{{0..1}}.tar,"
            "https://h/x-{0..1}.tar")
    assert expand_shard_spec(spec) == [
        f"{d}/a-0.tar", f"{d}/a-1.tar", f"{d}/a-2.tar", f"{d}/a-3.tar", f"{d}/a-3.tar", f"{d}/a-0.tar", f"{d}/b.tar",
        f"pipe:cat {d}/a-0.tar", f"pipe:cat {d}/a-1.tar", "https://h/x-0.tar", "https://h/x-1.tar"]
    assert expand_shard_spec(f"{d}/*.tar") == sorted(str(p) for p in tmp_path.glob("*.tar"))
    # names that do not exist are kept when the spec names something that does (counted missing_shard when read)
    assert expand_shard_spec(f"{d}/a-{{3..4}}.tar") == [f"{d}/a-3.tar", f"{d}/a-4.tar"]
    assert expand_shard_spec(f"{d}/b.tar,{d}/missing.tar") == [f"{d}/b.tar", f"{d}/missing.tar"]
    # ...but a glob matching nothing is a typo, and so is a spec of which nothing exists
    for spec, bad in ((f"{d}/b.tar,{d}/nope-*.tar", f"{d}/nope-*.tar"), (f"{d}/c-{{0..2}}.tar", f"{d}/c-{{0..2}}.tar"),
                      (f"{d}/missing.tar,{d}/c-{{0..2}}.tar", f"{d}/missing.tar")):
        with pytest.raises(ShardSpecError) as err:
            expand_shard_spec(spec)
        assert str(err.value) == f"shard pattern {bad!r} matches no files"


@pytest.mark.parametrize("n_shards", [5, 3])  # 3 < 2 ranks x 2 workers: the sample-split fallback
def test_rank_worker_split_covers_every_key_once(tmp_path: Path, n_shards: int) -> None:
    spec = make_shards(tmp_path, n_shards=n_shards, per_shard=7)
    keys: list[str] = []
    per_consumer = []
    for rank in range(2):
        loader = build_loader(_cfg(spec, num_workers=2, repeat=False), TOK, (2, 2), seed=3, rank=rank, world_size=2)
        rank_keys = [k for b in loader for k in b.keys]
        per_consumer.append(len(rank_keys))
        keys += rank_keys
    assert sorted(keys) == [f"k{i:04d}" for i in range(n_shards * 7)]
    assert min(per_consumer) > 0


def test_shard_order_differs_per_epoch_and_is_reproducible(tmp_path: Path) -> None:
    urls = expand_shard_spec(make_shards(tmp_path, n_shards=6, per_shard=2))

    def order(epoch: int) -> list[str]:
        return list(assign_shards(urls, seed=0, epoch=epoch, rank=0, world_size=1, worker=0, num_workers=1).urls)

    assert order(0) == order(0) and sorted(order(0)) == urls and order(0) != order(1)
    stream = ShardStream(urls, seed=0, shuffle_buffer=1, repeat=True)  # the stream follows that order, epoch by epoch
    seen = [raw["__url__"] for raw in itertools.islice(stream, 24)][::2]
    assert seen == order(0) + order(1)


# ---------------------------------------------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_decode_image_modes(mode: str) -> None:
    w, h = 12, 6
    if mode == "I;16":
        img = Image.fromarray(np.full((h, w), 65535, dtype=np.uint16))  # mode I;16
        expect = torch.ones(3)
    elif mode == "RGBA":  # fully transparent: composited onto white
        img = Image.new("RGBA", (w, h), (10, 20, 30, 0))
        expect = torch.ones(3)
    else:
        img = Image.new("RGB", (w, h), (255, 0, 0)).convert(mode)
        expect = torch.tensor(img.convert("RGB").getpixel((0, 0)), dtype=torch.float) / 127.5 - 1
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = decode_image(buf.getvalue(), 4)
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out, expect[:, None, None].expand(3, 4, 4), atol=1e-6)


def test_decode_image_center_crops_short_side() -> None:
    arr = np.zeros((8, 40, 3), dtype=np.uint8)  # wide: red margins, green centre well beyond the crop + filter
    arr[:, :4, 0] = arr[:, 36:, 0] = arr[:, 4:36, 1] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    out = decode_image(buf.getvalue(), 4)
    assert torch.allclose(out, torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 4, 4), atol=1e-6)


def test_iter_decoded_samples_file_order_and_json_caption(tmp_path: Path) -> None:
    samples = [color_sample(i, json=f'{{"caption": "json {i}", "n": {i}}}') for i in range(5)]
    path = write_tar(tmp_path / "eval.tar", samples)
    out = list(iter_decoded_samples(path, 8, caption_field="json:caption", limit=3))
    assert [(k, c, r["n"]) for k, _, c, r in out] == [(f"k{i:04d}", f"json {i}", i) for i in range(3)]
    assert out[0][1].shape == (3, 8, 8)
    key, _, caption, record = next(iter_decoded_samples(path, 8))
    assert (key, caption, record["n"]) == ("k0000", "color 0", 0)


# ---------------------------------------------------------------------------------------------------------------
# sequences and packing


def test_text_targets_both_layouts() -> None:
    img = torch.zeros(3, 8, 8)
    t2i = build_sequence(TOK, "x", img, [A, B], patch_grid=(1, 2), layout=T2I)
    assert t2i.tokens == [BOS, A, B, BOI, IMG, IMG, EOI, EOS]
    assert t2i.text_targets == [A, B, BOI, IGN, IGN, IGN, EOS, IGN]
    assert (t2i.image_spans, t2i.image_is_target) == ([(4, 6)], [True])

    cap = build_sequence(TOK, "y", img, [A, B], patch_grid=(1, 2), layout=CAPTION)
    assert cap.tokens == [BOS, BOI, IMG, IMG, EOI, A, B, EOS]
    assert cap.text_targets == [BOI, IGN, IGN, IGN, A, B, EOS, IGN]
    assert (cap.image_spans, cap.image_is_target) == ([(2, 4)], [False])

    drop = build_sequence(TOK, "z", img, [A, B], patch_grid=(1, 2), layout=T2I, drop_caption=True)
    assert drop.tokens == [BOS, BOI, IMG, IMG, EOI, EOS]
    assert drop.text_targets == [BOI, IGN, IGN, IGN, EOS, IGN]

    assert t2i_prompt_tokens(TOK, "ab") == t2i.tokens[:4]
    assert t2i_prompt_tokens(TOK, "") == drop.tokens[:2]
    assert caption_prompt_tokens(TOK) == cap.tokens[:2]


def test_layout_choice_is_a_stable_function_of_seed_epoch_key() -> None:
    picks = [choose_layout(0, 0, f"k{i}", 0.8, 0.25) for i in range(2000)]
    assert picks == [choose_layout(0, 0, f"k{i}", 0.8, 0.25) for i in range(2000)]
    t2i = [drop for layout, drop in picks if layout == T2I]
    assert abs(len(t2i) / 2000 - 0.8) < 0.04 and abs(sum(t2i) / len(t2i) - 0.25) < 0.04
    assert not any(drop for layout, drop in picks if layout == CAPTION)
    assert picks != [choose_layout(0, 1, f"k{i}", 0.8, 0.25) for i in range(2000)]


def test_pack_sequences_exact_matrices() -> None:
    imgs = [torch.full((3, 2, 2), float(i)) for i in range(3)]
    d0 = build_sequence(TOK, "d0", imgs[0], [A, B], patch_grid=(1, 2), layout=T2I)  # 8 tokens
    d1 = build_sequence(TOK, "d1", imgs[1], [C], patch_grid=(1, 2), layout=CAPTION)  # 7 tokens
    d2 = build_sequence(TOK, "d2", imgs[2], [A], patch_grid=(1, 2), layout=T2I, drop_caption=True)  # 6 tokens
    batch = pack_sequences([d0, d1, d2], seq_len=16, batch_rows=2, pad_id=PAD, patch_grid=(1, 2))
    P, N = PAD, -1
    tokens = [[BOS, A, B, BOI, IMG, IMG, EOI, EOS, BOS, BOI, IMG, IMG, EOI, C, EOS, P],
              [BOS, BOI, IMG, IMG, EOI, EOS, P, P, P, P, P, P, P, P, P, P]]
    doc_ids = [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, N],
               [0, 0, 0, 0, 0, 0, N, N, N, N, N, N, N, N, N, N]]
    image_ids = [[N, N, N, N, 0, 0, N, N, N, N, 1, 1, N, N, N, N],
                 [N, N, 2, 2, N, N, N, N, N, N, N, N, N, N, N, N]]
    positions = [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 0],
                 [0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    targets = [[A, B, BOI, IGN, IGN, IGN, EOS, IGN, BOI, IGN, IGN, IGN, C, EOS, IGN, IGN],
               [BOI, IGN, IGN, IGN, EOS, IGN] + [IGN] * 10]
    assert batch.tokens.tolist() == tokens
    assert batch.doc_ids.tolist() == doc_ids
    assert batch.image_ids.tolist() == image_ids
    assert batch.positions.tolist() == positions
    assert batch.text_targets.tolist() == targets
    assert torch.equal(batch.images, torch.stack(imgs))
    assert batch.image_rows.tolist() == [0, 0, 1] and batch.image_starts.tolist() == [4, 10, 2]
    assert batch.image_is_target.tolist() == [True, False, True]
    assert batch.patch_grid == (1, 2) and batch.keys == ["d0", "d1", "d2"]
    assert batch.num_text_targets() == 9

    packer = Packer(16, 1, PAD, (1, 2))  # one row: d0 + d1 fit, d2 must wait for the next batch
    assert packer.add(d0) and packer.add(d1) and not packer.add(d2)
    assert packer.emit().keys == ["d0", "d1"] and packer.add(d2) and packer.emit().keys == ["d2"]
    with pytest.raises(ValueError):
        pack_sequences([d0, d1, d2], seq_len=16, batch_rows=1, pad_id=PAD, patch_grid=(1, 2))


def test_first_fit_fills_an_earlier_row_that_sequential_packing_has_closed() -> None:
    def doc(key: str, caption: list[int], layout: str = T2I) -> object:
        return build_sequence(TOK, key, torch.zeros(3, 2, 2), caption, patch_grid=(1, 2), layout=layout)

    a, b, c, d = doc("a", [C], CAPTION), doc("b", [A, B]), doc("c", [A, B]), doc("d", [A, B])  # 7, 8, 8, 8 tokens
    e = build_sequence(TOK, "e", torch.zeros(3, 2, 2), [A], patch_grid=(1, 2), layout=T2I, drop_caption=True)  # 6
    packers = {policy: Packer(21, 2, PAD, (1, 2), policy=policy) for policy in ("first_fit", "sequential")}
    for packer in packers.values():  # rows: [a b] (15 tokens), [c d] (16 tokens)
        assert all(packer.add(s) for s in (a, b, c, d))
    assert packers["first_fit"].add(e)  # 15 + 6 = 21 tokens: row 0 still has room
    assert not packers["sequential"].add(e)  # only the last row is open: 16 + 6 > 21
    batch = packers["first_fit"].emit()
    assert batch.keys == ["a", "b", "e", "c", "d"] and batch.image_rows.tolist() == [0, 0, 0, 1, 1]
    assert packers["sequential"].emit().keys == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="unknown packing policy"):
        Packer(21, 2, PAD, (1, 2), policy="best")


def test_loader_batches_are_consistent(tmp_path: Path) -> None:
    cfg = _cfg(make_shards(tmp_path), num_workers=0)
    batch = next(iter(build_loader(cfg, TOK, (2, 2), seed=0)))
    assert isinstance(batch, Batch) and batch.tokens.shape == (2, 64)
    assert batch.images.shape == (batch.num_images, 3, 8, 8) and batch.images.abs().max() <= 1
    slots = batch.tokens == IMG
    assert torch.equal(slots, batch.image_ids >= 0)
    for n in range(batch.num_images):
        row, start = int(batch.image_rows[n]), int(batch.image_starts[n])
        assert (batch.image_ids[row, start:start + 4] == n).all()
    real = batch.doc_ids >= 0  # every real token predicts its successor or is ignored; padding is ignored
    assert (batch.text_targets[~real] == IGN).all() and (batch.tokens[~real] == PAD).all()


# ---------------------------------------------------------------------------------------------------------------
# exact resume


def _check_resume(cfg: DataConfig, total: int, ks: list[int]) -> set[tuple[int, int]]:
    """Batches after resuming at each k equal the uninterrupted run's, and so do the final counts; returns the
    (epoch, shard cursor) positions resumed from."""
    reference, end_state = _take(build_loader(cfg, TOK, (2, 2), seed=7), total)
    positions = set()
    for k in ks:
        _, state = _take(build_loader(cfg, TOK, (2, 2), seed=7), k)
        resumed = build_loader(cfg, TOK, (2, 2), seed=7)
        resumed.load_state_dict(state)
        rest, resumed_end = _take(resumed, total - k)
        for a, b in zip(reference[k:], rest, strict=True):
            _assert_same(a, b)
        assert data_counts(resumed_end) == data_counts(end_state)
        positions |= {(ds["stream"]["epoch"], ds["stream"]["shard_cursor"]) for ds in _dataset_states(state)}
    return positions


@pytest.mark.parametrize("num_workers,ks", [(0, list(range(1, 14))), (2, [3, 6, 11])])
def test_resume_is_exact(tmp_path: Path, num_workers: int, ks: list[int]) -> None:
    cfg = _cfg(make_shards(tmp_path), num_workers=num_workers)
    positions = _check_resume(cfg, 14, ks)  # 40 samples, ~8 documents per batch: more than two epochs
    assert len({p[1] for p in positions}) > 1  # resumed from different shards...
    assert max(p[0] for p in positions) >= 1  # ...and from a later epoch


def test_resume_finite_pass_including_last_partial_batch(tmp_path: Path) -> None:
    cfg = _cfg(make_shards(tmp_path, n_shards=3, per_shard=9), repeat=False, shuffle_buffer=5)
    reference = list(build_loader(cfg, TOK, (2, 2), seed=1))
    assert sorted(k for b in reference for k in b.keys) == [f"k{i:04d}" for i in range(27)]
    _, state = _take(build_loader(cfg, TOK, (2, 2), seed=1), len(reference) - 1)
    resumed = build_loader(cfg, TOK, (2, 2), seed=1)
    resumed.load_state_dict(state)
    (last,) = list(resumed)
    _assert_same(last, reference[-1])
    assert last.tokens.shape == (2, 64) and (last.doc_ids == -1).any()  # the final batch is padded to full shape


def _dataset_states(state):
    if isinstance(state, dict):
        if "stream" in state:
            yield state
        for v in state.values():
            yield from _dataset_states(v)


# ---------------------------------------------------------------------------------------------------------------
# errors are skipped and counted


def test_corrupt_inputs_are_skipped_and_counted(tmp_path: Path) -> None:
    good = write_tar(tmp_path / "good-0.tar", [color_sample(i) for i in range(6)])
    full = (tmp_path / "full.tar")
    write_tar(full, [color_sample(100 + i) for i in range(6)])
    data = full.read_bytes()
    (tmp_path / "good-1.tar").write_bytes(data[: len(data) // 2])  # truncated mid-stream
    # cut exactly after the members of the first 3 samples, dropping the end-of-archive blocks
    offsets = [m.offset_data + m.size for m in _members(str(full))]
    cut = -(-offsets[5] // 512) * 512
    (tmp_path / "trunc-at-member.tar").write_bytes(data[:cut])
    bad = [color_sample(200), {"__key__": "bad_png", "png": os.urandom(300), "txt": "noise"},
           {"__key__": "no_txt", "png": png_bytes((1, 2, 3))}, {"__key__": "empty_txt", "png": png_bytes((1, 2, 3)), "txt": " "},
           {"__key__": "no_img", "txt": "only text"}, {"__key__": "long", "png": png_bytes((1, 2, 3)), "txt": "x" * 40},
           color_sample(201)]
    write_tar(tmp_path / "good-2.tar", bad)
    spec = (f"{tmp_path}/good-{{0..3}}.tar,{tmp_path}/trunc-at-member.tar,pipe:exit 3,"
            f"pipe:cat {tmp_path}/full.tar")
    cfg = _cfg(spec, repeat=False, max_skip_rate=1.0)
    loader = build_loader(cfg, TOK, (2, 2), seed=0)
    keys = [k for b in loader for k in b.keys]
    counts = data_counts(loader.state_dict())

    expected = {f"k{i:04d}" for i in range(6)} | {"k0200", "k0201"} | {f"k{100 + i:04d}" for i in range(6)}
    assert set(keys) == expected  # good shards, the good samples of good-2, full.tar through `pipe:cat`
    assert len(keys) > len(expected)  # plus the complete samples before the cuts of the two truncated copies
    assert counts["bad_image"] == 1 and counts["missing_caption"] == 2 and counts["no_image"] == 1
    assert counts["caption_too_long"] == 1 and counts["too_long_for_row"] == 0
    assert counts["corrupt_shard"] == 2 and counts["missing_shard"] == 2  # good-3.tar and `pipe:exit 3`
    assert counts["shard_retries"] == 3  # `pipe:exit 3` only: a local file that is missing or corrupt stays so
    assert counts["seen"] == len(keys) + counts["skipped"]


def test_resume_is_exact_over_broken_shards(tmp_path: Path) -> None:
    make_shards(tmp_path, n_shards=2, per_shard=9)
    data = (tmp_path / "train-01.tar").read_bytes()
    (tmp_path / "train-02.tar").write_bytes(data[: len(data) // 2])
    write_tar(tmp_path / "train-03.tar", [color_sample(50), {"__key__": "bad", "png": b"xx", "txt": "a"}, color_sample(51)])
    cfg = _cfg(f"{tmp_path}/train-{{00..04}}.tar", shuffle_buffer=3, max_skip_rate=1.0)
    _check_resume(cfg, 12, [2, 5, 7, 9])
    _, state = _take(build_loader(cfg, TOK, (2, 2), seed=7), 12)
    counts = data_counts(state)
    assert counts["missing_shard"] >= 2 and counts["corrupt_shard"] >= 2 and counts["bad_image"] >= 2


def _members(path: str):
    import tarfile

    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_iter_tar_reports_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(3000))
    errors = []
    on_error = lambda reason, url, exc: errors.append(reason)  # noqa: E731
    assert list(iter_tar(str(junk), on_error=on_error)) == []
    assert list(iter_tar(str(tmp_path / "none.tar"), on_error=on_error)) == []
    assert list(iter_tar("pipe:exit 1", on_error=on_error)) == []
    assert errors == ["corrupt_shard", "missing_shard", "missing_shard"]
    # a tar cut at a member boundary (no end-of-archive blocks): complete samples come out, the last one is dropped
    full = tmp_path / "full.tar"
    write_tar(full, [color_sample(i) for i in range(4)])
    members = _members(str(full))
    cut = -(-(members[5].offset_data + members[5].size) // 512) * 512  # after k0002.txt
    (tmp_path / "cut.tar").write_bytes(full.read_bytes()[:cut])
    errors.clear()
    assert [raw["__key__"] for _, raw in iter_tar(str(tmp_path / "cut.tar"), on_error=on_error)] == ["k0000", "k0001"]
    assert errors == ["corrupt_shard"]
    # start / keep select samples by index without reading the others
    picked = [(i, raw["__key__"], sorted(raw)) for i, raw in iter_tar(str(full), start=1, keep=lambda i: i != 2)]
    fields_ = ["__key__", "__url__", "png", "txt"]
    assert picked == [(1, "k0001", fields_), (3, "k0003", fields_)]


def test_skip_rate_ceiling_raises(tmp_path: Path) -> None:
    n = MIN_SAMPLES_FOR_SKIP_RATE + 20
    samples = [color_sample(i) if i % 3 == 0 else {"__key__": f"k{i:04d}", "png": b"", "txt": "x"} for i in range(n)]
    path = write_tar(tmp_path / "mostly-bad.tar", samples)
    loader = build_loader(_cfg(path, repeat=False, max_skip_rate=0.5), TOK, (2, 2), seed=0)
    one_line = r"^data skip rate 6\d\.\d% exceeds data\.max_skip_rate=50\.0% after 1\d\d samples on rank 0 worker 0 \("
    with pytest.raises(DataError, match=one_line) as err:
        list(loader)
    assert "\n" not in str(err.value)
    assert len(list(build_loader(_cfg(path, repeat=False, max_skip_rate=0.7), TOK, (2, 2), seed=0))) > 0


def test_unreadable_data_with_repeat_raises(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(os.urandom(2000))
    loader = build_loader(_cfg(str(tmp_path / "junk.tar")), TOK, (2, 2), seed=0)
    with pytest.raises(DataError, match="read no sample in 3 whole epochs"):
        next(iter(loader))


def test_state_from_another_world_size_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(make_shards(tmp_path))
    state = PackedDataset(cfg, TOK, (2, 2), seed=0, rank=1, world_size=2).state_dict()
    with pytest.raises(DataError, match="exact resume needs the same world size"):
        PackedDataset(cfg, TOK, (2, 2), seed=0).load_state_dict(state)


def test_grid_prompts_name_why_eval_shards_give_none(tmp_path: Path) -> None:
    from transfusion.config import load_config
    from transfusion.training.outputs import grid_prompts

    def error(eval_shards: str) -> str:
        cfg = load_config(None, [f"--data.eval_shards={eval_shards}"])
        with pytest.raises(DataError) as e:
            grid_prompts(cfg)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert error(str(tmp_path / "nope.tar")).endswith(f"data.eval_shards: shard pattern "
                                                       f"{str(tmp_path / 'nope.tar')!r} matches no files")
    (tmp_path / "junk.tar").write_bytes(os.urandom(2000))
    assert error(str(tmp_path / "junk.tar")).endswith("could not be read (0 shard(s) missing, 1 corrupt)")
    write_tar(tmp_path / "no-captions.tar", [{"__key__": "a", "png": png_bytes((1, 2, 3))}])
    assert error(str(tmp_path / "no-captions.tar")).endswith("has no captions")


@pytest.mark.slow
def test_missing_eval_shards_say_they_match_no_file(tmp_path: Path) -> None:
    """The grid prompts come from data.eval_shards when sample.prompts is empty: a path that does not exist is named
    as such, not reported as shards without captions."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    missing = tmp_path / "heldout-000000.tar"
    proc = subprocess.run(
        [sys.executable, "-m", "transfusion.train", "recipes/shapes_tiny.toml", f"--run.dir={tmp_path / 'run'}",
         "--run.device=cpu", f"--data.shards={make_shards(tmp_path / 'train')}", f"--data.eval_shards={missing}",
         "--data.image_size=8", "--data.seq_len=64", "--data.batch_rows=2", "--data.num_workers=0",
         "--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--train.autocast=fp32", "--no-progress"],
        cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "matches no file" in errors[0] and str(missing) in errors[0] and "data.eval_shards" in errors[0]
    assert "has no captions" not in proc.stderr
