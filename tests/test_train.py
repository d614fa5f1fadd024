"""The training loop end to end on the tiny Wan twin, the real face models and real videos."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import run
from rewardfl.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from rewardfl.config import load_config
from rewardfl.registry import resolve_plugins
from rewardfl.training import Trainer
from rewardfl.training.engines import lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("step_time_s",)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def test_three_step_run_writes_metrics_checkpoint_video_and_curve(make_config, tmp_path):
    cfg_path = make_config(sample_video_steps=3)
    assert run.main([cfg_path]) == 0
    out = str(tmp_path / "out")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss", "reward_score", "kl_loss", "lr", "grad_norm", "step_time_s", "skipped_samples",
                    "skipped_nonfinite", "skipped_no_reference"):
            assert key in r, key
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert -1.0 <= r["reward_score"] <= 1.0
        # loss = shaped reward loss + kl, shaping -(score - 0.54) / 0.16 * 0.1 (one sample per step)
        assert r["reward_loss"] == pytest.approx(-(r["reward_score"] - 0.54) / 0.16 * 0.1, abs=1e-5)
        assert r["loss"] == pytest.approx(r["reward_loss"] + r["kl_loss"], abs=1e-6)
    # warm-up of 1 step then constant: the lr logged is the one each update used
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3, 1e-3])
    assert records[0]["kl_loss"] == 0.0  # fresh LoRA: the adapted expert equals the base one
    assert records[1]["kl_loss"] > 0.0   # after an update it no longer does
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [2, 3]
    assert os.path.getsize(os.path.join(out, "samples", "step-000003.mp4")) > 0
    assert os.path.getsize(os.path.join(out, "reward_curve.png")) > 0
    # diffsynth LoRA format; the low-noise expert alone, named for it (ComfyUI users load files by name)
    assert os.listdir(os.path.join(out, "final")) == ["trainable_low_noise.safetensors"]
    assert os.path.getsize(os.path.join(out, "final", "trainable_low_noise.safetensors")) > 0
    resolved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert resolved["max_steps"] == 3 and resolved["reward"]["name"] == "face_identity"

    import imageio.v3 as iio

    video = iio.imread(os.path.join(out, "samples", "step-000003.mp4"))
    assert video.shape == (5, 64, 128, 3)  # reference | generated, side by side


def test_checkpoint_holds_exactly_the_trainable_weights(make_config, tmp_path):
    cfg = load_config(make_config(max_steps=2))
    trainer = Trainer(cfg, resolve_plugins(cfg))
    trainer.run()
    weights, state = load_checkpoint(latest_checkpoint(trainer.ckpt_dir))
    live = trainer.model.trainable_state_dict()
    assert sorted(weights) == sorted(live)
    for k in live:
        assert torch.equal(weights[k], live[k].cpu())
    assert (state["step"], state["epoch"], state["position"]) == (2, 0, 2)  # 2 clips, batch 1: epoch 0 fully read


def _run_cli(cfg_path, **kw):
    return subprocess.Popen([sys.executable, "-m", "rewardfl.run", cfg_path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def kill_once_saved(cfg_path, checkpoint, timeout=600):
    """``python -m rewardfl.run cfg_path`` in a real process, SIGKILLed as soon as ``checkpoint`` exists."""
    proc = _run_cli(cfg_path)
    deadline = time.time() + timeout
    while not os.path.exists(checkpoint) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_killed_run_resumes_to_the_same_metrics(make_config, tmp_path):
    # uninterrupted reference run, 4 steps
    ref_cfg = make_config(max_steps=4, output_dir=str(tmp_path / "ref"))
    assert run.main([ref_cfg]) == 0
    expected = stable(read_metrics(str(tmp_path / "ref")))
    assert len(expected) == 4

    # the same run, SIGKILLed once its step-2 checkpoint exists, then resumed
    cfg = make_config(max_steps=4, output_dir=str(tmp_path / "cut"))
    kill_once_saved(cfg, tmp_path / "cut" / "checkpoints" / "checkpoint-2")
    resumed = make_config(max_steps=4, output_dir=str(tmp_path / "cut"), resume_from_checkpoint=True)
    assert run.main([resumed]) == 0
    got = stable(read_metrics(str(tmp_path / "cut")))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got == expected


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(make_config, tmp_path):
    # a child process saves checkpoint 1 of a real Trainer, then is SIGKILLed in the middle of
    # writing checkpoint 2 (its optimizer, RNG states and weights written, its manifest not)
    cfg = make_config()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from rewardfl import checkpoints as checkpoint
        from rewardfl.config import load_config
        from rewardfl.registry import resolve_plugins
        from rewardfl.training import Trainer
        cfg = load_config({cfg!r})
        trainer = Trainer(cfg, resolve_plugins(cfg))
        def save(step, value):
            with torch.no_grad():
                for p in trainer.params:
                    p.fill_(value)
            trainer.state.step = trainer.state.position = step
            trainer.save()
        save(1, 0.25)
        real_write = checkpoint.write_safetensors
        def dying_write(path, tensors, *a, **k):
            real_write(path, tensors, *a, **k)
            if path.endswith("trainable.safetensors"):
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.write_safetensors = dying_write
        save(2, 0.0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = str(tmp_path / "out" / "checkpoints")
    assert ".checkpoint-2.tmp" in os.listdir(root)  # the torn write
    assert latest_checkpoint(root).endswith("checkpoint-1")
    resumed_cfg = load_config(make_config(resume_from_checkpoint=True))
    trainer = Trainer(resumed_cfg, resolve_plugins(resumed_cfg))
    assert trainer.maybe_resume().endswith("checkpoint-1")
    assert all(bool((v == 0.25).all()) for v in trainer.model.trainable_state_dict().values())
    assert (trainer.state.step, trainer.state.position) == (1, 1)
    trainer.state.step = 2  # the next save is not blocked by the leftovers, and removes them
    trainer.save()
    assert sorted(os.listdir(root)) == ["checkpoint-1", "checkpoint-2"]


def test_non_finite_loss_skips_the_update(make_config):
    cfg = load_config(make_config(max_steps=2))
    trainer = Trainer(cfg, resolve_plugins(cfg))
    before = {k: v.clone() for k, v in trainer.model.trainable_state_dict().items()}
    real_loss = trainer.reward.loss
    trainer.reward.loss = lambda out: real_loss(out) * float("nan")  # fault injection: one poisoned step
    record = trainer.train_step()
    assert record["updated"] is False and record["skipped_nonfinite"] == 1
    after = trainer.model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.reward.loss = real_loss
    record = trainer.train_step()
    assert record["updated"] is True and record["skipped_nonfinite"] == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.trainable_state_dict().items())


def test_missing_dataset_file_fails_fast_with_one_line(make_config, tmp_path, capsys):
    csv = tmp_path / "meta.csv"
    csv.write_text("video,prompt\nclips/missing.mp4,a face\n")
    cfg = make_config(data={"metadata_path": str(csv)})
    t0 = time.perf_counter()
    assert run.main([cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rewardfl.run: error: ")
    assert "missing.mp4" in err[0] and "meta.csv:2" in err[0]
    assert time.perf_counter() - t0 < 30  # before any model is loaded


def test_missing_metadata_csv_is_a_config_error(make_config, capsys):
    cfg = make_config(data={"metadata_path": "/nonexistent/metadata.csv"})
    assert run.main([cfg, "--check"]) == 2
    assert "data.metadata_path: path does not exist: /nonexistent/metadata.csv" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule_against_hand_values(kind):
    f = lr_lambda(kind, warmup=2, total=6)
    got = [f(s) for s in range(7)]
    warm = [0.5, 1.0]
    rest = {"constant": [1.0] * 5,
            "linear": [1.0, 0.75, 0.5, 0.25, 0.0],
            "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1.0)]}[kind]
    assert got == pytest.approx(warm + rest)


def test_train_batch_size_must_agree(make_config, capsys):
    cfg = make_config(train_batch_size=3, gradient_accumulation_steps=2)
    assert run.main([cfg]) == 2
    assert "train_batch_size: 3 != per_device_train_batch_size (1) x processes (1) x gradient_accumulation_steps (2)" \
        in capsys.readouterr().err


def test_check_plans_the_gradient_window_before_loading_the_model(make_config, capsys):
    # N=4, shift 5: timesteps 1000, 937.5, 833.3, 625; boundary 0.9 -> steps 0-1 dit, 2-3 dit2;
    # mid=2, final=3: gradient on steps 2 and 3, both on dit2
    assert run.main([make_config(), "--check"]) == 0
    out = capsys.readouterr().out
    assert "plan     4 steps, gradient at 2:dit2, 3:dit2" in out
    # min_timestep_boundary 0.75 keeps only step 3 (dit2): with only dit trainable, nothing would learn
    bad = make_config(trainable_models="dit", lora_base_model="dit", min_timestep_boundary=0.75)
    assert run.main([bad, "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainable_models" in err[0], err
