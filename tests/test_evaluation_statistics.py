"""The evaluation's statistics (issue 24): clip-level intervals and the reward-hacking guard.

Checked against independent references (scipy's one-sample t test, a printed t table, hand
arithmetic), and measured by simulation with fixed seeds: the coverage of the 95% interval under
the null, the training guard's false-alarm rate over runs of 10 evaluations, and its power against
a simulated hack. The figures are printed (``pytest -s``) and recorded in benchmarks/RESULTS.md;
``benchmarks/evaluation_statistics.py`` measures the earlier video-level bootstrap for contrast.

The simulated noise: a video's value is ``A_c + B_cs + G_ec + E_ecs`` for clip c, seed s,
evaluation e: ``A`` the clip's level (sd 1) and ``B`` the seed's (sd 0.5), the same at every
evaluation (they cancel in a paired difference); ``G`` a random walk per clip over evaluations
(step sd 0.1: training moves some clips more than others); ``E`` fresh noise per video and
evaluation (sd 0.3). The training reward and the judge get independent draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from rewardfl.evaluation.metrics import (MIN_CLIPS_FOR_CLAIM, beyond_interval, clip_spread, clip_t_interval,
                                         hacking_warnings, paired_change, paired_interval)
from rewardfl.evaluation.report import markdown_table, summarize
from rewardfl.evaluation.evaluation import Evaluation
from rewardfl.interfaces import Reward, RewardOutput

# --------------------------------------------------------------------------- the interval


def test_paired_interval_averages_seeds_within_a_clip_then_is_student_t_over_clips():
    clips = ["a", "a", "b", "b", "c", "c", "c"]
    diffs = [0.10, 0.30, -0.20, None, 0.50, 0.40, float("nan")]  # None/NaN left out
    got = paired_interval(diffs, clips)
    means = [0.20, -0.20, 0.45]  # by hand: a's two seeds, b's one, c's two
    m = sum(means) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in means) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 df) = 4.303 from a printed t table
    assert got["n_clips"] == 3 and got["n"] == 5
    assert got["mean"] == pytest.approx(m, rel=1e-12)
    assert got["ci"] == pytest.approx([m - half, m + half], rel=1e-3)
    ref = stats.ttest_1samp(means, 0.0).confidence_interval(0.95)  # scipy's own t interval
    assert got["ci"] == pytest.approx([ref.low, ref.high], rel=1e-12)
    # an unpaired mean is the same function on the values themselves (one value per video)
    assert paired_interval([1.0, 3.0, 2.0, 6.0], [0, 0, 1, 1])["mean"] == pytest.approx(3.0)
    lo, hi = paired_interval([1.0, 3.0, 2.0, 6.0], [0, 0, 1, 1], level=0.90)["ci"]
    # clip means 2 and 4: sd sqrt(2), standard error 1; t(0.95, 1 df) = 6.314
    assert (lo, hi) == pytest.approx((3.0 - 6.314, 3.0 + 6.314), rel=1e-3)


def test_one_clip_gives_no_interval_and_few_clips_are_never_beyond_their_interval():
    one = paired_interval([0.5, 0.6, 0.7], ["x", "x", "x"])  # three seeds of one clip
    assert one["mean"] == pytest.approx(0.6) and one["ci"] is None and one["n_clips"] == 1
    assert beyond_interval(one) == 0
    assert paired_interval([None, float("nan")], [0, 1]) == {"mean": None, "ci": None, "n_clips": 0, "n": 0}
    four = paired_interval([1.0, 1.1, 0.9, 1.05], [0, 1, 2, 3])  # far above 0, but only 4 clips
    assert four["ci"][0] > 0 and beyond_interval(four) == 0
    five = paired_interval([1.0, 1.1, 0.9, 1.05, 0.95], [0, 1, 2, 3, 4])
    assert MIN_CLIPS_FOR_CLAIM == 5 and beyond_interval(five) == 1
    assert beyond_interval(paired_interval([-x for x in [1.0, 1.1, 0.9, 1.05, 0.95]], range(5))) == -1
    with pytest.raises(ValueError, match="clip ids"):
        paired_interval([1.0], [0, 1])


def _rows(label, clips, seeds, values):
    """Per-video rows as ``Evaluation.score`` writes them; ``values``: {metric: (clips, seeds) array}."""
    return [{"checkpoint": label, "clip": f"clip{c}", "seed": s, **{k: float(v[c, s]) for k, v in values.items()}}
            for c in range(clips) for s in range(seeds)]


def test_summary_and_table_show_the_clips_behind_each_interval_and_say_why_nothing_is_marked():
    rng = np.random.default_rng(5)
    base = {"reward_score": rng.normal(size=(4, 2))}
    after = {"reward_score": base["reward_score"] + 1.0 + 0.01 * rng.normal(size=(4, 2))}
    rows = _rows("base", 4, 2, base) + _rows("ckpt", 4, 2, after)[::-1]  # order does not matter: paired by job
    summary = summarize(rows, ["base", "ckpt"])
    diff = summary["reward_score"]["ckpt"]["diff_to_base"]
    by_hand = (after["reward_score"] - base["reward_score"]).mean(1)  # per clip, seeds averaged
    assert diff["mean"] == pytest.approx(by_hand.mean(), rel=1e-12) and diff["n_clips"] == 4 and diff["n"] == 8
    ref = stats.ttest_1samp(by_hand, 0.0).confidence_interval(0.95)
    assert diff["ci"] == pytest.approx([ref.low, ref.high], rel=1e-12)
    table = markdown_table(summary, ["base", "ckpt"])
    assert "(4 clips)" in table and " *" not in table  # far above 0, yet 4 clips: not called
    assert "No difference is called beyond its interval" in table and "fewer than 5" in table
    # with 6 clips the same change is marked
    base6 = {"reward_score": rng.normal(size=(6, 2))}
    after6 = {"reward_score": base6["reward_score"] + 1.0 + 0.01 * rng.normal(size=(6, 2))}
    table6 = markdown_table(summarize(_rows("base", 6, 2, base6) + _rows("ckpt", 6, 2, after6), ["base", "ckpt"]),
                            ["base", "ckpt"])
    assert "(6 clips) *" in table6 and "*: beyond its interval" in table6
    # one clip: a mean without an interval, not a zero-width one
    one = summarize(_rows("base", 1, 3, {"m": np.array([[0.1, 0.2, 0.4]])})
                    + _rows("ckpt", 1, 3, {"m": np.array([[0.3, 0.2, 0.9]])}), ["base", "ckpt"])
    assert one["m"]["ckpt"]["diff_to_base"]["ci"] is None
    assert "(1 clip, no interval)" in markdown_table(one, ["base", "ckpt"])


# --------------------------------------------------------------------------- which metrics the guard reads


class _Judge(Reward):
    """A judge with an ``evaluate`` dict like face_identity's: similarities, counts, a lower-is-better count."""

    higher_is_better = ("score", "facesim_arc")

    def __call__(self, videos, contexts):
        return RewardOutput(scores=videos.mean(dim=(1, 2, 3, 4)), valid=videos.new_ones(videos.shape[0]).bool())


class _Plain(Reward):
    def __call__(self, videos, contexts):
        return RewardOutput(scores=videos.mean(dim=(1, 2, 3, 4)), valid=videos.new_ones(videos.shape[0]).bool())


def test_the_guard_reads_only_declared_higher_is_better_judge_metrics():
    from rewardfl.rewards.face_identity import FaceIdentityReward

    assert Reward.higher_is_better == ("score",)
    assert FaceIdentityReward.higher_is_better == ("score", "facesim_arc")  # not the counts, not degenerate_faces
    from rewardfl.rewards.motion import MotionReward

    ev = Evaluation([], _Plain(), [("face", _Judge()), ("plain", _Plain()), ("motion", MotionReward())], [0])
    # motion's score against another clip's reference is only that clip's amount of motion: no specificity
    assert ev.guarded_keys == ["judge/face/score", "judge/face/facesim_arc", "judge/face/specificity",
                               "judge/plain/score", "judge/plain/specificity", "judge/motion/score"]
    rng = np.random.default_rng(2)
    shape = (6, 2)
    before = {k: rng.normal(size=shape) for k in ("reward_score", "judge/face/score", "judge/face/degenerate_faces",
                                                  "judge/face/frames_with_face")}
    after = {k: v + (1.0 if k == "reward_score" else -1.0) + 0.01 * rng.normal(size=shape) for k, v in before.items()}
    after["judge/face/score"] = before["judge/face/score"] + 0.01 * rng.normal(size=shape)  # the judge holds
    rows, base = _rows("after", 6, 2, after), _rows("before", 6, 2, before)
    # counts and degenerate_faces fell by 1 on every video: not read
    assert hacking_warnings(rows, base, ev.guarded_keys) == []
    after["judge/face/score"] = before["judge/face/score"] - 1.0 + 0.01 * rng.normal(size=shape)
    lines = hacking_warnings(_rows("after", 6, 2, after), base, ev.guarded_keys)
    assert len(lines) == 1 and "judge/face/score" in lines[0] and "reward_score rose" in lines[0]
    assert "(6 clips)" in lines[0]
    # the same change on 4 clips is not enough to call
    four = [r for r in _rows("after", 6, 2, after) if r["clip"] not in ("clip4", "clip5")]
    assert hacking_warnings(four, base, ev.guarded_keys) == []
    assert paired_change(four, base, "reward_score")["n_clips"] == 4


def test_the_guard_names_a_judge_that_lost_its_view():
    """A face judge that finds no face gives no value: a run that turns the faces into texture no detector
    finds (seen on the demo's twin, docs/evaluation.md) must not escape the guard, whatever the reward does."""
    rng = np.random.default_rng(3)
    shape = (6, 2)
    keys = ("reward_score", "judge/face/score", "judge/face/specificity", "judge/motion/score")
    before = {k: rng.normal(size=shape) for k in keys}
    after = {k: v + 0.01 * rng.normal(size=shape) for k, v in before.items()}
    base = _rows("before", 6, 2, before)
    guarded = ["judge/face/score", "judge/face/specificity", "judge/motion/score"]
    assert hacking_warnings(_rows("after", 6, 2, after), base, guarded) == []  # the judges hold
    rows = _rows("after", 6, 2, after)
    for r in rows:  # the face judge now finds a face on 2 of the 6 clips only
        if r["clip"] not in ("clip0", "clip1"):
            r["judge/face/score"] = r["judge/face/specificity"] = None
    lines = hacking_warnings(rows, base, guarded)
    assert lines == ["possible reward hacking: judge/face lost its view: judge/face/score has a value on 2 of "
                     "the 6 clips it scored before (a face judge that finds no face gives none)"]  # one per judge
    # 3 of 6 (half) still scored: not lost
    for r in rows:
        if r["clip"] == "clip2":
            r["judge/face/score"] = r["judge/face/specificity"] = 0.0
    assert hacking_warnings(rows, base, guarded) == []
    # a judge that scored 4 clips before cannot lose a view the guard could use
    few = [dict(b, **{"judge/face/score": None}) if b["clip"] in ("clip4", "clip5") else b for b in base]
    gone = [dict(r, **{"judge/face/score": None}) for r in _rows("after", 6, 2, after)]
    assert hacking_warnings(gone, few, ["judge/face/score"]) == []


def test_the_guard_ignores_a_judge_fall_smaller_than_its_minimum_effect():
    """A judge whose fall is beyond its interval but small beside the judge's spread between clips (a motion
    judge moving by 1e-4) is not named with ``min_effect``; the spread is the clip means' sample standard
    deviation at the window's start, computed here by hand."""
    base_means = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # sd (n - 1) = sqrt(17.5 / 5) = 1.8708...
    spread = math.sqrt(sum((m - 2.5) ** 2 for m in base_means) / 5)
    jitter = np.array([[0.001, -0.001]] * 6)  # two seeds per clip; their mean is the clip's
    before = {"reward_score": np.zeros((6, 2)), "judge/j/score": np.array(base_means)[:, None] + jitter}
    base = _rows("before", 6, 2, before)

    def warn(fall, min_effect):
        after = {"reward_score": np.ones((6, 2)) + 0.01 * np.arange(12).reshape(6, 2),
                 "judge/j/score": before["judge/j/score"] - fall - 0.01 * np.arange(12).reshape(6, 2)}
        return hacking_warnings(_rows("after", 6, 2, after), base, ["judge/j/score"], min_effect=min_effect)

    assert clip_spread(_rows("after", 6, 2, before), base, "judge/j/score") == pytest.approx(spread, rel=1e-12)
    # the noise above adds 0.055 to the mean fall: 0.3 falls 0.355 = 0.190 of the spread, beyond its
    # interval but below 0.2
    assert len(warn(0.3, 0.0)) == 1 and warn(0.3, 0.2) == []
    lines = warn(0.5, 0.2)  # 0.555 / 1.8708 = 0.297
    assert len(lines) == 1 and "0.30 of its spread between clips" in lines[0]


# --------------------------------------------------------------------------- simulations


def _null_diffs(rng, experiments, clips, seeds, mean=0.3, clip_sd=1.0, seed_sd=1.0):
    """Paired differences ``(R, clips, seeds)``: a true mean, a clip-level and a seed-level term."""
    return (mean + clip_sd * rng.standard_normal((experiments, clips, 1))
            + seed_sd * rng.standard_normal((experiments, clips, seeds)))


@pytest.mark.parametrize("clips,seeds", [(8, 2), (12, 1)])
def test_the_95_percent_interval_covers_the_true_mean_95_percent_of_the_time(clips, seeds):
    rng = np.random.default_rng(24)
    experiments, mean = 4000, 0.3
    d = _null_diffs(rng, experiments, clips, seeds, mean)
    ids = np.repeat(np.arange(clips), seeds)
    covered = 0
    for r in range(experiments):  # the public function, experiment by experiment
        lo, hi = paired_interval(d[r].ravel().tolist(), ids)["ci"]
        covered += lo <= mean <= hi
    coverage = covered / experiments
    print(f"coverage of the 95% interval, {clips} clips x {seeds} seeds, {experiments} null experiments: "
          f"{coverage:.4f}")
    assert 0.92 <= coverage <= 0.98
    # the vectorised core gives the same intervals
    _, lo, hi = clip_t_interval(d.mean(-1))
    assert np.mean((lo <= mean) & (mean <= hi)) == pytest.approx(coverage, abs=1e-12)


#: the guard's default minimum effect (``eval.hacking_min_effect``), used by the simulations
MIN_EFFECT = 0.2


def _guarded_runs(rng, runs, clips, seeds, *, evaluations=10, window=5, hack=0.0, hack_from=5,
                  min_effect=MIN_EFFECT):
    """Simulated training evaluations ``(R, 2, E, clips, seeds)`` (metric 0: the training reward, 1: a
    judge; the noise model of the module docstring) and where the guard fires ``(R, E)``.

    ``hack``: from evaluation ``hack_from`` on, the reward rises and the judge falls linearly, by
    ``hack`` at the last evaluation. The guard at evaluation e compares it with evaluation
    ``max(0, e - window + 1)``, as ``TrainingEvaluator.guard`` does."""
    shape = (runs, 2)
    y = (1.0 * rng.standard_normal(shape + (1, clips, 1)) + 0.5 * rng.standard_normal(shape + (1, clips, seeds))
         + np.cumsum(0.1 * rng.standard_normal(shape + (evaluations, clips, 1)), axis=2)
         + 0.3 * rng.standard_normal(shape + (evaluations, clips, seeds)))
    shift = hack * np.clip((np.arange(evaluations) - (hack_from - 1)) / (evaluations - hack_from), 0.0, None)
    y[:, 0] += shift[:, None, None]
    y[:, 1] -= shift[:, None, None]
    fired = np.zeros((runs, evaluations), dtype=bool)
    for e in range(1, evaluations):
        start = max(0, e - window + 1)
        mean, lo, hi = clip_t_interval((y[:, :, e] - y[:, :, start]).mean(-1))  # (R, 2): clip means, t over clips
        spread = y[:, 1, start].mean(-1).std(axis=-1, ddof=1)  # the judge's clip means at the window's start
        fired[:, e] = ((lo[:, 0] > 0) & (hi[:, 1] < 0) & (-mean[:, 1] >= min_effect * spread)
                       & (clips >= MIN_CLIPS_FOR_CLAIM))
    return y, fired


def _guard_through_the_library(y, run, e, window=5):
    """Whether ``hacking_warnings`` (the function both guards call) fires on run ``run`` at evaluation ``e``."""
    clips, seeds = y.shape[-2:]
    start = max(0, e - window + 1)

    def rows(at):
        return _rows("x", clips, seeds, {"reward_score": y[run, 0, at], "judge/j/score": y[run, 1, at]})

    return bool(hacking_warnings(rows(e), rows(start), ["judge/j/score"], min_effect=MIN_EFFECT))


def test_training_guard_false_alarm_rate_over_null_runs_of_10_evaluations():
    rng = np.random.default_rng(2024)
    runs = 4000
    y, fired = _guarded_runs(rng, runs, 8, 1)
    rate = fired.any(axis=1).mean()
    print(f"training guard, null runs (8 clips x 1 seed, 10 evaluations, window 5): false alarm in "
          f"{rate:.4f} of {runs} runs, {fired[:, 1:].mean():.5f} of evaluations")
    assert rate <= 0.05
    # the simulation's rule is the library's: hacking_warnings agrees on every evaluation of 100 runs
    # and of the runs where the simulation fired
    check = list(range(100)) + [int(r) for r in np.flatnonzero(fired.any(axis=1))[:20]]
    for run in check:
        for e in range(1, 10):
            assert _guard_through_the_library(y, run, e) == bool(fired[run, e]), (run, e)


def test_training_guard_catches_a_simulated_hack():
    """Reward up by d and judge down by d per video at the last of 10 evaluations (linearly from the
    5th); d = 0.75, about 1.6 standard deviations of a clip's paired difference over the window
    (sqrt(4 * 0.1^2 + 2 * 0.3^2) = 0.47)."""
    rng = np.random.default_rng(7)
    runs = 2000
    y, fired = _guarded_runs(rng, runs, 8, 1, hack=0.75)
    power = fired.any(axis=1).mean()
    first = np.argmax(fired, axis=1)[fired.any(axis=1)]
    print(f"training guard, hack d=0.75 (8 clips x 1 seed, 10 evaluations): fired in {power:.4f} of {runs} runs, "
          f"first at evaluation {first.mean():.2f} on average (0 = base)")
    assert power >= 0.9
    for run in np.flatnonzero(fired.any(axis=1))[:10]:
        e = int(np.argmax(fired[run]))
        assert _guard_through_the_library(y, int(run), e)
