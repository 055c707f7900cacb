"""Fashion-MNIST (or any IDX image / label pair) as captioned samples: the first real images of the project.

    images, labels = read_idx_pair(root, "train")        # uint8 [N, 28, 28], uint8 [N]
    caption = caption_for(label, template)                 # "a photo of a sneaker"

Captions come from the class names through templates. ``TRAIN_TEMPLATES`` are used for training shards;
``HELDOUT_TEMPLATES`` never appear in training, so a captioning or text -> image score on them measures
generalisation to unseen phrasings (the held-out shard uses both kinds, marked in each sample's json). The published
train / test split is kept: held-out images come from the test split, minus any whose pixels equal a training image
(checked by hash: a held-out image is never seen in training by content, not only by file name).

Interleaved documents (a share of training samples): two items and a sentence comparing them, e.g.
``[a photo of a sneaker] <image> [next to it, a bag] <image> [the sneaker is footwear, the bag is an accessory]``.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import struct
from pathlib import Path

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# (name in captions, article, group): the ten Fashion-MNIST classes in label order
CLASSES = [("t-shirt", "a", "a top"), ("pair of trousers", "a", "legwear"), ("pullover", "a", "a top"),
           ("dress", "a", "a dress"), ("coat", "a", "outerwear"), ("sandal", "a", "footwear"),
           ("shirt", "a", "a top"), ("sneaker", "a", "footwear"), ("bag", "a", "an accessory"),
           ("ankle boot", "an", "footwear")]

TRAIN_TEMPLATES = ["a photo of {a} {c}", "{a} {c}", "{a} {c}, grayscale", "a picture of {a} {c}",
                   "a small image of {a} {c}", "this is {a} {c}"]
HELDOUT_TEMPLATES = ["a grayscale photo showing {a} {c}", "here we see {a} {c}"]


class IDXError(ValueError):
    pass


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally .gz) -> numpy array (uint8 data only, as MNIST-style sets ship)."""
    path = Path(path)
    if not path.is_file() and Path(str(path) + ".gz").is_file():
        path = Path(str(path) + ".gz")
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise IDXError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXError(f"{path}: not an IDX file (bad magic)")
    if data[2] != 0x08:
        raise IDXError(f"{path}: only unsigned-byte IDX data is supported (type 0x{data[2]:02x})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise IDXError(f"{path}: {body.size} bytes of data, header says {dims}")
    return body.reshape(dims)


def read_idx_pair(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels uint8 [N]) of one published split ("train" or "test")."""
    images_name, labels_name = FILES[split]
    images, labels = read_idx(Path(root) / images_name), read_idx(Path(root) / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise IDXError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not pair up")
    if labels.max(initial=0) >= len(CLASSES):
        raise IDXError(f"{root}: label {labels.max()} outside the {len(CLASSES)} classes")
    return images, labels


def caption_for(label: int, template: str) -> str:
    name, article, _ = CLASSES[label]
    return template.format(a=article, c=name)


def class_of_caption(text: str) -> int | None:
    """The class a caption names (longest name first: "shirt" is inside "t-shirt"), or None."""
    text = text.lower()
    for label in sorted(range(len(CLASSES)), key=lambda i: -len(CLASSES[i][0])):
        if CLASSES[label][0] in text:
            return label
    return None


def image_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def to_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] grayscale -> uint8 [size, size, 3], centred on a black canvas when ``size`` is larger (28 -> 32
    keeps every pixel) and resized down (bilinear) when smaller."""
    h, w = image.shape
    if size < max(h, w):
        from PIL import Image

        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        h, w = image.shape
    canvas = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top:top + h, left:left + w] = image
    return np.repeat(canvas[..., None], 3, axis=-1)


def comparison(a: int, b: int) -> str:
    na, nb = CLASSES[a][0], CLASSES[b][0]
    if a == b:
        return f"both are {CLASSES[a][1]} {na}"
    ga, gb = CLASSES[a][2], CLASSES[b][2]
    if ga == gb:
        return f"the {na} and the {nb} are both {ga}"
    return f"the {na} is {ga}, the {nb} is {gb}"


def interleaved_segments(a: int, b: int, rng: random.Random) -> list[dict]:
    """Segments of a two-item document (images as indices 0 and 1 into the sample's members)."""
    first = caption_for(a, rng.choice(TRAIN_TEMPLATES))
    return [{"text": first}, {"image": 0}, {"text": f"next to it, {CLASSES[b][1]} {CLASSES[b][0]}"}, {"image": 1},
            {"text": comparison(a, b)}]
