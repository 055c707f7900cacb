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

Rows (``rows_to_batch``): the one place where Sequences become a ``[B, L]`` Batch. Training packs several documents
per row, right-padded (``data_pipelines/packing.py`` chooses which go together); the engine left-pads one prompt per
row so every prompt ends at the last column. Padding: ``pad_id``, doc id -1, image id -1, position 0, target
IGNORE_INDEX. Hidden spans get batch-unique ids in ``Batch.hidden_ids`` (None when the batch has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from transfusion.batch import IGNORE_INDEX, Batch
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


def never_text_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that are never sampled as text: PAD, BOS, the image placeholder and EOI (BOI is the caller's choice: it
    starts an image where images are allowed). EOS never is, even where a pretrained tokenizer pads with it."""
    never = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_id, tokenizer.eoi_id)
    return [i for i in never if i != tokenizer.eos_id]


def caption_prompt_tokens(tokenizer: Tokenizer) -> list[int]:
    """``[BOS][BOI]``: the prefix of a captioning document; the engine appends the image block and ``EOI``."""
    return [tokenizer.bos_id, tokenizer.boi_id]


def block_length(num_slots: int, clean_copy: bool) -> int:
    """Tokens of one image block: ``BOI IMG*P EOI``, plus ``BOI IMG*P`` for a noisy copy."""
    return num_slots + 2 + (num_slots + 1 if clean_copy else 0)


def rows_to_batch(rows: list[list[Sequence]], seq_len: int, pad_id: int, patch_grid: tuple[int, int], *,
                  num_rows: int | None = None, image_shape: tuple[int, int, int] | None = None,
                  latents: bool = False, left_pad: bool = False) -> Batch:
    """Lay out ``rows`` (documents per row, in order) as a Batch of ``num_rows`` (default: len(rows)) rows of
    ``seq_len``. Tokens and targets are gathered as flat lists and converted once (numpy converts lists ~4x faster
    than torch.tensor); the other grids are slice-filled. ``image_shape`` [C, H, W] shapes the empty ``images`` of an
    image-free batch; ``latents`` sets ``Batch.images_are_latents``."""
    B, L = num_rows if num_rows is not None else len(rows), seq_len
    grids = _RowGrids(B, L)
    for r in range(B):
        row = rows[r] if r < len(rows) else []
        total = sum(len(seq) for seq in row)
        if total > L:
            raise ValueError(f"row {r} holds {total} tokens, more than seq_len {L}")
        pad = L - total
        if left_pad:
            grids.pad(pad_id, pad)
        used = pad if left_pad else 0
        for d, seq in enumerate(row):
            grids.place(seq, r, d, used)
            used += len(seq)
        if not left_pad:
            grids.pad(pad_id, pad)
    return grids.batch(patch_grid, image_shape, latents)


class _RowGrids:
    """A Batch under construction (``rows_to_batch``): flat token / target lists filled left to right, [B, L] id and
    position grids filled by slices, and the per-image lists in the order images are met."""

    def __init__(self, B: int, L: int) -> None:
        self.B, self.L = B, L
        self.tokens: list[int] = []
        self.targets: list[int] = []
        self.doc_ids = np.full((B, L), -1, dtype=np.int64)
        self.image_ids = np.full((B, L), -1, dtype=np.int64)
        self.positions = np.zeros((B, L), dtype=np.int64)
        self.ramp = np.arange(L, dtype=np.int64)
        self.hidden: np.ndarray | None = None
        self.n_hidden = 0
        self.images, self.img_rows, self.starts, self.is_target, self.limits, self.keys = [], [], [], [], [], []

    def pad(self, pad_id: int, n: int) -> None:
        self.tokens += [pad_id] * n
        self.targets += [IGNORE_INDEX] * n

    def place(self, seq: Sequence, r: int, d: int, used: int) -> None:
        """Document ``d`` of row ``r`` at column ``used``: its tokens, ids, positions, images and hidden spans."""
        n = len(seq)
        self.tokens += seq.tokens
        self.targets += seq.text_targets
        self.doc_ids[r, used:used + n] = d
        self.positions[r, used:used + n] = self.ramp[:n] if seq.positions is None else seq.positions
        noise_limits = seq.image_noise_limit or [1.0] * len(seq.images)
        for (start, stop), image, target, limit in zip(seq.image_spans, seq.images, seq.image_is_target,
                                                       noise_limits, strict=True):
            self.image_ids[r, used + start: used + stop] = len(self.images)
            self.images.append(image)
            self.img_rows.append(r)
            self.starts.append(used + start)
            self.is_target.append(target)
            self.limits.append(limit)
        for start, stop in seq.hidden_spans:
            if self.hidden is None:
                self.hidden = np.full((self.B, self.L), -1, dtype=np.int64)
            self.hidden[r, used + start: used + stop] = self.n_hidden
            self.n_hidden += 1
        self.keys.append(seq.key)

    def grid(self, values: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=self.B * self.L).reshape(self.B, self.L))

    def batch(self, patch_grid: tuple[int, int], image_shape: tuple[int, int, int] | None, latents: bool) -> Batch:
        if self.images:
            images_NCHW = torch.stack(self.images)
        else:
            c, h, w = image_shape or (3, 0, 0)
            images_NCHW = torch.zeros((0, c, h, w))
        return Batch(tokens=self.grid(self.tokens), doc_ids=torch.from_numpy(self.doc_ids),
                     image_ids=torch.from_numpy(self.image_ids), positions=torch.from_numpy(self.positions),
                     text_targets=self.grid(self.targets), images=images_NCHW,
                     image_rows=torch.tensor(self.img_rows, dtype=torch.long),
                     image_starts=torch.tensor(self.starts, dtype=torch.long),
                     image_is_target=torch.tensor(self.is_target, dtype=torch.bool), patch_grid=tuple(patch_grid),
                     keys=self.keys, image_noise_limit=torch.tensor(self.limits, dtype=torch.float32),
                     hidden_ids=None if self.hidden is None else torch.from_numpy(self.hidden),
                     images_are_latents=latents)
