"""The shapes world: one hard-edged colored shape on a plain dark background, deterministic by seed.

Geometry lives in unit coordinates (x right, y down, both in [0, 1]) and is scaled to the requested image size, so
the same scene renders at any resolution. Pixels are either exactly ``BACKGROUND`` or exactly one ``COLORS`` entry
(no anti-aliasing), which keeps the programmatic judge (``transfusion.eval.judge``) exact on ground truth.

    >>> key, image, text, record = make_sample("train", 123, seed=0, size=32)
    >>> key, text
    ('train-00000123', 'a ...')

A shape with center (cx, cy) and half-size h occupies the square [cx - h, cx + h] x [cy - h, cy + h]:

    circle: disc of radius h     square: the whole box     triangle: apex (cx, cy - h), base y = cy + h, width 2h
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

WORLD_VERSION = 2  # bump when sampling or rendering changes, so cached shards are regenerated

BACKGROUND: tuple[int, int, int] = (16, 16, 16)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 40),
    "purple": (200, 50, 220),
    "cyan": (40, 220, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
JITTER = 0.02  # max offset of a shape's center from its anchor, per axis
HALF_SIZE_RANGE = (0.18, 0.25)  # shape half-size as a fraction of the image side


@dataclass(frozen=True, slots=True)
class ShapeObject:
    shape: str  # one of SHAPES
    color: str  # key of COLORS
    position: str  # one of POSITIONS
    cx: float  # center, unit coordinates
    cy: float
    half_size: float  # half the side of the bounding box, unit coordinates

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapeObject":
        return cls(shape=str(d["shape"]), color=str(d["color"]), position=str(d["position"]),
                   cx=float(d["cx"]), cy=float(d["cy"]), half_size=float(d["half_size"]))


@dataclass(frozen=True, slots=True)
class Scene:
    objects: list[ShapeObject] = field(default_factory=list)  # drawn in order; one per image for now
    background: tuple[int, int, int] = BACKGROUND

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "background": list(self.background)}

    @staticmethod
    def is_record(d: Any) -> bool:
        """Whether a sample's json record describes a shapes-world scene (other datasets' records do not)."""
        return isinstance(d, dict) and isinstance(d.get("objects"), list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        """Inverse of ``to_dict``; extra keys (e.g. the ``caption`` stored beside a record) are ignored."""
        bg = d.get("background", BACKGROUND)
        return cls(objects=[ShapeObject.from_dict(o) for o in d["objects"]],
                   background=(int(bg[0]), int(bg[1]), int(bg[2])))


def sample_scene(rng: random.Random) -> Scene:
    """Draw one object uniformly over shape x color x position, with jittered center and random size."""
    shape = rng.choice(SHAPES)
    color = rng.choice(tuple(COLORS))
    position = rng.choice(POSITIONS)
    ax, ay = ANCHORS[position]
    cx = round(ax + rng.uniform(-JITTER, JITTER), 4)
    cy = round(ay + rng.uniform(-JITTER, JITTER), 4)
    half = round(rng.uniform(*HALF_SIZE_RANGE), 4)
    return Scene(objects=[ShapeObject(shape, color, position, cx, cy, half)])


def shape_mask(shape: str, cx: float, cy: float, half: float, height: int, width: int) -> np.ndarray:
    """[H, W] bool mask of pixels whose centers fall inside the shape (unit coordinates scaled per axis)."""
    y = (np.arange(height, dtype=np.float64)[:, None] + 0.5) / height
    x = (np.arange(width, dtype=np.float64)[None, :] + 0.5) / width
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # half-width grows linearly from 0 at the apex to `half` at the base
        return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def render(scene: Scene, size: int) -> Image.Image:
    """Rasterize ``scene`` to a ``size`` x ``size`` RGB image using only palette colors."""
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = scene.background
    for obj in scene.objects:
        pixels[shape_mask(obj.shape, obj.cx, obj.cy, obj.half_size, size, size)] = COLORS[obj.color]
    return Image.fromarray(pixels, mode="RGB")


def caption(scene: Scene) -> str:
    """'a red circle on the left'; several objects are joined with ' and '."""
    return " and ".join(f"a {o.color} {o.shape} {POSITION_PHRASES[o.position]}" for o in scene.objects)


def sample_seed(seed: int, split: str, index: int) -> int:
    """A 64-bit seed from (seed, split, index) via BLAKE2b: stable across processes, independent per split."""
    digest = hashlib.blake2b(f"shapes-v{WORLD_VERSION}:{seed}:{split}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:08d}"


def make_sample(split: str, index: int, seed: int, size: int) -> tuple[str, Image.Image, str, dict[str, Any]]:
    """(key, image, caption, record) for sample ``index`` of ``split``; the record is ``Scene.to_dict()`` plus
    ``caption`` and ``image_size`` and round-trips through JSON and ``Scene.from_dict``."""
    if "." in split or "/" in split:
        raise ValueError(f"split name must not contain '.' or '/': {split!r}")
    scene = sample_scene(random.Random(sample_seed(seed, split, index)))
    text = caption(scene)
    record = {**scene.to_dict(), "caption": text, "image_size": size}
    return sample_key(split, index), render(scene, size), text, record


def png_bytes(image: Image.Image) -> bytes:
    """Lossless, deterministic PNG encoding."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
