"""``rewardfl.plan``: the memory planner, checked against a measured step and hand counts.

* The tracker itself, on real tensors whose bytes are known.
* The tiny twin's predicted step (fake tensors) against a measured CPU allocation trace of the
  real ``Trainer.train_step`` (the same dispatch tracker on real tensors): within 2 %.
* Parameter, gradient and optimizer bytes against hand counts: LoRA Psi x 4 bytes x (1 + 1 + 2)
  for fp32 weights, gradients and AdamW's two moments; DeepSpeed ZeRO-2's partitions.
* The A14B preset without any file: the expert's bf16 weights against the parameter count of
  Wan2.2-I2V-A14B's DiT written out by hand from its layer shapes.
* ``--fast`` (1- and 2-block runs, extrapolated) against the full run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from train_fixtures import make_config, small_dataset, tiny_dir  # noqa: F401  (fixtures)

from rewardfl.plan import planner

MiB = 2**20


def _resolved(path, *overrides):
    from rewardfl.config import load_config
    from rewardfl.registry import resolve_config, resolve_plugins

    cfg = load_config(path, list(overrides))
    plugins = resolve_plugins(cfg)
    return resolve_config(cfg, plugins), plugins


def tiny_lora_params(rank: int, layers: int = 2, dim: int = 64, ffn: int = 128) -> int:
    """LoRA parameters on q,k,v,o (self and cross attention) and ffn.0, ffn.2 of every block:
    rank x (in + out) per adapted Linear."""
    attention = 8 * rank * (dim + dim)
    return layers * (attention + rank * (dim + ffn) + rank * (ffn + dim))


# --------------------------------------------------------------------------- the tracker


def test_tracker_counts_bytes_per_storage_views_once_and_frees():
    tracker = planner.MemoryTracker()
    with tracker:
        tracker.mark()
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        view = a[10:20].view(2, 5)  # a view allocates nothing
        b = torch.empty(256, dtype=torch.bfloat16)  # 512 bytes
        assert tracker.device_live["cpu"] == 4000 + 512
        c = torch.ones(100, dtype=torch.float64) * 2  # ones (800) and the product (800) live together
        del view
        assert tracker.device_live["cpu"] == 4000 + 512 + 800  # the ones were freed; a is held by a
        del a
    assert tracker.peak["cpu"] == 4000 + 512 + 800 + 800
    assert tracker.new_peak == 4000 + 512 + 800 + 800
    assert tracker.device_live["cpu"] == 512 + 800  # b and c are left
    del b, c


# --------------------------------------------------------------------------- the tiny twin


_MEASURED: dict = {}


@pytest.fixture
def measured_and_planned(make_config):  # noqa: F811
    """(measured bytes, plan, metrics) for one tiny reward-FL step on the CPU (computed once)."""
    if not _MEASURED:
        _MEASURED["result"] = _measure_and_plan(make_config(reward={"reference_cache_dir": "none"}))
    return _MEASURED["result"]


def _measure_and_plan(path):
    cfg, plugins = _resolved(path)
    from rewardfl.training.loop import Trainer

    trainer = Trainer(cfg, plugins)
    trainer.train_step()  # first step: optimizer states, caches, the face twin
    tracker = planner.MemoryTracker()
    with tracker:
        tracker.mark()
        metrics = trainer.train_step()
    plan = planner.plan_memory(cfg, plugins, target="cpu")
    return tracker.new_peak, plan, metrics


def test_predicted_step_peak_matches_a_measured_cpu_step(measured_and_planned):
    measured, plan, metrics = measured_and_planned
    # the planner assumes one face per generated frame; the measured step must have had them
    assert metrics["reward/face_frames"] == 4, metrics
    assert measured > 50 * MiB  # the step did real work (reward, decode with gradient)
    assert abs(plan.step_peak - measured) <= 0.02 * measured, (plan.step_peak / MiB, measured / MiB)


def test_lora_gradient_and_adamw_bytes_match_a_hand_count(measured_and_planned):
    _, plan, _ = measured_and_planned
    psi = tiny_lora_params(rank=4)  # the fixture's lora_rank
    rows = {(c, where): b for c, b, where in plan.components}
    assert rows[("trainable parameters (LoRA), fp32", "device")] == psi * 4
    assert rows[("optimizer states (AdamW), fp32", "device")] == psi * 4 * 2  # exp_avg, exp_avg_sq
    assert plan.snapshots["optimizer update"]["gradients, fp32"] == psi * 4


def test_update_counts_the_rollback_copies_only_where_the_engine_makes_them(make_config, monkeypatch):  # noqa: F811
    """The plain engine's rule (``PlainEngine.pre_update_copy``): during an update it keeps copies of
    the trainable weights and of AdamW's two moments to roll a non-finite update back, but only
    while the trainable weights take at most ``engines.ROLLBACK_MAX_BYTES`` (2 GiB: LoRA); above
    that (a full fine-tune) it keeps none. The planned update peak differs by exactly those copies."""
    from rewardfl.training import engines

    cfg, plugins = _resolved(make_config(reward_model_path=None, data={"num_frames": 1}))
    psi, limit = tiny_lora_params(rank=4), engines.ROLLBACK_MAX_BYTES
    assert psi * 4 <= limit == 2 << 30
    update = {}
    for limit in (limit, 0):  # the LoRA as configured; then as if it were too large to copy
        monkeypatch.setattr(engines, "ROLLBACK_MAX_BYTES", limit)
        plan = planner.plan_memory(cfg, plugins)
        update[limit] = dict((n, g) for n, g, _ in plan.phases)["optimizer update"]
    assert update[2 << 30] - update[0] == psi * 4 * (1 + 2)  # fp32 weights, exp_avg, exp_avg_sq


def test_deepspeed_zero2_buffers_match_a_hand_count(make_config):  # noqa: F811
    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "bf16": {"enabled": True}}
    psi, ranks = tiny_lora_params(rank=4), 8
    part = math.ceil(psi / ranks)
    for offload in (False, True):
        section = dict(ds, zero_optimization=dict(ds["zero_optimization"], **(
            {"offload_optimizer": {"device": "cpu"}} if offload else {})))
        cfg, plugins = _resolved(make_config(deepspeed=section, mixed_precision="bf16", reward_model_path=None,
                                             data={"num_frames": 1}))
        plan = planner.plan_memory(cfg, plugins, world_size=ranks)
        rows = {(c, w): b for c, b, w in plan.components}
        where = "CPU" if offload else "GPU"
        assert rows[("trainable parameters (flat buffer), bf16", "GPU")] == psi * 2
        assert rows[("DeepSpeed: fp32 master weights (partition), fp32", where)] == part * 4
        assert rows[("DeepSpeed: optimizer states (Adam, partition), fp32", where)] == part * 4 * 2
        grads = ("DeepSpeed: gradients (partition), fp32", "CPU") if offload else \
            ("DeepSpeed: gradients (partition), bf16", "GPU")
        assert rows[grads] == part * (4 if offload else 2)
        assert rows[("DeepSpeed: reduce bucket, bf16", "GPU")] == 1000 * 2
        assert "ZeRO-2 over 8 ranks" in plan.engine


@pytest.mark.parametrize("algorithm", [
    {"name": "grpo", "group_size": 3, "beta": 0.04, "train_fraction": 1.0},
    {"name": "hybrid", "policy": {"group_size": 2, "beta": 0.04}},
])
def test_a_policy_gradient_step_is_planned_as_measured(make_config, algorithm):  # noqa: F811
    """A GRPO step (3 videos per clip sampled with the SDE, decoded without gradient, scored by the real
    face reward in onnxruntime, then the window's trained steps again with gradient plus the reference
    forward), and hybrid on the face reward alone (every entry gives gradients: reward backprop's step):
    the planner's prediction (fake tensors, the algorithm's own ``planned_micro_batch``) against the real
    ``Trainer.train_step`` measured by the same tracker: within 2 %."""
    from rewardfl.training.loop import Trainer

    path = make_config(algorithm=algorithm, mid_timestep=1, final_timestep=3, reward={"reference_cache_dir": "none"})
    cfg, plugins = _resolved(path)
    trainer = Trainer(cfg, plugins)
    trainer.train_step()  # optimizer states, caches
    tracker = planner.MemoryTracker()
    with tracker:
        tracker.mark()
        trainer.train_step()
    plan = planner.plan_memory(cfg, plugins, target="cpu")
    measured = tracker.new_peak
    assert measured > 10 * MiB
    assert abs(plan.step_peak - measured) <= 0.02 * measured, (plan.step_peak / MiB, measured / MiB, plan.peak_phase)
    phases = set(plan.snapshots)
    if algorithm["name"] == "grpo":
        assert {"denoise (dit2, no grad)", "denoise (dit2, grad)", "decode no grad (VAE)",
                "denoise (dit2): reference forward (no grad)"} <= phases, sorted(phases)
        assert "decode with grad (VAE)" not in phases
        assert [n for n in plan.notes if n.startswith("reward")] == [
            "reward: scored without gradient under algorithm grpo (not planned: on the GPU it holds only the frames "
            "it converts)"]
    else:
        assert "decode with grad (VAE)" in phases and "decode no grad (VAE)" not in phases, sorted(phases)


def test_a_hybrid_step_with_both_kinds_of_reward_plans_both_halves(make_config, tmp_path):  # noqa: F811
    """[face_identity, identity_consistency with gradient: false]: the backprop half's decode with gradient
    and the policy half's sampling, decode without gradient and trained steps are all planned, and the
    step needs more than either algorithm alone on the same list."""
    reward = [{"name": "face_identity", "landmark_fallback": True, "det_size": 160},
              {"name": "identity_consistency", "weight": 0.5, "gradient": False, "landmark_fallback": True,
               "det_size": 160}]

    def planned(algorithm):
        path = make_config(algorithm=algorithm, mid_timestep=1, final_timestep=3)
        raw = yaml.safe_load(open(path))
        raw["reward"] = reward
        path = tmp_path / f"{algorithm['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return planner.plan_memory(*_resolved(str(path)), target="cpu")

    policy = {"group_size": 2, "beta": 0.04}
    hybrid = planned({"name": "hybrid", "policy": policy})
    assert {"decode with grad (VAE)", "decode no grad (VAE)", "denoise (dit2, grad)"} <= set(hybrid.snapshots)
    assert hybrid.step_peak > planned({"name": "grpo", **policy}).step_peak


def test_planner_step_on_real_tensors_matches_its_fake_run(make_config):  # noqa: F811
    """``run_step(device=...)``, the GPU check's measured side, on real CPU tensors (random weights
    built in place) against the same step on fake tensors."""
    from rewardfl.plan.plugins import resolve_spec

    cfg, plugins = _resolved(make_config(reward_model_path=None, data={"num_frames": 5}))
    spec = resolve_spec(cfg, None)
    fake = planner.run_step(cfg, plugins, spec, target="cpu")
    real = planner.run_step(cfg, plugins, spec, target="cpu", device=torch.device("cpu"))
    assert real["device"] == "cpu" and fake["device"] == "meta"
    assert real["step_peak"] > 1 * MiB
    assert abs(fake["step_peak"] - real["step_peak"]) <= 0.01 * real["step_peak"], (fake["step_peak"],
                                                                                      real["step_peak"])


def test_the_model_decides_its_offloads_for_the_planned_target(make_config):  # noqa: F811
    """``offload_idle_expert: auto`` and the text encoder's parking follow the model's ``DeviceTarget``
    (the GPU the plan is for and its memory), not the meta device the skeleton is built on."""
    from rewardfl.plan.plugins import build_skeleton, resolve_spec

    cfg, plugins = _resolved(make_config(reward_model_path=None, mixed_precision="auto", data={"num_frames": 1}))
    spec = resolve_spec(cfg, None)
    decided = {}
    for target, gpu_bytes in (("cuda", 1), ("cuda", 2**40), ("cpu", 1)):
        with planner.fake_device(target) as (_, device):
            model = build_skeleton(plugins["model"], cfg, cfg.model, spec, device=device, target=target,
                                   gpu_bytes=gpu_bytes)
            decided[(target, gpu_bytes)] = (model.offload_experts, model._offload_text, model.dtype)
    assert decided == {("cuda", 1): (True, True, torch.bfloat16), ("cuda", 2**40): (False, True, torch.bfloat16),
                       ("cpu", 1): (False, False, torch.float32)}


def test_fast_mode_extrapolates_the_full_run(make_config):  # noqa: F811
    from rewardfl.plan.plugins import resolve_spec

    cfg, plugins = _resolved(make_config(reward_model_path=None, data={"num_frames": 1}))
    spec = resolve_spec(cfg, None).with_layers(5)
    full = planner.plan_memory(cfg, plugins, spec=spec)
    fast = planner.plan_memory(cfg, plugins, spec=spec, fast=True)
    assert "extrapolated" in fast.mode and "full" in full.mode
    assert abs(fast.peak - full.peak) <= 0.001 * full.peak, (fast.peak, full.peak)
    assert [n for n, _, _ in fast.phases] == [n for n, _, _ in full.phases]


# --------------------------------------------------------------------------- the CLI


def a14b_expert_params(blocks: int = 40) -> int:
    """Wan2.2-I2V-A14B's DiT (one expert), counted from its layer shapes (docs/design.md section 4):
    dim 5120, ffn 13824, 40 blocks, 36 input / 16 output channels, patch 1x2x2, text 4096, freq 256.
    (14,288,901,184 for the 40 blocks.)"""
    d, f = 5120, 13824
    attention = 4 * (d * d + d) + 2 * d  # q, k, v, o with biases; RMS norms of q and k
    block = 2 * attention + 2 * d + (d * f + f + f * d + d) + 6 * d  # self + cross, norm3, ffn, modulation
    stem = 36 * 4 * d + d  # patch embedding (Conv3d 1x2x2)
    stem += (4096 * d + d + d * d + d) + (256 * d + d + d * d + d) + (6 * d * d + 6 * d)  # text, time, projection
    head = 16 * 4 * d + 16 * 4 + 2 * d
    return blocks * block + stem + head


def umt5_xxl_params() -> int:
    """umT5-xxl's encoder: 256384 x 4096 embedding, 24 blocks of attention (q, k, v, o; no biases),
    gated-GELU FFN (fc1, gate 4096 -> 10240, fc2 back), two RMS norms and a 32 x 64 relative
    position table each; a final RMS norm."""
    d, f, heads, buckets = 4096, 10240, 64, 32
    block = 4 * d * d + 3 * d * f + 2 * d + buckets * heads
    return 256384 * d + 24 * block + d


def test_a14b_preset_plans_without_files():
    """The A14B preset (no file anywhere), one of its 40 blocks run: the experts' bf16 weights as
    counted by hand, one on the GPU at the peak and the other parked (offload_idle_expert)."""
    from rewardfl.config import config_from_dict
    from rewardfl.plan.plugins import spec_from_preset
    from rewardfl.registry import resolve_config, resolve_plugins

    cfg = config_from_dict({"model_name": "wan2_2", "data": {"num_frames": 1, "height": 64, "width": 64},
                            "model": {"offload_idle_expert": "yes"}})
    plugins = resolve_plugins(cfg)
    cfg = resolve_config(cfg, plugins)
    spec = spec_from_preset("wan2.2-i2v-a14b")
    assert spec.dit.kwargs["num_layers"] == 40 and spec.experts == ("dit", "dit2")
    plan = planner.plan_memory(cfg, plugins, spec=spec.with_layers(1))
    rows = {(c, w): b for c, b, w in plan.components}
    experts = {w: b for (c, w), b in rows.items() if "expert) weights, bf16" in c}
    assert experts == {"GPU": a14b_expert_params(blocks=1) * 2, "CPU": a14b_expert_params(blocks=1) * 2}
    assert rows[("text encoder (umT5) weights, bf16", "GPU" if plan.peak_phase.startswith("encode (text") else "CPU")] \
        == umt5_xxl_params() * 2


def test_cli_prints_one_json_object(make_config, capsys):  # noqa: F811
    path = make_config(reward_model_path=None, data={"num_frames": 1})
    assert planner.main([path, "--json", "--gpu-memory", "1GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"peak_gib", "fits", "components", "phases", "lever"}
    assert out["fits"] is True and 0 < out["peak_gib"] <= 1.0 and out["lever"] is None


def test_levers_are_the_memory_options_not_yet_pulled(make_config):  # noqa: F811
    cfg, plugins = _resolved(make_config(use_gradient_checkpointing_offload=True,
                                         model={"vae_tile": [8, 8], "vae_tile_stride": [4, 4],
                                                "vae_checkpointing": True}))
    levers = dict(planner.lever_candidates(cfg, plugins))
    assert set(levers) == {"model.offload_idle_expert: yes", "deepspeed: ZeRO-2 with offload_optimizer.device: cpu"}
    changed = planner.copy.deepcopy(cfg)
    levers["model.offload_idle_expert: yes"](changed)
    assert changed.model.offload_idle_expert == "yes" and cfg.model.offload_idle_expert == "auto"


@pytest.mark.parametrize("args, message", [
    (["--preset", "wan2.2-i2v-a14"], "--preset: unknown preset 'wan2.2-i2v-a14' (did you mean 'wan2.2-i2v-a14b'?)"),
    (["--preset", "wan2.2-i2v-a14b", "--gpu-memory", "lots"], "--gpu-memory: expected a size"),
    (["--preset", "wan2.2-i2v-a14b", "--world-size", "0"], "--world-size: must be >= 1"),
    ([], "--preset NAME"),  # no model files: plan before downloading with a preset
])
def test_user_errors_are_one_line_naming_the_argument(tmp_path, capsys, args, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model_name": "wan2_2", "model_paths": str(tmp_path / "missing.json")}))
    assert planner.main([str(cfg), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rewardfl.plan: error: ") and "\n" not in err and message in err, err


def test_gpu_memory_sizes():
    assert planner.parse_size("80GiB") == 80 * 2**30
    assert planner.parse_size("80GB") == 80 * 10**9
    assert planner.parse_size("141") == 141 * 2**30
    assert planner.parse_size("512MiB") == 512 * 2**20
