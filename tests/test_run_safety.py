"""Runs that cannot lose, corrupt or hijack a user's work: torn metrics, shared output dirs,
non-finite updates, steps with nothing to learn from, honest exit codes (the real loop, tiny Wan,
real face models, real videos)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import run
from rewardfl.checkpoints import list_checkpoints
from rewardfl.config import load_config
from rewardfl.training.outputs import MetricsLog, OutputDir, read_metrics
from rewardfl.registry import resolve_plugins
from rewardfl.cli import EXIT_NOTHING_TRAINED, EXIT_STOPPED_BY_SIGNAL as EXIT_STOPPED
from rewardfl.training import Trainer
from rewardfl.training.batches import MicroBatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _cli(cfg_path):
    return subprocess.Popen([sys.executable, "-m", "rewardfl.run", cfg_path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def blank_dataset(tmp_path_factory):
    """A real mp4 of a grey wall (no face anywhere) and its metadata.csv."""
    import imageio.v2 as imageio

    folder = tmp_path_factory.mktemp("blank")
    frames = np.full((5, 64, 64, 3), 128, np.uint8)
    frames[:, :, :32] = 90  # not flat: an encoder-friendly edge, still no face
    with imageio.get_writer(str(folder / "wall.mp4"), fps=16, codec="libx264", quality=10,
                            macro_block_size=1, pixelformat="yuv444p") as w:
        for f in frames:
            w.append_data(f)
    (folder / "metadata.csv").write_text("video,prompt\nwall.mp4,a wall\n")
    return str(folder / "metadata.csv")


# --------------------------------------------------------------------------- metrics.jsonl


def test_metrics_nan_is_written_as_null_and_a_torn_last_line_is_dropped(tmp_path, caplog):
    log = MetricsLog(str(tmp_path), enabled=True)
    log.write({"step": 1, "reward_score": float("nan"), "loss": 0.5})
    log.write({"step": 2, "reward_score": 0.25, "loss": float("inf")})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert [json.loads(line) for line in text.splitlines()] == [  # strict JSON, readable by any reader
        {"step": 1, "reward_score": None, "loss": 0.5}, {"step": 2, "reward_score": 0.25, "loss": None}]
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "loss": 0.')  # disk full mid-record
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    assert "torn last line 3" in caplog.text


def test_a_bad_line_in_the_middle_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid metrics JSON"):
        read_metrics(str(path))


def test_resume_after_a_torn_metrics_line(make_config, tmp_path):
    out = tmp_path / "out"
    assert run.main([make_config(max_steps=2, save_steps=2)]) == 0
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "loss": 0.1')  # a crash mid-write after the checkpoint
    assert run.main([make_config(max_steps=3, save_steps=2, resume_from_checkpoint=True)]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


# --------------------------------------------------------------------------- output_dir ownership


def test_second_run_into_a_busy_output_dir_stops_and_sigterm_exits_143_without_export(make_config, tmp_path, capsys):
    cfg = make_config(max_steps=50, save_steps=100)
    first = _cli(cfg)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or not metrics.read_text().strip()) and first.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1]
    # the same output_dir while the first run lives: one line, exit 2, nothing of the first touched
    second = make_config(max_steps=2, resume_from_checkpoint=True)
    assert run.main([second]) == 2
    err = one_line_error(capsys)
    assert "output_dir" in err and "in use by another run" in err and f"pid {first.pid}" in err
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == EXIT_STOPPED == 143, stderr
    assert "stopped by signal" in stderr
    steps = [s for s, _ in list_checkpoints(str(tmp_path / "out" / "checkpoints"))]
    assert len(steps) == 1 and 1 <= steps[0] < 50  # the stop saved a checkpoint ...
    assert not (tmp_path / "out" / "final").exists()  # ... and exported nothing
    assert not (tmp_path / "out" / ".lock").exists()  # the lock went with the run


def test_a_stale_lock_of_a_dead_process_is_taken_over(make_config, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(tmp_path / "out")
    import socket

    (tmp_path / "out" / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert run.main([make_config(max_steps=1)]) == 0
    assert "stale lock" in caplog.text


def test_fresh_run_refuses_another_runs_checkpoints_unless_told(make_config, tmp_path, capsys):
    assert run.main([make_config(max_steps=2, save_steps=1)]) == 0
    before = sorted(os.listdir(tmp_path / "out" / "checkpoints"))
    assert run.main([make_config(max_steps=1)]) == 2  # a fresh run, same output_dir
    err = one_line_error(capsys)
    assert "holds another run's checkpoints" in err and "overwrite_output_dir" in err
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == before  # nothing pruned
    assert run.main([make_config(max_steps=1, overwrite_output_dir=True)]) == 0
    assert [s for s, _ in list_checkpoints(str(tmp_path / "out" / "checkpoints"))] == [1]
    assert [r["step"] for r in read_metrics(str(tmp_path / "out" / "metrics.jsonl"))] == [1]


def test_a_fresh_run_keeps_the_rows_of_a_run_killed_before_its_first_checkpoint(make_config, tmp_path, capsys,
                                                                                  caplog):
    first = _cli(make_config(max_steps=50, save_steps=100))
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or not metrics.read_text().strip()) and first.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    first.kill()  # SIGKILL before any checkpoint: its rows are all that is left of it
    first.communicate()
    assert not (tmp_path / "out" / "checkpoints").exists() or not os.listdir(tmp_path / "out" / "checkpoints")
    rows = metrics.read_text()
    assert rows.strip()
    for args in (["--check"], []):  # a fresh run, checked or started: refused
        assert run.main([make_config(max_steps=1), *args]) == 2
        err = one_line_error(capsys)
        assert "holds another run's metrics.jsonl" in err and "overwrite_output_dir" in err, err
    assert metrics.read_text() == rows  # nothing dropped
    # told to start it over: the old rows go (said once), the new run's rows are there once each
    assert run.main([make_config(max_steps=2, save_steps=1, resume_from_checkpoint=True)]) == 0
    assert [r["step"] for r in read_metrics(str(metrics))] == [1, 2]
    assert sum("dropping the" in r.getMessage() and "earlier run" in r.getMessage() for r in caplog.records) == 1


def test_output_dir_that_is_a_file_or_read_only(make_config, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run.main([make_config(output_dir=str(tmp_path / "afile")), "--check"]) == 2
    assert "output_dir" in one_line_error(capsys)
    if os.geteuid() == 0:  # root writes anywhere: read-only needs a read-only mount, not a mode
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert run.main([make_config(output_dir=str(ro / "out")), "--check"]) == 2
        assert "not writable" in one_line_error(capsys)
    finally:
        ro.chmod(0o700)


def test_output_dir_lock_is_exclusive(tmp_path):
    with OutputDir(str(tmp_path / "o")):
        with pytest.raises(ValueError, match="in use by another run"):
            OutputDir(str(tmp_path / "o")).acquire()
    with OutputDir(str(tmp_path / "o")):  # released on exit
        pass


# --------------------------------------------------------------------------- updates that cannot corrupt weights


@pytest.mark.parametrize("key,value,pattern", [
    ("learning_rate", ".inf", "learning_rate: must be a finite number"),
    ("adam_epsilon", "0", "adam_epsilon: must be > 0"),
    ("weight_decay", ".nan", "weight_decay: must be a finite number"),
    ("max_grad_norm", "-.inf", "max_grad_norm: must be a finite number"),
])
def test_optimizer_numbers_must_be_finite_and_positive(make_config, capsys, key, value, pattern):
    assert run.main([make_config(), "--check", "--set", f"{key}={value}"]) == 2
    assert pattern in one_line_error(capsys)


def test_an_update_that_makes_weights_non_finite_is_rolled_back(make_config):
    cfg = load_config(make_config(max_steps=3))
    trainer = Trainer(cfg, resolve_plugins(cfg))
    assert trainer.train_step()["updated"] is True  # a real update first: AdamW has momentum now
    before = {k: v.clone() for k, v in trainer.model.trainable_state_dict().items()}
    state_before = {k: {n: t.clone() for n, t in s.items()} for k, s in trainer.engine.optimizer.state.items()}
    for group in trainer.engine.optimizer.param_groups:  # fault injection: an overflowing step size
        group["lr"] = float("inf")
    record = trainer.train_step()
    assert record["updated"] is False and record["skipped_nonfinite"] == 1
    after = trainer.model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for k, s in trainer.engine.optimizer.state.items():  # the optimizer state rolled back too
        for n, t in s.items():
            assert torch.equal(t, state_before[k][n]), n
    assert trainer.train_step()["updated"] is True  # the schedule set a finite lr again


def test_too_large_to_copy_a_non_finite_update_stops_before_any_checkpoint(make_config, monkeypatch, tmp_path):
    from rewardfl.training import engines

    cfg = load_config(make_config(max_steps=3))
    trainer = Trainer(cfg, resolve_plugins(cfg))
    monkeypatch.setattr(engines, "ROLLBACK_MAX_BYTES", 0)  # as a full fine-tune: no pre-update copy is kept
    for group in trainer.engine.optimizer.param_groups:
        group["lr"] = float("inf")
    with pytest.raises(FloatingPointError, match="too large to keep a pre-update copy"):
        trainer.train_step()
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_a_step_with_nothing_to_learn_from_does_not_move_the_weights(make_config, blank_dataset):
    from rewardfl.data import VideoDataset

    cfg = load_config(make_config(max_steps=4))
    trainer = Trainer(cfg, resolve_plugins(cfg))
    assert trainer.train_step()["updated"] is True  # AdamW's momentum is non-zero from here on
    before = {k: v.clone() for k, v in trainer.model.trainable_state_dict().items()}
    # the next micro-batch is a real faceless video: its reference has no face, nothing can be scored
    blank = VideoDataset(blank_dataset, num_frames=5, max_pixels=4096, height=64, width=64)
    trainer.batches, trainer.state.position = MicroBatches(blank, batch_size=1, seed=cfg.seed), 0
    record = trainer.train_step()
    assert record["updated"] is False and record["skipped_samples"] == 1 and record["skipped_nonfinite"] == 0
    after = trainer.model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # momentum did not move them
    assert trainer.state.skipped_empty == 1


def test_a_run_in_which_nothing_trained_exits_non_zero(make_config, blank_dataset, capsys):
    cfg = make_config(max_steps=2, data={"metadata_path": blank_dataset})
    assert run.main([cfg]) == EXIT_NOTHING_TRAINED == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rewardfl.run: error: no step updated the weights (2 steps: 2 with nothing to score")


# --------------------------------------------------------------------------- run --check, before any model loads


def test_check_finds_data_and_face_model_problems_without_loading(make_config, tmp_path, capsys, face_assets):
    assert run.main([make_config(), "--check"]) == 0
    out = capsys.readouterr().out
    assert "data     2 videos listed in" in out and "all present" in out
    assert "reward   detector" in out and "reward   recognizer" in out and "writable" in out
    # a CSV without the prompt column, a CSV listing a missing video
    (tmp_path / "cols.csv").write_text("video,caption\na.mp4,x\n")
    assert run.main([make_config(data={"metadata_path": str(tmp_path / "cols.csv")}), "--check"]) == 2
    assert "missing column prompt" in one_line_error(capsys)
    (tmp_path / "gone.csv").write_text("video,prompt\nnot_there.mp4,x\n")
    assert run.main([make_config(data={"metadata_path": str(tmp_path / "gone.csv")}), "--check"]) == 2
    assert "not_there.mp4" in one_line_error(capsys)
    # a face-model directory holding only a detector
    pack = tmp_path / "pack"
    pack.mkdir()
    det = [n for n in os.listdir(face_assets.scrfd_sface) if n.endswith(".onnx") and "sface" not in n][0]
    os.symlink(os.path.join(face_assets.scrfd_sface, det), pack / det)
    assert run.main([make_config(reward_model_path=str(pack)), "--check"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("rewardfl.run: error: reward_model_path: no recognizer") and det in err
    # a reward option out of range, caught by --check (no model loads)
    assert run.main([make_config(reward={"det_size": 100}), "--check"]) == 2
    assert "reward.det_size: must be a positive multiple of 32" in one_line_error(capsys)


# --------------------------------------------------------------------------- refused before the model loads (issue 28)


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: these refusals must come before it loads (minutes on Wan2.2)."""
    from rewardfl.models.wan.model import Wan22TinyModel

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(Wan22TinyModel, "__init__", built)


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    """An environment where wandb finds no credentials: no WANDB_* variables, an empty home."""
    for var in [v for v in os.environ if v.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_check_and_run_refuse_what_a_run_would_meet_after_the_model_loads(make_config, capsys, no_model, monkeypatch,
                                                                          no_wandb_credentials):
    cases = {
        "unknown judge": ({"eval": {"judges": [{"name": "face_identiti"}]}, "eval_steps": 1},
                          "eval.judges[0].name: "),
        "a judge's detector": ({"eval": {"judges": [{"name": "face_identity", "detector": "nope.onnx"}]},
                                "eval_steps": 1}, "eval.judges[0].detector: file not found: "),
        "no held-out clips": ({"eval_steps": 1}, "data.eval_metadata_path / data.eval_fraction: no held-out clips"),
        "wandb without credentials": ({"report_to": ["wandb"]},
                                      "report_to: wandb has no credentials for api.wandb.ai here"),
    }
    for name, (over, want) in cases.items():
        cfg = make_config(max_steps=1, **over)
        for args in (["--check"], []):
            assert run.main([cfg, *args]) == 2, (name, args)
            err = one_line_error(capsys)
            assert want in err, (name, args, err)
    # wandb's own ways of having credentials or none needed: --check passes the trackers
    (no_wandb_credentials / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (no_wandb_credentials / ".netrc").chmod(0o600)
    assert run.main([make_config(report_to=["wandb"]), "--check"]) == 0
    os.unlink(no_wandb_credentials / ".netrc")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert run.main([make_config(report_to=["wandb"]), "--check"]) == 0
    assert "trackers wandb" in capsys.readouterr().out


def test_a_run_into_an_output_dir_in_use_is_refused_before_the_model_loads(make_config, tmp_path, capsys, no_model):
    import socket

    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert run.main([make_config(max_steps=1)]) == 2
    assert "in use by another run" in one_line_error(capsys)


def test_a_differentiable_reward_that_returns_detached_scores_is_one_line(make_config):
    """The real face reward with its scores detached (a plugin computing them under no_grad or through
    numpy): before, autograd's "element 0 of tensors does not require grad" traceback."""
    import dataclasses as dc

    from rewardfl.config import load_config
    from rewardfl.rewards.face_identity.reward import FaceIdentityReward

    class DetachedFaceReward(FaceIdentityReward):
        differentiable = True

        def __call__(self, videos, contexts):
            out = super().__call__(videos, contexts)
            return dc.replace(out, scores=out.scores.detach())

    cfg = load_config(make_config(max_steps=1))
    plugins = {**resolve_plugins(cfg), "reward": DetachedFaceReward}
    trainer = Trainer(cfg, plugins)
    with pytest.raises(ValueError) as e:
        trainer.train_step()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("reward (face_identity): declares itself differentiable, but its loss carries no "
                              "gradient from the videos"), message


def test_wrong_names_in_errors_are_the_names_the_user_wrote(make_config, capsys, tmp_path):
    """A typo'd reward-list key is suggested among the entry's own keys (weight, label, normalize, ...) too;
    a negative weight is refused; a missing --metadata is --metadata; rewardfl.run suggests no option it lacks."""
    from rewardfl import generate as generate_cli

    bad = {"reward": [{"name": "face_identity", "landmark_fallback": True, "weigth": 0.5}]}
    assert run.main([make_config(**bad), "--check"]) == 2
    err = one_line_error(capsys)
    assert "unknown key 'reward[0].weigth' (did you mean 'weight'?)" in err and "normalize" in err, err
    assert run.main([make_config(reward=[{"name": "face_identity", "weight": -1.0}]), "--check"]) == 2
    assert "reward[0].weight: must be >= 0, got -1.0" in one_line_error(capsys)
    missing = str(tmp_path / "nope.csv")
    assert generate_cli.main([make_config(), "--checkpoint", "base", "--metadata", missing,
                              "--out", str(tmp_path / "gen")]) == 2
    assert one_line_error(capsys).startswith(f"rewardfl.generate: error: --metadata: file not found: {missing}")
    assert run.main([make_config(eval_steps=1), "--check"]) == 2
    err = one_line_error(capsys)
    assert "no held-out clips configured" in err and "--metadata" not in err, err


REPLACE_AND_DIE = """
import os, signal, sys
import rewardfl.fileio as fileio
tmp, dest, mode = sys.argv[1], sys.argv[2], sys.argv[3]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if mode == "exchange":  # killed right after the one-step exchange, before the previous copy is removed
    rmtree = fileio.shutil.rmtree
    fileio.shutil.rmtree = lambda path, **kw: die() if path == tmp else rmtree(path, **kw)
else:  # a file system without exchange: killed between moving the previous one aside and the rename
    fileio._exchange = lambda a, b: False
    real = fileio.os.replace
    fileio.os.replace = lambda a, b: (real(a, b), die())
fileio.replace_directory(tmp, dest)
"""


@pytest.mark.parametrize("mode", ["exchange", "two renames"])
def test_a_kill_while_best_is_replaced_never_leaves_the_run_without_best(make_config, tmp_path, mode):
    out = tmp_path / "out"
    best, new = out / "best", out / "best.tmp"
    for folder, value in ((best, "old"), (new, "new")):
        folder.mkdir(parents=True)
        (folder / "best.json").write_text(value)
    child = subprocess.run([sys.executable, "-c", REPLACE_AND_DIE, str(new), str(best), mode], cwd=ROOT)
    assert child.returncode == -signal.SIGKILL
    if mode == "exchange":  # best/ is the new one at every moment; the previous one is left in best.tmp
        assert (best / "best.json").read_text() == "new" and (new / "best.json").read_text() == "old"
    else:  # best/ is gone until the next start puts the previous one back
        assert not best.exists() and (out / "best.old" / "best.json").read_text() == "old"
    assert run.main([make_config(max_steps=1)]) == 0  # the next run into output_dir
    assert (best / "best.json").read_text() == ("new" if mode == "exchange" else "old")
    assert sorted(n for n in os.listdir(out) if n.startswith("best")) == ["best"]
