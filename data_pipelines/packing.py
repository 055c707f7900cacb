"""Packing of ``Sequence``s into fixed ``[batch_rows, seq_len]`` Batches, never cutting a document.

Two policies (``data.packing``), both online and in stream order, so a batch is a pure function of where in the
stream it starts (the loader's resume point):

- ``first_fit`` (default): a document goes into the first row of the batch with room for it, else opens a new row.
- ``sequential``: a document goes into the last row while it fits, else opens a new row (earlier rows are closed).

When no row has room and all ``batch_rows`` are open, the batch is full (``Packer.add`` returns False) and that
document starts the next batch. With documents of 76-116 tokens in rows of 256 (the v3 latent recipe), first fit
fills 83 % of the token slots where sequential fills 73 % (tools/bench_step.py's "useful tokens": 1.10x the document
tokens per second at the same step time; README, "Precision and CPU speed"). The rows become a Batch in
``transfusion.sequence.rows_to_batch`` (padding, image placement, noise limits, hidden-span ids), the one row builder that the engine and the tests use too.

Legend: B rows, L seq_len, N images in the batch.
"""

from __future__ import annotations

from transfusion.batch import Batch
from transfusion.sequence import Sequence, rows_to_batch

PACKING_POLICIES = ("first_fit", "sequential")


class Packer:
    """Accumulates sequences for one batch. ``add(seq)`` returns False when ``seq`` does not fit in what is left;
    ``emit()`` builds the Batch and starts an empty one."""

    def __init__(self, seq_len: int, batch_rows: int, pad_id: int, patch_grid: tuple[int, int],
                 image_shape: tuple[int, int, int] | None = None, *, latents: bool = False,
                 policy: str = "first_fit") -> None:
        if policy not in PACKING_POLICIES:
            raise ValueError(f"unknown packing policy {policy!r}; expected one of {PACKING_POLICIES}")
        self.seq_len, self.batch_rows, self.pad_id = seq_len, batch_rows, pad_id
        self.first_fit = policy == "first_fit"
        self.patch_grid = tuple(patch_grid)
        self.image_shape = image_shape  # [C, H, W] used for the empty `images` tensor of an image-free batch
        self.latents = latents  # images are precomputed latents (Batch.images_are_latents)
        self.rows: list[list[Sequence]] = [[]]
        self._used = [0]  # tokens used per row

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows)

    def add(self, seq: Sequence) -> bool:
        n = len(seq)
        if n > self.seq_len:
            raise ValueError(f"a sequence of {n} tokens cannot fit a row of {self.seq_len}")
        candidates = range(len(self.rows)) if self.first_fit else (len(self.rows) - 1,)
        row = next((i for i in candidates if self._used[i] + n <= self.seq_len), None)
        if row is None:
            if len(self.rows) == self.batch_rows:
                return False
            self.rows.append([])
            self._used.append(0)
            row = len(self.rows) - 1
        self.rows[row].append(seq)
        self._used[row] += n
        return True

    def emit(self) -> Batch:
        """The Batch of everything added since the last emit (laid out by ``transfusion.sequence.rows_to_batch``)."""
        batch = rows_to_batch(self.rows, self.seq_len, self.pad_id, self.patch_grid, num_rows=self.batch_rows,
                              image_shape=self.image_shape, latents=self.latents)
        self.rows, self._used = [[]], [0]
        return batch


def pack_sequences(sequences: list[Sequence], seq_len: int, batch_rows: int, pad_id: int,
                   patch_grid: tuple[int, int], image_shape: tuple[int, int, int] | None = None,
                   policy: str = "first_fit") -> Batch:
    """Pack ``sequences``, in order, into one Batch; ValueError when they do not all fit."""
    packer = Packer(seq_len, batch_rows, pad_id, patch_grid, image_shape, policy=policy)
    for i, seq in enumerate(sequences):
        if not packer.add(seq):
            raise ValueError(f"sequence {i} ({seq.key!r}) does not fit in {batch_rows} rows of {seq_len} tokens")
    return packer.emit()
