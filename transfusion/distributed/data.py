"""The data of one optimizer step, split into consumers that do not depend on the world size.

A global step reads ``M = dp_size x grad_accum`` micro-batches. Each is the next batch of one *consumer* ``v`` in
``[0, M)``: a data loader over the shard split ``(rank=v, world_size=M)`` of ``data_pipelines.loader``. Rank ``r``
owns consumers ``r * grad_accum ... r * grad_accum + grad_accum - 1`` and feeds them to its micro-steps in order::

    M = 4                 consumer:  0   1   2   3
    4 ranks x accum 1     rank:      0   1   2   3
    2 ranks x accum 2     rank:      0   0   1   1     (micro-step 0, 1, 0, 1)
    1 rank  x accum 4     rank:      0   0   0   0

So every step sees the same samples, and the trainer seeds each micro-step's noise by ``(step, consumer)``: a run's
loss curve is the same on 1, 2 or 4 ranks for the same global batch. The data position is saved per consumer,
which is what makes it portable: a checkpoint resumes exactly under any ``(dp_size, grad_accum)`` with the same
product ``M`` and the same ``data.num_workers``. Any other change cannot map the old stream positions onto new
consumers; :func:`check_layout` says so in one line, and the trainer's ``--reset-data`` starts fresh streams.

``data.num_workers`` is per consumer: a rank runs ``grad_accum x num_workers`` loader workers. A finite stream
(``data.repeat = false``) ends the run at the first step that some consumer cannot fill; that step's other batches
are dropped (``drop_last``), and the trainer agrees on it across ranks so that no rank waits for the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from transfusion.batch import Batch
from transfusion.config import DataConfig


class DataLayoutError(ValueError):
    """A saved data position that cannot be mapped onto this run's consumers. One line."""


def consumers_of(dp_rank: int, grad_accum: int) -> list[int]:
    return [dp_rank * grad_accum + a for a in range(grad_accum)]


def owner_of(consumer: int, grad_accum: int) -> int:
    """The data-parallel rank that owns ``consumer`` under ``grad_accum`` micro-steps per rank."""
    return consumer // grad_accum


class StepData:
    """This rank's consumers; ``next_step()`` returns one Batch per micro-step, or None when a finite stream ended."""

    def __init__(self, cfg: DataConfig, tokenizer, patch_grid: tuple[int, int], *, seed: int, dp_rank: int,
                 dp_size: int, grad_accum: int) -> None:
        from data_pipelines.loader import build_loader

        self.cfg, self.seed, self.grad_accum = cfg, seed, grad_accum
        self.num_consumers = dp_size * grad_accum
        self.consumers = consumers_of(dp_rank, grad_accum)
        self.loaders = {v: build_loader(cfg, tokenizer, patch_grid, seed=seed, rank=v, world_size=self.num_consumers)
                        for v in self.consumers}
        self._iters: dict[int, Iterator[Batch]] | None = None

    def layout(self) -> dict[str, Any]:
        return {"consumers": self.num_consumers, "grad_accum": self.grad_accum, "num_workers": self.cfg.num_workers,
                "seed": self.seed}

    def next_step(self) -> list[tuple[int, Batch]] | None:
        if self._iters is None:
            self._iters = {v: iter(loader) for v, loader in self.loaders.items()}
        out = []
        for v in self.consumers:
            try:
                out.append((v, next(self._iters[v])))
            except StopIteration:
                return None
        return out

    def state_dict(self) -> dict[int, Any]:
        """Position of each of this rank's consumers, by consumer index."""
        return {v: loader.state_dict() for v, loader in self.loaders.items()}

    def load_state_dict(self, states: dict[int, Any]) -> None:
        for v in self.consumers:
            self.loaders[v].load_state_dict(states[v])
        self._iters = None

    def close(self) -> None:
        self._iters = None  # drops the iterators, which shuts their worker processes down


def check_layout(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raise DataLayoutError when the data position saved under ``saved`` cannot resume ``current``."""
    if saved is None:
        raise DataLayoutError("the checkpoint holds no per-consumer data position (saved by an older trainer)")
    for key, what in (("consumers", "data consumers (dp ranks x train.grad_accum)"),
                      ("num_workers", "data.num_workers")):
        if saved[key] != current[key]:
            raise DataLayoutError(f"the data position was saved for {saved[key]} {what}, this run has "
                                  f"{current[key]}; keep dp ranks x train.grad_accum = {saved['consumers']} and "
                                  f"data.num_workers = {saved['num_workers']} to resume it exactly")
