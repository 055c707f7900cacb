"""The sequence format: how documents of text and images become token sequences, shared by data, training and
generation (the contract beside ``transfusion/batch.py`` and the tokenizer; it imports nothing but them).

Special ids come from the tokenizer (BOS, EOS, BOI, EOI, IMG, PAD). P = patch_grid[0] * patch_grid[1] image slots::

    text -> image   BOS c a p t i o n BOI IMG*P EOI EOS      prompt: t2i_prompt_tokens(tok, caption) = BOS caption BOI
    dropped caption BOS BOI IMG*P EOI EOS                    the unconditional prompt: t2i_prompt_tokens(tok, "")
    image -> text   BOS BOI IMG*P EOI c a p t i o n EOS      prompt: caption_prompt_tokens(tok) = BOS BOI

Target rule (``next_token_targets``): token i predicts token i + 1, except on image slots, on BOI (its successor is an
image slot) and on the last token, which get IGNORE_INDEX. An image block is ``BOI IMG*P EOI`` (``block_length``),
plus ``BOI IMG*P`` for a hidden noisy copy. ``data_pipelines/samples.py`` builds ``Sequence``s from documents with
these rules; ``transfusion/generation/engine.py`` builds its prompts with the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from transfusion.batch import IGNORE_INDEX
from transfusion.tokenizer import Tokenizer


@dataclass(slots=True)
class Sequence:
    """One document: its tokens, next-token targets and image blocks (spans are [start, stop) in ``tokens``)."""

    key: str
    tokens: list[int]
    text_targets: list[int]
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)  # one [C, H, W] tensor per span
    image_is_target: list[bool] = field(default_factory=list)  # per image: generation target or conditioning
    image_noise_limit: list[float] = field(default_factory=list)  # per image: max share of the schedule; [] = 1.0
    positions: list[int] | None = None  # None = 0, 1, 2, ... (clean copies repeat positions)
    hidden_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, stop): hidden from later tokens
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.tokens)



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


def block_length(num_slots: int, clean_copy: bool) -> int:
    """Tokens of one image block: ``BOI IMG*P EOI``, plus ``BOI IMG*P`` for a noisy copy."""
    return num_slots + 2 + (num_slots + 1 if clean_copy else 0)
