"""Held-out clips: a separate CSV (``data.eval_metadata_path``) or a deterministic split
(``data.eval_fraction``) of ``data.metadata_path`` that training never sees.

A clip is held out when ``u(seed, sample_id) < eval_fraction``, ``u`` the first 8 bytes of
``sha256("rewardfl-heldout:<seed>:<sample_id>")`` read as a fraction in [0, 1): the split depends
on the seed and each row's ``video`` cell only, not on row order, so adding or reordering rows
never moves another clip across it.
"""

from __future__ import annotations

import hashlib

import torch

from rewardfl.data import VideoDataset

__all__ = ["is_held_out", "held_out_indices", "training_dataset", "eval_dataset"]


def is_held_out(seed: int, sample_id: str, fraction: float) -> bool:
    """Whether clip ``sample_id`` is in the held-out ``fraction`` (0 <= fraction < 1) for ``seed``."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"rewardfl-heldout:{int(seed)}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64 < fraction


def held_out_indices(dataset, seed: int, fraction: float) -> list[int]:
    """Row indices of ``dataset`` (a ``VideoDataset``) that are held out, in row order."""
    return [i for i, row in enumerate(dataset.rows) if is_held_out(seed, row["sample_id"], fraction)]


def training_dataset(config, dataset):
    """``dataset`` without the held-out rows (itself when ``data.eval_fraction`` is 0).

    Items keep their row ``index`` (``dataset[i]["index"]``), so per-sample noise seeds do
    not move when the split changes. Raises ValueError naming the key when nothing is left."""
    fraction = config.data.eval_fraction
    if fraction <= 0:
        return dataset
    held = set(held_out_indices(dataset, config.seed, fraction))
    keep = [i for i in range(len(dataset)) if i not in held]
    if not keep:
        raise ValueError(f"data.eval_fraction: {fraction} holds out all {len(dataset)} clips of "
                         f"data.metadata_path for seed {config.seed}; lower it or add clips")
    return torch.utils.data.Subset(dataset, keep)


def eval_dataset(config, metadata_path=None, *, command_line: bool = False):
    """The held-out clips: ``metadata_path`` (a CSV given on the command line as ``--metadata``), else
    ``data.eval_metadata_path``, else the ``data.eval_fraction`` split of ``data.metadata_path``.

    Returns a ``VideoDataset`` or a ``Subset`` of one; ValueError naming the keys when none is set
    or the split is empty (``command_line``: a command with ``--metadata`` asks, so the error names it)."""
    d = config.data
    kwargs = dict(num_frames=d.num_frames, max_pixels=d.max_pixels, height=d.height, width=d.width)
    if metadata_path is not None:
        return VideoDataset(metadata_path, key="--metadata", **kwargs)
    if d.eval_metadata_path is not None:
        return VideoDataset(config.resolve_path(d.eval_metadata_path), key="data.eval_metadata_path", **kwargs)
    if d.eval_fraction > 0:
        full = VideoDataset.from_config(config)
        held = held_out_indices(full, config.seed, d.eval_fraction)
        if not held:
            raise ValueError(f"data.eval_fraction: {d.eval_fraction} holds out none of the {len(full)} clips of "
                             f"data.metadata_path for seed {config.seed}; raise it, or set data.eval_metadata_path")
        return torch.utils.data.Subset(full, held)
    raise ValueError("data.eval_metadata_path / data.eval_fraction: no held-out clips configured; set one of them"
                     + (" (or pass --metadata CSV)" if command_line else ""))
