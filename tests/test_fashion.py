"""Real-image plumbing at toy size: IDX files -> captioned shards with held-out templates and content-disjoint
held-out images; GPT-2-style BPE -> tokenizer.json and its corpus-reduced form (same pieces on the corpus); the
autoencoder trainer writes a loadable VAE with its scaling factor, and the latent recipe runs on it end to end."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.fashion import (
    CLASSES,
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    IDXError,
    caption_for,
    class_of_caption,
    read_idx,
    read_idx_pair,
)

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    head = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = head + array.astype(np.uint8).tobytes()
    (gzip.open(str(path) + ".gz", "wb") if gz else open(path, "wb")).write(data)


@pytest.fixture()
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 255, (60, 28, 28))
    test = rng.integers(0, 255, (12, 28, 28))
    test[3] = train[7]  # one test image equal to a training image: must not be held out
    write_idx(tmp_path / "train-images-idx3-ubyte", train)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(60) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(12) % 10, gz=False)
    return tmp_path


def test_idx_reader_and_captions(idx_dir, tmp_path):
    x, y = read_idx_pair(idx_dir, "train")
    assert x.shape == (60, 28, 28) and y.tolist()[:3] == [0, 1, 2]
    assert read_idx(idx_dir / "t10k-labels-idx1-ubyte").shape == (12,)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(IDXError, match="bad magic"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")
    assert caption_for(9, TRAIN_TEMPLATES[0]) == "a photo of an ankle boot"
    assert [class_of_caption(caption_for(c, t)) for c in range(10) for t in HELDOUT_TEMPLATES] == \
        [c for c in range(10) for _ in HELDOUT_TEMPLATES]  # "shirt" is not read inside "t-shirt"
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)


def members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_make_fashion_shards(idx_dir, tmp_path):
    out = tmp_path / "shards"
    res = subprocess.run([sys.executable, "tools/make_fashion_shards.py", "--idx", str(idx_dir), "--out", str(out),
                          "--image-size", "32", "--heldout-samples", "20", "--shard-size", "25"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["heldout"]["dropped_equal_to_a_training_image"] == 1
    train = {k: v for s in manifest["splits"]["train"]["shards"] for k, v in members(out / s).items()}
    held = members(out / manifest["splits"]["heldout"]["shards"][0])
    train_pngs = {v for m in train.values() for ext, v in m.items() if ext.endswith("png")}
    assert not train_pngs & {m["png"] for m in held.values()}  # disjoint by content
    train_texts = [m["txt"].decode() for m in train.values() if "txt" in m]
    assert train_texts and not any(class_of_caption(t) is None for t in train_texts)
    unseen = {caption_for(c, t) for c in range(10) for t in HELDOUT_TEMPLATES}
    assert not unseen & set(train_texts)  # held-out phrasings never reach training
    docs = [json.loads(m["json"]) for m in train.values() if "0.png" in m]
    assert docs and all([s.get("image") for s in d["segments"] if "image" in s] == [0, 1] for d in docs)
    kinds = [json.loads(m["json"])["template_seen"] for m in held.values()]
    assert kinds.count(True) == kinds.count(False) == 11  # 12 test images minus the duplicate, each twice
    bad = subprocess.run([sys.executable, "tools/make_fashion_shards.py", "--idx", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "apt-get install" in bad.stderr


def test_tokenizer_build_and_reduction(tmp_path):
    """A miniature GPT-2 BPE (byte alphabet + a few merges) through tools/make_tokenizer.py --from-dir."""
    from tokenizers import pre_tokenizers

    from transfusion.tokenizer import build_tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges = [("a", "b"), ("Ġ", "c"), ("ab", "c"), ("x", "y"), ("Ġc", "d")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    src = tmp_path / "bpe"
    src.mkdir()
    (src / "encoder.json").write_text(json.dumps(vocab))
    (src / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    shard = tmp_path / "train-000000.tar"
    import io

    with tarfile.open(shard, "w") as tar:
        for i, text in enumerate(["abc cd", "ab c"]):
            data = text.encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "tok"
    res = subprocess.run([sys.executable, "tools/make_tokenizer.py", "--from-dir", str(src), "--out", str(out),
                          "--reduce", str(tmp_path / "train-*.tar")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    full, small = build_tokenizer(str(out / "tokenizer.json")), build_tokenizer(str(out / "tokenizer-reduced.json"))
    assert full.vocab_size == 256 + 5 + 6 and small.vocab_size == 256 + 4 + 6  # "xy" is not used by the corpus
    for text in ("abc cd", "ab c", "xyz abc"):
        assert small.decode(small.encode(text)) == text == full.decode(full.encode(text))
    assert len(small.encode("abc cd")) == len(full.encode("abc cd")) == 2  # "abc", " cd"
    assert len(small.encode("xy")) == 2 and len(full.encode("xy")) == 1  # outside the corpus: smaller pieces


@pytest.mark.slow
def test_train_autoencoder_writes_a_loadable_vae(tmp_path, idx_dir):
    import torch

    from transfusion.latents.vae import VAECodec

    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "tools/make_fashion_shards.py", "--idx", str(idx_dir), "--out", str(shards),
                    "--heldout-samples", "5"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    out = tmp_path / "vae"
    res = subprocess.run([sys.executable, "tools/train_autoencoder.py", "--shards", str(shards / "train-*.tar"),
                          "--eval-shards", str(shards / "heldout-000000.tar"), "--out", str(out), "--steps", "3",
                          "--batch-size", "4", "--channels", "8", "16", "--latent-channels", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["latent_shape"] == [2, 14, 14] and report["heldout_images"] == 5
    codec = VAECodec(out)
    z = codec.encode(torch.zeros(1, 3, 28, 28))
    assert z.shape == (1, 2, 14, 14) and abs(codec.scaling_factor - report["scaling_factor"]) < 1e-6
    assert codec.decode(z).shape == (1, 3, 28, 28)

    # the latent path end to end, as recipes/fashion_latents.toml runs it: precomputed latent shards -> training ->
    # export -> evaluation on the *pixel* held-out shard (CAS classifier from the pixel training split beside it)
    from transfusion.components import build_components
    from transfusion.config import load_config

    lat = tmp_path / "latents"
    res = subprocess.run([sys.executable, "tools/precompute_latents.py", "--shards", str(shards / "train-*.tar"),
                          "--vae", str(out), "--out", str(lat), "--image-size", "28", "--dtype", "float32",
                          "--decode-workers", "0", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    overrides = [f"--run.dir={run}", f"--data.shards={lat}/train-*.tar", f"--latents.vae_path={out}",
                 f"--data.eval_shards={shards}/heldout-000000.tar", "--data.tokenizer=bytes", "--data.num_workers=0",
                 "--model.patch_size=2", "--data.shuffle_buffer=8", "--data.batch_rows=2", "--model.dim=32",
                 "--model.n_layers=1", "--model.n_heads=2", "--train.steps=2", "--train.log_interval=1",
                 "--sample.steps=2", "--sample.prompts=['a bag']", "--eval.num_t2i=4", "--eval.num_caption=4",
                 "--eval.batch_size=4", "--eval.num_fid=2", "--eval.max_caption_tokens=4", "--train.autocast=fp32"]
    cfg = load_config(ROOT / "recipes/fashion_latents.toml", overrides)
    parts = build_components(cfg, torch.device("cpu"))  # latents.vae_path loads the saved VAE
    assert parts.patch_grid == (7, 7) and parts.codec.channels == 2
    torch.testing.assert_close(parts.codec.encode(torch.zeros(1, 3, 28, 28)), z)
    res = subprocess.run([sys.executable, "-m", "transfusion.train", "recipes/fashion_latents.toml", *overrides,
                          "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "tools/evaluate.py", "--run", str(run), "--steps", "2", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    ev = json.loads((run / "eval/report.json").read_text())
    assert ev["held_out_format"] == "pixels" and ev["world"] == "fashion"
    assert ev["cas"]["n_seen"] == 4 and ev["fid"]["n"] == 2 and ev["caption"]["n"] == 4
    names = [c[0] for c in CLASSES]  # the accuracy is the share of the captions (all 4 are examples) naming the class
    hits = [class_of_caption(e["caption"]) == names.index(e["class"]) for e in ev["caption"]["examples"]]
    assert len(hits) == 4 and ev["caption"]["accuracy"] == sum(hits) / 4
    assert (shards / "cas_classifier.pt").is_file()  # trained on the pixel split beside the held-out shard
    assert torch.load(shards / "cas_classifier.pt", weights_only=True)["train_shards"] == str(shards / "train-*.tar")


def test_cas_caption_accuracy_and_classifier_on_toy_data():
    """evaluate_fashion's aggregation with an oracle classifier, and the CNN learning a separable toy problem."""
    import torch
    from helpers import GRID, TOK, tiny_model

    from transfusion.config import DiffusionConfig
    from transfusion.diffusion.schedule import NoiseSchedule
    from transfusion.eval.fashion import classify, evaluate_fashion, train_classifier
    from transfusion.eval.stats import binomial_se
    from transfusion.generation.engine import Engine
    from transfusion.latents.vae import PixelCodec

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    images = torch.full((200, 3, 28, 28), -1.0)
    for i, y in enumerate(labels.tolist()):  # class y: a bright band at row 2y
        images[i, :, 2 * y:2 * y + 3] = 1.0
    images += 0.1 * torch.randn(images.shape, generator=g)
    model = train_classifier(images, labels, epochs=15)
    assert float((classify(model, images) == labels).float().mean()) > 0.9

    class Always3(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    eng = Engine(tiny_model(), TOK, NoiseSchedule(DiffusionConfig()), PixelCodec(), GRID, torch.device("cpu"),
                 precision="fp32")
    samples = []
    for j in range(6):
        label = [3, 3, 5, 1, 3, 0][j]
        img = torch.rand(3, 8, 8, generator=g) * 2 - 1
        for seen in (True, False):
            rec = {"label": label, "class": CLASSES[label][0], "template_seen": seen, "test_index": j}
            samples.append((f"k{j}{seen}", img, caption_for(label, (TRAIN_TEMPLATES if seen else
                                                                    HELDOUT_TEMPLATES)[0]), rec))
    dress = caption_for(3, TRAIN_TEMPLATES[0])  # every image captioned "a photo of a dress": right for 3 of the 6
    eng.caption = lambda images, *args, **kwargs: [dress] * len(images)
    report = evaluate_fashion(eng, samples, num_t2i=6, num_caption=6, num_fid=2, batch_size=4, steps=2,
                              guidance=1.0, sampler="ddim", guidance_schedule="constant", seed=0,
                              max_caption_tokens=4, latents=False, progress=False, classifier=Always3())
    assert report["cas"]["seen"] == report["cas"]["unseen"] == 0.5 and report["cas"]["n_seen"] == 6
    assert report["cas"]["classifier_test_accuracy"] == 0.5  # 3 of the 6 distinct test images are class 3
    assert report["caption"]["n"] == 6 and report["caption"]["accuracy"] == 0.5
    se = binomial_se(0.5, 6)  # each rate's standard error over the images it was measured on
    assert report["caption"]["accuracy_se"] == se and report["cas"]["seen_se"] == report["cas"]["unseen_se"] == se
    assert report["cas"]["classifier_test_accuracy_se"] == se
    assert [e["caption"] for e in report["caption"]["examples"]] == [dress] * 6
    assert report["fid"]["n"] == 2 and report["fid"]["fid"] > 0  # 2 generated vs 2 of the 6 distinct real images
