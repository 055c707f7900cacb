"""What the server accepts and returns: request models with their limits, image decoding that refuses hostile input,
and PNG encoding of outputs. Everything here is pure (no engine, no HTTP), so it is tested on its own.

Two request shapes:
- ``GenerateRequest`` (``POST /v1/generate``): input ``segments`` (text, or a base64 PNG / JPEG) and the sampling
  options by name.
- ``ChatRequest`` (``POST /v1/chat/completions``): OpenAI's chat shape; content parts ``text`` and ``image_url``
  (data URIs). The models here are document models, not instruction-tuned: the parts of all messages are joined, in
  order, into one document prompt (roles are not rendered).
Unknown fields are refused (422); limits (``ServeLimits``) are checked before anything is queued.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor


class BadRequest(ValueError):
    """A request that is well-formed JSON of the right shape but cannot be served as asked (-> 400 / 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServeLimits:
    max_body_bytes: int = 8 * 2**20
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # text tokens a request may ask for
    max_output_images: int = 4
    max_input_images: int = 4
    max_image_side: int = 2048  # declared width / height of an uploaded image, checked before decoding
    max_steps: int = 250
    max_guidance: float = 20.0
    max_queue: int = 64  # requests waiting for a slot; beyond -> 429 with Retry-After
    max_batch: int = 16  # requests generating at once (the scheduler's slots)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Finite = Annotated[float, Field(allow_inf_nan=False)]
StopString = Annotated[str, Field(min_length=1, max_length=64)]


class Options(Strict):
    """Sampling options shared by both endpoints (bounds here are absolute; ``ServeLimits`` may be tighter)."""

    max_tokens: int = Field(64, ge=1, le=1 << 20)
    max_images: int = Field(1, ge=0, le=1 << 10)
    steps: int | None = Field(None, ge=1, le=1 << 20)
    guidance: Finite | None = Field(None, ge=0.0, le=1e6)
    guidance_schedule: Literal["constant", "linear", "interval"] | None = None
    sampler: Literal["ddim", "ddpm", "euler", "heun"] | None = None
    temperature: Finite = Field(0.0, ge=0.0, le=10.0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1 << 20)
    stop: list[StopString] = Field(default_factory=list, max_length=8)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    preview_every: int = Field(0, ge=0, le=1 << 20)
    start_with_image: bool = False  # close the prompt with BOI: the answer begins with an image
    ignore_eos: bool = False  # exactly max_tokens text tokens (benchmarks)
    stream: bool = False


class TextSegment(Strict):
    type: Literal["text"]
    text: str = Field(max_length=1 << 20)


class ImageSegment(Strict):
    type: Literal["image"]
    image: str = Field(description="base64 PNG or JPEG (a data URI is accepted too)")


class GenerateRequest(Options):
    segments: list[Annotated[Union[TextSegment, ImageSegment], Field(discriminator="type")]] = Field(
        min_length=1, max_length=256)


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str = Field(max_length=1 << 20)


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=1 << 20)] | Annotated[
        list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]], Field(max_length=256)]
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    """OpenAI chat completions; ``steps`` / ``guidance`` / ``max_images`` / ... ride along as extra body fields
    (the ``extra_body`` of OpenAI's client)."""

    model: str = "default"
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: Finite = Field(0.0, ge=0.0, le=10.0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: StopString | list[StopString] | None = Field(None, max_length=8)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions
    top_k: int = Field(0, ge=0, le=1 << 20)
    max_images: int = Field(1, ge=0, le=1 << 10)
    steps: int | None = Field(None, ge=1, le=1 << 20)
    guidance: Finite | None = Field(None, ge=0.0, le=1e6)
    guidance_schedule: Literal["constant", "linear", "interval"] | None = None
    sampler: Literal["ddim", "ddpm", "euler", "heun"] | None = None
    preview_every: int = Field(0, ge=0, le=1 << 20)
    start_with_image: bool = False
    ignore_eos: bool = False

    def options(self) -> Options:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Options(max_tokens=self.max_completion_tokens or self.max_tokens or 64, max_images=self.max_images,
                       steps=self.steps, guidance=self.guidance, guidance_schedule=self.guidance_schedule,
                       sampler=self.sampler, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       stop=stop, seed=self.seed or 0, preview_every=self.preview_every, stream=self.stream,
                       start_with_image=self.start_with_image, ignore_eos=self.ignore_eos)

    def segments(self) -> list[TextSegment | ImageSegment]:
        out: list[TextSegment | ImageSegment] = []
        for m in self.messages:
            parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            for part in parts:
                if isinstance(part, TextPart):
                    out.append(TextSegment(type="text", text=part.text))
                else:
                    out.append(ImageSegment(type="image", image=part.image_url.url))
        return out


def check_options(o: Options, limits: ServeLimits, samplers: tuple[str, ...]) -> None:
    """The server's limits on the options (beyond the models' absolute bounds)."""
    if o.max_tokens > limits.max_tokens:
        raise BadRequest(f"max_tokens {o.max_tokens} is above this server's limit {limits.max_tokens}")
    if o.max_images > limits.max_output_images:
        raise BadRequest(f"max_images {o.max_images} is above this server's limit {limits.max_output_images}")
    if o.steps is not None and o.steps > limits.max_steps:
        raise BadRequest(f"steps {o.steps} is above this server's limit {limits.max_steps}")
    if o.guidance is not None and o.guidance > limits.max_guidance:
        raise BadRequest(f"guidance {o.guidance} is above this server's limit {limits.max_guidance}")
    if o.start_with_image and o.max_images < 1:
        raise BadRequest("start_with_image needs max_images >= 1")
    if o.sampler is not None and o.sampler not in samplers:
        raise BadRequest(f"sampler {o.sampler!r} does not fit this model's objective (known: {', '.join(samplers)})")


# -- images ----------------------------------------------------------------------------------------------------------
def decode_image(data: str, size: tuple[int, int], limits: ServeLimits) -> np.ndarray:
    """base64 PNG / JPEG (or a ``data:image/...;base64,`` URI) -> RGB uint8 [H, W, 3] at the model's ``size``
    (H, W), resized if needed. The declared dimensions are checked before any pixel is decoded, so a decompression
    bomb is refused from its header. No torch here: torch's CPU pool belongs to the engine thread
    (``to_pixels`` runs there)."""
    from PIL import Image, UnidentifiedImageError

    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise BadRequest("image: only data:image/...;base64 URIs are accepted")
    if len(data) > limits.max_body_bytes * 4 // 3 + 4:
        raise BadRequest("image: larger than the body limit", status=413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format not in ("PNG", "JPEG", "MPO"):  # MPO: JPEG with the multi-picture extension (phones)
                raise BadRequest(f"image: format {img.format} is not accepted (PNG or JPEG)")
            w, h = img.size
            if max(w, h) > limits.max_image_side or min(w, h) < 1:
                raise BadRequest(f"image: {w}x{h} is outside 1..{limits.max_image_side} px per side", status=413)
            img = img.convert("RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BICUBIC)
            arr = np.array(img, dtype=np.uint8).reshape(size[0], size[1], 3)  # a writable copy
    except BadRequest:
        raise
    except Image.DecompressionBombError:  # PIL's own check, from the header, above ~179 Mpx
        raise BadRequest(f"image: declared size is outside 1..{limits.max_image_side} px per side", status=413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadRequest(f"image: cannot decode ({type(e).__name__})") from None
    return arr


def to_pixels(rgb_HW3: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] -> pixels [3, H, W] in [-1, 1] (what the engine reads)."""
    return torch.from_numpy(np.array(rgb_HW3, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1


def to_rgb(image_CHW: Tensor) -> np.ndarray:
    """Pixels [3, H, W] in [-1, 1] -> uint8 [H, W, 3] (what PNG encoding reads)."""
    return ((image_CHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def encode_png(rgb_HW3: np.ndarray, scale: int = 1) -> str:
    """uint8 [H, W, 3] -> base64 PNG (upscaled by ``scale`` with nearest neighbours)."""
    from PIL import Image

    img = Image.fromarray(rgb_HW3)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def png_payload(rgb_HW3: np.ndarray, **meta: Any) -> dict[str, Any]:
    return {"png": encode_png(rgb_HW3), "width": int(rgb_HW3.shape[1]), "height": int(rgb_HW3.shape[0]),
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in meta.items()}}
