"""Real shard formats (written with webdataset's own TarWriter), interleaved documents, latents, filters, noise
limits, clean copies, truncation and resume of a finite multi-worker stream."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tar
from PIL import Image

from data_pipelines.documents import Document, decode_image, decode_latent
from data_pipelines.errors import DataError, SkipSample
from data_pipelines.loader import build_loader, data_counts
from data_pipelines.packing import Packer
from data_pipelines.samples import ImageSegment, SequenceBuilder, assemble
from data_pipelines.shards import iter_tar
from transfusion.attention.masks import dense_mask
from transfusion.batch import IGNORE_INDEX as IGN
from transfusion.config import DataConfig
from transfusion.sequence import next_token_targets
from transfusion.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BOS, EOS, BOI, EOI, IMG, PAD = TOK.bos_id, TOK.eos_id, TOK.boi_id, TOK.eoi_id, TOK.image_id, TOK.pad_id
H, I_, O, K = (ord(c) for c in "hiok")


def _image(fmt: str, size=(12, 9), mode: str = "RGB", color=(200, 30, 30)) -> bytes:
    if mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
    else:
        img = Image.new("RGB", size, color).convert(mode)
    buf = io.BytesIO()
    img.save(buf, {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def _npy(z: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, z)
    return buf.getvalue()


def _cfg(shards: str, **kw) -> DataConfig:
    base = dict(shards=shards, image_size=8, seq_len=64, batch_rows=2, num_workers=0, shuffle_buffer=1,
                repeat=False, t2i_ratio=1.0, caption_dropout=0.0, max_text_tokens=32, max_skip_rate=1.0)
    return DataConfig(**(base | kw))


def _read_all(cfg: DataConfig, grid=(1, 2)):
    loader = build_loader(cfg, TOK, grid, seed=0)
    return list(loader), data_counts(loader.state_dict())


DOC_SEGMENTS = [{"text": "hi"}, {"image": 0}, {"text": "ok"}, {"image": "1.jpg", "role": "condition"},
                {"image": "2.webp"}]


# ---------------------------------------------------------------------------------------------------------------
# reading standard shards


def test_member_grouping_rule(tmp_path: Path) -> None:
    """Keys with dots, interleaved image tags, WebDataset multi-part extensions, directories, upper-case ext."""
    path = tmp_path / "names.tar"
    names = ["000123.abc.jpg", "000123.abc.txt", "000124.abc.jpg", "000124.abc.txt",  # dotted keys
             "doc.0.png", "doc.1.png", "doc.json",  # an interleaved document: the key shrinks to "doc"
             "k.json", "k.latent.npy", "k.txt",  # a latent pair
             "abc.seg.png", "abc.txt",  # webdataset's multi-part extension
             "d1/x.JPG", "d1/x.txt", "d2/x.jpg", "d2/x.txt",  # same basename in two directories
             "img.001.jpg", "img.001.txt", "img.002.jpg", "img.002.txt",  # numbered keys with two members each
             "noext", ".hidden.txt"]
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    got = [(i, raw["__key__"], sorted(k for k in raw if not k.startswith("__"))) for i, raw in iter_tar(str(path))]
    assert got == [(0, "000123.abc", ["jpg", "txt"]), (1, "000124.abc", ["jpg", "txt"]),
                   (2, "doc", ["0.png", "1.png", "json"]), (3, "k", ["json", "latent.npy", "txt"]),
                   (4, "abc", ["seg.png", "txt"]), (5, "d1/x", ["jpg", "txt"]), (6, "d2/x", ["jpg", "txt"]),
                   (7, "img.001", ["jpg", "txt"]), (8, "img.002", ["jpg", "txt"])]
    raw = dict(iter_tar(str(path)))[2]
    assert raw["0.png"] == b"doc.0.png" and raw["json"] == b"doc.json"  # the re-keyed first member kept its data


def test_every_layout_reads_back_through_the_loader(tmp_path: Path) -> None:
    """jpg/jpeg/png/webp, txt or json captions, dotted keys, any mode and size, and a three-image document."""
    pairs = [
        {"__key__": "a.jpg.0001", "jpg": _image("jpg", (40, 30)), "txt": "a jpg"},
        {"__key__": "a.jpg.0002", "jpeg": _image("jpeg", (9, 31), "L"), "txt": "a grey jpeg"},
        {"__key__": "b-0003", "png": _image("png", (64, 64), "RGBA"), "txt": "an rgba png"},
        {"__key__": "b-0004", "png": _image("png", (10, 10), "P"), "txt": "a palette png"},
        {"__key__": "b-0005", "png": _image("png", (17, 5), "I;16"), "txt": "a 16-bit png"},
        {"__key__": "c-0006", "webp": _image("webp", (20, 20)), "txt": "a webp", "json": '{"caption": "json!"}'},
    ]
    doc = {"__key__": "doc.a", "0.png": _image("png", (8, 8), color=(255, 0, 0)),
           "1.jpg": _image("jpg", (30, 8), color=(0, 255, 0)), "2.webp": _image("webp", (8, 50), color=(0, 0, 255)),
           "json": json.dumps({"segments": DOC_SEGMENTS, "url": "http://x"})}
    spec = ",".join([write_tar(tmp_path / "pairs.tar", pairs), write_tar(tmp_path / "docs.tar", [doc])])
    batches, counts = _read_all(_cfg(spec))
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted([p["__key__"] for p in pairs] + ["doc.a"])
    assert counts["skipped"] == 0 and counts["seen"] == 7
    for b in batches:
        assert b.images.shape[1:] == (3, 8, 8) and b.images.abs().max() <= 1 and not b.images_are_latents
    (batch,), _ = _read_all(_cfg(str(tmp_path / "docs.tar"), batch_rows=1))
    assert batch.keys == ["doc.a"]
    assert batch.tokens[0, :18].tolist() == [BOS, H, I_, BOI, IMG, IMG, EOI, O, K, BOI, IMG, IMG, EOI,
                                             BOI, IMG, IMG, EOI, EOS]
    ids = [0, 1, 2]
    assert batch.image_starts.tolist() == [4, 10, 14] and batch.num_images == 3
    # segment order is kept: red, green, blue (each image's mean colour, channel-wise in [-1, 1])
    dominant = [int(batch.images[i].mean((1, 2)).argmax()) for i in ids]
    assert dominant == [0, 1, 2]
    # roles: image 0 has text after it (data.image_then_text_role = condition), 1 is conditioning by the data,
    # 2 ends the document (generation target)
    assert batch.image_is_target[ids].tolist() == [False, False, True]
    # a json caption field reads the same shards
    batches, counts = _read_all(_cfg(spec, caption_field="json:caption"))
    assert sorted(k for b in batches for k in b.keys) == ["c-0006", "doc.a"] and counts["missing_caption"] == 5


def test_latent_shards_read_back_as_latents(tmp_path: Path) -> None:
    from safetensors.torch import save

    rng = np.random.default_rng(0)
    z = [rng.standard_normal((4, 4, 8)).astype(np.float32) for _ in range(4)]
    samples = [
        {"__key__": "k0", "latent.npy": _npy(z[0].astype(np.float16)), "txt": "half"},
        {"__key__": "k1", "latent.safetensors": save({"latent": torch.from_numpy(z[1]).bfloat16()}), "txt": "bf16"},
        {"__key__": "k2", "latent.npy": _npy(z[2]), "txt": "float"},
        {"__key__": "k3", "latent.npy": _npy(np.zeros((4, 8, 8), np.float16)), "txt": "wrong shape"},
        {"__key__": "k4", "latent.npy": b"\x93NUMPY garbage", "txt": "garbage"},
        {"__key__": "k5", "latent.npy": _npy(np.full((4, 4, 8), np.nan, np.float16)), "txt": "nan"},
        {"__key__": "doc", "0.latent.npy": _npy(z[3]), "1.latent.npy": _npy(z[0]),
         "json": json.dumps({"segments": [{"image": "0.png"}, {"text": "and"}, {"image": 1}]})},
    ]
    spec = write_tar(tmp_path / "lat.tar", samples)
    batches, counts = _read_all(_cfg(spec, seq_len=32, batch_rows=4), grid=(2, 4))
    (batch,) = batches
    assert batch.images_are_latents and batch.images.dtype == torch.float32
    assert batch.keys == ["k0", "k1", "k2", "doc"] and counts["bad_latent"] == 3
    expect = [torch.from_numpy(z[0].astype(np.float16).astype(np.float32)), torch.from_numpy(z[1]).bfloat16().float(),
              torch.from_numpy(z[2]), torch.from_numpy(z[3]), torch.from_numpy(z[0])]
    assert torch.equal(batch.images, torch.stack(expect))
    # configuration alone picks the format; "latents" on pixel shards is a clear error
    pixels = write_tar(tmp_path / "pix.tar", [{"__key__": "p", "png": _image("png"), "txt": "x"}])
    assert not _read_all(_cfg(pixels))[0][0].images_are_latents
    assert not _read_all(_cfg(spec, format="pixels"))[0]  # pixel mode ignores latent members: nothing to read
    with pytest.raises(DataError, match="data.format = 'latents' but the first readable sample"):
        build_loader(_cfg(pixels, format="latents"), TOK, (2, 4), seed=0)
    with pytest.raises(DataError, match="do not split into the \\(3, 3\\) patch grid"):
        build_loader(_cfg(spec), TOK, (3, 3), seed=0)


def test_latent_decoding_never_unpickles() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SkipSample, match="bad_latent"):
        decode_latent(buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# resize policies and filters


def test_resize_policies() -> None:
    arr = np.zeros((8, 32, 3), dtype=np.uint8)  # wide: red margins, green centre
    arr[:, :8, 0] = arr[:, 24:, 0] = arr[:, 8:24, 1] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = buf.getvalue()
    crop = decode_image(data, 4, "center_crop")
    assert torch.allclose(crop, torch.tensor([-1.0, 1.0, -1.0])[:, None, None].expand(3, 4, 4), atol=1e-6)
    squash = decode_image(data, 8, "resize")  # the whole width is kept: red left and right, green in the middle
    assert squash[0, :, 0].min() > 0.9 and squash[0, :, -1].min() > 0.9 and squash[1, :, 4].min() > 0.9
    pad = decode_image(data, 8, "pad")  # 32x8 -> 8x2 in the middle rows, grey above and below
    grey = 128 / 127.5 - 1
    assert torch.allclose(pad[:, :3], torch.full((3, 3, 8), grey), atol=1e-6)
    assert torch.allclose(pad[:, 5:], torch.full((3, 3, 8), grey), atol=1e-6)
    assert pad[0, 3:5, 0].min() > 0.9 and pad[1, 3:5, 3:5].min() > 0.9
    with pytest.raises(SkipSample, match="image_too_small"):
        decode_image(data, 4, "center_crop", min_size=9)


def test_filters_and_bad_documents_are_counted_by_reason(tmp_path: Path) -> None:
    good = {"__key__": "good", "png": _image("png", (16, 16)), "txt": "fine"}
    samples = [good,
               {"__key__": "small", "png": _image("png", (16, 6)), "txt": "too small"},
               {"__key__": "chatty", "png": _image("png", (16, 16)), "txt": "x" * 30},
               {"__key__": "nocap", "png": _image("png", (16, 16))},
               {"__key__": "noimg", "txt": "text only"},
               {"__key__": "badref", "0.png": _image("png", (16, 16)),
                "json": json.dumps({"segments": [{"text": "a"}, {"image": 3}]})},
               {"__key__": "badrole", "0.png": _image("png", (16, 16)),
                "json": json.dumps({"segments": [{"image": 0, "role": "boss"}]})},
               {"__key__": "badseg", "json": json.dumps({"segments": [{"text": "a", "image": 0}]})},
               {"__key__": "textonly", "json": json.dumps({"segments": [{"text": "just words"}]})}]
    spec = write_tar(tmp_path / "f.tar", samples)
    batches, counts = _read_all(_cfg(spec, min_image_size=8, max_caption_chars=20))
    assert sorted(k for b in batches for k in b.keys) == ["good", "textonly"]
    assert {k: v for k, v in counts.items() if v and k not in ("seen", "skipped")} == {
        "image_too_small": 1, "caption_too_long": 1, "missing_caption": 1, "no_image": 1, "bad_document": 3}


# ---------------------------------------------------------------------------------------------------------------
# interleaved documents: roles, noise limits, clean copies, truncation


def _document(roles=(None, "condition", None)) -> Document:
    images = [torch.full((3, 2, 2), float(i)) for i in range(3)]
    return Document("doc", ["hi", images[0], "ok", images[1], images[2]], list(roles), True)


def _builder(**kw) -> SequenceBuilder:
    return SequenceBuilder(TOK, (1, 2), seed=0, **kw)


def test_interleaved_roles_and_noise_limit() -> None:
    seq = _builder()(_document(), 0)  # defaults: image with text after it -> condition; the last one -> target
    assert seq.tokens == [BOS, H, I_, BOI, IMG, IMG, EOI, O, K, BOI, IMG, IMG, EOI, BOI, IMG, IMG, EOI, EOS]
    assert seq.image_spans == [(4, 6), (10, 12), (14, 16)] and seq.image_is_target == [False, False, True]
    assert seq.text_targets == next_token_targets(seq.tokens, [t == IMG for t in seq.tokens], BOI)
    assert seq.image_noise_limit == [1.0, 1.0, 1.0] and seq.positions is None

    limited = _builder(image_then_text_role="target", noise_limit=0.5, noise_limit_share=1.0)(_document(), 0)
    assert limited.image_is_target == [True, False, True]
    assert limited.image_noise_limit == [0.5, 1.0, 1.0]  # only the target image that text follows
    # the share is a stable function of (seed, epoch, key): about noise_limit_share of documents are limited
    b = _builder(image_then_text_role="target", noise_limit=0.5, noise_limit_share=0.8)
    img = torch.zeros(3, 2, 2)
    picks = [b(Document(f"k{i}", [img, "cap"], [None], True), 0).image_noise_limit[0] for i in range(1000)]
    assert abs(picks.count(0.5) / 1000 - 0.8) < 0.05
    assert picks == [b(Document(f"k{i}", [img, "cap"], [None], True), 0).image_noise_limit[0] for i in range(1000)]


def test_clean_copy_layout_positions_targets_and_mask() -> None:
    seq = _builder(image_then_text_role="target", clean_copy=True)(_document(), 0)
    assert seq.tokens == [BOS, H, I_, BOI, IMG, IMG, BOI, IMG, IMG, EOI, O, K, BOI, IMG, IMG, EOI,
                          BOI, IMG, IMG, EOI, EOS]
    assert seq.positions == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert seq.hidden_spans == [(3, 6)]
    assert seq.image_spans == [(4, 6), (7, 9), (13, 15), (17, 19)]
    assert seq.image_is_target == [True, False, False, True]  # noisy copy, clean copy, conditioning, last image
    # the noise limit is for text that reads a noisy image: behind a clean copy the noisy copy keeps the whole schedule
    capped = _builder(image_then_text_role="target", clean_copy=True, noise_limit=0.5, noise_limit_share=1.0)
    assert capped(_document(), 0).image_noise_limit == [1.0, 1.0, 1.0, 1.0]
    assert _builder(image_then_text_role="target", noise_limit=0.5,
                    noise_limit_share=1.0)(_document(), 0).image_noise_limit[0] == 0.5
    assert torch.equal(seq.images[0], seq.images[1])
    assert seq.text_targets == [H, I_, BOI, IGN, IGN, IGN, IGN, IGN, IGN, O, K, BOI, IGN, IGN, IGN, BOI, IGN, IGN, IGN,
                                EOS, IGN]
    packer = Packer(24, 1, PAD, (1, 2))
    assert packer.add(seq)
    b = packer.emit()
    assert b.hidden_ids[0].tolist() == [-1, -1, -1, 0, 0, 0] + [-1] * 18
    assert b.positions[0, :21].tolist() == seq.positions
    mask = dense_mask(b.doc_ids, b.image_ids, hidden_ids=b.hidden_ids)[0]
    assert not mask[6:21, 3:6].any()  # nothing after the noisy copy sees it
    assert mask[4, 3] and mask[4, 5] and mask[5, 4] and mask[4, :3].all()  # it sees the prefix, its BOI and itself
    assert mask[20, 6:10].all() and mask[7, 8]  # later text sees the clean copy, which is bidirectional


def test_truncation_never_cuts_an_image() -> None:
    doc = _document()
    cut_after_text = _builder(seq_len=9)(doc, 0)  # BOS h i BOI I I EOI o k | the next image block does not fit
    assert cut_after_text.truncated and cut_after_text.tokens == [BOS, H, I_, BOI, IMG, IMG, EOI, O, K]
    assert cut_after_text.text_targets[-1] == IGN and len(cut_after_text.image_spans) == 1
    cut_in_text = _builder(seq_len=8)(doc, 0)
    assert cut_in_text.tokens == [BOS, H, I_, BOI, IMG, IMG, EOI, O]
    before_image = _builder(seq_len=5)(doc, 0)  # BOS h i | the first image block (4 tokens) does not fit
    assert before_image.tokens == [BOS, H, I_] and before_image.image_spans == []
    assert _builder(seq_len=18)(doc, 0).truncated is False  # exactly fits with EOS
    assert _builder(seq_len=17)(doc, 0).tokens[-1] == EOI  # EOS dropped: truncated
    with pytest.raises(SkipSample, match="too_long_for_row"):
        _builder(seq_len=9, long_documents="skip")(doc, 0)
    with pytest.raises(SkipSample, match="too_long_for_row"):  # nothing to learn from what is left
        _builder(seq_len=1)(doc, 0)
    # the loader counts truncations (kept) apart from skips
    part = assemble(TOK, "x", [[H], ImageSegment(torch.zeros(3, 2, 2), True)], patch_grid=(1, 2), max_len=3)
    assert part.tokens == [BOS, H] and part.truncated


def test_noise_limit_reaches_the_noising_function() -> None:
    from transfusion.config import DiffusionConfig
    from transfusion.diffusion.schedule import NoiseSchedule
    from transfusion.model.image_head import noised_images

    schedule = NoiseSchedule(DiffusionConfig())
    seqs = [assemble(TOK, f"d{i}", [ImageSegment(torch.zeros(3, 2, 2), True, 0.5 if i % 2 else 1.0), [H]],
                     patch_grid=(1, 2)) for i in range(64)]
    packer = Packer(len(seqs[0]) * 64, 1, PAD, (1, 2))
    for s in seqs:
        assert packer.add(s)
    batch = packer.emit()
    _, t, _ = noised_images(batch, schedule, torch.Generator().manual_seed(0))
    limited = batch.image_noise_limit < 1
    assert limited.sum() == 32 and t[limited].max() < 500 and t[~limited].max() >= 500
    unlimited = type(batch)(**{f: getattr(batch, f) for f in batch.__slots__} | {"image_noise_limit": None})
    _, t_free, _ = noised_images(unlimited, schedule, torch.Generator().manual_seed(0))
    assert torch.equal(t_free[~limited], t[~limited])  # same draws; the limit only scales
    assert torch.equal(t[limited], (t_free[limited].double() * 0.5).floor().long())


# ---------------------------------------------------------------------------------------------------------------
# exact resume of a finite stream read by two workers


def test_finite_two_workers_resumed_twice_sees_every_key_once(tmp_path: Path) -> None:
    samples = [{"__key__": f"s{s}-{i:03d}", "png": _image("png", (8, 8), color=(i, s, 0)), "txt": f"c{i}"}
               for s in range(5) for i in range(9)]
    spec = ",".join(write_tar(tmp_path / f"t-{s}.tar", samples[9 * s: 9 * s + 9]) for s in range(5))
    cfg = _cfg(spec, num_workers=2, shuffle_buffer=4, seq_len=32, batch_rows=2, t2i_ratio=0.5)
    seen: list[str] = []
    state = None
    for take in (3, 4, None):  # kill after 3 batches, resume, kill after 4 more, resume to the end
        loader = build_loader(cfg, TOK, (2, 2), seed=5)
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        batches = list(it) if take is None else [next(it) for _ in range(take)]
        seen += [k for b in batches for k in b.keys]
        state = loader.state_dict()
        del it, loader
    assert sorted(seen) == sorted(s["__key__"] for s in samples)
    assert len(seen) == len(set(seen)) == 45
