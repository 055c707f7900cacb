"""What the server accepts and returns: request models with their limits, image decoding that refuses hostile input,
and PNG encoding of outputs. Everything here is pure (no engine, no HTTP), so it is tested on its own.

Two request shapes:
- ``GenerateRequest`` (``POST /v1/generate``): input ``segments`` (text, or a base64 PNG / JPEG) and the sampling
  options by name.
- ``ChatRequest`` (``POST /v1/chat/completions``): OpenAI's chat shape; content parts ``text`` and ``image_url``
  (data URIs). The models here are document models, not instruction-tuned: the parts of all messages are joined, in
  order, into one document prompt (roles are not rendered).
Unknown fields are refused (422), and so is a value of another JSON type than the one declared (strict: ``"stream": 0``
is not false, ``"5"`` is not 5); the two conversions JSON itself implies are kept: an integer where a number is
declared, and an integral number (``5.0``) where an integer is (JSON Schema counts it as one). Limits
(``ServeLimits``) are checked before anything is queued. A request without ``seed`` gets a fresh one (``fresh_seed``),
returned with the answer so that it can be replayed.

The response models (``GenerateResponse``, ``ChatCompletion``, the SSE events, ``ErrorBody``) are what the OpenAPI
schema documents; ``tools/fuzz_serve.py`` checks the server's answers against them.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
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
    """Request models: unknown fields and values of another JSON type than declared are refused (422)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    """5.0 -> 5 (JSON Schema's integer includes integral numbers); anything else is left to strict validation."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**64 else value


def _int(low: int, high: int, description: str | None = None) -> Any:
    """A strict integer in [low, high] that also takes an integral number (5.0). The bounds come before the
    validator: after it, pydantic's JSON schema would drop them (found by tools/fuzz_serve.py)."""
    return Annotated[int, Field(ge=low, le=high, description=description), BeforeValidator(_integral)]


Tokens = _int(1, 1 << 20)  # max_tokens, steps
Count = _int(0, 1 << 20)  # top_k, preview_every
ImageCount = _int(0, 1 << 10)
# Seeds stop at 2**53 - 1: the largest integer every JSON client holds exactly (JavaScript's Number.MAX_SAFE_INTEGER),
# so a returned seed replays from any client; and FastAPI writes schema bounds as floats, exact only up to 2**53
# (2**63 - 1 was documented as 2**63, one above what was accepted: found by tools/fuzz_serve.py).
SEED_MAX = 2**53 - 1
Seed = _int(0, SEED_MAX, "the request's random seed; absent or null: a fresh one, returned in the answer")
Finite = Annotated[float, Field(allow_inf_nan=False)]
StopString = Annotated[str, Field(min_length=1, max_length=64)]


def fresh_seed() -> int:
    """A seed for a request that named none, from the OS's entropy (two unseeded requests differ)."""
    return secrets.randbits(53)


# a valid 8x8 PNG, for the schema's examples
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8oaHBgA0wMeAAg1MCAOA4ASjhBhuDAAAAAElFTkSuQmCC"


class Options(Strict):
    """Sampling options shared by both endpoints (bounds here are absolute; ``ServeLimits`` may be tighter)."""

    max_tokens: Tokens = 64
    max_images: ImageCount = 1
    steps: Tokens | None = None
    guidance: Finite | None = Field(None, ge=0.0, le=1e6)
    guidance_schedule: Literal["constant", "linear", "interval"] | None = None
    sampler: Literal["ddim", "ddpm", "euler", "heun"] | None = None
    temperature: Finite = Field(0.0, ge=0.0, le=10.0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    top_k: Count = 0
    stop: list[StopString] = Field(default_factory=list, max_length=8)
    seed: Seed | None = None
    preview_every: Count = 0
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
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"segments": [{"type": "text", "text": "a red circle to the left of a blue square"}], "start_with_image": True,
         "max_images": 1, "max_tokens": 16, "steps": 20, "guidance": 2.0, "seed": 1},
        {"segments": [{"type": "text", "text": "two green triangles"}], "max_tokens": 32, "temperature": 0.8,
         "top_p": 0.9, "max_images": 0, "stream": True},
        {"segments": [{"type": "image", "image": EXAMPLE_PNG}, {"type": "text", "text": "this is"}], "max_tokens": 24,
         "max_images": 0}]})

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

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "default", "messages": [{"role": "user", "content": "a red circle"}], "max_tokens": 16,
         "max_images": 0},
        {"model": "default", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "two green triangles"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + EXAMPLE_PNG}}]}],
         "start_with_image": True, "steps": 20, "max_tokens": 8, "seed": 7, "stream": True,
         "stream_options": {"include_usage": True}}]})

    model: str = "default"
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: Finite = Field(0.0, ge=0.0, le=10.0)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    n: _int(1, 1) = 1
    stop: StopString | Annotated[list[StopString], Field(max_length=8)] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions
    top_k: Count = 0
    max_images: ImageCount = 1
    steps: Tokens | None = None
    guidance: Finite | None = Field(None, ge=0.0, le=1e6)
    guidance_schedule: Literal["constant", "linear", "interval"] | None = None
    sampler: Literal["ddim", "ddpm", "euler", "heun"] | None = None
    preview_every: Count = 0
    start_with_image: bool = False
    ignore_eos: bool = False

    def options(self) -> Options:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Options(max_tokens=self.max_completion_tokens or self.max_tokens or 64, max_images=self.max_images,
                       steps=self.steps, guidance=self.guidance, guidance_schedule=self.guidance_schedule,
                       sampler=self.sampler, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       stop=stop, seed=self.seed, preview_every=self.preview_every, stream=self.stream,
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


# -- answers (documented in the OpenAPI schema; extra fields may be added, so these models allow them) ---------------
class ErrorDetail(BaseModel):
    loc: list[str] = Field(description="where in the request body (field names and list indices)")
    msg: str
    type: str


class ErrorInfo(BaseModel):
    message: str
    code: int = Field(description="the HTTP status")
    detail: list[ErrorDetail] | None = Field(None, description="422 only: every problem found (at most 20)")


class ErrorBody(BaseModel):
    """Every error answer (4xx / 5xx): one JSON object; the request is never echoed."""

    error: ErrorInfo


FinishReason = Literal["eos", "stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    tokens: int = Field(description="text tokens generated")
    images: int = Field(description="images generated")
    finish_reason: FinishReason
    seconds: float = Field(description="submission to finish")
    time_to_first_token: float | None = None


class TextOutput(BaseModel):
    type: Literal["text"]
    text: str


class ImageOutput(BaseModel):
    type: Literal["image"]
    png: str = Field(description="base64 PNG")
    width: int
    height: int
    index: int = Field(description="0 for the first image of the answer")
    seconds: float | None = Field(description="image_start to image")


class GenerateResponse(BaseModel):
    id: str
    output: list[Annotated[Union[TextOutput, ImageOutput], Field(discriminator="type")]]
    finish_reason: FinishReason
    usage: Usage
    seed: int = Field(description="the seed it ran with (the request's, or a fresh one): send it to replay")


class StreamText(BaseModel):
    text: str


class StreamImageStart(BaseModel):
    index: int
    passes: int


class StreamPreview(BaseModel):
    png: str
    width: int
    height: int
    pass_: int = Field(alias="pass")
    passes: int


class StreamImage(BaseModel):
    png: str
    width: int
    height: int
    index: int
    seconds: float | None


class StreamDone(BaseModel):
    id: str
    finish_reason: FinishReason
    usage: Usage
    seed: int


class StreamError(BaseModel):
    """The last event of a stream that could not finish: the engine failed (code 500) or the server shut down
    (503)."""

    error: str
    code: int


GENERATE_EVENTS: dict[str, type[BaseModel]] = {"text": StreamText, "image_start": StreamImageStart,
                                               "preview": StreamPreview, "image": StreamImage, "done": StreamDone,
                                               "error": StreamError}


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    images: int
    seconds: float


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    seed: int = Field(description="the seed it ran with (the request's, or a fresh one): send it to replay")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | list[ImagePart] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """One SSE ``data:`` line of a streamed chat; the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: ChatUsage | None = None
    seed: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    aliases: list[str]
    image_size: list[int]
    max_batch: int
    samplers: list[str]
    default_steps: int
    default_guidance: float


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "draining", "engine stopped"]
    queued: int
    running: int
    model: str
    error: str | None = None


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


def image_payload(event: Any) -> dict[str, Any]:
    """A scheduler ``image`` or ``preview`` event (``.kind``, ``.data``) as PNG (base64) with its size and where it
    stands: the image's index and seconds, or the preview's pass of passes."""
    d = event.data
    if event.kind == "preview":
        return png_payload(d["image"], **{"pass": d["pass"], "passes": d["passes"]})
    return png_payload(d["image"], index=d["index"], seconds=round(d["seconds"], 4))
