"""Evaluation during training (issue 14): ``eval_steps``, ``save_best_by``, the hacking guard in the
loop, ``stop_on_hacking`` and ``eval.at_end``.

The training-time numbers are checked against ``rewardfl.evaluate`` run afterwards as a separate
command on the saved checkpoints (a fresh model, the same held-out clips and seed): equal numbers
prove the fixed, paired noise and that evaluation saw the weights of that step."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from train_fixtures import small_dataset  # noqa: F401  (session fixture)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import evaluate as evaluate_cli
from rewardfl import run
from rewardfl.sampling.generator import Generator
from rewardfl.registry import load_resolved
from rewardfl.training.outputs import read_metrics


def _config(root, tiny_dir, small_dataset, face_assets, **over):  # noqa: F811
    raw = {
        "model_name": "wan2_2_tiny", "model_paths": os.path.join(tiny_dir, "model_paths.json"),
        "reward_model_path": face_assets.scrfd_sface, "lora_rank": 4, "mixed_precision": "fp32", "device": "cpu",
        "num_inference_steps": 4, "mid_timestep": 2, "final_timestep": 3, "learning_rate": 2e-2,
        "warmup_steps": 0, "max_steps": 2, "save_steps": 1, "save_total_limit": None, "seed": 3,
        "output_dir": str(root / "out"), "report_to": [],
        "reward": {"name": "face_identity", "landmark_fallback": True, "det_size": 160,
                   "reference_cache_dir": str(root / "refcache")},
        "data": {"metadata_path": small_dataset, "num_frames": 5, "height": 64, "width": 64,
                 "eval_metadata_path": small_dataset},
        "eval": {"judges": [{"name": "face_identity", "label": "face_fb", "landmark_fallback": True,
                             "det_size": 160, "reference_cache_dir": "none"}],
                 "seeds": 1, "train_seeds": 1, "train_clips": 0},
        "eval_steps": 1,
    }
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_dir, small_dataset, face_assets):  # noqa: F811
    root = tmp_path_factory.mktemp("train_eval")
    config = _config(root, tiny_dir, small_dataset, face_assets, save_best_by="eval/reward_score")
    assert run.main([config]) == 0
    return root, config


def test_eval_rows_are_logged_at_step_0_and_every_eval_steps(evaluated_run):
    root, _ = evaluated_run
    rows = read_metrics(str(root / "out" / "metrics.jsonl"))
    evals = [r for r in rows if "eval/reward_score" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for key in ("eval/motion", "eval/first_frame_psnr", "eval/judge/face_fb/score", "eval/judge/face_fb/specificity"):
        assert all(key in r for r in evals), key
    assert "eval/motion/diff_to_base" not in evals[0] and "eval/motion/diff_to_base" in evals[1]
    # the paired difference: this step's mean minus the base's (same clips, same noise), by hand
    history = json.load(open(root / "out" / "eval_history.json"))["history"]
    for h in history[1:]:
        base = [r["motion"] for r in history[0]["rows"]]
        now = [r["motion"] for r in h["rows"]]
        assert h["metrics"]["eval/motion/diff_to_base"] == pytest.approx(np.mean(np.subtract(now, base)), rel=1e-9)
    # training rows keep their shape (every one has the training reward)
    train = [r for r in rows if "eval/reward_score" not in r]
    assert [r["step"] for r in train] == [1, 2] and all("reward_score" in r for r in train)
    assert len(os.listdir(root / "out" / "eval_steps" / "step-000002")) == 2  # a contact sheet per clip


@pytest.mark.parametrize("step", [0, 2])
def test_training_evaluation_equals_the_evaluate_command_on_the_same_weights(evaluated_run, step, capsys):
    """Step 0 against ``--checkpoint``-less base, step 2 against checkpoint-2: a fresh model, the same
    noise, so the same videos and the same numbers."""
    root, config = evaluated_run
    out = str(root / f"eval-{step}")
    ckpt = [] if step == 0 else ["--checkpoint", str(root / "out" / "checkpoints" / f"checkpoint-{step}")]
    assert evaluate_cli.main([config, *ckpt, "--out", out, "--seeds", "1"]) == 0
    capsys.readouterr()
    result = json.load(open(os.path.join(out, "eval.json")))
    label = "base" if step == 0 else f"checkpoint-{step}"
    history = {h["step"]: h for h in json.load(open(root / "out" / "eval_history.json"))["history"]}
    for key in ("reward_score", "motion", "first_frame_psnr", "judge/face_fb/score"):
        separate = [r[key] for r in result["videos"] if r["checkpoint"] == label]
        during = [r[key] for r in history[step]["rows"]]
        assert [x is None for x in during] == [x is None for x in separate], key
        assert [x for x in during if x is not None] == pytest.approx([x for x in separate if x is not None],
                                                                     rel=1e-5, abs=1e-6), key
        if key != "judge/face_fb/score":  # the strict judge finds no face in the tiny model's frames
            assert any(x is not None for x in during), key


def test_save_best_by_keeps_the_weights_of_the_best_evaluation(evaluated_run):
    root, config = evaluated_run
    history = json.load(open(root / "out" / "eval_history.json"))
    series = {h["step"]: h["metrics"]["eval/reward_score"] for h in history["history"]}  # the base (0) too
    best_step = max(series, key=series.get)
    best = json.load(open(root / "out" / "best" / "best.json"))
    assert best["step"] == best_step and best["value"] == pytest.approx(series[best_step])
    assert best == history["best"]
    cfg, plugins = load_resolved(config)
    gen = Generator.build(cfg, plugins)
    built = {k: v.clone() for k, v in gen.model.trainable_state_dict().items()}
    gen.load(str(root / "out" / "best"))  # the exported weights, read back as generate reads them
    saved = gen.model.trainable_state_dict()
    at_step = built if best_step == 0 else load_file(
        str(root / "out" / "checkpoints" / f"checkpoint-{best_step}" / "trainable.safetensors"))
    assert set(saved) == set(at_step)
    for key in saved:
        np.testing.assert_allclose(saved[key].numpy(), at_step[key].numpy(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def six_clips(tmp_path_factory, face_assets):
    """Six short 64x64 held-out clips (two photos, three camera motions each): enough clips (>= 5)
    for the hacking guard to call a change."""
    from rewardfl.demo.example_data import build_from_face_assets

    out = str(tmp_path_factory.mktemp("six_clips"))
    return build_from_face_assets(out, assets=face_assets, photo_names=("person_a_1", "person_b_1"),
                                  num_frames=5, size=(64, 64), clips_per_photo=3)


def test_stop_on_hacking_stops_after_a_checkpoint_with_exit_code_4(tmp_path, tiny_dir, small_dataset, six_clips,
                                                                   face_assets, caplog):  # noqa: F811
    """A run resumed at step 1 whose base evaluation (step 0, the window's start; crafted in
    eval_history.json, video by video) had a much lower training reward and a judge (motion: always
    a number, at most 0) far above anything the model scores: the next real evaluation, paired with
    it by (clip, seed) on 6 clips, shows the reward up and the judge down beyond their intervals; the
    guard fires, the run saves checkpoint-2 and stops (no final export)."""
    config = _config(tmp_path, tiny_dir, small_dataset, face_assets, max_steps=1, stop_on_hacking=True,
                     data={"eval_metadata_path": six_clips}, eval={"judges": [{"name": "motion", "label": "motion"}]})
    assert run.main([config]) == 0
    out = tmp_path / "out"
    path = out / "eval_history.json"
    saved = json.load(open(path))
    base = saved["history"][0]
    assert base["step"] == 0 and len({r["clip"] for r in base["rows"]}) == 6
    for i, row in enumerate(base["rows"]):  # per video, with a little spread between clips
        row["reward_score"], row["judge/motion/score"] = -10.0 - 0.01 * i, 10.0 + 0.01 * i
    json.dump(saved, open(path, "w"))
    cfg = yaml.safe_load(open(config))
    cfg.update(max_steps=4, resume_from_checkpoint=True)
    open(config, "w").write(yaml.safe_dump(cfg))
    import shutil

    shutil.rmtree(out / "final")
    with caplog.at_level("WARNING", logger="rewardfl"):
        assert run.main([config]) == 4
    err = caplog.text
    assert "step 2 vs step 0: possible reward hacking: reward_score rose" in err, err
    assert "judge/motion/score fell" in err and "(6 clips)" in err and "stop_on_hacking" in err
    assert os.path.isdir(out / "checkpoints" / "checkpoint-2") and not (out / "checkpoints" / "checkpoint-3").exists()
    assert not (out / "final").exists()


def test_a_run_that_collapses_motion_is_stopped_by_the_guard(tmp_path, tiny_dir, small_dataset, six_clips,
                                                            face_assets, caplog):  # noqa: F811
    """examples/hack_motion_collapse.yaml cut down to CI size: training that really collapses motion (no
    crafted history), caught by the guard on 6 held-out clips, the run stopped with exit code 4.

    The demo's hack trains the identity reward on the warm-started twin, where copying the sharp first
    frame is the cheapest way up; the fixture's untrained twin has no face to copy, so here the training
    reward is one a still video maximises outright (``motion`` with target 0: score = -energy). The judge
    is ``motion`` against 3x the reference clips' energy (the untrained twin moves more than the clips,
    unlike the warm-started one), so less motion is worse for it. Frames 1-4 of a 5-frame video decode
    from one latent frame, so less motion means frame 1 nearer the injected first frame.

    Learning rate 0.1: at 2e-2 the held-out motion fell by only 7e-4, 0.02 of the judge's spread between
    clips, which the guard's minimum effect (``eval.hacking_min_effect`` 0.2) rightly leaves unnamed; at
    0.1 it falls by 0.011 at step 4 (0.23 of that spread; 6x the spread of the generated videos' own
    motion between clips), and the guard stops the run there."""
    config = _config(tmp_path, tiny_dir, small_dataset, face_assets, max_steps=8, save_steps=100,
                     learning_rate=0.1, stop_on_hacking=True, eval_steps=2, data={"eval_metadata_path": six_clips},
                     eval={"judges": [{"name": "motion", "label": "motion", "target_scale": 3.0}],
                           "hacking_window": 5})
    raw = yaml.safe_load(open(config))
    raw["reward"] = {"name": "motion", "target_scale": 0.0}
    del raw["reward_model_path"]  # no face reward or judge left to declare it
    open(config, "w").write(yaml.safe_dump(raw))
    with caplog.at_level("WARNING", logger="rewardfl"):
        assert run.main([config]) == 4
    out = tmp_path / "out"
    history = json.load(open(out / "eval_history.json"))["history"]
    stop, base = history[-1], history[0]
    assert base["step"] == 0 and len({r["clip"] for r in stop["rows"]}) == 6
    # what the guard saw, from the per-video rows: the held-out videos move less than at the base (the
    # training reward up) and the judge's score fell with it, on (nearly) every clip
    for key, sign in (("motion", -1), ("reward_score", 1), ("judge/motion/score", -1)):
        diffs = np.array([r[key] - b[key] for r, b in zip(stop["rows"], base["rows"])])
        assert (sign * diffs > 0).sum() >= 5, (key, diffs)
    # and by enough to matter: at least 0.2 of the judge's spread between clips at step 0 (numpy, by hand)
    key = "judge/motion/score"
    fall = -np.mean([r[key] - b[key] for r, b in zip(stop["rows"], base["rows"])])
    assert fall >= 0.2 * np.std([b[key] for b in base["rows"]], ddof=1) > 0  # one seed: a row is a clip
    err = caplog.text
    assert f"step {stop['step']} vs step 0: possible reward hacking: reward_score rose" in err, err
    assert "judge/motion/score fell" in err and "(6 clips)" in err and "stopped by the reward-hacking guard" in err
    assert os.path.isdir(out / "checkpoints" / f"checkpoint-{stop['step']}") and not (out / "final").exists()


def test_stop_on_hacking_with_fewer_than_5_held_out_clips_is_a_config_error(tmp_path, tiny_dir, small_dataset,
                                                                             face_assets, capsys):  # noqa: F811
    config = _config(tmp_path, tiny_dir, small_dataset, face_assets, max_steps=1, stop_on_hacking=True)
    assert run.main([config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stop_on_hacking: the hacking guard needs at least 5 held-out clips" in err[0], err
    assert "evaluates 2" in err[0] and "eval.train_clips" in err[0]


def test_eval_at_end_prints_base_vs_final(tmp_path, tiny_dir, small_dataset, face_assets, capsys):  # noqa: F811
    config = _config(tmp_path, tiny_dir, small_dataset, face_assets, max_steps=1, eval_steps=None,
                     eval={"at_end": True})
    assert run.main([config]) == 0
    printed = capsys.readouterr().out
    assert "| metric | base | final | final - base |" in printed
    result = json.load(open(tmp_path / "out" / "eval" / "eval.json"))
    # the evaluation of the run's own final export equals the evaluate command on it
    out = str(tmp_path / "again")
    assert evaluate_cli.main([config, "--checkpoint", str(tmp_path / "out" / "final"), "--out", out]) == 0
    again = json.load(open(os.path.join(out, "eval.json")))
    for key in ("reward_score", "motion"):
        assert [r[key] for r in result["videos"]] == pytest.approx([r[key] for r in again["videos"]], rel=1e-5)


def test_eval_config_errors_name_the_key(tmp_path, tiny_dir, small_dataset, face_assets, capsys):  # noqa: F811
    removed = _config(tmp_path, tiny_dir, small_dataset, face_assets, eval={"bootstrap_samples": 200})
    assert run.main([removed, "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.bootstrap_samples: removed; intervals are Student-t over held-out clips" in err[0]
    bad = _config(tmp_path, tiny_dir, small_dataset, face_assets, eval_steps=None, save_best_by="eval/reward_score")
    assert run.main([bad, "--check"]) == 2
    assert "save_best_by" in capsys.readouterr().err
    bad = _config(tmp_path, tiny_dir, small_dataset, face_assets, save_best_by="eval/no_such_metric", max_steps=1)
    assert run.main([bad]) == 2
    err = capsys.readouterr().err
    assert "save_best_by: eval/no_such_metric is not among" in err and "eval/reward_score" in err


def test_a_judge_with_no_finite_value_says_the_guard_cannot_watch_it(tmp_path, tiny_dir, small_dataset,  # noqa: F811
                                                                     face_assets, caplog):
    """The strict face judge (no landmark fallback) finds no face in the tiny model's frames: every
    eval/judge/strict/* is null, so the guard and save_best_by on it cannot work: said once, and again at
    the end of the run, instead of a stop_on_hacking that silently never fires."""
    # (stop_on_hacking needs 5 held-out clips, these are 2: the guard's own refusal, tested elsewhere)
    config = _config(tmp_path, tiny_dir, small_dataset, face_assets, max_steps=2,
                     save_best_by="eval/judge/strict/score",
                     eval={"judges": [{"name": "face_identity", "label": "strict", "det_size": 160,
                                       "reference_cache_dir": "none"}]})
    with caplog.at_level("WARNING", logger="rewardfl"):
        assert run.main([config]) == 0
    evals = [r for r in read_metrics(str(tmp_path / "out" / "metrics.jsonl")) if "eval/reward_score" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all(r["eval/judge/strict/score"] is None and r["eval/judge/strict/specificity"] is None for r in evals)
    lines = [r.getMessage() for r in caplog.records if "judge strict gave no finite value" in r.getMessage()]
    assert len(lines) == 2, lines  # once when seen (step 0), once in the run's closing summary
    assert lines[0].startswith("eval.judges: judge strict gave no finite value at step 0")
    assert "the reward-hacking guard cannot watch it" in lines[0] and "stop_on_hacking" not in lines[0]
    assert "save_best_by: eval/judge/strict/score cannot save best/" in lines[0]
    assert lines[1].startswith("this run's safeguards were partly blind: ")
    assert not (tmp_path / "out" / "best").exists()


def test_best_compares_against_the_base_and_says_when_nothing_beat_it(tmp_path, tiny_dir, small_dataset,  # noqa: F811
                                                                      face_assets, caplog):
    """One step, save_best_by eval/motion as max and as min: in one of the two the base (step 0) is at
    least as good as step 1 whichever way the step moved motion, and best/ must then hold the base weights
    (before, the base was never a candidate and best/ held the worse step 1) and the run must say so."""
    base_won = 0
    for mode in ("max", "min"):
        root = tmp_path / mode
        root.mkdir()
        config = _config(root, tiny_dir, small_dataset, face_assets, max_steps=1, save_best_by="eval/motion",
                         save_best_mode=mode, eval={"judges": [{"name": "motion"}]})
        caplog.clear()
        with caplog.at_level("WARNING", logger="rewardfl"):
            assert run.main([config]) == 0
        series = {h["step"]: h["metrics"]["eval/motion"]
                  for h in json.load(open(root / "out" / "eval_history.json"))["history"]}
        assert sorted(series) == [0, 1]
        sign = 1.0 if mode == "max" else -1.0
        want = 0 if sign * series[0] >= sign * series[1] else 1  # ties: the earlier one
        best = json.load(open(root / "out" / "best" / "best.json"))
        assert best["step"] == want and best["value"] == series[want]
        said = [r.getMessage() for r in caplog.records if "no evaluation beat the base" in r.getMessage()]
        assert len(said) == (1 if want == 0 else 0), said
        cfg, plugins = load_resolved(config)
        gen = Generator.build(cfg, plugins)
        built = {k: v.clone() for k, v in gen.model.trainable_state_dict().items()}  # the base: LoRA as built
        gen.load(str(root / "out" / "best"))
        at_step = (built if want == 0 else
                   load_file(str(root / "out" / "checkpoints" / "checkpoint-1" / "trainable.safetensors")))
        for key, value in gen.model.trainable_state_dict().items():
            np.testing.assert_allclose(value.numpy(), at_step[key].numpy(), rtol=1e-6, atol=1e-7)
        base_won += want == 0
    assert base_won >= 1
