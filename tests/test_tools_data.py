"""tools/make_shards.py, tools/precompute_latents.py and tools/bench_data.py from the command line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipelines.loader import build_loader, data_counts
from transfusion.config import DataConfig
from transfusion.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str, code: int = 2) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], \
        (proc.returncode, proc.stderr)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of images with sidecars, a JSONL and a CSV manifest, and an interleaved documents file."""
    root = tmp_path_factory.mktemp("inputs")
    photos = root / "photos" / "sub"
    photos.mkdir(parents=True)
    for i in range(6):
        folder = photos if i % 2 else photos.parent
        Image.new("RGB", (20 + i, 16), (30 * i, 100, 50)).save(folder / f"p{i}.{'png' if i % 3 else 'jpg'}")
        if i == 4:
            (folder / f"p{i}.json").write_text(json.dumps({"caption": "from json", "source": "x"}))
        elif i != 5:
            (folder / f"p{i}.txt").write_text(f"photo {i}\n")
    Image.new("L", (18, 18), 40).save(photos / "grey.bmp")  # re-encoded as PNG
    (photos / "grey.txt").write_text("a grey bitmap")
    (photos / "broken.jpg").write_bytes(os.urandom(400))
    (photos / "broken.txt").write_text("never read")
    (photos / "tiny.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (4, 4)).save(photos / "tiny.png")
    (photos / "tiny.txt").write_text("too small")
    lines = [{"image": "photos/p0.jpg", "caption": "zero", "id": 7}, {"image": "photos/sub/p1.png", "caption": "one"},
             {"image": "photos/nope.png", "caption": "missing"}, {"image": "photos/p2.png", "caption": "  "}]
    (root / "pairs.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")
    (root / "pairs.csv").write_text("image,caption\nphotos/p0.jpg,zero\nphotos/sub/p1.png,one\n")
    docs = [{"segments": [{"text": "first"}, {"image": "photos/p0.jpg"}, {"text": "then"},
                          {"image": "photos/sub/p1.png", "role": "condition"}, {"image": "photos/p2.png"}],
             "url": "http://example.com"},
            {"segments": [{"text": "gone"}, {"image": "photos/nope.png"}]},
            {"segments": [{"image": "photos/p0.jpg", "role": "boss"}]}]
    (root / "docs.jsonl").write_text("\n".join(map(json.dumps, docs)) + "\n")
    return root


def test_make_shards_folder_sizes_index_and_determinism(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    proc = _run("tools/make_shards.py", "--images", str(inputs / "photos"), "--out", str(out), "--max-samples", "2",
                "--min-image-size", "8", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "train.index.json").read_text())
    assert index["samples"] == 6 and index["skipped"] == {"bad_image": 1, "image_too_small": 1, "missing_caption": 1}
    assert [s["samples"] for s in index["shards"]] == [2, 2, 2] and index["spec"] == "train-{000000..000002}.tar"
    assert "skipped 3: bad_image=1, image_too_small=1, missing_caption=1" in proc.stdout
    assert not list(out.glob("*.tmp"))
    names = tarfile.open(out / "train-000000.tar").getnames()
    assert names[0].split(".")[0].isdigit() and len(names[0].split(".")[0]) == 9
    # same input, same bytes (keys from input order, fixed tar metadata), also with worker processes
    again = _run("tools/make_shards.py", "--images", str(inputs / "photos"), "--out", str(tmp_path / "b"),
                 "--max-samples", "2", "--min-image-size", "8", "--workers", "2", "--no-progress")
    assert again.returncode == 0, again.stderr
    for shard in index["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
    # a byte limit: every sample gets a shard of its own
    proc = _run("tools/make_shards.py", "--images", str(inputs / "photos"), "--out", str(tmp_path / "c"),
                "--max-size-mb", "0.001", "--no-progress")
    assert json.loads((tmp_path / "c/train.index.json").read_text())["samples"] == 7
    assert len(list((tmp_path / "c").glob("train-*.tar"))) == 7
    # read back through the training loader: captions from txt, json sidecars and the re-encoded bitmap
    loader = build_loader(DataConfig(shards=f"{out}/train-{{000000..000002}}.tar", image_size=8, seq_len=64,
                                     batch_rows=4, num_workers=0, repeat=False), TOK, (2, 2), seed=0)
    keys = [k for b in loader for k in b.keys]
    assert len(keys) == 6 and data_counts(loader.state_dict())["skipped"] == 0


def test_make_shards_manifests_and_documents(inputs: Path, tmp_path: Path) -> None:
    proc = _run("tools/make_shards.py", "--manifest", str(inputs / "pairs.jsonl"), "--out", str(tmp_path / "j"),
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "j/train.index.json").read_text())
    assert index["samples"] == 2
    assert index["skipped"] == {"bad_record": 1, "missing_caption": 1, "missing_file": 1}
    assert index["skipped_examples"]["missing_file"] == ["pairs.jsonl:3"]
    members = {m.name: m for m in tarfile.open(tmp_path / "j/train-000000.tar")}
    assert json.loads(tarfile.open(tmp_path / "j/train-000000.tar").extractfile("000000000.json").read())["id"] == 7
    assert set(members) == {"000000000.jpg", "000000000.txt", "000000000.json", "000000001.png", "000000001.txt",
                            "000000001.json"}
    proc = _run("tools/make_shards.py", "--manifest", str(inputs / "pairs.csv"), "--out", str(tmp_path / "c"),
                "--no-progress")
    assert proc.returncode == 0 and json.loads((tmp_path / "c/train.index.json").read_text())["samples"] == 2

    proc = _run("tools/make_shards.py", "--documents", str(inputs / "docs.jsonl"), "--out", str(tmp_path / "d"),
                "--no-progress")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "d/train.index.json").read_text())
    assert (index["samples"], index["images"]) == (1, 3)
    assert index["skipped"] == {"bad_record": 1, "missing_file": 1}
    tar = tarfile.open(tmp_path / "d/train-000000.tar")
    assert tar.getnames() == ["000000000.0.jpg", "000000000.1.png", "000000000.2.png", "000000000.json"]
    doc = json.loads(tar.extractfile("000000000.json").read())
    assert [s.get("image") for s in doc["segments"]] == [None, "0.jpg", None, "1.png", "2.png"]
    assert doc["segments"][3]["role"] == "condition" and doc["url"] == "http://example.com"
    (batch,) = list(build_loader(DataConfig(shards=str(tmp_path / "d/train-000000.tar"), image_size=8, seq_len=64,
                                            batch_rows=1, num_workers=0, repeat=False), TOK, (2, 2), seed=0))
    assert batch.num_images == 3 and batch.image_is_target.tolist() == [False, False, True]


def test_make_shards_errors_are_one_line(inputs: Path, tmp_path: Path) -> None:
    assert _run("tools/make_shards.py", "--help").returncode == 0
    _one_line_error(_run("tools/make_shards.py", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
                    "no such directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(_run("tools/make_shards.py", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")),
                    "no image files")
    _one_line_error(_run("tools/make_shards.py", "--manifest", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")),
                    "no such file")
    (tmp_path / "bad.csv").write_text("path,text\na.png,b\n")
    _one_line_error(_run("tools/make_shards.py", "--manifest", str(tmp_path / "bad.csv"), "--out",
                         str(tmp_path / "o")), "lacks column(s) caption, image")
    (tmp_path / "junk.jsonl").write_text("{}\n[]\n")
    proc = _run("tools/make_shards.py", "--manifest", str(tmp_path / "junk.jsonl"), "--out", str(tmp_path / "o2"),
                "--no-progress")
    _one_line_error(proc, "no usable samples among 2 input records", code=1)
    out = tmp_path / "twice"
    assert _run("tools/make_shards.py", "--manifest", str(inputs / "pairs.csv"), "--out", str(out)).returncode == 0
    _one_line_error(_run("tools/make_shards.py", "--manifest", str(inputs / "pairs.csv"), "--out", str(out)),
                    "pass --force")
    assert _run("tools/make_shards.py", "--manifest", str(inputs / "pairs.csv"), "--out", str(out),
                "--force").returncode == 0
    usage = _run("tools/make_shards.py", "--out", str(out))
    assert usage.returncode == 2 and "one of the arguments --images --manifest --documents is required" in usage.stderr



def test_precompute_latents_parts_match_the_codec(inputs: Path, tmp_path: Path, vae_dir: Path, capsys) -> None:
    from transfusion.latents.vae import VAECodec

    assert _run("tools/make_shards.py", "--images", str(inputs / "photos"), "--out", str(tmp_path / "pix"),
                "--max-samples", "3", "--no-progress").returncode == 0
    assert _run("tools/make_shards.py", "--documents", str(inputs / "docs.jsonl"), "--out", str(tmp_path / "pix"),
                "--prefix", "docs", "--no-progress").returncode == 0
    tool = _tool("precompute_latents")
    spec = f"{tmp_path}/pix/train-{{000000..000002}}.tar,{tmp_path}/pix/docs-000000.tar"
    common = ["--shards", spec, "--vae", str(vae_dir), "--out", str(tmp_path / "lat"), "--image-size", "16",
              "--batch-size", "3", "--decode-workers", "0", "--no-progress", "--num-shards", "2"]
    assert tool.main([*common, "--shard-index", "1", "--min-image-size", "8"]) == 0
    assert not (tmp_path / "lat/index.json").exists()  # one of two parts done
    assert tool.main([*common, "--shard-index", "0", "--min-image-size", "8"]) == 0
    index = json.loads((tmp_path / "lat/index.json").read_text())
    assert index["format"] == "latents" and index["latent"]["shape"] == [4, 8, 8]
    assert index["latent"]["scaling_factor"] == 0.5 and index["latent"]["shift_factor"] == 0.1
    assert index["samples"] == 7 and index["images"] == 9 and index["skipped"] == {"image_too_small": 1}
    assert [s["output"] for s in index["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                                      "docs-000000.tar"]
    names = tarfile.open(tmp_path / "lat/docs-000000.tar").getnames()
    assert names == ["000000000.0.latent.npy", "000000000.1.latent.npy", "000000000.2.latent.npy", "000000000.json"]
    record = json.loads(tarfile.open(tmp_path / "lat/docs-000000.tar").extractfile("000000000.json").read())
    assert record["latent"]["source_key"] == "000000000" and record["segments"][1]["image"] == "0.jpg"
    # a re-run skips finished shards and keeps the index
    capsys.readouterr()
    assert tool.main([*common, "--shard-index", "0"]) == 0
    assert "part 0/2: 0 shard(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "lat/index.json").read_text())["samples"] == 7

    # training reads the latents; they equal the codec's encoding of the same pixels (float16 storage)
    codec = VAECodec(vae_dir)
    for pix_spec, lat_spec in ((f"{tmp_path}/pix/train-{{000000..000002}}.tar",
                                f"{tmp_path}/lat/train-{{000000..000002}}.tar"),
                               (f"{tmp_path}/pix/docs-000000.tar", f"{tmp_path}/lat/docs-000000.tar")):
        def read(spec: str):
            cfg = DataConfig(shards=spec, image_size=16, seq_len=160, batch_rows=8, num_workers=0, repeat=False,
                             shuffle_buffer=1, min_image_size=8)
            return list(build_loader(cfg, TOK, (2, 2), seed=0))
        (pix,), (lat,) = read(pix_spec), read(lat_spec)
        assert pix.keys == lat.keys and lat.images_are_latents and not pix.images_are_latents
        torch.testing.assert_close(lat.images, codec.encode(pix.images), atol=2e-3, rtol=1e-2)


def test_precompute_latents_errors_are_one_line(tmp_path: Path, vae_dir: Path, capsys) -> None:
    base = ["--shards", str(tmp_path / "x.tar"), "--out", str(tmp_path / "o"), "--image-size", "16"]
    _one_line_error(_run("tools/precompute_latents.py", *base, "--vae", str(vae_dir), "--dtype", "bfloat16"),
                    "needs --format safetensors")
    tool = _tool("precompute_latents")
    for args, needle in ((["--vae", str(vae_dir)], "matches no files"),
                         (["--vae", str(tmp_path / "novae")], "VAE directory not found"),
                         (["--vae", str(vae_dir), "--shard-index", "3", "--num-shards", "2"], "--shard-index 3 must")):
        capsys.readouterr()
        assert tool.main([*base, *args]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
        (tmp_path / "x.tar").write_bytes(b"")


def test_bench_data_prints_one_table() -> None:
    proc = _run("tools/bench_data.py", "--samples", "24", "--seconds", "0.3", "--repeats", "1", "--image-size", "64",
                "--grid", "4", "--seq-len", "256")
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert len(rows) == 5 and rows[0].startswith("| shards | samples/s | tokens/s")
    assert "pixels: 64 px JPEG" in rows[2] and "float16 .npy" in rows[3] and "bfloat16 .safetensors" in rows[4]
    assert all(float(r.split("|")[2].replace(",", "")) > 0 for r in rows[2:])


def test_shard_writer_limits_names_and_interrupted_shards(tmp_path: Path) -> None:
    """The one writer behind the shard tools: a shard closes before the sample that would pass a limit, a sample
    larger than the byte limit gets a shard alone, no empty shard is started, an interrupted shard stays .tmp."""
    from data_pipelines.writer import PLAIN, WEBDATASET, ShardWriter, tar_size

    members = {"txt": b"x" * 600, "png": b"p" * 10}
    with ShardWriter(tmp_path, "a", max_samples=2) as w:
        for i in range(5):
            w.write(f"{i:03d}", members, images=1)
    assert [(s["name"], s["samples"], s["images"]) for s in w.shards] == [
        ("a-000000.tar", 2, 2), ("a-000001.tar", 2, 2), ("a-000002.tar", 1, 1)]
    assert all(s["bytes"] == (tmp_path / s["name"]).stat().st_size for s in w.shards)
    with tarfile.open(tmp_path / "a-000000.tar") as tar:
        infos = tar.getmembers()
    assert [m.name for m in infos] == ["000.png", "000.txt", "001.png", "001.txt"]  # sorted by extension
    assert {(m.mtime, m.mode, m.uname, m.uid) for m in infos} == {(0, 0o644, "", 0)}

    big = {"bin": b"b" * 5000}
    limit = 1024 + tar_size(members) * 2  # room for two small samples
    with ShardWriter(tmp_path, "b", max_samples=100, max_bytes=limit, style=WEBDATASET) as w:
        for i, m in enumerate([members, members, members, big, members]):
            w.write(f"{i:03d}", m)
    assert [s["samples"] for s in w.shards] == [2, 1, 1, 1]
    with tarfile.open(tmp_path / "b-000000.tar") as tar:
        assert {(m.mode, m.uname) for m in tar} == {(0o444, "bigdata")}

    assert ShardWriter(tmp_path, "c", max_samples=1, style=PLAIN).shards == [] and not list(tmp_path.glob("c-*"))
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, "d", max_samples=10) as w:
            w.write("000", members)
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.glob("d-*")] == ["d-000000.tar.tmp"]  # never looks complete
