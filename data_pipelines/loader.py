"""The training data loader: shards -> decoded samples -> Sequences -> packed Batches, exactly resumable.

    loader = build_loader(cfg.data, tokenizer, patch_grid, seed=cfg.run.seed, rank=rank, world_size=world)
    for batch in loader: ...                       # one Batch per micro-step (DataLoader batch_size=None)
    state = loader.state_dict()                    # save with the checkpoint
    loader.load_state_dict(state)                  # on a freshly built loader: the next batches are identical
    data_counts(state)                             # {"seen": ..., "bad_image": ..., "skipped": ...} for logging

Exactness with packing: a batch is emitted when the next document does not fit, so that document is carried into
the following batch. The state saved with a batch therefore points at the stream position *before* the carried
document (the first sample not yet emitted in a batch); nothing buffered is stored, the carried document is simply
read again after a resume.

Pixels or latents by configuration alone (``data.format``): ``"pixels"`` decodes image members, ``"latents"`` reads
``<key>.latent.npy`` / ``.safetensors`` members written by ``tools/precompute_latents.py``, ``"auto"`` peeks at the
first sample of the first readable shard when the dataset is built (in the main process, so every worker agrees).
Latent batches carry ``Batch.images_are_latents = True``: the trainer uses them as they are, never re-encodes.

Skip accounting: every worker keeps cumulative per-reason counts (``errors.COUNT_KEYS``) inside its dataset state,
so they travel with ``loader.state_dict()`` (and survive resumes); ``data_counts(loader.state_dict())`` sums them over
this rank's workers. A worker raises ``DataError`` once it has seen ``MIN_SAMPLES_FOR_SKIP_RATE`` samples and more
than ``cfg.max_skip_rate`` of them were skipped (1.0 disables the check).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipelines.documents import (DecodeOptions, RawSample, check_caption_field, decode_document,
                                      decode_latent_member, has_latents)
from data_pipelines.errors import COUNT_KEYS, SAMPLE_SKIP_REASONS, DataError, ShardSpecError, SkipSample
from data_pipelines.packing import Packer
from data_pipelines.samples import SequenceBuilder
from data_pipelines.shards import ShardStream, expand_shard_spec, iter_decoded_samples, peek_first_sample
from transfusion.batch import Batch
from transfusion.config import DataConfig
from transfusion.sequence import Sequence
from transfusion.tokenizer import Tokenizer

__all__ = ["PackedDataset", "build_loader", "data_counts", "DataError", "ShardSpecError", "iter_decoded_samples"]

STATE_FORMAT = "transfusion.packed_dataset/1"
MIN_SAMPLES_FOR_SKIP_RATE = 100


def resolve_format(urls: list[str], fmt: str, image_size: int, patch_grid: tuple[int, int], *, retries: int = 0,
                   backoff_s: float = 0.0) -> tuple[bool, tuple[int, int, int]]:
    """(shards hold latents?, [C, H, W] of every image) for ``data.format`` ("pixels", "latents" or "auto": peek at
    the first readable sample, reopening a failing shard ``retries`` times). Latents take their shape from that
    sample. Training and evaluation both ask here."""
    pixels = (3, image_size, image_size)
    if fmt == "pixels":
        return False, pixels
    raw = peek_first_sample(urls, retries=retries, backoff_s=backoff_s)
    if raw is None or not has_latents(raw):
        if fmt == "latents" and raw is None:  # nothing to look at: not the same as a sample without latents
            raise DataError(f"data.format = 'latents' but none of the first {min(len(urls), 4)} shard(s) starting "
                            f"with {urls[0]!r} could be read (missing, corrupt or empty); check data.shards")
        if fmt == "latents":
            raise DataError(f"data.format = 'latents' but the first readable sample ({raw.get('__url__')!r}, key "
                            f"{raw.get('__key__')!r}) has no <key>.latent.npy or .latent.safetensors member (see "
                            f"tools/precompute_latents.py)")
        return False, pixels
    try:
        z = decode_latent_member(raw)
    except SkipSample:
        raise DataError(f"the first latent of {raw.get('__url__')!r} (key {raw.get('__key__')!r}) does not "
                        f"parse as [C, h, w] float16/bfloat16/float32") from None
    c, h, w = z.shape
    gh, gw = patch_grid
    if h % gh or w % gw or h // gh != w // gw:
        raise DataError(f"latents of shape {tuple(z.shape)} in {raw.get('__url__')!r} do not split into the "
                        f"{patch_grid} patch grid of data.image_size={image_size}; were they computed at another "
                        f"image size or with another VAE?")
    return True, (int(c), int(h), int(w))


class PackedDataset(IterableDataset):
    """Iterable of packed ``Batch``es for one rank; each DataLoader worker streams its own share of the shards.

    ``state_dict()`` (per worker, collected by StatefulDataLoader)::

        {"format", "rank", "world_size", "worker", "num_workers",
         "stream": {"epoch", "shard_cursor", "sample_offset", "block", "index", "exhausted", "empty_epochs",
                    "counts": {"seen": int, "<reason>": int, ...}}}

    ``shard_cursor`` indexes this reader's shard list for ``epoch``, ``sample_offset`` is the raw sample (inside
    that shard) where the current shuffle block starts, ``block`` its number in the epoch and ``index`` how many of
    its permuted samples were consumed. A finite pass (``repeat=False``) that was consumed to its end (``"ended"``)
    starts over when iterated again (same order, counts kept); a state saved with a reader's last batch resumes to
    nothing more from that reader (with several workers, the others carry on)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, patch_grid: tuple[int, int], *, seed: int,
                 rank: int = 0, world_size: int = 1, shards: str | None = None, repeat: bool | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        check_caption_field(cfg.caption_field)
        self.cfg = cfg
        self.urls = expand_shard_spec(cfg.shards if shards is None else shards)
        self.repeat = cfg.repeat if repeat is None else repeat
        self.tokenizer = tokenizer
        self.patch_grid = (int(patch_grid[0]), int(patch_grid[1]))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.builder = SequenceBuilder.from_config(cfg, tokenizer, self.patch_grid, seed)
        if self.builder.min_length > cfg.seq_len:
            raise ValueError(f"data.seq_len={cfg.seq_len} cannot hold one image document "
                             f"({self.builder.min_length} tokens for a {self.patch_grid} patch grid)")
        self.latents, self.image_shape = resolve_format(self.urls, self.cfg.format, self.cfg.image_size,
                                                         self.patch_grid, retries=cfg.shard_retries,
                                                         backoff_s=cfg.shard_retry_backoff_s)
        self.decode_options = DecodeOptions.from_config(cfg, self.latents, self.image_shape if self.latents else None)
        self._state: dict[str, Any] | None = None  # position of the next batch; None = start

    # -- reader identity and state -----------------------------------------------------------------------------

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _new_stream(self) -> ShardStream:
        worker, num_workers = self._worker()
        return ShardStream(self.urls, seed=self.seed, rank=self.rank, world_size=self.world_size, worker=worker,
                           num_workers=num_workers, shuffle_buffer=self.cfg.shuffle_buffer, repeat=self.repeat,
                           retries=self.cfg.shard_retries, backoff_s=self.cfg.shard_retry_backoff_s)

    def _wrap(self, stream_state: dict[str, Any]) -> dict[str, Any]:
        worker, num_workers = self._worker()
        return {"format": STATE_FORMAT, "rank": self.rank, "world_size": self.world_size, "worker": worker,
                "num_workers": num_workers, "stream": stream_state}

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:  # not cached: the same object may be asked in the main process, then forked
            return self._wrap(self._new_stream().state_dict())
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"data state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        worker, num_workers = self._worker()
        saved = (state["rank"], state["world_size"], state["worker"], state["num_workers"])
        if saved != (self.rank, self.world_size, worker, num_workers):
            raise DataError(f"data state of rank {saved[0]}/{saved[1]} worker {saved[2]}/{saved[3]} cannot resume "
                            f"rank {self.rank}/{self.world_size} worker {worker}/{num_workers}: exact resume needs "
                            f"the same world size and data.num_workers")
        self._state = copy.deepcopy(state)

    # -- samples -> sequences -> batches -------------------------------------------------------------------------

    def _sequence(self, raw: RawSample, counts: dict[str, int]) -> Sequence | None:
        """Decode one raw sample into a Sequence, or count why it is skipped and return None."""
        counts["seen"] += 1
        try:
            seq = self.builder(decode_document(raw, self.decode_options), raw["__epoch__"])
            counts["truncated"] += seq.truncated
            return seq
        except SkipSample as skip:
            counts[skip.reason] += 1
        self._check_skip_rate(counts)  # outside the except block: the error carries no chained traceback
        return None

    def _check_skip_rate(self, counts: dict[str, int]) -> None:
        seen = counts["seen"]
        skipped = sum(counts[r] for r in SAMPLE_SKIP_REASONS)
        if seen >= MIN_SAMPLES_FOR_SKIP_RATE and skipped > self.cfg.max_skip_rate * seen:
            worker, _ = self._worker()
            detail = ", ".join(f"{r}={counts[r]}" for r in SAMPLE_SKIP_REASONS if counts[r])
            raise DataError(f"data skip rate {skipped / seen:.1%} exceeds data.max_skip_rate="
                            f"{self.cfg.max_skip_rate:.1%} after {seen} samples on rank {self.rank} worker {worker} "
                            f"({detail}); check data.shards, data.caption_field and data.max_text_tokens")

    def __iter__(self) -> Iterator[Batch]:
        stream = self._new_stream()
        if self._state is not None:
            self.load_state_dict(self._state)  # validates the reader identity
            stream.load_state_dict(self._state["stream"])
            if stream.exhausted and not self._state.get("ended"):
                # saved with this reader's last batch (the loader snapshots at every batch): nothing is left of
                # this pass, so a resume must not replay it
                self._state = self._state | {"ended": True}
                return
            if stream.exhausted:  # a pass that ended and is iterated again: replay it, keep the tallies
                counts, stream = stream.counts, self._new_stream()
                stream.counts = counts
        cfg = self.cfg
        packer = Packer(cfg.seq_len, cfg.batch_rows, self.tokenizer.pad_id, self.patch_grid, self.image_shape,
                        latents=self.latents, policy=cfg.packing)
        try:
            while True:
                position = stream.state_dict()  # before the sample: where a batch that carries it must resume
                try:
                    raw = next(stream)
                except StopIteration:
                    break
                seq = self._sequence(raw, stream.counts)
                if seq is None:
                    continue
                if not packer.add(seq):
                    batch = packer.emit()
                    self._state = self._wrap(position)
                    yield batch
                    packer.add(seq)
            final = self._wrap(stream.state_dict())
            if len(packer):
                batch = packer.emit()
                self._state = final
                yield batch
            self._state = final | {"ended": True}  # consumed to the end: iterating again replays the pass
        finally:
            stream.close()


def build_loader(cfg: DataConfig, tokenizer: Tokenizer, patch_grid: tuple[int, int], *, seed: int, rank: int = 0,
                 world_size: int = 1, shards: str | None = None, repeat: bool | None = None) -> StatefulDataLoader:
    """A StatefulDataLoader over ``PackedDataset`` yielding one ``Batch`` per step (``batch_size=None``) from
    ``cfg.num_workers`` workers. ``shards`` / ``repeat`` override ``cfg.shards`` / ``cfg.repeat``."""
    dataset = PackedDataset(cfg, tokenizer, patch_grid, seed=seed, rank=rank, world_size=world_size, shards=shards,
                            repeat=repeat)
    workers = cfg.num_workers
    return StatefulDataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                              prefetch_factor=2 if workers > 0 else None, snapshot_every_n_steps=1)


def _dataset_states(state: Any) -> Iterator[dict[str, Any]]:
    if isinstance(state, dict):
        if state.get("format") == STATE_FORMAT:
            yield state
            return
        for value in state.values():
            yield from _dataset_states(value)


def data_counts(state: dict[str, Any]) -> dict[str, int]:
    """Cumulative sample / skip counts of this rank, summed over its workers, from ``loader.state_dict()`` (or one
    dataset state): ``COUNT_KEYS`` plus ``skipped`` (all per-sample skips). Sum over ranks for global totals."""
    total = dict.fromkeys(COUNT_KEYS, 0)
    for ds_state in _dataset_states(state):
        for key, value in ds_state["stream"]["counts"].items():
            total[key] = total.get(key, 0) + int(value)
    total["skipped"] = sum(total[r] for r in SAMPLE_SKIP_REASONS)
    return total
