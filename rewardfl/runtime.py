"""The runtime every layer shares: the device, seeding, and processes (who this process is, the few
collectives the loop needs, signals every process agrees on).

``init_distributed`` reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``; set by ``torchrun`` and ``deepspeed``) and starts the process
group (NCCL on GPUs, gloo on CPUs) when there is more than one process or a
``deepspeed`` section. Without either, nothing distributed is imported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import threading
from typing import Optional

import numpy as np
import torch

from rewardfl.config import ConfigError, TrainConfig

__all__ = ["resolve_device", "seed_everything", "DistInfo", "init_distributed", "all_reduce_mean", "all_reduce_sum_",
           "barrier", "StopSignal"]

log = logging.getLogger("rewardfl")


def resolve_device(cfg: TrainConfig, dist: Optional["DistInfo"] = None) -> torch.device:
    """The config's ``device`` (``auto``: this process's GPU when CUDA is available, else the CPU)."""
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist else torch.cuda.current_device())
        return torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} requested but CUDA is not available (use device: cpu or auto)")
    return torch.device(cfg.device)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Start the process group when launched with several processes or with DeepSpeed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and cfg.deepspeed is None:
        return DistInfo()
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    if cfg.deepspeed is not None:
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)


def all_reduce_mean(values: list[float], dist: DistInfo) -> list[float]:
    """Mean over processes of a few floats (identity in one process)."""
    if not dist.active or dist.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return (t / dist.world_size).cpu().tolist()


def all_reduce_sum_(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.active and dist.world_size > 1:
        torch.distributed.all_reduce(t)
    return t


def barrier(dist: DistInfo) -> None:
    if dist.active and dist.world_size > 1:
        torch.distributed.barrier()


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits.

    With several processes the flag is agreed on (any process signalled stops all), so that
    every process takes part in the final checkpoint's collectives.
    """

    def __init__(self, dist: Optional[DistInfo] = None):
        self.signal: Optional[int] = None
        self.dist = dist or DistInfo()
        self._old = {}

    def requested(self) -> bool:
        flag = 1.0 if self.signal is not None else 0.0
        if self.dist.world_size > 1:
            flag = all_reduce_mean([flag], self.dist)[0]
        return flag > 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: finishing the step, saving a checkpoint, then exiting",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
