"""The compositional world (v3) and its strict GenEval-style judge: ground truth passes, adversarial images fail
(extra objects off the palette among them), held-out compositions never reach training, and the tag aggregation is
a mean of tag accuracies, over the same tags for seen and unseen."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from data_pipelines import scenes
from data_pipelines.scenes import HELDOUT, TAGS, Prompt, is_unseen, make_prompt
from data_pipelines.shapes import BACKGROUND, COLORS, SHAPES, Scene, ShapeObject, render, shape_mask
from transfusion.eval.geneval import CHECKS, detect, judge, relative_position, summarise

SIZE = scenes.IMAGE_SIZE
GROUND_TRUTH_PASS = 0.99  # ground-truth renders that must pass
ATTACK_PASS = 0.02  # attacks of one kind allowed through


def heldout(n: int, seed: int = 0):
    for i in range(n):
        _, img, _, rec = scenes.heldout_sample(i, seed, SIZE)
        yield img, Prompt.from_dict(rec["prompt"]), Scene.from_dict(rec), rec


def test_ground_truth_passes_every_tag():
    results = [{"tag": p.tag, "pass": judge(img, p).passed, "unseen": rec["unseen"]}
               for img, p, _, rec in heldout(1000)]
    summary = summarise(results)
    assert sum(r["pass"] for r in results) / len(results) >= GROUND_TRUTH_PASS
    for tag in TAGS:
        assert summary["counts"][f"{tag}.all"] >= 80, tag
        assert summary[f"geneval.{tag}.all"] >= GROUND_TRUTH_PASS, (tag, summary)
    assert summary["counts"]["colors.unseen"] > 0 and summary["counts"]["position.unseen"] > 0


def _stretch(scene: Scene) -> Image.Image:
    """The scene with its first object drawn 2:1 wide (a stretched shape)."""
    img = np.asarray(render(Scene(scene.objects[1:]), SIZE)).copy()
    o = scene.objects[0]
    y = (np.arange(SIZE)[:, None] + 0.5) / SIZE
    x = (np.arange(SIZE)[None, :] + 0.5) / SIZE
    cx = min(max(o.cx, 2 * o.half_size + 0.02), 1 - 2 * o.half_size - 0.02)
    mask = ((x - cx) / (2 * o.half_size)) ** 2 + ((y - o.cy) / o.half_size) ** 2 <= 1
    img[mask] = COLORS[o.color]
    return Image.fromarray(img)


def _recolor(img: Image.Image, rgb: tuple[int, int, int]) -> Image.Image:
    arr = np.asarray(img).copy()
    fg = (arr != np.array(BACKGROUND)).any(-1)
    arr[fg] = rgb
    return Image.fromarray(arr)


def _extra_object(scene: Scene, rng: random.Random) -> Scene | None:
    color, shape = rng.choice(scenes.SEEN_OBJECTS)
    for _ in range(200):
        h = rng.uniform(*scenes.HALF_SIZE_RANGE)
        cx, cy = rng.uniform(h + 0.02, 1 - h - 0.02), rng.uniform(h + 0.02, 1 - h - 0.02)
        if all(abs(cx - o.cx) >= h + o.half_size + 0.03 or abs(cy - o.cy) >= h + o.half_size + 0.03
               for o in scene.objects):
            return Scene(list(scene.objects) + [ShapeObject(shape, color, "", cx, cy, h)])
    return None


def _swapped(p: Prompt, scene: Scene) -> tuple[Scene, Prompt] | None:
    """A wrong image for the prompt by one attribute: colors swapped between the objects, the relation reversed,
    one object too many or too few, or the shape changed."""
    objs = list(scene.objects)
    if p.tag == "color_attr" and objs[0].color != objs[1].color:
        return Scene([replace(objs[0], color=objs[1].color), replace(objs[1], color=objs[0].color)]), p
    if p.tag == "position":
        return scene, replace(p, relation=scenes.INVERSE[p.relation])
    if p.tag == "counting":
        return Scene(objs[:-1]), p
    other = next(s for s in ("circle", "square", "triangle") if s != objs[0].shape)
    return Scene([replace(objs[0], shape=other)] + objs[1:]), p


def adversarial_set(n: int = 120):
    """(image, prompt, kind) triples that must all fail."""
    rng = random.Random(0)
    out = []
    for i, (img, p, scene, _) in enumerate(heldout(n, seed=1)):
        g = np.random.default_rng(i)
        out.append((Image.fromarray(g.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)), p, "uniform noise"))
        dark = np.clip(np.array(BACKGROUND) + g.normal(0, 60, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        out.append((Image.fromarray(dark), p, "noise on the background"))
        out.append((render(Scene([]), SIZE), p, "blank"))
        out.append((Image.new("RGB", (SIZE, SIZE), (128, 128, 128)), p, "grey"))
        out.append((_recolor(img, (140, 90, 40)), p, "brown (off-palette)"))
        out.append((_stretch(scene), p, "stretched"))
        extra = _extra_object(scene, rng)
        if extra is not None:
            out.append((render(extra, SIZE), p, "extra object"))
        if len(scene.objects) > 1:
            out.append((render(Scene(scene.objects[:-1]), SIZE), p, "missing object"))
        swapped = _swapped(p, scene)
        if swapped is not None:
            out.append((render(swapped[0], SIZE), swapped[1], "swapped attribute"))
    return out


# Extra objects that are no palette object of the world, pasted into an empty area of a ground-truth render.
OFF_PALETTE = {"grey": (128, 128, 128), "brown": (140, 90, 40), "light grey": (200, 200, 200),
               "dark grey": (80, 80, 80),
               "red+blue blend": tuple((np.array(COLORS["red"]) + COLORS["blue"]) // 2)}
EXTRA_SIDES = (4, 5, 7, 9, 11)  # pixels, at 32-pixel images
EXTRA_FORMS = ("square", "circle")
EMPTY_MARGIN = 1  # background pixels kept around a pasted blob
BLOBS_PER_KIND = 100


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` grown by ``steps`` pixels (8-neighbour)."""
    out = mask.copy()
    for _ in range(steps):
        p = np.pad(out, 1)
        out = np.max([p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx]
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    return out


def _blob(form: str, side: int) -> np.ndarray:
    """A side x side square, a dithered one (a checkerboard: no two pixels side by side), or the circle of pixel
    centres within side / 2 of the box centre: [side, side] bool."""
    if form == "square":
        return np.ones((side, side), dtype=bool)
    if form == "dithered square":
        return (np.arange(side)[:, None] + np.arange(side)[None, :]) % 2 == 0
    c = np.arange(side) + 0.5 - side / 2
    return c[:, None] ** 2 + c[None, :] ** 2 <= (side / 2) ** 2


def _paste(arr: np.ndarray, blob: np.ndarray, rgb: tuple[int, int, int], g: np.random.Generator,
           touching: bool = False) -> np.ndarray | None:
    """``arr`` with ``blob`` painted in ``rgb`` at a random spot off the image border where it covers only
    background: EMPTY_MARGIN pixels clear of every object, or (``touching``) with an object pixel next to it."""
    fg = (arr != np.array(BACKGROUND)).any(-1)
    near = _dilate(fg, 1 if touching else EMPTY_MARGIN + 1)
    h, w = blob.shape
    windows = np.lib.stride_tricks.sliding_window_view  # [y, x, h, w]: the box with its top-left corner at (y, x)
    covers_fg = (windows(fg, (h, w)) & blob).any((-2, -1))[1:-1, 1:-1]  # off the 1-pixel border
    covers_near = (windows(near, (h, w)) & blob).any((-2, -1))[1:-1, 1:-1]
    spots = np.argwhere(~covers_fg & (covers_near == touching)) + 1
    if not len(spots):
        return None
    y, x = spots[g.integers(len(spots))]
    out = arr.copy()
    out[y:y + h, x:x + w][blob] = rgb
    return out


def _world_shape_blob(arr: np.ndarray, g: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """A world shape (shape and size as the renderer draws them) at a random spot clear of every object: its
    [H, W] mask and its [H, W] left-half mask, or None when the image has no room."""
    fg = _dilate((arr != np.array(BACKGROUND)).any(-1), EMPTY_MARGIN + 1)
    for _ in range(50):
        shape = SHAPES[g.integers(len(SHAPES))]
        h = g.uniform(*scenes.HALF_SIZE_RANGE)
        cx, cy = g.uniform(h + 1 / SIZE, 1 - h - 1 / SIZE, size=2)
        mask = shape_mask(shape, cx, cy, h, SIZE, SIZE)
        if not (mask & fg).any():
            left = mask & ((np.arange(SIZE)[None, :] + 0.5) / SIZE < cx)
            return mask, left
    return None


def _two_palette_colors(g: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a, b = g.choice(len(COLORS), 2, replace=False)
    names = list(COLORS)
    return np.array(COLORS[names[a]]), np.array(COLORS[names[b]])


def extra_blob_set(color: str, n: int = BLOBS_PER_KIND):
    """(image, prompt, kind) triples that must all fail: ``n`` ground-truth renders per kind, each with one extra
    blob of the off-palette ``color`` (a square or circle of each side in EXTRA_SIDES, a 7 x 7 dithered square, or
    a 5 x 5 square touching an object) pasted where it covers only background. For "red+blue blend", also the
    blends: a world shape in a 50/50 blend of two palette colors, and a world shape half one palette color (left)
    half another (right)."""
    rgb = OFF_PALETTE[color]
    kinds = {f"{color} {form} {side}x{side}": (_blob(form, side), False)
             for form in EXTRA_FORMS for side in EXTRA_SIDES}
    kinds[f"{color} dithered square 7x7"] = (_blob("dithered square", 7), False)
    kinds[f"{color} square 5x5 touching an object"] = (_blob("square", 5), True)
    blends = ("world shape in a blend of two palette colors", "world shape in two palette colors")
    out, have = [], dict.fromkeys([*kinds, *(blends if color == "red+blue blend" else ())], 0)
    for i, (img, p, _, _) in enumerate(heldout(4 * n, seed=2)):
        g, arr = np.random.default_rng(i), np.asarray(img)
        for kind, (blob, touching) in kinds.items():
            pasted = _paste(arr, blob, rgb, g, touching) if have[kind] < n else None
            if pasted is not None:
                out.append((Image.fromarray(pasted), p, kind))
                have[kind] += 1
        spot = _world_shape_blob(arr, g) if color == "red+blue blend" else None
        for kind in blends if spot is not None else ():
            if have[kind] < n:
                (shape_px, left_px), (a, b) = spot, _two_palette_colors(g)
                pasted = arr.copy()
                if kind == blends[0]:
                    pasted[shape_px] = (a + b) // 2
                else:
                    pasted[shape_px] = b
                    pasted[left_px] = a
                out.append((Image.fromarray(pasted), p, kind))
                have[kind] += 1
        if min(have.values()) == n:
            return out
    raise AssertionError(f"too few images with room for every kind: {have}")


def test_adversarial_images_fail():
    cases = adversarial_set()
    kinds = {k for _, _, k in cases}
    assert len(kinds) == 9 and len(cases) > 900
    passed = [(k, p.text) for img, p, k in cases if judge(img, p).passed]
    assert len(passed) / len(cases) <= 0.02, passed[:10]
    for kind in kinds:  # no kind of attack gets through more than rarely
        of_kind = [1 for img, p, k in cases if k == kind]
        assert sum(1 for k, _ in passed if k == kind) <= ATTACK_PASS * len(of_kind), kind


@pytest.mark.parametrize("color", OFF_PALETTE)
def test_extra_objects_off_the_palette_fail(color):
    """An extra blob that is no palette object (off-palette color or a blend of two palette colors), pasted into
    an empty area of a ground-truth render, fails at every size from 4 x 4 pixels up, solid or dithered, apart from
    the objects or touching one; a world shape half one palette color half another fails as two halves of no world
    shape."""
    cases = extra_blob_set(color)
    kinds = Counter(k for _, _, k in cases)
    assert len(kinds) == len(EXTRA_FORMS) * len(EXTRA_SIDES) + 2 + 2 * (color == "red+blue blend")
    assert set(kinds.values()) == {BLOBS_PER_KIND}
    verdicts = [(k, judge(img, p)) for img, p, k in cases]
    passed = Counter(k for k, v in verdicts if v.passed)
    assert all(passed[k] <= ATTACK_PASS * n for k, n in kinds.items()), passed
    for kind, v in verdicts:  # charged to the color checks, or (two palette colors) to the halves' box
        halves = kind.endswith("in two palette colors")
        expected = {"aspect", "size", "form"} if halves else {"off_palette", "extra_object"}
        assert v.passed or v.check in expected, (kind, v.check, v.failed)


def _two_squares() -> tuple[np.ndarray, Prompt]:
    """Two large squares in the middle of the image: enough object pixels that a 7 x 7 off-palette blob stays
    under the global off-palette share."""
    scene = Scene([ShapeObject("square", "red", "", 0.3, 0.5, 0.17), ShapeObject("square", "blue", "", 0.7, 0.5,
                                                                                  0.17)])
    return np.asarray(render(scene, SIZE)).copy(), make_prompt("counting", ((None, "square"),) * 2)


def test_an_off_palette_square_in_an_empty_corner_is_an_extra_object():
    """The issue's case: the same 7 x 7 square fails in grey (an extra object, not a palette one) as in red (a
    third object), while a blend along one side of an object is its blurred edge."""
    arr, p = _two_squares()
    assert judge(arr, p).passed
    for rgb, check in ((OFF_PALETTE["grey"], "extra_object"), (COLORS["red"], "count")):
        pasted = arr.copy()
        pasted[1:8, 1:8] = rgb
        v = judge(pasted, p)
        assert not v.passed and v.check == check, (rgb, v.failed)
    edge = arr.copy()
    red = np.nonzero((arr == COLORS["red"]).all(-1))
    edge[red[0].min():red[0].max() + 1, red[1].min() - 1] = (np.array(COLORS["red"]) + BACKGROUND) // 2
    assert judge(edge, p).passed, judge(edge, p).failed


def test_blurred_edges_are_no_extra_objects():
    """Off-palette pixels along blurred edges (a VAE decoder's anti-aliasing, emulated by a Gaussian blur) stay
    within the edge band: the extra-object check does not fire on blurred ground truth."""
    from PIL import ImageFilter

    fired = [("extra_object" in detect(img.filter(ImageFilter.GaussianBlur(radius))).checks)
             for img, _, _, _ in heldout(300) for radius in (0.5, 0.7)]
    assert sum(fired) <= 0.01 * len(fired)


def test_failures_are_charged_to_the_check_that_catches_them():
    """Each kind of attack fails at the check meant for it (most of the time: a stretched object can also leave the
    size range, a missing object of a two-object prompt is a count error), and the summary tallies them."""
    expected = {"uniform noise": {"background"}, "noise on the background": {"off_palette", "form", "size", "debris",
                                                                             "aspect"},
                "blank": {"count"}, "grey": {"background"}, "brown (off-palette)": {"off_palette"},
                "stretched": {"aspect", "size"}, "extra object": {"count"}, "missing object": {"count"},
                "swapped attribute": {"shapes", "color", "binding", "relation", "count"}}
    results, by_kind = [], {}
    for img, p, kind in adversarial_set(40):
        v = judge(img, p)
        assert v.passed or v.check in CHECKS
        if not v.passed:
            by_kind.setdefault(kind, []).append(v.check)
            results.append({"tag": p.tag, "pass": False, "unseen": False, "check": v.check})
    for kind, checks in by_kind.items():
        share = sum(c in expected[kind] for c in checks) / len(checks)
        assert share >= 0.9, (kind, sorted(set(checks)))
    assert {"background", "off_palette", "aspect", "count"} <= {c for cs in by_kind.values() for c in cs}
    fails = summarise(results)["failures"]
    assert sum(v for k, v in fails.items() if k.endswith(".seen")) == len(results) == fails.get("background.all", 0) \
        + sum(v for k, v in fails.items() if k.endswith(".all") and not k.startswith("background."))
    assert fails["background.seen"] == sum(c == "background" for cs in by_kind.values() for c in cs)


def test_detection_reports_why():
    img = render(Scene([ShapeObject("circle", "red", "", 0.3, 0.5, 0.14)]), SIZE)
    det = detect(img)
    assert not det.problems and [(o.color, o.shape) for o in det.objects] == [("red", "circle")]
    assert "background" in detect(Image.new("RGB", (SIZE, SIZE), (128, 128, 128))).problems
    assert any("off-palette" in p for p in detect(_recolor(img, (140, 90, 40))).problems)
    assert any("aspect" in p for p in detect(_stretch(Scene(det and [ShapeObject("square", "red", "", 0.5, 0.5,
                                                                                 0.12)]))).problems)


def test_geneval_relative_position_rule():
    left = ShapeObject("circle", "red", "", 0.25, 0.5, 0.12)
    right = ShapeObject("square", "blue", "", 0.75, 0.52, 0.12)
    det = detect(render(Scene([left, right]), SIZE)).objects
    a, b = (det[0], det[1]) if det[0].shape == "circle" else (det[1], det[0])
    assert relative_position(a, b) == {"to the left of"} and relative_position(b, a) == {"to the right of"}
    # centres closer than the margin (0.1 x the sum of sizes on that axis) give no relation on that axis
    near = ShapeObject("square", "blue", "", 0.30, 0.82, 0.12)
    det = detect(render(Scene([left, near]), SIZE)).objects
    a, b = (det[0], det[1]) if det[0].shape == "circle" else (det[1], det[0])
    assert relative_position(a, b) == {"above"}


def test_overall_is_the_mean_of_tag_accuracies_not_of_images():
    results = ([{"tag": "colors", "pass": True, "unseen": False}] * 9 + [{"tag": "colors", "pass": False,
                                                                           "unseen": False}]
               + [{"tag": "counting", "pass": False, "unseen": False}] * 1
               + [{"tag": "counting", "pass": True, "unseen": True}] * 2)
    s = summarise(results)
    assert s["geneval.colors.seen"] == 0.9 and s["geneval.counting.seen"] == 0.0
    assert s["geneval.overall_all_tags.seen"] == pytest.approx(0.45)  # (0.9 + 0.0) / 2; per image it would be 9/11
    assert s["geneval.overall_all_tags.unseen"] == 1.0 and s["counts"]["colors.unseen"] == 0
    assert s["geneval.overall_all_tags.all"] == pytest.approx((0.9 + 2 / 3) / 2)
    assert s["shared_tags"] == ["counting"]  # colors has no unseen image here
    assert s["geneval.overall_shared.seen"] == 0.0 and s["geneval.overall_shared.unseen"] == 1.0
    assert s["geneval.overall_shared.all"] == pytest.approx(2 / 3)
    assert s["failures"] == {"unknown.seen": 2, "unknown.all": 2}  # failures without a named check
    seen_only = summarise([{"tag": "colors", "pass": True, "unseen": False}])
    assert seen_only["shared_tags"] == [] and not any(k.startswith("geneval.overall_shared") for k in seen_only)
    assert seen_only["geneval.overall_all_tags.seen"] == 1.0


def test_seen_and_unseen_overall_average_the_same_tags():
    """single_object and two_object have only seen prompts: the shared-tag overall leaves them out of both splits,
    so a model that is perfect on them does not widen the seen / unseen gap; the all-tag overall keeps them."""
    shared = ("counting", "colors", "position", "color_attr")
    results = [{"tag": t, "pass": True, "unseen": False} for t in ("single_object", "two_object")]
    for i, tag in enumerate(shared):  # seen: 2 of 4 pass per tag; unseen: 1 of 4
        results += [{"tag": tag, "pass": j < 2, "unseen": False} for j in range(4)]
        results += [{"tag": tag, "pass": j < 1, "unseen": True} for j in range(4)]
    s = summarise(results)
    assert s["shared_tags"] == [t for t in TAGS if t in shared]
    assert s["geneval.overall_shared.seen"] == pytest.approx(0.5)
    assert s["geneval.overall_shared.unseen"] == pytest.approx(0.25)
    assert s["geneval.overall_shared.all"] == pytest.approx(0.375)
    assert s["geneval.overall_all_tags.seen"] == pytest.approx((2 * 1.0 + 4 * 0.5) / 6)
    assert s["geneval.overall_all_tags.unseen"] == pytest.approx(0.25)
    assert not any(k.startswith("geneval.overall.") for k in s)


def test_training_scenes_never_hold_a_heldout_composition():
    rng = random.Random(0)
    for _ in range(3000):
        scene, prompt = scenes.sample_training_scene(rng)
        objs = {(o.color, o.shape) for o in scene.objects}
        assert not objs & HELDOUT.color_shape
        assert not is_unseen(prompt) and not is_unseen(scenes.drop_colors(prompt))
        if len(objs) == 2:
            assert frozenset(objs) not in HELDOUT.object_pairs
        if prompt.relation:
            assert scenes.relation_holds(prompt.relation, scene.objects[0], scene.objects[1])
    # every tag has seen prompts; all but single_object / two_object have unseen ones
    prompts = scenes.all_eval_prompts()
    for tag in TAGS:
        assert any(p.tag == tag and not is_unseen(p) for p in prompts)
        assert any(p.tag == tag and is_unseen(p) for p in prompts) == (tag not in ("single_object", "two_object"))
    assert make_prompt("position", ((None, "square"), (None, "circle")), "below") in \
        [p for p in prompts if is_unseen(p)]  # the inverse phrasing of a held-out triple is held out too


def test_world3_shards_are_disjoint_by_content(tmp_path):
    """The shard writer's held-out split shares no render (PNG hash) with training, and no training caption states
    an unseen composition; the held-out split has seen and unseen prompts."""
    import hashlib
    import json
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "w3"
    subprocess.run([sys.executable, "tools/make_shapes_shards.py", "--world", "3", "--out", str(out),
                    "--train-samples", "3000", "--heldout-samples", "300", "--shard-size", "1000"], cwd=repo,
                   check=True, capture_output=True)

    def members(split):
        recs, hashes = {}, {}
        for shard in sorted(out.glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.rsplit(".", 1)
                    data = tar.extractfile(m).read()
                    if ext == "png":
                        hashes[key] = hashlib.sha256(data).hexdigest()
                    elif ext == "json":
                        recs[key] = json.loads(data)
        return recs, hashes

    train, train_png = members("train")
    held, held_png = members("heldout")
    assert len(train) == 3000 and len(held) == 300
    assert not set(train_png.values()) & set(held_png.values())
    unseen_texts = {p.text for p in scenes.all_eval_prompts() if is_unseen(p)}
    interleaved = 0
    for rec in train.values():
        if "segments" in rec:  # text, image, text about it, second image
            interleaved += 1
            objs = {(o["color"], o["shape"]) for o in rec["scenes"][1]["objects"]}
            assert len(objs) == 2 and frozenset(objs) not in HELDOUT.object_pairs and not objs & HELDOUT.color_shape
            assert [s.get("image") for s in rec["segments"]] == [None, 0, None, 1]
            continue
        assert not is_unseen(Prompt.from_dict(rec["prompt"])) and rec["caption"] not in unseen_texts
        assert not {(o["color"], o["shape"]) for o in rec["objects"]} & HELDOUT.color_shape
    assert interleaved == 300  # every tenth training sample
    flags = [rec["unseen"] for rec in held.values()]
    assert 0.2 < sum(flags) / len(flags) < 0.6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["world_version"] == 3 and manifest["image_size"] == 32
    assert ["red", "triangle"] in manifest["heldout_compositions"]["color_shape"]


def test_judge_cli(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    d = tmp_path / "imgs"
    d.mkdir()
    prompts = {}
    for i, (img, p, _, rec) in enumerate(heldout(12)):
        img.save(d / f"{i}.png")
        prompts[f"{i}.png"] = p.text
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(d / "noise.png")
    prompts["noise.png"] = "two blue circles"
    (d / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "judged.json"
    run = subprocess.run([sys.executable, "tools/judge.py", "--images", str(d), "--out", str(out)], cwd=repo,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    judged = json.loads(out.read_text())
    assert all(judged["images"][f"{i}.png"]["pass"] for i in range(12))
    noise = judged["images"]["noise.png"]
    assert not noise["pass"] and noise["failed"] == "background" and noise["tag"] == "counting"
    assert noise["check"] == "background"
    assert judged["summary"]["failures"]["background.all"] == 1 and len(judged["summary"]["failures"]) == 2
    summary = judged["summary"]
    assert "geneval.overall_all_tags.all" in summary and summary["shared_tags"]  # 12 renders: seen and unseen
    assert "geneval.overall_shared.all" in summary and "shared tags: " + ", ".join(summary["shared_tags"]) in run.stdout
    # bad input: one line, exit 2, nothing written
    (d / "prompts.json").write_text(json.dumps({"0.png": "a purple dog"}))
    bad = subprocess.run([sys.executable, "tools/judge.py", "--images", str(d), "--out", str(tmp_path / "x.json")],
                         cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a prompt" in bad.stderr
    assert not (tmp_path / "x.json").exists()
    missing = subprocess.run([sys.executable, "tools/judge.py", "--images", str(tmp_path / "nope"), "--out",
                              str(out)], cwd=repo, capture_output=True, text=True)
    assert missing.returncode == 2 and "not a directory" in missing.stderr and "Traceback" not in missing.stderr


def test_vae_judge_ceiling_reads_reconstructions(tmp_path):
    """tools/train_autoencoder.py's ceiling: the judge's pass rate on what the autoencoder gives back. An identity
    autoencoder keeps every render passing; one that decodes to the background fails them all; non-v3 data -> None."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("train_autoencoder", repo / "tools/train_autoencoder.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    class Fake:
        def __init__(self, blank: bool):
            self.blank = blank

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

        def decode(self, z):
            bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
            return SimpleNamespace(sample=bg.expand_as(z).clone() if self.blank else z)

    for world, name in ((3, "w3"), (2, "w2")):
        subprocess.run([sys.executable, "tools/make_shapes_shards.py", "--world", str(world), "--out",
                        str(tmp_path / name), "--train-samples", "10", "--heldout-samples", "40"], cwd=repo,
                       check=True, capture_output=True)
    shard = str(tmp_path / "w3" / "heldout-000000.tar")
    same = tool.judge_ceiling(Fake(blank=False), shard, SIZE, batch=16)
    blank = tool.judge_ceiling(Fake(blank=True), shard, SIZE, batch=16)
    assert same == {"images": 40, "renders": 1.0, "reconstructions": 1.0}
    assert blank["renders"] == 1.0 and blank["reconstructions"] == 0.0
    assert tool.judge_ceiling(Fake(blank=False), str(tmp_path / "w2" / "heldout-000000.tar"), SIZE) is None
