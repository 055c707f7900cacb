"""Greedy sequential packing of ``Sequence``s into fixed ``[batch_rows, seq_len]`` Batches, never cutting a document.

Documents go into the current row while they fit; the first one that does not fit opens the next row; when it does
not fit in the last row either, the batch is full (``Packer.add`` returns False) and that document starts the next
batch. Padding: ``pad_id`` tokens, doc id -1, image id -1, position 0, target IGNORE_INDEX.

Legend: B rows, L seq_len, N images in the batch.
"""

from __future__ import annotations

import torch

from data_pipelines.samples import Sequence
from transfusion.batch import IGNORE_INDEX, Batch


class Packer:
    """Accumulates sequences for one batch. ``add(seq)`` returns False when ``seq`` does not fit in what is left;
    ``emit()`` builds the Batch and starts an empty one."""

    def __init__(self, seq_len: int, batch_rows: int, pad_id: int, patch_grid: tuple[int, int],
                 image_shape: tuple[int, int, int] | None = None) -> None:
        self.seq_len, self.batch_rows, self.pad_id = seq_len, batch_rows, pad_id
        self.patch_grid = tuple(patch_grid)
        self.image_shape = image_shape  # [C, H, W] used for the empty `images` tensor of an image-free batch
        self.rows: list[list[Sequence]] = [[]]
        self._used = 0  # tokens used in the current (last) row

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows)

    def add(self, seq: Sequence) -> bool:
        n = len(seq)
        if n > self.seq_len:
            raise ValueError(f"a sequence of {n} tokens cannot fit a row of {self.seq_len}")
        if self._used + n > self.seq_len:
            if len(self.rows) == self.batch_rows:
                return False
            self.rows.append([])
            self._used = 0
        self.rows[-1].append(seq)
        self._used += n
        return True

    def emit(self) -> Batch:
        B, L = self.batch_rows, self.seq_len
        tokens_BL = torch.full((B, L), self.pad_id, dtype=torch.long)
        doc_ids_BL = torch.full((B, L), -1, dtype=torch.long)
        image_ids_BL = torch.full((B, L), -1, dtype=torch.long)
        positions_BL = torch.zeros((B, L), dtype=torch.long)
        targets_BL = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        images, rows, starts, is_target, keys = [], [], [], [], []
        for r, row in enumerate(self.rows):
            offset = 0
            for d, seq in enumerate(row):
                n = len(seq)
                sl = slice(offset, offset + n)
                tokens_BL[r, sl] = torch.tensor(seq.tokens, dtype=torch.long)
                targets_BL[r, sl] = torch.tensor(seq.text_targets, dtype=torch.long)
                doc_ids_BL[r, sl] = d
                positions_BL[r, sl] = torch.arange(n)
                for (start, stop), image, target in zip(seq.image_spans, seq.images, seq.image_is_target, strict=True):
                    image_ids_BL[r, offset + start: offset + stop] = len(images)
                    images.append(image)
                    rows.append(r)
                    starts.append(offset + start)
                    is_target.append(target)
                keys.append(seq.key)
                offset += n
        if images:
            images_NCHW = torch.stack(images)
        else:
            c, h, w = self.image_shape or (3, 0, 0)
            images_NCHW = torch.zeros((0, c, h, w))
        self.rows, self._used = [[]], 0
        return Batch(tokens=tokens_BL, doc_ids=doc_ids_BL, image_ids=image_ids_BL, positions=positions_BL,
                     text_targets=targets_BL, images=images_NCHW, image_rows=torch.tensor(rows, dtype=torch.long),
                     image_starts=torch.tensor(starts, dtype=torch.long),
                     image_is_target=torch.tensor(is_target, dtype=torch.bool), patch_grid=self.patch_grid,
                     keys=keys)


def pack_sequences(sequences: list[Sequence], seq_len: int, batch_rows: int, pad_id: int,
                   patch_grid: tuple[int, int], image_shape: tuple[int, int, int] | None = None) -> Batch:
    """Pack ``sequences`` greedily, in order, into one Batch; ValueError when they do not all fit."""
    packer = Packer(seq_len, batch_rows, pad_id, patch_grid, image_shape)
    for i, seq in enumerate(sequences):
        if not packer.add(seq):
            raise ValueError(f"sequence {i} ({seq.key!r}) does not fit in {batch_rows} rows of {seq_len} tokens")
    return packer.emit()
