"""A strict judge for the compositional shapes world, scored with GenEval's tags (Ghosh et al. 2023, arXiv
2310.11513): every object is detected from the pixels, and an image passes only if it shows what the prompt asks
for and nothing else.

Detection (one image, any size, PIL or [H, W, 3] uint8):

    background   median of the 1-pixel border; it must lie within BACKGROUND_TOLERANCE of the world's background
                 (noise and blank grey images fail here)
    foreground   pixels farther than FOREGROUND_DISTANCE from the background
    palette      a foreground pixel takes the nearest palette color if within PALETTE_TOLERANCE, else it is
                 off-palette; off-palette pixels beyond OFF_PALETTE_EDGE_SHARE of the object pixels fail the image
                 (brown is not red)
    objects      4-connected components per palette color; specks below SPECK_FRACTION of the smallest object
                 are edge debris; every other component must be an object of the world: bounding-box aspect within
                 ASPECT_RANGE (every world shape has a square box), side within SIDE_RANGE of the image side, and
                 a shape template (the renderer's circle / square / triangle drawn in the component's *own* box,
                 best of a few sub-pixel fits) with IoU >= SHAPE_IOU and a margin over the runner-up
    extra blobs  off-palette pixels are tolerated only as the blurred edge of a palette object: within EDGE_BAND
                 pixels (8-neighbour) of a palette component that is not a speck. Off-palette pixels outside that
                 band form 8-connected components (a dithered blob is one blob); one at least as large as a speck
                 (SPECK_FRACTION of the smallest object, the size rule for palette debris) is an extra object that
                 is no palette object of the world (a grey square, a blend of two colors) and fails the image,
                 wherever it lies and whatever its share of the object pixels (an off-palette blob touching an
                 object is charged by its part outside the band)

Tag rules (GenEval's, made strict: the object count must match exactly, extra objects fail every tag):

    single_object  exactly one object, of the asked shape
    colors         exactly one object, of the asked shape and color
    two_object     exactly two objects, the asked shapes
    counting       exactly N objects, all of the asked shape (and color, if asked)
    position       exactly two objects, the asked shapes (and colors, if asked), and GenEval's relative-position
                   rule: offsets between
                   box centres, each shrunk by POSITION_MARGIN x (sum of the two box sizes) on its axis, normalised
                   by the distance; a relation holds when its normalised component is beyond 0.5
    color_attr     exactly two objects whose shapes carry the asked colors

Every failure is also named by the first check it failed (``CHECKS``: ``background``, ``aspect``, ``size``,
``form``, ``off_palette``, ``extra_object``, ``debris`` from detection; ``count``, ``shapes``, ``color``, ``binding``,
``relation`` from the tag rule), so a report can say *why* a model's images fail, not only how often.

``summarise`` gives each tag's accuracy, separately for seen and unseen compositions, and two overall scores, each a
mean of tag accuracies (not of images): ``overall_shared`` over the *shared tags* (those with images in both the seen
and the unseen split: single_object and two_object have no unseen prompts, so an all-tag seen score would average six
tags against the unseen score's four and overstate the seen / unseen gap), and ``overall_all_tags`` over every tag
with images in the split; and the failures per check.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.scenes import HALF_SIZE_RANGE, TAGS, Prompt, visible_relations
from data_pipelines.shapes import BACKGROUND, COLORS, SHAPES

BACKGROUND_TOLERANCE = 40.0  # RGB distance of the border median from the world's background
FOREGROUND_DISTANCE = 60.0
PALETTE_TOLERANCE = 60.0  # a foreground pixel farther than this from every palette color is off-palette
OFF_PALETTE_EDGE_SHARE = 0.25  # off-palette pixels allowed, as a share of object pixels (blurred edges)
SPECK_FRACTION = 0.25  # components smaller than this share of the smallest object's area are edge debris
DEBRIS_SHARE = 0.15  # debris allowed, as a share of object pixels
EDGE_BAND = 1  # pixels around a palette object where off-palette pixels are its blurred edge
ASPECT_RANGE = (0.75, 1.34)
SIDE_RANGE = (2 * HALF_SIZE_RANGE[0] * 0.75, 2 * HALF_SIZE_RANGE[1] * 1.25)  # box side / image side
SHAPE_IOU = 0.72
SHAPE_MARGIN = 0.02

# The checks an image can fail, in the order the judge applies them (an image is charged to the first it fails).
CHECKS = {
    "background": "the border is not the world's background (noise, grey, blank canvas of another color)",
    "aspect": "an object's box is not square (stretched)",
    "size": "an object is smaller or larger than any the world draws",
    "form": "an object matches no world shape template (blobs, blends)",
    "off_palette": "too many foreground pixels off the palette (blended or wrong colors)",
    "extra_object": "a foreground blob that is no palette object of the world (off-palette color or blend)",
    "debris": "too many stray specks",
    "count": "the number of objects differs from the prompt's",
    "shapes": "the objects' shapes differ from the prompt's",
    "color": "no object of the asked color and shape",
    "binding": "a color sits on the wrong object, or a counted object has another color",
    "relation": "the two objects are not in the asked relative position",
}

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float64)


@dataclass
class DetectedObject:
    color: str
    shape: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive, pixels
    area: int
    iou: float

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2

    @property
    def size(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return x1 - x0 + 1.0, y1 - y0 + 1.0


@dataclass
class Detection:
    objects: list[DetectedObject] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # reasons the image is not a clean world render
    checks: list[str] = field(default_factory=list)  # the CHECKS key of each problem

    def flag(self, check: str, problem: str) -> None:
        if check not in CHECKS:
            raise ValueError(f"unknown check {check!r} (known: {', '.join(CHECKS)})")
        self.checks.append(check)
        self.problems.append(problem)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects], "problems": list(self.problems)}


def label_components(mask_HW: np.ndarray, diagonal: bool = False) -> np.ndarray:
    """[H, W] int labels of the 4-connected (``diagonal``: 8-connected) components of ``mask_HW`` (-1 outside it).
    Min-label propagation with pointer jumping: each label is the flat index of the component's first pixel in
    row-major order."""
    H, W = mask_HW.shape
    none = H * W
    labels = np.where(mask_HW, np.arange(H * W).reshape(H, W), none)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        if diagonal:
            np.minimum(new[1:, 1:], labels[:-1, :-1], out=new[1:, 1:])
            np.minimum(new[:-1, :-1], labels[1:, 1:], out=new[:-1, :-1])
            np.minimum(new[1:, :-1], labels[:-1, 1:], out=new[1:, :-1])
            np.minimum(new[:-1, 1:], labels[1:, :-1], out=new[:-1, 1:])
        new[~mask_HW] = none
        new = np.append(new.ravel(), none)[new]
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask_HW, labels, -1)


FIT_SCALES = (0.9, 1.0, 1.1)  # template half-sizes tried, relative to the box
FIT_SHIFTS = (-0.25, 0.0, 0.25)  # template centre offsets tried, pixels per axis
FIT_CACHE_SIZE = 4096  # (shape, box height, box width) triples whose template fits are kept


def template(shape: str, h: int, w: int, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """The renderer's shape (pixel centres inside the continuous shape) fitted to an h x w box at its own aspect,
    half-sizes ``scale`` x half the box, centre shifted by (dx, dy) pixels: [h, w] bool."""
    hx, hy = scale * w / 2, scale * h / 2
    y = (np.arange(h, dtype=np.float64)[:, None] + 0.5 - h / 2 - dy) / hy  # [-1, 1] inside the shape
    x = (np.arange(w, dtype=np.float64)[None, :] + 0.5 - w / 2 - dx) / hx
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return (np.abs(x) <= 1) & (np.abs(y) <= 1)
    if shape == "triangle":  # apex at the top, base at the bottom
        return (np.abs(y) <= 1) & (np.abs(x) <= (y + 1) / 2)
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=FIT_CACHE_SIZE)
def template_fits(shape: str, h: int, w: int) -> np.ndarray:
    """Every sub-pixel fit of the shape's template to an h x w box (FIT_SCALES x FIT_SHIFTS x FIT_SHIFTS):
    [fits, h, w] bool, read-only (cached: the boxes of objects take few sizes)."""
    fits = np.stack([template(shape, h, w, s, dx, dy) for s in FIT_SCALES for dx in FIT_SHIFTS for dy in FIT_SHIFTS])
    fits.flags.writeable = False
    return fits


def shape_iou(crop: np.ndarray, shape: str) -> float:
    """Best IoU of a component's box crop with the shape's template over a few sub-pixel fits (pixelisation moves
    a small shape's outline by up to half a pixel)."""
    fits = template_fits(shape, *crop.shape)
    inter, union = (crop & fits).sum((1, 2)), (crop | fits).sum((1, 2))
    return float((inter / np.maximum(union, 1)).max())


def dilate(mask_HW: np.ndarray, steps: int) -> np.ndarray:
    """``mask_HW`` grown by ``steps`` pixels, 8-neighbour (a square of side 2 x steps + 1 around each pixel)."""
    out = mask_HW.copy()
    H, W = out.shape
    for _ in range(steps):
        padded = np.pad(out, 1)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                out |= padded[dy:dy + H, dx:dx + W]
    return out


def off_palette_blobs(stray_HW: np.ndarray, speck_area: float) -> list[tuple[int, tuple[int, int]]]:
    """(area, (x, y) of a pixel) of each 8-connected component of ``stray_HW`` at least ``speck_area`` large,
    largest first."""
    if not stray_HW.any():
        return []
    labels = label_components(stray_HW, diagonal=True)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    W = stray_HW.shape[1]
    blobs = [(int(n), (int(lab) % W, int(lab) // W)) for lab, n in zip(ids, counts) if n >= speck_area]
    return sorted(blobs, reverse=True)


def as_rgb_array(img: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape [H, W, 3], got {arr.shape}")
    return arr


def component_object(comp_HW: np.ndarray, name: str, area: int) -> DetectedObject | tuple[str, str]:
    """One palette component of color ``name`` (not a speck) as a world object, or the check it fails (aspect, size
    or form: no world shape fits its box clearly) and why."""
    H, W = comp_HW.shape
    ys, xs = np.nonzero(comp_HW)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    if not ASPECT_RANGE[0] <= bw / bh <= ASPECT_RANGE[1]:
        return "aspect", f"{name} object with aspect {bw / bh:.2f} (world shapes have 1)"
    side = max(bw / W, bh / H)
    if not SIDE_RANGE[0] <= side <= SIDE_RANGE[1]:
        return "size", (f"{name} object of size {side:.2f} outside the world's {SIDE_RANGE[0]:.2f}-"
                        f"{SIDE_RANGE[1]:.2f}")
    crop = comp_HW[y0:y1 + 1, x0:x1 + 1]
    ious = {s: shape_iou(crop, s) for s in SHAPES}
    ranked = sorted(ious, key=ious.get, reverse=True)
    best, second = ious[ranked[0]], ious[ranked[1]]
    if best < SHAPE_IOU or best - second < SHAPE_MARGIN:
        return "form", f"{name} object of no world shape (best IoU {best:.2f} {ranked[0]}, runner-up {second:.2f})"
    return DetectedObject(name, ranked[0], (x0, y0, x1, y1), area, round(best, 3))


def detect(img: Image.Image | np.ndarray) -> Detection:
    """Every object in ``img`` and every reason it is not a clean render of the world (see the module docstring)."""
    px = as_rgb_array(img).astype(np.float64)
    H, W, _ = px.shape
    out = Detection()
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg = np.median(border, axis=0)
    if np.linalg.norm(bg - np.array(BACKGROUND, dtype=np.float64)) > BACKGROUND_TOLERANCE:
        out.flag("background", "background")
        return out
    fg = np.linalg.norm(px - bg, axis=-1) > FOREGROUND_DISTANCE
    dist = np.linalg.norm(px[:, :, None, :] - _PALETTE[None, None], axis=-1)  # [H, W, K]
    nearest = dist.argmin(-1)
    on_palette = fg & (dist.min(-1) <= PALETTE_TOLERANCE)
    off_palette = int((fg & ~on_palette).sum())
    min_area = np.pi * (HALF_SIZE_RANGE[0] * 0.75 * min(H, W)) ** 2 * 0.5  # a small triangle's area, with slack
    speck_area = SPECK_FRACTION * min_area
    debris = 0
    object_pixels = 0
    palette_objects = np.zeros((H, W), dtype=bool)  # every palette component that is not a speck
    for k, name in enumerate(_NAMES):
        mask = on_palette & (nearest == k)
        if not mask.any():
            continue
        labels = label_components(mask)
        ids, counts = np.unique(labels[labels >= 0], return_counts=True)
        for lab, area in zip(ids.tolist(), counts.tolist()):
            if area < speck_area:
                debris += area
                continue
            comp = labels == lab
            palette_objects |= comp
            object_pixels += area
            found = component_object(comp, name, area)
            if isinstance(found, DetectedObject):
                out.objects.append(found)
            else:
                out.flag(*found)
    if off_palette > OFF_PALETTE_EDGE_SHARE * max(object_pixels, min_area):
        out.flag("off_palette", f"{off_palette} off-palette pixels")
    blobs = off_palette_blobs(fg & ~on_palette & ~dilate(palette_objects, EDGE_BAND), speck_area)
    if blobs:
        (area, (x, y)), more = blobs[0], f" and {len(blobs) - 1} more" if len(blobs) > 1 else ""
        out.flag("extra_object", f"off-palette blob of {area} pixels at ({x}, {y}){more}, no palette object's edge")
    if debris > DEBRIS_SHARE * max(object_pixels, min_area):
        out.flag("debris", f"{debris} pixels of debris")
    out.objects.sort(key=lambda o: (o.box[0], o.box[1]))
    return out


def relative_position(a: DetectedObject, b: DetectedObject) -> set[str]:
    """GenEval's rule (``data_pipelines.scenes.visible_relations``, which the training-scene generator uses to keep
    held-out relations out of training images): the relations of ``a`` to ``b`` ("to the left of", "above", ...),
    from box centres, each axis offset shrunk by POSITION_MARGIN x (a's size + b's size) and normalised by the
    centres' distance."""
    return visible_relations(a.center, a.size, b.center, b.size)


@dataclass
class Verdict:
    passed: bool
    failed: str | None  # what the first failed check found, in words
    detection: Detection
    check: str | None = None  # the CHECKS key of the first failed check

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.passed, "failed": self.failed, "check": self.check, **self.detection.to_dict()}


def judge(img: Image.Image | np.ndarray, prompt: Prompt) -> Verdict:
    """Whether ``img`` shows ``prompt`` under its tag's rule (see the module docstring)."""
    det = detect(img)
    if det.problems:
        return Verdict(False, det.problems[0], det, det.checks[0])
    objs, want = det.objects, prompt.objects
    if len(objs) != len(want):
        return Verdict(False, f"{len(objs)} objects, the prompt asks for {len(want)}", det, "count")
    if sorted(o.shape for o in objs) != sorted(s for _, s in want):
        return Verdict(False, f"shapes {sorted(o.shape for o in objs)}, asked {sorted(s for _, s in want)}", det, "shapes")
    for color, shape in want:
        if color is not None and not any(o.shape == shape and o.color == color for o in objs):
            return Verdict(False, f"no {color} {shape}", det, "color")
    if prompt.tag in ("color_attr", "position") and want[0][0] is not None:  # each color on its own object
        for color, shape in want:
            if [o.color for o in objs if o.shape == shape] != [color]:
                return Verdict(False, f"the {shape} is not {color}", det, "binding")
    if prompt.tag == "counting" and want[0][0] is not None and any(o.color != want[0][0] for o in objs):
        return Verdict(False, "not all objects have the asked color", det, "binding")
    if prompt.tag in ("colors", "counting", "color_attr", "single_object", "two_object"):
        return Verdict(True, None, det)
    if prompt.tag == "position":
        a = next(o for o in objs if o.shape == want[0][1])
        b = next(o for o in objs if o is not a)
        if prompt.relation not in relative_position(a, b):
            return Verdict(False, f"the {a.shape} is not {prompt.relation} the {b.shape} "
                                  f"({sorted(relative_position(a, b)) or 'no relation'})", det, "relation")
        return Verdict(True, None, det)
    raise ValueError(f"unknown tag {prompt.tag!r} (known: {', '.join(TAGS)})")


SPLITS = ("seen", "unseen", "all")


def summarise(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``results``: dicts with ``tag``, ``pass``, ``unseen`` and (optional) ``check``. Returns, for split in seen /
    unseen / all::

        geneval.<tag>.<split>               the tag's accuracy (left out when the split has no image of the tag; its
                                            count is then 0)
        geneval.overall_shared.<split>      mean of the accuracies of the shared tags: those with images in both the
                                            seen and the unseen split (left out when no tag is shared)
        geneval.overall_all_tags.<split>    mean of the accuracies of every tag with images in the split
        shared_tags                         the shared tags, in TAGS order
        counts                              {"<tag>.<split>": images}
        failures                            {"<check>.<split>": images}: each failed image once, under its first
                                            failed check (``unknown`` when a result names none)
    """
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    failures: dict[str, int] = defaultdict(int)
    for r in results:
        for split in ("unseen" if r["unseen"] else "seen", "all"):
            t = tally[(r["tag"], split)]
            t[0] += int(bool(r["pass"]))
            t[1] += 1
            if not r["pass"]:
                failures[f"{r.get('check') or 'unknown'}.{split}"] += 1
    out: dict[str, Any] = {}
    counts = {f"{tag}.{split}": tally.get((tag, split), (0, 0))[1] for split in SPLITS for tag in TAGS}
    shared = [tag for tag in TAGS if counts[f"{tag}.seen"] and counts[f"{tag}.unseen"]]
    for split in SPLITS:
        accs = {tag: tally[(tag, split)][0] / counts[f"{tag}.{split}"] for tag in TAGS if counts[f"{tag}.{split}"]}
        out.update({f"geneval.{tag}.{split}": acc for tag, acc in accs.items()})
        if shared:
            out[f"geneval.overall_shared.{split}"] = float(np.mean([accs[tag] for tag in shared]))
        if accs:
            out[f"geneval.overall_all_tags.{split}"] = float(np.mean(list(accs.values())))
    out["shared_tags"] = shared
    out["counts"] = counts
    out["failures"] = dict(sorted(failures.items()))
    return out
