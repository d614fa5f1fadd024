"""The training clips, micro-batch by micro-batch: this process's share, epoch after epoch.

Each epoch is one permutation of the clips seeded by (seed, epoch), the same on every process; each
global micro-batch (``per_device_train_batch_size`` x processes clips) is split by rank, so a run on N
processes sees the same samples per step as one process with N times the batch. Clips are decoded by
a DataLoader (``data.num_workers`` processes decode ahead of the training thread). The position lives
in the run's ``TrainState`` (``epoch``, ``position``: micro-batches *consumed*), so a checkpoint resumes
at the first one not trained on, whatever the workers had prefetched.
"""

from __future__ import annotations

import copy
import types

import torch

from rewardfl.data import collate

__all__ = ["MicroBatches"]


class MicroBatches:
    def __init__(self, dataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        self.num_workers = num_workers
        self.global_micro = batch_size * world_size  # videos of one micro-batch over all processes
        self.per_epoch = len(dataset) // self.global_micro  # whole micro-batches in an epoch
        self._loader = None  # the current epoch's iterator (built at the first batch, after a resume)

    def order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``: one permutation seeded by (seed, epoch)."""
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def next(self, state) -> dict:
        """This process's share of the next micro-batch; advances ``state.epoch``/``state.position``."""
        if state.position >= self.per_epoch:
            state.epoch += 1
            state.position = 0
            self._loader = None
        if self._loader is None:
            self._loader = iter(self.loader(state.epoch, state.position))
        batch = next(self._loader)
        state.position += 1
        return batch

    def replay(self, epoch: int, position: int, count: int) -> list[dict]:
        """The ``count`` micro-batches :meth:`next` gave from ``epoch``/``position`` on (a resumed run
        rebuilding the micro-batches an algorithm trains on again), without moving this run's iterator."""
        scratch = copy.copy(self)
        scratch._loader = None
        state = types.SimpleNamespace(epoch=epoch, position=position)
        return [scratch.next(state) for _ in range(count)]

    def restart(self) -> None:
        """Forget the current epoch's iterator (after the position was changed from outside)."""
        self._loader = None

    def loader(self, epoch: int, start: int):
        """The micro-batches of ``epoch`` from position ``start`` on, this rank's indices only."""
        bs, order, n = self.batch_size, self.order(epoch), self.global_micro
        batches = [order[i * n + self.rank * bs:i * n + (self.rank + 1) * bs] for i in range(start, self.per_epoch)]
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                                           num_workers=self.num_workers,
                                           prefetch_factor=2 if self.num_workers else None)
