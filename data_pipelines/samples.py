"""Decoded samples -> token ``Sequence``s: layout choice, caption dropout and next-token targets.

Two layouts of one (image, caption) pair, P = patch_grid[0] * patch_grid[1] image slots:

    text -> image   BOS c a p t i o n BOI IMG*P EOI EOS      image is a generation target (noised, diffusion loss)
    dropped caption BOS BOI IMG*P EOI EOS                    text -> image with the caption removed (for CFG)
    image -> text   BOS BOI IMG*P EOI c a p t i o n EOS      image is conditioning only (clean)

Text targets (``transfusion/batch.py``): token i predicts token i + 1, except on image slots, on BOI (its successor
is an image slot) and on the last token of the document, which get IGNORE_INDEX. So in text -> image the last
caption token predicts BOI and EOI predicts EOS; in image -> text BOS predicts BOI and EOI predicts the first
caption token.

The layout and dropout decisions are a pure function of (seed, epoch, key) through a stable hash, so a resumed stream
reproduces them without any RNG state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from torch import Tensor

from transfusion.batch import IGNORE_INDEX
from transfusion.tokenizer import Tokenizer

T2I = "t2i"
CAPTION = "caption"


@dataclass(slots=True)
class Sequence:
    """One document: its tokens, next-token targets and image blocks (spans are [start, stop) in ``tokens``)."""

    key: str
    tokens: list[int]
    text_targets: list[int]
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)  # one [C, H, W] tensor per span
    image_is_target: list[bool] = field(default_factory=list)  # per image: generation target or conditioning

    def __len__(self) -> int:
        return len(self.tokens)


def stable_uniforms(*parts: object, n: int = 2) -> list[float]:
    """``n`` uniforms in [0, 1) from a blake2b hash of ``parts`` (identical on every machine and Python version)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8 * n).digest()
    return [int.from_bytes(digest[8 * i: 8 * i + 8], "little") / 2.0**64 for i in range(n)]


def choose_layout(seed: int, epoch: int, key: str, t2i_ratio: float, caption_dropout: float) -> tuple[str, bool]:
    """(layout, drop_caption) for one sample: ``T2I`` with probability ``t2i_ratio``, else ``CAPTION``; a T2I
    sample drops its caption with probability ``caption_dropout``."""
    u_layout, u_drop = stable_uniforms("layout", seed, epoch, key)
    layout = T2I if u_layout < t2i_ratio else CAPTION
    return layout, layout == T2I and u_drop < caption_dropout


def next_token_targets(tokens: list[int], is_image_slot: list[bool], boi_id: int) -> list[int]:
    """Targets for one document: ``tokens[i + 1]``, or IGNORE_INDEX on image slots, on BOI and on the last token."""
    targets = tokens[1:] + [IGNORE_INDEX]
    for i, tok in enumerate(tokens):
        if is_image_slot[i] or tok == boi_id:
            targets[i] = IGNORE_INDEX
    return targets


def t2i_prompt_tokens(tokenizer: Tokenizer, caption: str | list[int]) -> list[int]:
    """``[BOS] caption [BOI]``: the prefix after which a text -> image generation starts denoising ("" or [] gives
    the unconditional prefix ``[BOS][BOI]``, the dropped-caption layout)."""
    ids = tokenizer.encode(caption) if isinstance(caption, str) else list(caption)
    return [tokenizer.bos_id, *ids, tokenizer.boi_id]


def caption_prompt_tokens(tokenizer: Tokenizer) -> list[int]:
    """``[BOS][BOI]``: the prefix of a captioning document; the engine appends the image block and ``EOI``."""
    return [tokenizer.bos_id, tokenizer.boi_id]


def build_sequence(tokenizer: Tokenizer, key: str, image: Tensor, caption_ids: list[int], *,
                   patch_grid: tuple[int, int], layout: str, drop_caption: bool = False) -> Sequence:
    """One (image, caption) document in the given layout (see the module docstring)."""
    num_slots = patch_grid[0] * patch_grid[1]
    block = [tokenizer.image_id] * num_slots
    if layout == T2I:
        head = t2i_prompt_tokens(tokenizer, [] if drop_caption else caption_ids)
        tail = [tokenizer.eoi_id, tokenizer.eos_id]
    elif layout == CAPTION:
        head = caption_prompt_tokens(tokenizer)
        tail = [tokenizer.eoi_id, *caption_ids, tokenizer.eos_id]
    else:
        raise ValueError(f"unknown layout {layout!r} (expected {T2I!r} or {CAPTION!r})")
    tokens = head + block + tail
    span = (len(head), len(head) + num_slots)
    is_slot = [span[0] <= i < span[1] for i in range(len(tokens))]
    return Sequence(key=key, tokens=tokens, text_targets=next_token_targets(tokens, is_slot, tokenizer.boi_id),
                    image_spans=[span], images=[image], image_is_target=[layout == T2I])


@dataclass(slots=True)
class SequenceBuilder:
    """Applies the configured layout mix: ``builder(key, image, caption_ids, epoch) -> Sequence``."""

    tokenizer: Tokenizer
    patch_grid: tuple[int, int]
    seed: int
    t2i_ratio: float = 0.8
    caption_dropout: float = 0.1

    def __call__(self, key: str, image: Tensor, caption_ids: list[int], epoch: int) -> Sequence:
        layout, drop = choose_layout(self.seed, epoch, key, self.t2i_ratio, self.caption_dropout)
        return build_sequence(self.tokenizer, key, image, caption_ids, patch_grid=self.patch_grid, layout=layout,
                              drop_caption=drop)

    @property
    def min_length(self) -> int:
        """Tokens of the shortest document (dropped caption): BOS BOI IMG*P EOI EOS."""
        return self.patch_grid[0] * self.patch_grid[1] + 4
