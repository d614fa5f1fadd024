"""Coverage and false alarms of the evaluation's statistics, old and new: ``python benchmarks/evaluation_statistics.py``.

Simulated null experiments with a fixed seed (numpy only; about a minute on 2 CPU cores):

* coverage of the "95%" interval of a mean paired difference whose true value is known, with a
  clip-level and a seed-level term (sd 1 each): rewardfl's interval (Student-t over clip means,
  ``rewardfl.evaluation.metrics.clip_t_interval``), the alternatives it was chosen over (percentile
  and BCa bootstrap over clip means, scipy), and, for contrast, the method rewardfl used before
  issue 24 (a percentile bootstrap over videos, as if the seeds of a clip were independent);
  also with skewed clip effects (centred exponential), where the t interval's normality assumption
  does not hold;
* the false-alarm rate of the training guard over null runs of 10 evaluations, new (paired by
  (clip, seed), clip-level t; the rule ``tests/test_evaluation_statistics.py`` checks against the
  library) and old (the last evaluation's mean against a bootstrap interval of one or two earlier
  means), with the noise model of that test file; and the new guard's power against a hack of size d.

The old methods are reproduced here from the code they replaced, for contrast only.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewardfl.evaluation.metrics import MIN_CLIPS_FOR_CLAIM, clip_t_interval  # noqa: E402

LEVEL = 0.95


def old_video_bootstrap(values: np.ndarray, rng, samples: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The interval before issue 24: percentile bootstrap of the mean over the videos (last axis)."""
    n = values.shape[-1]
    lo, hi = np.empty(values.shape[0]), np.empty(values.shape[0])
    for start in range(0, values.shape[0], 100):  # 100 experiments at a time: (100, samples, n) indices
        chunk = values[start:start + 100]
        idx = rng.integers(0, n, (chunk.shape[0], samples, n))
        means = np.take_along_axis(chunk[:, None, :].repeat(samples, 1), idx, axis=2).mean(-1)
        lo[start:start + 100], hi[start:start + 100] = np.percentile(means, [2.5, 97.5], axis=1)
    return lo, hi


def clip_bootstrap(clip_means: np.ndarray, rng, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Percentile or BCa bootstrap over clip means (scipy.stats.bootstrap, vectorised over experiments)."""
    res = stats.bootstrap((clip_means,), np.mean, axis=-1, n_resamples=1000, method=method, confidence_level=LEVEL,
                          random_state=rng, vectorized=True)
    return res.confidence_interval.low, res.confidence_interval.high


def coverage_table(rng, experiments: int = 2000) -> list[str]:
    lines = ["| clips x seeds | clip effects | t over clips (rewardfl) | BCa over clips | percentile over clips | "
             "old: percentile over videos |", "|---|---|---|---|---|---|"]
    for clips, seeds in ((4, 6), (4, 2), (5, 2), (8, 2), (12, 1)):
        for effects in ("normal", "skewed"):
            mean = 0.3
            if effects == "normal":
                clip = rng.standard_normal((experiments, clips, 1))
            else:
                clip = rng.exponential(1.0, (experiments, clips, 1)) - 1.0
            d = mean + clip + rng.standard_normal((experiments, clips, seeds))
            cm = d.mean(-1)
            cells = []
            _, lo, hi = clip_t_interval(cm, LEVEL)
            cells.append(np.mean((lo <= mean) & (mean <= hi)))
            for method in ("BCa", "percentile"):
                lo, hi = clip_bootstrap(cm, rng, method)
                cells.append(np.mean((lo <= mean) & (mean <= hi)))
            lo, hi = old_video_bootstrap(d.reshape(experiments, -1), rng)
            cells.append(np.mean((lo <= mean) & (mean <= hi)))
            lines.append(f"| {clips} x {seeds} | {effects} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return lines


def simulated_runs(rng, runs: int, clips: int, seeds: int, evaluations: int = 10, hack: float = 0.0,
                   hack_from: int = 5, rho: float = 0.0) -> np.ndarray:
    """``(R, 2, E, clips, seeds)``: training reward and judge per video and evaluation (the noise model of
    tests/test_evaluation_statistics.py: clip sd 1, seed sd 0.5, a per-clip random walk with step sd
    0.1, fresh noise sd 0.3), with a hack of size ``hack`` growing from evaluation ``hack_from``;
    ``rho``: the correlation of the reward's and the judge's changes (random walk and fresh noise)."""
    shape = (runs, 2)

    def correlated(*tail):
        z = rng.standard_normal(shape + tail)
        z[:, 1] = rho * z[:, 0] + np.sqrt(1.0 - rho * rho) * z[:, 1]
        return z

    y = (rng.standard_normal(shape + (1, clips, 1)) + 0.5 * rng.standard_normal(shape + (1, clips, seeds))
         + np.cumsum(0.1 * correlated(evaluations, clips, 1), axis=2)
         + 0.3 * correlated(evaluations, clips, seeds))
    shift = hack * np.clip((np.arange(evaluations) - (hack_from - 1)) / (evaluations - hack_from), 0.0, None)
    y[:, 0] += shift[:, None, None]
    y[:, 1] -= shift[:, None, None]
    return y


def new_guard(y: np.ndarray, window: int = 5, min_effect: float = 0.0) -> np.ndarray:
    """Where rewardfl's guard fires ``(R, E)``: evaluation e against e - window + 1, paired, t over clips;
    the judge's fall at least ``min_effect`` standard deviations of its clip means at the window's start
    (``eval.hacking_min_effect``)."""
    runs, _, evaluations, clips, _ = y.shape
    fired = np.zeros((runs, evaluations), dtype=bool)
    for e in range(1, evaluations):
        start = max(0, e - window + 1)
        mean, lo, hi = clip_t_interval((y[:, :, e] - y[:, :, start]).mean(-1), LEVEL)
        spread = y[:, 1, start].mean(-1).std(axis=-1, ddof=1)
        fired[:, e] = ((lo[:, 0] > 0) & (hi[:, 1] < 0) & (-mean[:, 1] >= min_effect * spread)
                       & (clips >= MIN_CLIPS_FOR_CLAIM))
    return fired


def old_guard(y: np.ndarray, window: int = 5, samples: int = 1000) -> np.ndarray:
    """The guard before issue 24 (``hacking_warnings`` over per-evaluation means): over the last ``window``
    means, the reward's last above its first, and the judge's last below its first and below the lower
    end of the percentile-bootstrap interval of the window's first half (one or two means)."""
    runs, _, evaluations = y.shape[:3]
    means = y.reshape(runs, 2, evaluations, -1).mean(-1)
    fired = np.zeros((runs, evaluations), dtype=bool)
    for e in range(1, evaluations):
        r = means[:, 0, max(0, e - window + 1):e + 1]
        j = means[:, 1, max(0, e - window + 1):e + 1]
        head = j[:, :max(1, j.shape[1] // 2)]
        # the old code's resamples: default_rng(bootstrap_seed 0), the same at every call
        idx = np.random.default_rng(0).integers(0, head.shape[1], (samples, head.shape[1]))
        lo = np.percentile(head[:, idx].mean(-1), 2.5, axis=1)
        fired[:, e] = (r[:, -1] > r[:, 0]) & (j[:, -1] < lo) & (j[:, -1] < j[:, 0])
    return fired


def guard_table(rng, runs: int = 2000) -> list[str]:
    lines = ["| guard | min effect | runs | clips x seeds | hack d | reward/judge correlation | runs with a warning | "
             "evaluations with a warning |", "|---|---|---|---|---|---|---|---|"]
    new = "new (paired, t over clips)"

    def rows(y, clips, seeds, d, rho):  # the new guard without and with the default minimum effect, same runs
        for min_effect in (0.0, 0.2):
            fired = new_guard(y, min_effect=min_effect)
            lines.append(f"| {new} | {min_effect} | {runs} | {clips} x {seeds} | {d} | {rho} | "
                         f"{fired.any(1).mean():.4f} | {fired[:, 1:].mean():.4f} |")

    for clips, seeds in ((8, 1), (4, 1), (8, 2)):
        y = simulated_runs(rng, runs, clips, seeds)
        rows(y, clips, seeds, "0 (null)", 0)
        fired = old_guard(y)
        lines.append(f"| old (means, bootstrap of 1-2 means) | - | {runs} | {clips} x {seeds} | 0 (null) | 0 | "
                     f"{fired.any(1).mean():.4f} | {fired[:, 1:].mean():.4f} |")
    for rho in (0.5, -0.5, -0.9):
        rows(simulated_runs(rng, runs, 8, 1, rho=rho), 8, 1, "0 (null)", rho)
    for d in (0.25, 0.5, 0.75, 1.0):
        rows(simulated_runs(rng, runs, 8, 1, hack=d), 8, 1, d, 0)
    return lines


def main() -> None:
    rng = np.random.default_rng(24)
    print("Coverage of the 95% interval (2000 null experiments each; true mean 0.3, clip sd 1, seed sd 1):\n")
    print("\n".join(coverage_table(rng)))
    print("\nThe hacking guard over runs of 10 evaluations (window 5):\n")
    print("\n".join(guard_table(rng)))


if __name__ == "__main__":
    main()
