"""Documents -> token ``Sequence``s: layout choice, caption dropout, image roles, noise limits, clean copies,
next-token targets and truncation.

Two layouts of one (image, caption) pair, P = patch_grid[0] * patch_grid[1] image slots:

    text -> image   BOS c a p t i o n BOI IMG*P EOI EOS      image is a generation target (noised, diffusion loss)
    dropped caption BOS BOI IMG*P EOI EOS                    text -> image with the caption removed (for CFG)
    image -> text   BOS BOI IMG*P EOI c a p t i o n EOS      image role: data.image_then_text_role

An interleaved document keeps its segment order: ``BOS text BOI IMG*P EOI text BOI IMG*P EOI ... EOS``. Each image
is a generation *target* (noised, diffusion loss) or *conditioning* (clean, t = 0, no image loss): the role given
in the data wins; otherwise an image with text after it takes ``data.image_then_text_role`` and the others are
targets.

Noise limit (Transfusion, section 4.3): for a share ``data.noise_limit_share`` of documents (a stable hash of seed,
epoch and key), every target image with text after it is noised at most to ``data.noise_limit`` of the schedule
(the paper: t <= 500 of 1000 for 80% of captioning samples), so the text learns from a recognisable image. An image
given a clean copy is not limited: the text after it sees the clean copy.

Clean copy (``data.clean_copy``): a target image with text after it is written twice. The noisy copy ``BOI IMG*P``
is hidden from every later token (``Sequence.hidden_spans`` -> ``Batch.hidden_ids`` -> the attention mask); the
clean copy ``BOI IMG*P EOI`` (conditioning) follows with the *same positions*, so later text sees exactly what it
sees at inference, where the engine appends the finished clean image:

    tokens     t  BOI n n n n  BOI c c c c EOI t        n: noisy copy (target, hidden)   c: clean copy
    positions  4  5   6 7 8 9  5   6 7 8 9 10  11

Text targets (``transfusion/batch.py``): token i predicts token i + 1, except on image slots, on BOI (its successor
is an image slot), on hidden tokens and on the last token of the document, which get IGNORE_INDEX.

Documents longer than a row: pairs are skipped (``too_long_for_row``); interleaved documents are cut before the first
image block that does not fit, or inside a text segment at a token (``data.long_documents = "truncate"``, counted
as ``truncated``; a cut document has no EOS), or skipped (``"skip"``). An image block is never cut.

Every decision is a pure function of (seed, epoch, key) through a stable hash, so a resumed stream reproduces them
without any RNG state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import Tensor

from data_pipelines.documents import Document
from data_pipelines.errors import SkipSample
from transfusion.batch import IGNORE_INDEX
from transfusion.sequence import Sequence, block_length
from transfusion.tokenizer import Tokenizer

T2I = "t2i"
CAPTION = "caption"
TARGET, CONDITION = "target", "condition"
LONG_DOCUMENT_POLICIES = ("truncate", "skip")


@dataclass(slots=True)
class ImageSegment:
    """One image of a document being assembled."""

    image: Tensor
    target: bool
    noise_limit: float = 1.0
    clean_copy: bool = False


Segment = list[int] | ImageSegment  # text ids, or an image


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


def assemble(tokenizer: Tokenizer, key: str, parts: list[Segment], *, patch_grid: tuple[int, int],
             max_len: int | None = None) -> Sequence:
    """``BOS parts... EOS`` as a Sequence (see the module docstring). With ``max_len``, assembly stops at the first
    image block that does not fit, or cuts a text part at a token; a cut sequence has no EOS and ``truncated``."""
    num_slots = patch_grid[0] * patch_grid[1]
    boi, eoi, img = tokenizer.boi_id, tokenizer.eoi_id, tokenizer.image_id
    tokens, positions = [tokenizer.bos_id], [0]
    text_has_boi = False
    seq = Sequence(key=key, tokens=tokens, text_targets=[])
    limit = max_len if max_len is not None else 1 << 62
    for part in parts:
        room = limit - len(tokens)
        if isinstance(part, ImageSegment):
            if block_length(num_slots, part.clean_copy) > room:
                seq.truncated = True
                break
            pos = positions[-1] + 1
            block_pos = list(range(pos, pos + num_slots + 1))
            if part.clean_copy:  # noisy target copy, hidden from later tokens; then the clean copy, same positions
                seq.hidden_spans.append((len(tokens), len(tokens) + num_slots + 1))
                _add_image(seq, len(tokens) + 1, part.image, True, part.noise_limit, num_slots)
                tokens += [boi] + [img] * num_slots
                positions += block_pos
                _add_image(seq, len(tokens) + 1, part.image, False, 1.0, num_slots)
            else:
                _add_image(seq, len(tokens) + 1, part.image, part.target, part.noise_limit, num_slots)
            tokens += [boi] + [img] * num_slots + [eoi]
            positions += block_pos + [pos + num_slots + 1]
        else:
            ids = part
            if len(ids) > room:
                ids, seq.truncated = ids[:room], True
            tokens += ids
            positions += range(positions[-1] + 1, positions[-1] + 1 + len(ids))
            text_has_boi = text_has_boi or boi in ids
            if seq.truncated:
                break
    if not seq.truncated:
        if len(tokens) < limit:
            tokens.append(tokenizer.eos_id)
            positions.append(positions[-1] + 1)
        else:
            seq.truncated = True
    # next_token_targets(tokens, is_slot, boi), by slices: every BOI precedes an image span
    targets = tokens[1:] + [IGNORE_INDEX]
    for start, stop in seq.image_spans:
        targets[start - 1:stop] = [IGNORE_INDEX] * (stop - start + 1)
    for start, stop in seq.hidden_spans:
        targets[start:stop] = [IGNORE_INDEX] * (stop - start)
    if text_has_boi:  # a tokenizer that maps some text to the BOI id: ignore it like any BOI
        targets = [IGNORE_INDEX if t == boi else g for t, g in zip(tokens, targets)]
    seq.text_targets = targets
    if seq.hidden_spans:
        seq.positions = positions
    return seq


def _add_image(seq: Sequence, start: int, image: Tensor, target: bool, noise_limit: float, num_slots: int) -> None:
    seq.image_spans.append((start, start + num_slots))
    seq.images.append(image)
    seq.image_is_target.append(target)
    seq.image_noise_limit.append(noise_limit)


def build_sequence(tokenizer: Tokenizer, key: str, image: Tensor, caption_ids: list[int], *,
                   patch_grid: tuple[int, int], layout: str, drop_caption: bool = False,
                   caption_image: ImageSegment | None = None) -> Sequence:
    """One (image, caption) document in the given layout (see the module docstring). ``caption_image`` overrides
    the image part of the image -> text layout (default: conditioning, clean)."""
    if layout == T2I:
        parts: list[Segment] = [[] if drop_caption else list(caption_ids), ImageSegment(image, True)]
    elif layout == CAPTION:
        parts = [caption_image or ImageSegment(image, False), list(caption_ids)]
    else:
        raise ValueError(f"unknown layout {layout!r} (expected {T2I!r} or {CAPTION!r})")
    return assemble(tokenizer, key, parts, patch_grid=patch_grid)


class _Lazy:
    """A boolean computed on first use (the noise-limit hash is only needed for some documents)."""

    __slots__ = ("fn", "value")

    def __init__(self, fn) -> None:
        self.fn, self.value = fn, None

    def __call__(self) -> bool:
        if self.value is None:
            self.value = bool(self.fn())
        return self.value


@dataclass(slots=True)
class SequenceBuilder:
    """Applies the configured layout mix and image policies: ``builder(document, epoch) -> Sequence`` or
    ``SkipSample`` (``caption_too_long``, ``too_long_for_row``)."""

    tokenizer: Tokenizer
    patch_grid: tuple[int, int]
    seed: int
    t2i_ratio: float = 0.8
    caption_dropout: float = 0.1
    max_text_tokens: int | None = None  # pairs: longer captions are skipped
    seq_len: int | None = None  # documents must fit one row
    long_documents: str = "truncate"  # interleaved documents longer than a row: "truncate" or "skip"
    image_then_text_role: str = CONDITION  # role of an image with text after it, when the data names none
    noise_limit: float = 1.0  # max share of the noise schedule for limited images
    noise_limit_share: float = 0.0  # share of documents whose target images with text after them are limited
    clean_copy: bool = False

    @classmethod
    def from_config(cls, cfg, tokenizer: Tokenizer, patch_grid: tuple[int, int], seed: int) -> "SequenceBuilder":
        return cls(tokenizer, tuple(patch_grid), seed, t2i_ratio=cfg.t2i_ratio, caption_dropout=cfg.caption_dropout,
                   max_text_tokens=cfg.max_text_tokens, seq_len=cfg.seq_len, long_documents=cfg.long_documents,
                   image_then_text_role=cfg.image_then_text_role, noise_limit=cfg.noise_limit,
                   noise_limit_share=cfg.noise_limit_share, clean_copy=cfg.clean_copy)

    def _image(self, image: Tensor, role: str | None, text_after: bool, limited: "_Lazy") -> ImageSegment:
        role = role or (self.image_then_text_role if text_after else TARGET)
        target = role == TARGET
        clean_copy = self.clean_copy and target and text_after
        # the noise limit exists so that later text learns from a recognisable image; with a clean copy the later
        # text sees the clean image, so the (hidden) noisy copy keeps the whole schedule
        limit = self.noise_limit if target and text_after and not clean_copy and limited() else 1.0
        return ImageSegment(image, target, limit, clean_copy=clean_copy)

    def __call__(self, doc: Document, epoch: int) -> Sequence:
        limited = _Lazy(lambda: self.noise_limit < 1.0 and self.noise_limit_share > 0.0 and
                        stable_uniforms("noise_limit", self.seed, epoch, doc.key, n=1)[0] < self.noise_limit_share)
        if not doc.interleaved:
            caption, image = doc.segments
            ids = self.tokenizer.encode(caption)
            if self.max_text_tokens is not None and len(ids) > self.max_text_tokens:
                raise SkipSample("caption_too_long")
            layout, drop = choose_layout(self.seed, epoch, doc.key, self.t2i_ratio, self.caption_dropout)
            part = self._image(image, doc.roles[0] if doc.roles else None, True, limited) if layout == CAPTION \
                else None
            seq = build_sequence(self.tokenizer, doc.key, image, ids, patch_grid=self.patch_grid, layout=layout,
                                 drop_caption=drop, caption_image=part)
            if self.seq_len is not None and len(seq) > self.seq_len:
                raise SkipSample("too_long_for_row")
            return seq

        parts: list[Segment] = []
        roles = iter(doc.roles)
        is_text = [isinstance(s, str) for s in doc.segments]
        text_after = [any(is_text[i + 1:]) for i in range(len(is_text))]
        for i, segment in enumerate(doc.segments):
            if is_text[i]:
                parts.append(self.tokenizer.encode(segment))
            else:
                parts.append(self._image(segment, next(roles, None), text_after[i], limited))
        truncate = self.long_documents == "truncate"
        seq = assemble(self.tokenizer, doc.key, parts, patch_grid=self.patch_grid,
                       max_len=self.seq_len if truncate else None)
        if self.seq_len is not None and len(seq) > self.seq_len:
            raise SkipSample("too_long_for_row")
        if seq.truncated and not (any(seq.image_is_target) or any(t != IGNORE_INDEX for t in seq.text_targets)):
            raise SkipSample("too_long_for_row")  # nothing left to learn from
        return seq

    @property
    def min_length(self) -> int:
        """Tokens of the shortest document (dropped caption): BOS BOI IMG*P EOI EOS."""
        return self.patch_grid[0] * self.patch_grid[1] + 4
