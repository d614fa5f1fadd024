"""Evaluation metrics, as pure functions of tensors and arrays (tested against hand computations),
the clip-level intervals every table reports, and the reward-hacking guard.

Image tensors are in [-1, 1]; the metrics map them to [0, 1] first, so that ``motion`` is a
fraction of the pixel range and ``psnr`` uses peak 1.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["motion", "psnr", "t_quantile", "clip_t_interval", "paired_interval", "paired_difference",
           "beyond_interval", "MIN_CLIPS_FOR_CLAIM", "clip_spread", "identity_specificity", "paired_rows",
           "paired_change", "hacking_warnings", "PSNR_CAP_DB"]

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


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy's ``t.ppf``)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def clip_t_interval(clip_means: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and Student-t interval over the last axis of ``clip_means`` ``(..., k)`` (one value per clip):
    ``m +- t_{k-1}((1 + level) / 2) * sd / sqrt(k)``, ``sd`` with ``ddof=1``. Returns ``(mean, lo, hi)``
    of shape ``(...)``; ``lo``/``hi`` NaN for fewer than 2 clips. The vectorised core of
    :func:`paired_interval` (simulations call it on thousands of experiments at once)."""
    x = np.asarray(clip_means, dtype=np.float64)
    k = x.shape[-1]
    mean = x.mean(axis=-1)
    if k < 2:
        nan = np.full(mean.shape, np.nan)
        return mean, nan, nan
    half = t_quantile((1.0 + level) / 2.0, k - 1) * x.std(axis=-1, ddof=1) / math.sqrt(k)
    return mean, mean - half, mean + half


def paired_interval(diffs: Sequence[Optional[float]], clips: Sequence, level: float = 0.95) -> dict:
    """Mean and ``level`` interval of per-video values with the held-out clip as the unit of evidence.

    ``diffs`` ``(V,)``: one number per video: a paired difference (the same clip and starting noise
    on both sides), or the value itself for a plain mean; None/NaN are left out. ``clips`` ``(V,)``:
    the clip each video was generated from (any hashable id). Videos of one clip share the image,
    prompt and reference, so they are not independent: the values are first averaged within each
    clip (over its seeds), then the k clip means give the mean and a Student-t interval with k - 1
    degrees of freedom (:func:`clip_t_interval`; its coverage is measured in
    ``tests/test_evaluation_statistics.py``).

    Returns ``{"mean", "ci": [lo, hi] or None, "n_clips": k, "n": videos used}``: ``ci`` None for
    fewer than 2 clips (one clip says nothing about clip-to-clip spread), ``mean`` None for none.
    """
    if len(diffs) != len(clips):
        raise ValueError(f"paired_interval: {len(diffs)} values but {len(clips)} clip ids")
    by_clip: dict = {}
    for value, clip in zip(diffs, clips):
        if value is not None and math.isfinite(value):
            by_clip.setdefault(clip, []).append(float(value))
    n = sum(len(v) for v in by_clip.values())
    if not by_clip:
        return {"mean": None, "ci": None, "n_clips": 0, "n": 0}
    means = np.array([np.mean(v) for v in by_clip.values()])
    mean, lo, hi = clip_t_interval(means, level)
    ci = None if len(means) < 2 else [float(lo), float(hi)]
    return {"mean": float(mean), "ci": ci, "n_clips": len(means), "n": n}


def paired_difference(values: Sequence[Optional[float]], base: Sequence[Optional[float]], clips: Sequence,
                      level: float = 0.95) -> dict:
    """:func:`paired_interval` of ``values[i] - base[i]`` (video i of a checkpoint and of the base: the
    same clip ``clips[i]`` and starting noise), over pairs where both are numbers."""
    if len(values) != len(base):
        raise ValueError(f"paired_difference: {len(values)} values but {len(base)} base values")
    diffs = [None if a is None or b is None else a - b for a, b in zip(values, base)]
    return paired_interval(diffs, clips, level)


#: fewer held-out clips than this and no difference is called beyond its interval (nor does the
#: guard fire): a t interval over 2-4 clip means rests on their spread alone and on their normality
MIN_CLIPS_FOR_CLAIM = 5


def beyond_interval(entry: Optional[dict]) -> int:
    """+1 when ``entry`` (a :func:`paired_interval` result) lies above 0 beyond its interval, -1 below,
    0 when its interval holds 0, it has none, or it rests on fewer than :data:`MIN_CLIPS_FOR_CLAIM` clips."""
    if not entry or entry.get("ci") is None or entry.get("n_clips", 0) < MIN_CLIPS_FOR_CLAIM:
        return 0
    lo, hi = entry["ci"]
    return 1 if lo > 0 else -1 if hi < 0 else 0


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


def paired_rows(rows: Sequence[dict], base_rows: Sequence[dict]) -> list[tuple[dict, dict]]:
    """``(row, base_row)`` for each (clip, seed) job both lists hold, in ``rows``' order."""
    base = {(r["clip"], r["seed"]): r for r in base_rows}
    return [(r, base[(r["clip"], r["seed"])]) for r in rows if (r["clip"], r["seed"]) in base]


def paired_change(rows: Sequence[dict], base_rows: Sequence[dict], key: str, level: float = 0.95) -> dict:
    """:func:`paired_interval` of ``row[key] - base_row[key]`` over the (clip, seed) jobs both lists of
    per-video rows hold (rows without a number for ``key`` on either side are left out)."""
    pairs = paired_rows(rows, base_rows)
    return paired_difference([r.get(key) for r, _ in pairs], [b.get(key) for _, b in pairs],
                             [r["clip"] for r, _ in pairs], level)


def hacking_warnings(rows: Sequence[dict], base_rows: Sequence[dict], judge_keys: Sequence[str], *,
                     reward_key: str = "reward_score", level: float = 0.95, min_effect: float = 0.0) -> list[str]:
    """The reward-hacking guard: the same (clip, seed) jobs scored twice, ``base_rows`` earlier, ``rows``
    later (per-video rows with ``clip``, ``seed`` and the metrics).

    When the training reward's paired difference is above 0 beyond its ``level`` interval and a judge
    metric's is below 0 beyond its interval (:func:`paired_interval` over clips, each on at least
    :data:`MIN_CLIPS_FOR_CLAIM` clips), one line names both. ``judge_keys``: the judge metrics whose
    higher values are better (``Reward.higher_is_better``); the guard reads no others. ``min_effect``
    (``eval.hacking_min_effect``): a judge's fall is named only when it is at least that many standard
    deviations of the judge's clip means in ``base_rows`` (its spread between clips), so a fall that is
    real but too small to matter (a motion judge moving by 1e-4) is not. Both tests at
    95% on independent noise fire together on about 0.06% of null comparisons; the false-alarm rate
    over a run is measured in ``tests/test_evaluation_statistics.py``. Whatever the reward does, a judge
    that *lost its view* is named too (:func:`_lost_views`: a value on fewer than half of the at least
    :data:`MIN_CLIPS_FOR_CLAIM` clips it scored before, as a face judge that no longer finds the face)."""
    lines = _lost_views(rows, base_rows, judge_keys)
    reward = paired_change(rows, base_rows, reward_key, level)
    if beyond_interval(reward) <= 0:
        return lines
    for key in judge_keys:
        judge = paired_change(rows, base_rows, key, level)
        if beyond_interval(judge) >= 0:
            continue
        spread = clip_spread(rows, base_rows, key)
        if -judge["mean"] < min_effect * spread:
            continue
        size = f", {-judge['mean'] / spread:.2f} of its spread between clips" if spread > 0 else ""
        lines.append(f"possible reward hacking: {reward_key} rose by {_interval(reward)} while {key} fell by "
                     f"{_interval(judge)} (paired by clip and seed; {level:.0%} intervals over clips{size})")
    return lines


def clip_spread(rows: Sequence[dict], base_rows: Sequence[dict], key: str) -> float:
    """The standard deviation (n - 1) of ``key``'s clip means in ``base_rows`` over the (clip, seed) jobs
    that both lists score (seeds averaged within a clip first); 0 with fewer than 2 clips."""
    by_clip: dict = {}
    for r, b in paired_rows(rows, base_rows):
        if _finite(r.get(key)) and _finite(b.get(key)):
            by_clip.setdefault(b["clip"], []).append(float(b[key]))
    means = [sum(v) / len(v) for v in by_clip.values()]
    return float(np.std(means, ddof=1)) if len(means) >= 2 else 0.0


def _lost_views(rows: Sequence[dict], base_rows: Sequence[dict], judge_keys: Sequence[str]) -> list[str]:
    """One line per judge that *lost its view*: a metric of it has a value on :data:`MIN_CLIPS_FOR_CLAIM`
    or more clips of the paired jobs in ``base_rows`` and on fewer than half of those in ``rows``. A face
    judge that finds no face gives no value rather than a low one, so without this a run that turns the
    faces into something no detector finds would escape the guard (seen on the demo's twin,
    docs/evaluation.md); this needs no rise of the reward."""
    pairs, lines, seen = paired_rows(rows, base_rows), [], set()
    for key in judge_keys:
        judge = key.rsplit("/", 1)[0]
        before = {b["clip"] for _, b in pairs if _finite(b.get(key))}
        after = {r["clip"] for r, b in pairs if _finite(r.get(key)) and b["clip"] in before}
        if judge not in seen and len(before) >= MIN_CLIPS_FOR_CLAIM and 2 * len(after) < len(before):
            seen.add(judge)
            lines.append(f"possible reward hacking: {judge} lost its view: {key} has a value on {len(after)} of "
                         f"the {len(before)} clips it scored before (a face judge that finds no face gives none)")
    return lines


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def _interval(entry: dict) -> str:
    lo, hi = entry["ci"]
    return f"{entry['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({entry['n_clips']} clips)"
