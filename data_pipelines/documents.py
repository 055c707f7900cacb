"""Raw tar samples -> ``Document``s: images (pixels or precomputed latents), captions, interleaved segments.

Two sample layouts, told apart by the json member (``data.segments_field``, default ``segments``):

    (image, caption) pair    key.jpg  key.txt  [key.json]            caption: txt member or json field
    interleaved document     key.0.png key.1.jpg key.2.png key.json  json: {"segments": [{"text": "..."},
                                                                             {"image": 0}, {"image": "1.jpg",
                                                                             "role": "condition"}, ...]}

Image members are ``<tag>.<ext>`` with ext in ``IMAGE_EXTENSIONS`` (pixel shards) or ``<tag>.latent.npy`` /
``<tag>.latent.safetensors`` (latent shards, written by ``tools/precompute_latents.py``); the tag is empty for the
one image of a pair and names the image inside a document. A segment's ``"image"`` is an int ``i`` (tag ``"i"``)
or a member name like ``"1.jpg"`` (its tag, ``"1"``, is used), so the same json serves a pixel shard and its latent
twin. An optional ``"role"`` (``"target"`` or ``"condition"``) fixes that image's role; otherwise the sequence
builder decides (``data_pipelines.samples``).

Pixels: any PIL mode (grey, RGBA, palette, 16-bit) -> RGB (transparency composited on white), then
``data.resize``: ``center_crop`` (short side to S, centre crop), ``resize`` (squash to S x S) or ``pad`` (long side
to S, centred on mid-grey). Result: float [3, S, S] in [-1, 1]. Latents are returned as stored ([C, h, w], float32).
"""

from __future__ import annotations

import ast
import io
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from data_pipelines.errors import SkipSample

RawSample = dict[str, Any]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
LATENT_SUFFIXES = ("latent.npy", "latent.safetensors")
RESIZE_POLICIES = ("center_crop", "resize", "pad")
ROLES = ("target", "condition")
PAD_GREY = (128, 128, 128)  # the `pad` policy's fill, ~0 in [-1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Members


def _tag(ext: str, suffix: str) -> str:
    return ext[: -len(suffix)].rstrip(".")


def image_members(raw: RawSample, latents: bool = False) -> dict[str, str]:
    """``{tag: member ext}`` of the sample's image members (pixel images, or latents when ``latents``). When a
    tag has several (``0.png`` and ``0.jpg``), the first in ``IMAGE_EXTENSIONS`` order wins."""
    found: dict[str, str] = {}
    if latents:
        for ext in raw:
            if not ext.startswith("__"):
                for suffix in LATENT_SUFFIXES:
                    if ext == suffix or ext.endswith("." + suffix):
                        found.setdefault(_tag(ext, suffix), ext)
        return found
    ranked: dict[str, tuple[int, str]] = {}
    for ext in raw:
        if ext.startswith("__"):
            continue
        last = ext.rpartition(".")[2]
        if last in IMAGE_EXTENSIONS:
            tag, rank = _tag(ext, last), IMAGE_EXTENSIONS.index(last)
            if tag not in ranked or rank < ranked[tag][0]:
                ranked[tag] = (rank, ext)
    return {tag: ext for tag, (_, ext) in ranked.items()}


def has_latents(raw: RawSample) -> bool:
    return bool(image_members(raw, latents=True))


def decode_latent_member(raw: RawSample) -> Tensor:
    """The sample's untagged latent, else its first tagged one in name order (``SkipSample`` when none parses)."""
    members = image_members(raw, latents=True)
    if not members:
        raise SkipSample("no_image")
    ext = members[""] if "" in members else members[sorted(members)[0]]
    return decode_latent(raw[ext], ext)


def read_json(raw: RawSample) -> dict[str, Any] | None:
    """The sample's ``json`` member parsed, or None when absent or unreadable."""
    if "json" not in raw:
        return None
    try:
        record = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def check_caption_field(caption_field: str) -> None:
    if caption_field == "json:" or not caption_field:
        raise ValueError(f"data.caption_field must be an extension like 'txt' or 'json:<field>', got {caption_field!r}")


def read_caption(raw: RawSample, caption_field: str = "txt", record: dict[str, Any] | None = None) -> str:
    """The caption: the ``txt`` member (or any other text extension named by ``caption_field``) as stripped UTF-8,
    or the field of the ``json`` member when ``caption_field = "json:<field>"``. Absent, empty, non-string or
    undecodable captions raise ``SkipSample("missing_caption")``."""
    if caption_field.startswith("json:"):
        record = read_json(raw) if record is None else record
        value = None if record is None else record.get(caption_field[len("json:"):])
    else:
        data = raw.get(caption_field)
        try:
            value = None if data is None else data.decode("utf-8")
        except UnicodeDecodeError:
            value = None
    if not isinstance(value, str) or not value.strip():
        raise SkipSample("missing_caption")
    return value.strip()


# ---------------------------------------------------------------------------------------------------------------
# Pixels


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit grey is scaled from 16-bit range; transparency is composited onto white."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            arr = arr / 257.0  # 16-bit content (the usual source of I / I;16 images) -> 8 bit
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _fit(rgb: Image.Image, size: int, resize: str) -> Image.Image:
    w, h = rgb.size
    bicubic = Image.Resampling.BICUBIC
    if resize == "center_crop":
        side = min(w, h)
        if w == h == size:
            return rgb
        left, top = (w - side) / 2, (h - side) / 2
        return rgb.resize((size, size), bicubic, box=(left, top, left + side, top + side))
    if resize == "resize":
        return rgb if (w, h) == (size, size) else rgb.resize((size, size), bicubic)
    if resize == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
        inner = rgb if (w, h) == (nw, nh) else rgb.resize((nw, nh), bicubic)
        if (nw, nh) == (size, size):
            return inner
        canvas = Image.new("RGB", (size, size), PAD_GREY)
        canvas.paste(inner, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise ValueError(f"unknown data.resize {resize!r} (known: {', '.join(RESIZE_POLICIES)})")


def decode_image(data: bytes, image_size: int, resize: str = "center_crop", min_size: int = 0) -> Tensor:
    """Encoded image bytes -> float [3, S, S] in [-1, 1], fitted by ``resize`` (see the module docstring).
    Raises ``SkipSample("bad_image")`` when the bytes do not decode and ``SkipSample("image_too_small")`` when the
    image's shorter side is under ``min_size``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if min(img.size) < min_size:
                raise SkipSample("image_too_small")
            img.draft("RGB", (image_size, image_size))  # JPEG: decode at the smallest scale still >= S
            arr = np.array(_fit(_to_rgb(img), image_size, resize), dtype=np.uint8)
    except SkipSample:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad data
        raise SkipSample("bad_image") from exc
    if arr.shape != (image_size, image_size, 3):
        raise SkipSample("bad_image")
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Latents: .npy and .safetensors parsed by hand (headers cached: every member of a shard shares one)

_NPY_MAGIC = b"\x93NUMPY"
_header_cache: dict[bytes, tuple[str, tuple[int, ...], int]] = {}
_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _parse_npy(data: bytes) -> tuple[str, tuple[int, ...], int]:
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy member")
    if data[6] == 1:
        hlen, start = struct.unpack_from("<H", data, 8)[0], 10
    else:
        hlen, start = struct.unpack_from("<I", data, 8)[0], 12
    header = data[start:start + hlen]
    hit = _header_cache.get(header)
    if hit is None:
        meta = ast.literal_eval(header.decode("latin1"))
        if meta.get("fortran_order"):
            raise ValueError("fortran-ordered .npy latents are not supported")
        dtype = np.dtype(meta["descr"])
        if dtype.byteorder == ">" or dtype.name not in ("float16", "float32", "float64"):
            raise ValueError(f"unsupported latent dtype {meta['descr']!r}")
        hit = (dtype.name, tuple(int(s) for s in meta["shape"]), start + hlen)
        _header_cache[header] = hit
    return hit


def _parse_safetensors(data: bytes) -> tuple[str, tuple[int, ...], int]:
    (hlen,) = struct.unpack_from("<Q", data, 0)
    header = data[8:8 + hlen]
    hit = _header_cache.get(header)
    if hit is None:
        meta = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        if len(meta) != 1:
            raise ValueError("a latent .safetensors member must hold exactly one tensor")
        (info,) = meta.values()
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"unsupported latent dtype {info['dtype']!r}")
        hit = (_ST_DTYPES[info["dtype"]], tuple(int(s) for s in info["shape"]), 8 + hlen + info["data_offsets"][0])
        _header_cache[header] = hit
    return hit


def decode_latent(data: bytes, suffix: str = "npy") -> Tensor:
    """A ``.npy`` (float16/32/64) or ``.safetensors`` (F16/BF16/F32, one tensor) member -> float32 [C, h, w].
    Never goes through PIL or pickle; raises ``SkipSample("bad_latent")`` on anything unexpected."""
    try:
        dtype, shape, offset = (_parse_safetensors if suffix.endswith("safetensors") else _parse_npy)(data)
        if len(shape) != 3:
            raise ValueError(f"latent member has shape {shape}, expected [C, h, w]")
        count = shape[0] * shape[1] * shape[2]  # np.frombuffer raises when the member is shorter
        if dtype == "bfloat16":  # numpy has no bfloat16: widen the raw 16 bits into the top half of a float32
            bits = np.frombuffer(data, dtype="<u2", count=count, offset=offset).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).astype(np.float32)
    except Exception as exc:  # noqa: BLE001
        raise SkipSample("bad_latent") from exc
    if not np.isfinite(arr.sum()):  # one reduction catches any NaN / inf
        raise SkipSample("bad_latent")
    return torch.from_numpy(arr.reshape(shape))


# ---------------------------------------------------------------------------------------------------------------
# Documents


@dataclass(slots=True)
class Document:
    """One sample: ordered segments (text, or one image [C, H, W]) and, per image in order, a role from the data
    (``"target"``, ``"condition"``) or None. A pair (``interleaved=False``) holds ``[caption, image]`` and is laid
    out by the builder's layout mix; an interleaved document keeps its order."""

    key: str
    segments: list[str | Tensor]
    roles: list[str | None] = field(default_factory=list)
    interleaved: bool = False
    record: dict[str, Any] | None = None
    url: str = ""

    @property
    def images(self) -> list[Tensor]:
        return [s for s in self.segments if isinstance(s, Tensor)]


@dataclass(kw_only=True, slots=True)
class DecodeOptions:
    image_size: int
    resize: str = "center_crop"
    min_image_size: int = 0
    caption_field: str = "txt"
    max_caption_chars: int = 0  # 0 = no limit
    segments_field: str = "segments"
    latents: bool = False  # read <tag>.latent.* members instead of pixel images
    latent_shape: tuple[int, int, int] | None = None  # when set, latents of another shape are "bad_latent"

    @classmethod
    def from_config(cls, cfg: Any, latents: bool, latent_shape: tuple[int, int, int] | None = None) -> "DecodeOptions":
        return cls(image_size=cfg.image_size, resize=cfg.resize, min_image_size=cfg.min_image_size,
                   caption_field=cfg.caption_field, max_caption_chars=cfg.max_caption_chars,
                   segments_field=cfg.segments_field, latents=latents, latent_shape=latent_shape)


def _decode_member(raw: RawSample, ext: str, opts: DecodeOptions) -> Tensor:
    if opts.latents:
        z = decode_latent(raw[ext], ext)
        if opts.latent_shape is not None and tuple(z.shape) != tuple(opts.latent_shape):
            raise SkipSample("bad_latent")
        return z
    return decode_image(raw[ext], opts.image_size, opts.resize, opts.min_image_size)


def _image_tag(ref: Any) -> str | None:
    """A segment's image reference -> member tag: 3 -> "3"; "3.png" / "3.latent.npy" / "3" -> "3"."""
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        return None
    if isinstance(ref, int):
        return str(ref) if ref >= 0 else None
    ref = ref.lower()
    for suffix in LATENT_SUFFIXES + IMAGE_EXTENSIONS:
        if ref == suffix or ref.endswith("." + suffix):
            return _tag(ref, suffix)
    return ref


def decode_document(raw: RawSample, opts: DecodeOptions) -> Document:
    """Raw sample -> Document, or ``SkipSample`` (pairs check, in order: no_image, missing_caption,
    caption_too_long (characters), then the image)."""
    record = read_json(raw)
    members = image_members(raw, opts.latents)
    key, url = raw["__key__"], raw.get("__url__", "")
    segments = None if record is None else record.get(opts.segments_field)
    if segments is None:
        if not members:
            raise SkipSample("no_image")
        caption = read_caption(raw, opts.caption_field, record)
        if opts.max_caption_chars and len(caption) > opts.max_caption_chars:
            raise SkipSample("caption_too_long")
        ext = members[""] if "" in members else members[sorted(members)[0]]
        return Document(key, [caption, _decode_member(raw, ext, opts)], [None], False, record, url)

    if not isinstance(segments, list):
        raise SkipSample("bad_document")
    out: list[str | Tensor] = []
    roles: list[str | None] = []
    for seg in segments:
        if not isinstance(seg, dict) or ("text" in seg) == ("image" in seg):
            raise SkipSample("bad_document")
        if "text" in seg:
            if not isinstance(seg["text"], str):
                raise SkipSample("bad_document")
            if seg["text"].strip():
                out.append(seg["text"])
            continue
        tag, role = _image_tag(seg["image"]), seg.get("role")
        if tag is None or tag not in members or (role is not None and role not in ROLES):
            raise SkipSample("bad_document")
        out.append(_decode_member(raw, members[tag], opts))
        roles.append(role)
    if not out:
        raise SkipSample("bad_document")
    return Document(key, out, roles, True, record, url)
