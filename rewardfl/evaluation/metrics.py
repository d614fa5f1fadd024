"""Evaluation metrics, as pure functions of tensors and arrays (tested against hand computations).

Image tensors are in [-1, 1]; the metrics map them to [0, 1] first, so that ``motion`` is a
fraction of the pixel range and ``psnr`` uses peak 1.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["motion", "psnr", "bootstrap_ci", "mean_with_ci", "paired_difference", "identity_specificity",
           "hacking_warnings", "paired_hacking_warnings", "PSNR_CAP_DB"]

#: PSNR of identical images (infinite) is reported as this, so that means and intervals stay finite
PSNR_CAP_DB = 100.0


def motion(video: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames of ``video`` ``(F, 3, H, W)`` in [-1, 1],
    in units of the pixel range [0, 1] (0: a still video; 1: every pixel flips black/white every frame).
    A one-frame video has motion 0."""
    if video.shape[0] < 2:
        return 0.0
    x = (video.double() + 1.0) / 2.0
    return float((x[1:] - x[:-1]).abs().mean())


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of ``image`` against ``reference``, both ``(3, H, W)`` in [-1, 1],
    over the [0, 1] range: ``10 log10(1 / mse)``; identical images give :data:`PSNR_CAP_DB`."""
    if image.shape != reference.shape:
        raise ValueError(f"psnr: image {tuple(image.shape)} and reference {tuple(reference.shape)} differ in shape")
    mse = float((((image.double() - reference.double()) / 2.0) ** 2).mean())
    return PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else 10.0 * math.log10(1.0 / mse)


def bootstrap_ci(values: Sequence[float], *, samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``: ``samples`` resamples with replacement
    (``numpy.random.default_rng(seed).integers(0, n, (samples, n))``), the ``(1-level)/2`` and
    ``(1+level)/2`` percentiles of their means (numpy's linear interpolation). One value gives (v, v)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, v.size, (samples, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _finite(values) -> np.ndarray:
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    return v[np.isfinite(v)]


def mean_with_ci(values: Sequence[Optional[float]], *, samples: int = 1000, seed: int = 0) -> dict:
    """``{"mean", "ci": [lo, hi], "n"}`` over the finite values (None/NaN are left out, and counted out)."""
    v = _finite(values)
    if v.size == 0:
        return {"mean": None, "ci": [None, None], "n": 0}
    lo, hi = bootstrap_ci(v, samples=samples, seed=seed)
    return {"mean": float(v.mean()), "ci": [lo, hi], "n": int(v.size)}


def paired_difference(values: Sequence[Optional[float]], base: Sequence[Optional[float]], *,
                      samples: int = 1000, seed: int = 0) -> dict:
    """Mean of ``values[i] - base[i]`` over pairs where both are finite, with its bootstrap interval
    (pairs resampled together: the same clip and starting noise on both sides)."""
    if len(values) != len(base):
        raise ValueError(f"paired_difference: {len(values)} values but {len(base)} base values")
    diffs = [None if a is None or b is None else a - b for a, b in zip(values, base)]
    return mean_with_ci(diffs, samples=samples, seed=seed)


def identity_specificity(similarity: np.ndarray, own: Sequence[int]) -> np.ndarray:
    """For each video i: ``similarity[i, own[i]] - mean_{j != own[i]} similarity[i, j]``.

    ``similarity`` ``(V, C)``: a judge's score of video i against clip j's reference (NaN where the
    judge could not score); ``own`` ``(V,)``: the clip each video was generated from. NaN where the
    own score is missing, or no other clip's score is (fewer than 2 clips)."""
    s = np.asarray(similarity, dtype=np.float64)
    out = np.full(s.shape[0], np.nan)
    for i, c in enumerate(own):
        others = np.delete(s[i], c)
        others = others[np.isfinite(others)]
        if np.isfinite(s[i, c]) and others.size:
            out[i] = s[i, c] - others.mean()
    return out


def hacking_warnings(reward: Sequence[float], judges: dict[str, Sequence[float]], *, window: int = 5,
                     samples: int = 1000, seed: int = 0) -> list[str]:
    """Reward hacking guard over metric series (one value per evaluation point, oldest first).

    Over the last ``window`` points, compare the last value with the first: when the training reward
    rose and a judge fell by more than its bootstrap interval allows (the judge's last value lies below
    the lower end of the 95% interval of the window's first half), returns one line naming both. A
    series shorter than 2 points, or with missing values, gives nothing.
    """
    r = np.asarray([np.nan if x is None else x for x in reward], dtype=np.float64)[-window:]
    if r.size < 2 or not np.all(np.isfinite(r)) or r[-1] <= r[0]:
        return []
    lines = []
    for name, series in judges.items():
        j = np.asarray([np.nan if x is None else x for x in series], dtype=np.float64)[-window:]
        if j.size < 2 or not np.all(np.isfinite(j)):
            continue
        head = j[: max(1, j.size // 2)]
        lo, _ = bootstrap_ci(head, samples=samples, seed=seed)
        if j[-1] < lo and j[-1] < j[0]:
            lines.append(f"possible reward hacking: training reward rose {r[0]:.4f} -> {r[-1]:.4f} over the last "
                         f"{r.size} points while judge {name} fell {j[0]:.4f} -> {j[-1]:.4f} (below {lo:.4f}, the "
                         "lower end of its 95% interval over the window's first half)")
    return lines


def paired_hacking_warnings(summary: dict, labels: Sequence[str], reward_key: str = "reward_score") -> list[str]:
    """The guard over one evaluation: for each checkpoint, when the training reward's paired difference
    to base is above 0 beyond its 95% interval while a judge's (``judge/...``) is below 0 beyond its
    interval, one line naming both. ``summary`` as ``report.summarize`` returns it."""
    lines = []
    for label in labels[1:]:
        r = summary.get(reward_key, {}).get(label, {}).get("diff_to_base")
        if not r or r.get("ci") is None or r["ci"][0] is None or not r["ci"][0] > 0:
            continue
        for key, per in summary.items():
            d = per.get(label, {}).get("diff_to_base") if key.startswith("judge/") else None
            if d and d.get("ci") is not None and d["ci"][1] is not None and d["ci"][1] < 0:
                lines.append(f"possible reward hacking in {label}: {reward_key} rose by {r['mean']:+.4f} "
                             f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] over base while {key} fell by "
                             f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")
    return lines
