"""The shapes world, its pixel judge and the shard writer."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import subprocess
import sys
import tarfile
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.shapes import (BACKGROUND, COLORS, POSITIONS, SHAPES, Scene, ShapeObject, caption, make_sample,
                                   png_bytes, render, sample_scene)
from transfusion.eval.judge import (accuracy, judge_image, largest_component, parse_caption, score_caption,
                                    score_scene)

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_shapes_shards.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_shapes_shards", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# World


def test_make_sample_is_deterministic_by_seed():
    a = [make_sample("train", i, seed=0, size=32) for i in range(20)]
    b = [make_sample("train", i, seed=0, size=32) for i in range(20)]
    c = [make_sample("train", i, seed=1, size=32) for i in range(20)]
    for (ka, ia, ta, ra), (kb, ib, tb, rb) in zip(a, b):
        assert (ka, ta, ra) == (kb, tb, rb)
        assert png_bytes(ia) == png_bytes(ib)
    assert [s[3] for s in a] != [s[3] for s in c]
    assert sum(png_bytes(x[1]) != png_bytes(y[1]) for x, y in zip(a, c)) >= 15


def test_splits_are_independent_streams():
    train = [make_sample("train", i, 0, 32) for i in range(100)]
    held = [make_sample("heldout", i, 0, 32) for i in range(100)]
    assert train[5][0] == "train-00000005" and held[5][0] == "heldout-00000005"
    assert not {s[0] for s in train} & {s[0] for s in held}
    assert all("." not in s[0] for s in train + held)
    assert all(t[3] != h[3] for t, h in zip(train, held))
    assert sum(png_bytes(t[1]) == png_bytes(h[1]) for t, h in zip(train, held)) <= 2


def test_every_attribute_value_appears():
    objs = [make_sample("train", i, 0, 32)[3]["objects"][0] for i in range(300)]
    assert {o["color"] for o in objs} == set(COLORS)
    assert {o["shape"] for o in objs} == set(SHAPES)
    assert {o["position"] for o in objs} == set(POSITIONS)


def test_caption_phrasing():
    def cap(color, shape, position):
        return caption(Scene(objects=[ShapeObject(shape, color, position, 0.5, 0.5, 0.15)]))

    assert cap("red", "circle", "left") == "a red circle on the left"
    assert cap("blue", "square", "right") == "a blue square on the right"
    assert cap("green", "triangle", "top") == "a green triangle at the top"
    assert cap("cyan", "circle", "bottom") == "a cyan circle at the bottom"
    assert cap("yellow", "square", "center") == "a yellow square in the center"


def test_records_match_captions_and_round_trip_json():
    for i in range(50):
        key, image, text, record = make_sample("heldout", i, 3, 32)
        scene = Scene.from_dict(json.loads(json.dumps(record)))
        assert caption(scene) == text == record["caption"]
        assert scene.to_dict() == {k: record[k] for k in ("objects", "background")}
        assert png_bytes(render(scene, 32)) == png_bytes(image)


def test_render_uses_palette_colors_and_stays_inside():
    rng = random.Random(0)
    for size in (32, 48):
        for _ in range(100):
            scene = sample_scene(rng)
            pixels = np.asarray(render(scene, size))
            assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
            colors = {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}
            assert colors == {BACKGROUND, COLORS[scene.objects[0].color]}
            border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
            assert (border == BACKGROUND).all()


# ---------------------------------------------------------------------------------------------------------------
# Judge


def _judge_accuracy(size: int, n: int) -> dict[str, float]:
    scores = []
    for i in range(n):
        _, image, _, record = make_sample("heldout", i, 0, size)
        scores.append(score_scene(judge_image(image), record))
    return accuracy(scores)


def test_judge_is_accurate_on_ground_truth_32px():
    acc = _judge_accuracy(32, 500)
    assert all(acc[a] >= 0.99 for a in ("color", "shape", "position")), acc


def test_judge_is_accurate_on_ground_truth_64px():
    acc = _judge_accuracy(64, 100)
    assert all(acc[a] >= 0.99 for a in ("color", "shape", "position")), acc


def test_judge_survives_blur_and_noise():
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    scores = []
    for i in range(100):
        _, image, _, record = make_sample("heldout", i, 0, 32)
        noisy = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8))).astype(np.float64)
        noisy += rng.normal(0, 10, noisy.shape)
        scores.append(score_scene(judge_image(np.clip(noisy, 0, 255).astype(np.uint8)), record))
    acc = accuracy(scores)
    assert acc["all"] >= 0.95, acc


def test_judge_returns_none_without_an_object():
    for color in (BACKGROUND, (200, 200, 200)):
        blank = Image.new("RGB", (32, 32), color)
        j = judge_image(blank)
        assert (j.color, j.shape, j.position) == (None, None, None)
    speck = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    speck[10, 10] = COLORS["red"]
    assert judge_image(speck).color is None
    assert not any(score_scene(judge_image(speck), make_sample("train", 0, 0, 32)[3]).values())


def test_judge_accepts_arrays_and_non_square_images():
    _, image, _, record = make_sample("train", 1, 0, 32)
    assert judge_image(image) == judge_image(np.asarray(image))
    obj = ShapeObject("triangle", "purple", "right", 0.75, 0.5, 0.18)
    wide = np.full((40, 80, 3), BACKGROUND, dtype=np.uint8)
    from data_pipelines.shapes import shape_mask

    wide[shape_mask(obj.shape, obj.cx, obj.cy, obj.half_size, 40, 80)] = COLORS[obj.color]
    j = judge_image(wide)
    assert (j.color, j.shape, j.position) == ("purple", "triangle", "right")


def _naive_largest_component(mask: np.ndarray) -> np.ndarray:
    """Reference: BFS flood fill from every unvisited pixel in raster order; first largest wins."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y in range(H):
        for x in range(W):
            if not mask[y, x] or seen[y, x]:
                continue
            comp, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                comp.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if len(comp) > len(best):
                best = comp
    out = np.zeros_like(mask)
    for y, x in best:
        out[y, x] = True
    return out


@pytest.mark.parametrize("density", [0.0, 0.3, 0.55, 0.7, 1.0])
def test_largest_component_matches_naive_bfs(density):
    rng = np.random.default_rng(int(density * 100))
    for shape in ((1, 1), (7, 13), (24, 24)):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(largest_component(mask), _naive_largest_component(mask))
    snake = np.zeros((15, 15), dtype=bool)  # one long serpentine path: labels must travel ~100 steps
    snake[1::2, 1:14] = True
    snake[2::4, 13] = True
    snake[4::4, 1] = True
    snake[14, 0] = snake[0, 14] = True  # plus two single-pixel components
    np.testing.assert_array_equal(largest_component(snake), _naive_largest_component(snake))
    assert largest_component(snake).sum() == snake.sum() - 2


def test_parse_caption_round_trips_and_rejects_ambiguity():
    for i in range(60):
        _, _, text, record = make_sample("train", i, 0, 32)
        obj = record["objects"][0]
        assert parse_caption(text) == {"color": obj["color"], "shape": obj["shape"], "position": obj["position"]}
        assert score_caption(text, record) == {"color": True, "shape": True, "position": True, "all": True}
    assert parse_caption("A Red square, Top!") == {"color": "red", "shape": "square", "position": "top"}
    assert parse_caption("a red blue circle") == {"color": None, "shape": "circle", "position": None}
    assert parse_caption("") == {"color": None, "shape": None, "position": None}
    scene = Scene(objects=[ShapeObject("circle", "red", "left", 0.25, 0.5, 0.15)])
    assert score_caption("a red square on the left", scene) == {
        "color": True, "shape": False, "position": True, "all": False}


# ---------------------------------------------------------------------------------------------------------------
# Shard writer


def _members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_tool_writes_readable_shards(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "shapes"
    argv = ["--out", str(out), "--train-samples", "7", "--heldout-samples", "3", "--shard-size", "3",
            "--image-size", "32", "--seed", "5"]
    assert tool.main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["heldout-000000.tar", "manifest.json", "train-000000.tar", "train-000001.tar",
                     "train-000002.tar"]
    assert [len(_members(out / f"train-00000{i}.tar")) for i in range(3)] == [9, 9, 3]
    assert _members(out / "heldout-000000.tar")[:3] == [
        "heldout-00000000.json", "heldout-00000000.png", "heldout-00000000.txt"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 7 and manifest["splits"]["heldout"]["samples"] == 3
    assert manifest["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert manifest["seed"] == 5 and manifest["image_size"] == 32
    assert manifest["palette"] == {k: list(v) for k, v in COLORS.items()}

    import webdataset as wds

    samples = list(wds.WebDataset([str(out / f"train-00000{i}.tar") for i in range(3)], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"train-{i:08d}" for i in range(7)]
    for i, s in enumerate(samples):
        key, image, text, record = make_sample("train", i, 5, 32)
        assert s["png"] == png_bytes(image)
        assert s["txt"].decode() == text
        assert json.loads(s["json"]) == record
        assert Image.open(io.BytesIO(s["png"])).size == (32, 32)

    # Idempotent: same parameters leave the files untouched; others are refused; --force rewrites and cleans up.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert tool.main(argv) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert tool.main(argv[:-2] + ["--seed", "6"]) == 2
    assert "seed 5 -> 6" in capsys.readouterr().err
    assert tool.main(argv[:-2] + ["--seed", "6", "--train-samples", "2", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["heldout-000000.tar", "manifest.json", "train-000000.tar"]

    # Shards are byte-for-byte reproducible.
    again = tmp_path / "again"
    assert tool.main(["--out", str(again)] + argv[2:-2] + ["--seed", "6", "--train-samples", "2"]) == 0
    for name in ("train-000000.tar", "heldout-000000.tar"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


def test_tool_cli_runs_from_repo_root_and_rejects_bad_input(tmp_path):
    cmd = [sys.executable, "tools/make_shapes_shards.py", "--out", str(tmp_path / "d"), "--train-samples", "4",
           "--heldout-samples", "0", "--shard-size", "10"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote 4 train + 0 heldout" in done.stdout
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["manifest.json", "train-000000.tar"]
    bad = _load_tool()
    for args in (["--train-samples", "-1"], ["--shard-size", "0"], ["--image-size", "8"], ["--seed", "x"]):
        with pytest.raises(SystemExit) as exc:
            bad.build_parser().parse_args(args)
        assert exc.value.code != 0
