"""Greedy sequential packing of ``Sequence``s into fixed ``[batch_rows, seq_len]`` Batches, never cutting a document.

Documents go into the current row while they fit; the first one that does not fit opens the next row; when it does
not fit in the last row either, the batch is full (``Packer.add`` returns False) and that document starts the next
batch. Padding: ``pad_id`` tokens, doc id -1, image id -1, position 0, target IGNORE_INDEX.

Per image the batch also carries its noise limit (``Batch.image_noise_limit``, 1 = none); hidden spans (the noisy
copy of a clean-copied image) get batch-unique ids in ``Batch.hidden_ids`` (None when the batch has none), which the
attention mask uses to hide them from later tokens.

Legend: B rows, L seq_len, N images in the batch.
"""

from __future__ import annotations

import numpy as np
import torch

from transfusion.batch import IGNORE_INDEX, Batch
from transfusion.sequence import Sequence


class Packer:
    """Accumulates sequences for one batch. ``add(seq)`` returns False when ``seq`` does not fit in what is left;
    ``emit()`` builds the Batch and starts an empty one."""

    def __init__(self, seq_len: int, batch_rows: int, pad_id: int, patch_grid: tuple[int, int],
                 image_shape: tuple[int, int, int] | None = None, *, latents: bool = False) -> None:
        self.seq_len, self.batch_rows, self.pad_id = seq_len, batch_rows, pad_id
        self.patch_grid = tuple(patch_grid)
        self.image_shape = image_shape  # [C, H, W] used for the empty `images` tensor of an image-free batch
        self.latents = latents  # images are precomputed latents (Batch.images_are_latents)
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
        """The Batch of everything added since the last emit. Tokens and targets are gathered as flat lists and
        converted once (numpy converts lists ~4x faster than torch.tensor); the other grids are slice-filled."""
        B, L = self.batch_rows, self.seq_len
        tokens: list[int] = []
        targets: list[int] = []
        doc_ids = np.full((B, L), -1, dtype=np.int64)
        image_ids = np.full((B, L), -1, dtype=np.int64)
        positions = np.zeros((B, L), dtype=np.int64)
        ramp = np.arange(L, dtype=np.int64)
        hidden: np.ndarray | None = None
        n_hidden = 0
        images, rows, starts, is_target, limits, keys = [], [], [], [], [], []
        for r in range(B):
            row = self.rows[r] if r < len(self.rows) else []
            used = 0
            for d, seq in enumerate(row):
                n = len(seq)
                tokens += seq.tokens
                targets += seq.text_targets
                doc_ids[r, used:used + n] = d
                positions[r, used:used + n] = ramp[:n] if seq.positions is None else seq.positions
                noise_limits = seq.image_noise_limit or [1.0] * len(seq.images)
                for (start, stop), image, target, limit in zip(seq.image_spans, seq.images, seq.image_is_target,
                                                               noise_limits, strict=True):
                    image_ids[r, used + start: used + stop] = len(images)
                    images.append(image)
                    rows.append(r)
                    starts.append(used + start)
                    is_target.append(target)
                    limits.append(limit)
                for start, stop in seq.hidden_spans:
                    if hidden is None:
                        hidden = np.full((B, L), -1, dtype=np.int64)
                    hidden[r, used + start: used + stop] = n_hidden
                    n_hidden += 1
                keys.append(seq.key)
                used += n
            tokens += [self.pad_id] * (L - used)
            targets += [IGNORE_INDEX] * (L - used)

        def grid(values: list[int]) -> torch.Tensor:
            return torch.from_numpy(np.fromiter(values, dtype=np.int64, count=B * L).reshape(B, L))

        if images:
            images_NCHW = torch.stack(images)
        else:
            c, h, w = self.image_shape or (3, 0, 0)
            images_NCHW = torch.zeros((0, c, h, w))
        self.rows, self._used = [[]], 0
        return Batch(tokens=grid(tokens), doc_ids=torch.from_numpy(doc_ids), image_ids=torch.from_numpy(image_ids),
                     positions=torch.from_numpy(positions), text_targets=grid(targets), images=images_NCHW,
                     image_rows=torch.tensor(rows, dtype=torch.long),
                     image_starts=torch.tensor(starts, dtype=torch.long),
                     image_is_target=torch.tensor(is_target, dtype=torch.bool), patch_grid=self.patch_grid,
                     keys=keys, image_noise_limit=torch.tensor(limits, dtype=torch.float32),
                     hidden_ids=None if hidden is None else torch.from_numpy(hidden), images_are_latents=self.latents)


def pack_sequences(sequences: list[Sequence], seq_len: int, batch_rows: int, pad_id: int,
                   patch_grid: tuple[int, int], image_shape: tuple[int, int, int] | None = None) -> Batch:
    """Pack ``sequences`` greedily, in order, into one Batch; ValueError when they do not all fit."""
    packer = Packer(seq_len, batch_rows, pad_id, patch_grid, image_shape)
    for i, seq in enumerate(sequences):
        if not packer.add(seq):
            raise ValueError(f"sequence {i} ({seq.key!r}) does not fit in {batch_rows} rows of {seq_len} tokens")
    return packer.emit()
