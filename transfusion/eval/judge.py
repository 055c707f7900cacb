"""A programmatic judge for the shapes world: reads color, shape and position off the pixels, no neural network.

Pipeline for one image (any size, PIL or [H, W, 3] uint8):

    background  = median color of the 1-pixel border (robust to a generated background that drifted a little)
    foreground  = pixels farther than FOREGROUND_DISTANCE from the background (RGB Euclidean)
    object      = largest 4-connected foreground component; none (all fields None) if it covers < MIN_AREA_FRACTION;
                  then re-segmented at half contrast (pixels nearer the object's median color than the background,
                  along the background->object axis) so blurred, generated edges keep the shape's true outline
    color       = palette color nearest to the component's per-channel median color
    shape       = template with the best IoU against the component inside its bounding box, where the templates
                  are the renderer's own circle / square / triangle fitted to that box. Square IoU is the fill
                  ratio (square ~1.0, circle ~0.785, triangle ~0.5); the templates also use *where* the pixels are
                  (a triangle is empty in its top corners), which is more robust than the fill ratio alone
    position    = anchor nearest to the bounding-box center (not the pixel centroid: a triangle's centroid is low)

``parse_caption`` reads the same three attributes out of generated text so captions are scored per attribute.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.shapes import ANCHORS, COLORS, POSITION_PHRASES, SHAPES, Scene, shape_mask
from transfusion.eval.geneval import as_rgb_array, label_components

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position")
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel is foreground
MIN_AREA_FRACTION = 0.01  # smallest real object covers ~0.039 of the image; smaller components are noise

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)  # [K, 3]


@dataclass(frozen=True, slots=True)
class Judgement:
    color: str | None  # key of COLORS
    shape: str | None  # one of SHAPES
    position: str | None  # one of POSITIONS
    fill_ratio: float | None = None  # component pixels / bounding-box pixels (debugging)
    area_fraction: float = 0.0  # component pixels / image pixels
    bbox: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) in pixels, inclusive
    shape_iou: dict[str, float] | None = None  # IoU against each template (debugging)

    def as_dict(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


_NOTHING = Judgement(color=None, shape=None, position=None)


def _border_color(pixels_HWC: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels_HWC[0], pixels_HWC[-1], pixels_HWC[:, 0], pixels_HWC[:, -1]])
    return np.median(border, axis=0)


def largest_component(mask_HW: np.ndarray) -> np.ndarray:
    """[H, W] bool mask of the largest 4-connected component of ``mask_HW`` (ties: the one starting first in
    raster order); all False when ``mask_HW`` is empty."""
    labels = label_components(mask_HW)
    fg = labels[mask_HW]
    if fg.size == 0:
        return np.zeros_like(mask_HW)
    return labels == np.bincount(fg).argmax()


def _nearest_anchor(x: float, y: float) -> str:
    return min(ANCHORS, key=lambda p: (ANCHORS[p][0] - x) ** 2 + (ANCHORS[p][1] - y) ** 2)


def judge_image(img: Image.Image | np.ndarray) -> Judgement:
    """Judge the single object in ``img``; fields are None when no object is found."""
    pixels = as_rgb_array(img).astype(np.float64)
    H, W, _ = pixels.shape
    min_area = max(1.0, MIN_AREA_FRACTION * H * W)
    background = _border_color(pixels)
    coarse = largest_component(np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE)
    if coarse.sum() < min_area:
        return _NOTHING
    # Re-segment at half contrast between background and object color, so blurred edges keep the true geometry.
    axis = np.median(pixels[coarse], axis=0) - background
    contrast = float(axis @ axis)
    if contrast < 1.0:
        return _NOTHING
    comp = largest_component((pixels - background) @ axis > 0.5 * contrast)
    area = int(comp.sum())
    if area < min_area:
        return _NOTHING

    median = np.median(pixels[comp], axis=0)
    color = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - median, axis=-1)))]

    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    crop = comp[y0:y1 + 1, x0:x1 + 1]
    bh, bw = crop.shape
    iou = {}
    for s in SHAPES:
        template = shape_mask(s, 0.5, 0.5, 0.5, bh, bw)
        iou[s] = float((crop & template).sum() / (crop | template).sum())
    shape = max(SHAPES, key=lambda s: iou[s])

    position = _nearest_anchor((x0 + x1 + 1) / 2 / W, (y0 + y1 + 1) / 2 / H)
    return Judgement(color=color, shape=shape, position=position, fill_ratio=area / (bh * bw),
                     area_fraction=area / (H * W), bbox=(x0, y0, x1, y1), shape_iou=iou)


# ---------------------------------------------------------------------------------------------------------------
# Captions and scoring

_WORDS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": tuple(POSITION_PHRASES),
}


def parse_caption(text: str) -> dict[str, str | None]:
    """{'color', 'shape', 'position'} named in ``text``; an attribute is None when absent or when the text names
    two different values for it (so a caption listing every color earns nothing)."""
    words = re.findall(r"[a-z]+", text.lower())
    out: dict[str, str | None] = {}
    for attr, vocab in _WORDS.items():
        found = {w for w in words if w in vocab}
        out[attr] = found.pop() if len(found) == 1 else None
    return out


def _target(scene_or_record: Scene | Mapping[str, Any]) -> dict[str, str]:
    scene = scene_or_record if isinstance(scene_or_record, Scene) else Scene.from_dict(scene_or_record)
    if not scene.objects:
        raise ValueError("scene has no objects to score against")
    obj = scene.objects[0]
    return {"color": obj.color, "shape": obj.shape, "position": obj.position}


def _score(pred: Mapping[str, str | None], target: Mapping[str, str]) -> dict[str, bool]:
    scores = {a: pred.get(a) is not None and pred.get(a) == target[a] for a in ATTRIBUTES}
    scores["all"] = all(scores[a] for a in ATTRIBUTES)
    return scores


def score_scene(judgement: Judgement, scene_or_record: Scene | Mapping[str, Any]) -> dict[str, bool]:
    """Per-attribute correctness of a judged image against its intended scene (or its JSON record), plus 'all'."""
    return _score(judgement.as_dict(), _target(scene_or_record))


def score_caption(text: str, scene_or_record: Scene | Mapping[str, Any]) -> dict[str, bool]:
    """Per-attribute correctness of a generated caption against the scene it describes, plus 'all'."""
    return _score(parse_caption(text), _target(scene_or_record))


def accuracy(scores: Iterable[Mapping[str, bool]]) -> dict[str, float]:
    """Mean of each key over a list of ``score_*`` results; empty input gives an empty dict."""
    rows = list(scores)
    if not rows:
        return {}
    return {k: sum(bool(r[k]) for r in rows) / len(rows) for k in rows[0]}
