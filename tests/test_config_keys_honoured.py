"""Every accepted key does what it says (issue: keys accepted and then ignored), on the real loop.

The gradient window of the user's config, ``extra_inputs``, ``logging_steps``, classifier-free
guidance end to end, ``data.num_workers``.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import yaml

from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import build_tiny, tiny_dir  # noqa: F401  (session fixture)

from rewardfl import registry, run
from rewardfl.config import config_from_dict, load_config
from rewardfl.registry import resolve_plugins
from rewardfl.data import VideoDataset
from rewardfl.training import Trainer, TrainState
from rewardfl.training.batches import MicroBatches
from rewardfl.sampling.rollout import sample_latents
from rewardfl.sampling.policy import plan_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- the user's gradient window


def test_users_example_config_plans_gradient_at_steps_4_to_7_with_the_boundary_note(tiny_dir, tmp_path, capsys,
                                                                                      face_assets):
    # examples/reward_fl_wan22.yaml as it stands, only its paths pointed at tiny files
    raw = yaml.safe_load(open(os.path.join(ROOT, "examples", "reward_fl_wan22.yaml"), encoding="utf-8"))
    raw.update(model_paths=os.path.join(tiny_dir, "model_paths.json"), tokenizer_path=os.path.join(tiny_dir, "tokenizer"),
               reward_model_path=face_assets.scrfd_sface, output_dir=str(tmp_path / "out"))
    raw["data"]["metadata_path"] = None
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run.main([str(path), "--check"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "plan     8 steps, gradient at 4:dit2, 5:dit2, 6:dit2, 7:dit2" in out
    note = [line for line in out.splitlines() if "min_timestep_boundary/max_timestep_boundary" in line]
    assert len(note) == 1 and "[0.9, 1]" in note[0] and "timesteps 5..357" in note[0]
    assert "do not change reward-FL sampling" in note[0]
    # the boundary keys stay in the resolved config
    cfg = load_config(str(path), paths=False)
    assert (cfg.min_timestep_boundary, cfg.max_timestep_boundary) == (0.9, 1.0)


def test_training_timestep_range_agrees_with_diffsynths_training_schedule():
    # DiffSynth-Studio's own Wan training schedule, and its trainer's draw range [int(min*T), int(max*T))
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    from rewardfl.config import training_timestep_range

    sched = FlowMatchScheduler("Wan")
    sched.set_timesteps(1000, training=True, shift=5)
    ts = sched.timesteps.double()
    for lo_frac, hi_frac in ((0.9, 1.0), (0.358, 1.0), (0.0, 0.5)):
        lo_i, hi_i = int(lo_frac * 1000), int(hi_frac * 1000)
        low, high = training_timestep_range(lo_frac, hi_frac)
        assert high == pytest.approx(float(ts[lo_i]), rel=1e-4)
        assert low == pytest.approx(float(ts[hi_i - 1]), rel=1e-3, abs=1e-2)


# --------------------------------------------------------------------------- extra_inputs


@pytest.mark.parametrize("value,pattern", [
    ("input_image,end_image", r"extra_inputs: end_image not supported; rewardfl supports input_image"),
    ("reference_image", r"extra_inputs: reference_image not supported"),
    ("''", r"extra_inputs: wan2_2_tiny is an image-to-video model and needs input_image"),
])
def test_unsupported_or_missing_extra_inputs_are_one_line_errors(make_config, capsys, value, pattern):
    path = make_config()
    assert run.main([path, "--check", "--set", f"extra_inputs={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(pattern, err[0]), err


def test_input_image_is_accepted(make_config, capsys):
    assert run.main([make_config(extra_inputs="input_image"), "--check"]) == 0


# --------------------------------------------------------------------------- logging_steps


def test_logging_steps_rows_are_means_of_n_steps(make_config, tmp_path):
    every = make_config(max_steps=4, save_steps=4, output_dir=str(tmp_path / "every"))
    assert run.main([every]) == 0
    per_step = read_metrics(str(tmp_path / "every"))
    pairs = make_config(max_steps=4, save_steps=4, logging_steps=2, output_dir=str(tmp_path / "pairs"))
    assert run.main([pairs]) == 0
    rows = read_metrics(str(tmp_path / "pairs"))
    assert [r["step"] for r in rows] == [2, 4]
    for row, (a, b) in zip(rows, [per_step[0:2], per_step[2:4]]):
        assert row["logged_steps"] == 2
        for key in ("loss", "reward_score", "kl_loss", "lr", "grad_norm"):
            assert row[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-6, abs=1e-9), key
        assert row["updated"] == int(a["updated"]) + int(b["updated"])


# --------------------------------------------------------------------------- guidance


def test_guided_sampling_against_a_hand_computation(tiny_dir):
    """guidance_scale 3 with a negative prompt: every step mixes v_uncond + g (v - v_uncond), in float64
    by hand from the model's own conditional and unconditional velocities."""
    cfg = config_from_dict({"model_name": "wan2_2_tiny", "lora_rank": 4, "mixed_precision": "fp32",
                            "num_inference_steps": 4, "mid_timestep": 2, "final_timestep": 3})
    model = build_tiny(tiny_dir, num_inference_steps=4, mid_timestep=2, final_timestep=3)
    sampler = registry.create("sampler", "flow_match_euler", cfg,
                              {"guidance_scale": 3.0, "negative_prompt": "blurry", "kernels": "torch",
                               "latent_dtype": "float32"})
    plan = plan_steps(cfg, sampler, model.experts, model.trainable_experts(), 0.9)
    g = torch.Generator().manual_seed(0)
    first = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    batch = {"first_frame": first, "prompt": ["a face"]}
    with torch.no_grad():
        got, _ = sample_latents(model, sampler, plan, batch, num_frames=5, step=0, seeds=[11], kl_weight=0.0)
        cond = model.encode(["a face"], first, 5)
        uncond = model.encode(["blurry"], first, 5)
        x = sampler.initial_noise(model.latent_shape(5, 32, 32), sample_seeds=[11], step=0).double()
        for p in plan:
            t = torch.full((1,), p.timestep)
            v = model.denoise(p.expert, x.float(), t, cond).double()
            vu = model.denoise(p.expert, x.float(), t, uncond).double()
            x = x + (p.sigma_next - p.sigma) * (vu + 3.0 * (v - vu))
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)
    # and guidance changes the result: the same call without it differs
    plain = registry.create("sampler", "flow_match_euler", cfg, {"kernels": "torch", "latent_dtype": "float32"})
    with torch.no_grad():
        other, _ = sample_latents(model, plain, plan, batch, num_frames=5, step=0, seeds=[11], kl_weight=0.0)
    assert (other - got).abs().max() > 1e-3


def test_guided_training_step_runs_and_updates(make_config):
    cfg = load_config(make_config(max_steps=1, sampler={"name": "flow_match_euler", "guidance_scale": 2.0}))
    trainer = Trainer(cfg, resolve_plugins(cfg))
    before = {k: v.clone() for k, v in trainer.model.trainable_state_dict().items()}
    record = trainer.train_step()
    assert record["updated"] is True and math.isfinite(record["loss"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.trainable_state_dict().items())


# --------------------------------------------------------------------------- data.num_workers


def test_num_workers_decode_ahead_and_give_the_same_batches(make_config):
    batches = {}
    for workers in (0, 2):
        cfg = load_config(make_config(data={"num_workers": workers}))
        dataset = VideoDataset(cfg.resolve_path(cfg.data.metadata_path), num_frames=5, max_pixels=4096,
                               height=64, width=64)
        # only the data half: no model needed to compare batches
        data, state = MicroBatches(dataset, batch_size=1, seed=cfg.seed, num_workers=cfg.data.num_workers), TrainState()
        batches[workers] = [data.next(state) for _ in range(5)]  # crosses an epoch boundary
        assert data.per_epoch == len(dataset) == 2 and state.epoch == 2 and state.position == 1
    for a, b in zip(batches[0], batches[2]):
        assert a["sample_id"] == b["sample_id"] and torch.equal(a["video"], b["video"])
