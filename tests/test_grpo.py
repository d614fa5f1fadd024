"""``algorithm: grpo``: advantages and the clipped surrogate against hand computations, the policy
gradient against the analytic gradient of an expected reward, and real runs on the tiny model with a
reward used without its gradient (the ratio of the first update exactly 1, kill and resume exact)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from rewardfl import run
from rewardfl.algorithms.grpo import STD_EPS, clipped_surrogate, group_advantages
from rewardfl.kernels import sde_coefficients, sde_step
from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)
from test_train import kill_once_saved, read_metrics, stable


def test_group_advantages_by_hand():
    scores = torch.tensor([0.2, 0.5, 0.8, 0.1, 0.4, 0.4, 0.9, 0.3, 0.7])
    valid = torch.tensor([True, True, True, True, True, False, True, False, False])
    adv = group_advantages(scores, valid, 3).numpy()
    g1 = np.array([0.2, 0.5, 0.8])
    np.testing.assert_allclose(adv[:3], (g1 - g1.mean()) / (g1.std() + STD_EPS), rtol=1e-6, atol=1e-6)
    g2 = np.array([0.1, 0.4])  # the invalid member is left out of mean and std, and gets 0
    np.testing.assert_allclose(adv[3:5], (g2 - g2.mean()) / (g2.std() + STD_EPS), rtol=1e-6, atol=1e-6)
    assert adv[5] == 0
    assert (adv[6:] == 0).all()  # one valid video: nothing to compare
    flat = np.array([0.2, 0.5, 0.8, 0.1, 0.4, 0.9])
    glob = group_advantages(scores, valid, 3, std="global").numpy()
    np.testing.assert_allclose(glob[:3], (g1 - g1.mean()) / (flat.std() + STD_EPS), rtol=1e-6, atol=1e-6)


def test_clipped_surrogate_by_hand():
    old = torch.zeros(4, dtype=torch.float64)
    new = torch.tensor([0.0, 0.3, -0.3, 0.05], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0], dtype=torch.float64)
    loss, stats = clipped_surrogate(new, old, adv, 0.1)
    r = np.exp([0.0, 0.3, -0.3, 0.05])
    a = adv.numpy()
    terms = np.maximum(-a * r, -a * np.clip(r, 0.9, 1.1))
    assert loss.item() == pytest.approx(terms.mean(), rel=1e-12)
    loss.backward()
    # clipped terms (r > 1.1 with A > 0; r < 0.9 with A < 0) give no gradient; the others -A r / N
    expected = np.where([False, True, True, False], 0.0, -a * r / 4)
    np.testing.assert_allclose(new.grad.numpy(), expected, rtol=1e-12)
    assert stats["clip_fraction"] == pytest.approx(0.5)


def test_the_surrogate_gradient_is_the_policy_gradient_of_the_expected_reward():
    """A Gaussian policy (one SDE step, v the parameter) and a quadratic reward R(x) = -(x - c)^2:
    E[R] = -((m - c)^2 + s^2) with m = c_x x + c_v v, so dE/dv = -2 c_v (m - c). The surrogate's gradient
    at ratio 1 with advantages R - mean(R) (REINFORCE with a baseline) estimates it."""
    n, c = 200_000, 0.3
    coef = sde_coefficients(0.6, 0.45, 0.8)
    x = torch.full((n, 1), 0.5, dtype=torch.float64)
    v = torch.full((n, 1), -0.2, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    x_next, logp_old = sde_step(x, v.detach(), coef, noise=torch.randn(n, 1, generator=g, dtype=torch.float64))
    reward = -(x_next[:, 0] - c) ** 2
    _, logp = sde_step(x, v, coef, x_next=x_next)
    loss, stats = clipped_surrogate(logp, logp_old, reward - reward.mean(), 0.2)
    assert stats["ratio_max_dev"] == 0.0
    loss.backward()
    estimate = -v.grad.sum().item()  # minimising the surrogate ascends E[R]: -grad is the ascent direction
    m = coef.c_x * 0.5 + coef.c_v * -0.2
    exact = -2 * coef.c_v * (m - c)
    se = 4 * abs(coef.c_v) * coef.s / math.sqrt(n) * (abs(m - c) + coef.s) / coef.s  # a loose MC bound
    assert estimate == pytest.approx(exact, abs=max(se, 0.02 * abs(exact)))


# --------------------------------------------------------------------------- real runs


def _grpo_config(make_config, tmp_path, **overrides):
    return make_config(**{"algorithm": {"name": "grpo", "group_size": 2, "noise_level": 0.7, "beta": 0.04},
                          "mid_timestep": 1, "final_timestep": 3, "learning_rate": 3e-3,
                          "output_dir": str(tmp_path / "out"), **overrides})


def test_grpo_trains_with_the_reward_used_without_gradient(make_config, tmp_path):
    from rewardfl.registry import load_resolved
    from rewardfl.training import Trainer

    cfg, plugins = load_resolved(_grpo_config(make_config, tmp_path))
    trainer = Trainer(cfg, plugins)
    before = {k: v.clone() for k, v in trainer.model.trainable_state_dict().items()}
    record = trainer.train_step()
    assert record["updated"] and math.isfinite(record["loss"])
    # the stored transitions re-scored under the same weights: the ratio is exactly 1
    assert record["reward/grpo/ratio_max_dev"] == 0.0
    assert record["reward/grpo/trained_steps"] == 2.0  # steps 1..3 run the trainable low-noise expert at 2 and 3
    after = trainer.model.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_kill_and_resume_reproduce_an_uninterrupted_run(make_config, tmp_path):
    ref = _grpo_config(make_config, tmp_path, max_steps=3, output_dir=str(tmp_path / "ref"))
    assert run.main([ref]) == 0
    expected = stable(read_metrics(str(tmp_path / "ref")))
    cut = _grpo_config(make_config, tmp_path, max_steps=3, output_dir=str(tmp_path / "cut"))
    kill_once_saved(cut, tmp_path / "cut" / "checkpoints" / "checkpoint-2")
    resumed = _grpo_config(make_config, tmp_path, max_steps=3, output_dir=str(tmp_path / "cut"),
                           resume_from_checkpoint=True)
    assert run.main([resumed]) == 0
    got = stable(read_metrics(str(tmp_path / "cut")))
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got == expected


def _with_reward(path, reward):
    import yaml

    raw = yaml.safe_load(open(path))
    raw["reward"] = reward
    if reward.get("name") not in ("face_identity", "identity_consistency"):
        raw.pop("reward_model_path", None)  # the face rewards' key: unknown without one
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def test_reward_backprop_with_a_reward_without_gradient_is_one_line(make_config, tmp_path, capsys):
    cfg = _with_reward(make_config(), {"name": "command", "command": [sys.executable, "-c", "print(1)"]})
    assert run.main([cfg, "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rewardfl.run: error: algorithm: reward_backprop needs a reward with gradients; "
                          "command gives none") and "\n" not in err


def test_grpo_check_accepts_a_command_reward(make_config, tmp_path, capsys):
    cfg = _with_reward(_grpo_config(make_config, tmp_path), {"name": "command", "command": [sys.executable, "-c", "1"]})
    assert run.main([cfg, "--check"]) == 0
    out = capsys.readouterr().out
    assert "algorithm grpo: 2 videos per clip, stochastic steps 1..3" in out


@pytest.mark.parametrize("options, key", [({"group_size": 1}, "algorithm.group_size"),
                                          ({"noise_level": 0}, "algorithm.noise_level"),
                                          ({"sde": "cps", "noise_level": 1.5}, "algorithm.noise_level"),
                                          ({"sde": "ode"}, "algorithm.sde"),
                                          ({"train_fraction": 0}, "algorithm.train_fraction"),
                                          ({"bogus": 1}, "algorithm")])
def test_bad_grpo_options_name_the_key(make_config, tmp_path, capsys, options, key):
    cfg = make_config(algorithm={"name": "grpo", **options})
    assert run.main([cfg, "--check"]) == 2
    assert key in capsys.readouterr().err


# --------------------------------------------------------------------------- several updates per sampled batch


def _hand_surrogate(trainer, state: dict, batch: dict) -> tuple[float, float]:
    """The clipped surrogate of the next update in float64 from the stored groups of micro-batch 0: the
    Gaussian log-probability of each stored transition under the current weights, the ratio to the
    stored one, advantages normalised within each group, PPO's clip, averaged over videos and steps;
    and the same without the clip."""
    o, model, g = trainer.cfg.algorithm.options, trainer.model, trainer.cfg.algorithm.options.group_size
    plans = {p.index: p for p in trainer.plan}
    first = batch["first_frame"].repeat_interleave(g, 0)
    cond = model.encode([p for p in batch["prompt"] for _ in range(g)], first, trainer.cfg.data.num_frames)
    scores, valid = state["0.scores"].double().numpy().reshape(-1, g), state["0.valid"].numpy().reshape(-1, g)
    assert valid.all()
    adv = ((scores - scores.mean(1, keepdims=True)) / (scores.std(1, keepdims=True) + STD_EPS)).reshape(-1)
    terms, j = [], 0
    while f"0.step.{j}.plan" in state:
        p = plans[int(state[f"0.step.{j}.plan"])]
        x, x_next = state[f"0.step.{j}.x"], state[f"0.step.{j}.x_next"]
        with torch.no_grad():
            t = torch.full((x.shape[0],), p.timestep)
            v = model.denoise(p.expert, x, t, cond)
            if trainer.sampler.uses_guidance:  # classifier-free guidance: the negative prompt, same images
                uncond = model.encode([trainer.sampler.negative_prompt] * x.shape[0], first, trainer.cfg.data.num_frames)
                v_u = model.denoise(p.expert, x, t, uncond)
                v = v_u + trainer.cfg.sampler.options.guidance_scale * (v - v_u)
        if o.sde == "cps":  # Flow-CPS written out: from the predicted clean sample and the predicted noise
            x0, x1 = x.double() - p.sigma * v.double(), x.double() + (1 - p.sigma) * v.double()
            mean = (1 - p.sigma_next) * x0 + p.sigma_next * math.cos(o.noise_level * math.pi / 2) * x1
            sd = p.sigma_next * math.sin(o.noise_level * math.pi / 2)
        else:
            cap = float(trainer.sampler.sigmas[1]) if p.sigma >= 1.0 else None
            c = sde_coefficients(p.sigma, p.sigma_next, o.noise_level, sigma_cap=cap)
            mean, sd = c.c_x * x.double() + c.c_v * v.double(), c.s
        r = (x_next.double() - mean).flatten(1).numpy()
        logp = -(r * r).mean(1) / (2 * sd**2) - math.log(sd) - 0.5 * math.log(2 * math.pi)
        ratio = np.exp(logp - state[f"0.step.{j}.log_prob"].double().numpy())
        clipped = np.clip(ratio, 1 - o.clip_range, 1 + o.clip_range)
        terms.append((np.maximum(-adv * ratio, -adv * clipped).mean(), (-adv * ratio).mean()))
        j += 1
    return tuple(np.mean(terms, axis=0))


def test_training_the_videos_in_chunks_gives_the_same_update(make_config, tmp_path):
    """``video_chunk`` (the B*G videos sampled, decoded and trained in chunks, each trained chunk its own
    graph) changes what is held at once, not what is computed: 2 clips x 2 videos in chunks of 1 and 3 (a
    ragged last chunk) against all 4 at once: the same loss, ratio statistics, gradient norm and weights
    (a large Adam epsilon makes the update linear in the gradient, as in tests/test_deepspeed.py)."""
    from rewardfl.registry import load_resolved
    from rewardfl.training import Trainer

    results = []
    for chunk in (0, 1, 3):
        options = {"name": "grpo", "group_size": 2, "beta": 0.04, "video_chunk": chunk}
        cfg, plugins = load_resolved(_grpo_config(make_config, tmp_path, algorithm=options, max_steps=1,
                                                  per_device_train_batch_size=2, adam_epsilon=1e-2,
                                                  output_dir=str(tmp_path / f"out{chunk}")))
        trainer = Trainer(cfg, plugins)
        metrics = trainer.train_step()
        results.append((metrics, {k: v.detach().clone() for k, v in trainer.model.trainable_state_dict().items()}))
    (a, wa) = results[0]
    assert a["grad_norm"] > 0
    for b, wb in results[1:]:
        # the first update's surrogate is ~0 (ratio 1, advantages summing to 0 in each group) and its KL 0
        # (LoRA B starts at 0): float32 sums in another order differ by ~1e-8 there
        # the same videos, sampled chunk by chunk (batched float32 arithmetic differs in the last bits)
        assert b["reward_score"] == pytest.approx(a["reward_score"], rel=1e-5)
        for key in ("loss", "reward_loss", "kl_loss", "reward/grpo/ratio_mean", "reward/grpo/clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-7)


def test_inner_updates_train_again_on_the_sampled_groups_without_drawing(make_config, tmp_path):
    from rewardfl.registry import load_resolved
    from rewardfl.training import Trainer

    options = {"name": "grpo", "group_size": 2, "inner_updates": 2, "clip_range": 2e-3}
    cfg, plugins = load_resolved(_grpo_config(make_config, tmp_path, algorithm=options, learning_rate=3e-2,
                                              max_steps=None, num_train_epochs=1))
    trainer = Trainer(cfg, plugins)
    assert trainer.total_steps == 4  # an epoch: 2 clips drawn one by one, each trained on twice
    drawn, trained = [], []
    draw, micro_batch = trainer.batches.next, trainer.algorithm.micro_batch
    trainer.batches.next = lambda state: drawn.append(1) or draw(state)
    trainer.algorithm.micro_batch = lambda batch, *rest: trained.append(batch) or micro_batch(batch, *rest)
    first = trainer.train_step()
    assert first["reward/grpo/ratio_max_dev"] == 0.0  # the first update of a cycle: the sampling weights
    position = (trainer.state.epoch, trainer.state.position)
    state = {k: v.clone() for k, v in trainer.algorithm.state_dict().items()}
    assert int(state["step"]) == 0 and "0.step.1.x" in state and "1.index" not in state  # one micro-batch
    expected, unclipped = _hand_surrogate(trainer, state, trained[0])

    second = trainer.train_step()  # trains on the same groups under the updated weights
    assert len(drawn) == 1 and (trainer.state.epoch, trainer.state.position) == position
    assert trained[1] is trained[0]  # the same clips, handed over again
    assert second["reward/grpo/ratio_max_dev"] > 0 and second["reward/grpo/clip_fraction"] > 0
    # float32 log-probabilities (|logp| ~ 1) against float64: ~1e-7 on a ratio, times advantages of
    # order 1, a few 1e-8 on the surrogate (~1e-3); the clip's effect below is 1e-5 or more
    assert second["reward_loss"] == pytest.approx(expected, rel=0, abs=5e-8)
    assert abs(unclipped - expected) > 1e-5  # the clip acted
    assert second["reward_score"] == first["reward_score"]  # the scores of the samples it trained on
    assert trainer.algorithm.state_dict() == {}  # the cycle is over: nothing for a checkpoint to keep

    third = trainer.train_step()  # a new cycle: new clips, sampled under the current weights
    assert len(drawn) == 2 and (trainer.state.epoch, trainer.state.position) != position
    assert third["reward/grpo/ratio_max_dev"] == 0.0


def test_grpo_with_classifier_free_guidance_steps_with_the_guided_velocity(make_config, tmp_path):
    """``sampler.guidance_scale: 3``: the stochastic steps' Gaussian mean uses ``v_u + 3 (v - v_u)``. The
    second update of a cycle (weights moved) is checked against the surrogate computed by hand in float64
    from the stored transitions with the guided velocity; the first update's ratio is exactly 1."""
    from rewardfl.registry import load_resolved
    from rewardfl.training import Trainer

    options = {"name": "grpo", "group_size": 2, "inner_updates": 2, "clip_range": 2e-3}
    cfg, plugins = load_resolved(_grpo_config(make_config, tmp_path, algorithm=options, learning_rate=3e-2,
                                              max_steps=2, sampler={"name": "flow_match_euler", "shift": 5.0,
                                                                    "guidance_scale": 3.0,
                                                                    "negative_prompt": "blurry"}))
    trainer = Trainer(cfg, plugins)
    assert trainer.sampler.uses_guidance
    batches = []
    micro_batch = trainer.algorithm.micro_batch
    trainer.algorithm.micro_batch = lambda batch, *rest: batches.append(batch) or micro_batch(batch, *rest)
    first = trainer.train_step()
    assert first["reward/grpo/ratio_max_dev"] == 0.0
    state = {k: v.clone() for k, v in trainer.algorithm.state_dict().items()}
    expected, _ = _hand_surrogate(trainer, state, batches[0])
    second = trainer.train_step()
    assert second["reward/grpo/ratio_max_dev"] > 0
    assert second["reward_loss"] == pytest.approx(expected, rel=0, abs=5e-8)


def test_coefficients_preserving_sampling_trains_the_window_s_stochastic_steps(make_config, tmp_path):
    """``sde: cps``: the window 1..3 of 4 steps; the step into t = 0 is deterministic, so of the trainable
    expert's steps 2 and 3 only step 2 is stored and trained. The second update of a cycle against the
    surrogate computed by hand in float64 from Flow-CPS's Gaussian written out; the first ratio exactly 1."""
    from rewardfl.registry import load_resolved
    from rewardfl.training import Trainer

    options = {"name": "grpo", "group_size": 2, "inner_updates": 2, "clip_range": 2e-3, "sde": "cps",
               "noise_level": 0.5}
    cfg, plugins = load_resolved(_grpo_config(make_config, tmp_path, algorithm=options, learning_rate=3e-2,
                                              max_steps=2))
    trainer = Trainer(cfg, plugins)
    batches = []
    micro_batch = trainer.algorithm.micro_batch
    trainer.algorithm.micro_batch = lambda batch, *rest: batches.append(batch) or micro_batch(batch, *rest)
    first = trainer.train_step()
    assert first["reward/grpo/ratio_max_dev"] == 0.0
    assert first["reward/grpo/trained_steps"] == 1.0
    state = {k: v.clone() for k, v in trainer.algorithm.state_dict().items()}
    assert [int(state[k]) for k in sorted(state) if k.startswith("0.step.") and k.endswith(".plan")] == [2]
    expected, _ = _hand_surrogate(trainer, state, batches[0])
    second = trainer.train_step()
    assert second["reward/grpo/ratio_max_dev"] > 0
    assert second["reward_loss"] == pytest.approx(expected, rel=0, abs=5e-8)


def test_kill_and_resume_between_inner_updates_reproduce_an_uninterrupted_run(make_config, tmp_path):
    from safetensors.torch import load_file

    def config(name, **overrides):
        return _grpo_config(make_config, tmp_path, algorithm={"name": "grpo", "group_size": 2, "inner_updates": 2},
                            max_steps=3, save_steps=1, save_total_limit=3, output_dir=str(tmp_path / name),
                            **overrides)

    assert run.main([config("ref")]) == 0
    ref = tmp_path / "ref" / "checkpoints"
    # mid-cycle checkpoints keep the sampled groups; at a cycle's end there is nothing to keep
    assert [(ref / f"checkpoint-{s}" / "algorithm-0.safetensors").exists() for s in (1, 2, 3)] == [True, False, True]
    ckpt = tmp_path / "cut" / "checkpoints" / "checkpoint-1"
    kill_once_saved(config("cut"), ckpt)
    # resumed after the cycle's first update: step 2 trains on the groups of step 1, from the checkpoint
    assert run.main([config("cut", resume_from_checkpoint=str(ckpt))]) == 0
    assert stable(read_metrics(str(tmp_path / "cut"))) == stable(read_metrics(str(tmp_path / "ref")))
    cut = tmp_path / "cut" / "checkpoints"
    for s in (2, 3):
        got, expected = load_file(cut / f"checkpoint-{s}" / "trainable.safetensors"), load_file(
            ref / f"checkpoint-{s}" / "trainable.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        state = json.loads((cut / f"checkpoint-{s}" / "state.json").read_text())
        assert state == json.loads((ref / f"checkpoint-{s}" / "state.json").read_text())


def test_one_inner_update_keeps_nothing_between_steps(make_config, tmp_path):
    from rewardfl.registry import load_resolved
    from rewardfl.training import Trainer

    trainer = Trainer(*load_resolved(_grpo_config(make_config, tmp_path)))
    trainer.train_step()
    # no groups, no micro-batches held for a next step, nothing for a checkpoint to write
    assert trainer.algorithm.state_dict() == {} and trainer.algorithm._cycle == [] and trainer._drawn is None


def test_inner_updates_below_one_name_the_key(make_config, capsys):
    assert run.main([make_config(algorithm={"name": "grpo", "inner_updates": 0}), "--check"]) == 2
    assert "algorithm.inner_updates: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("same", [False, True])
def test_same_start_noise_starts_every_video_of_a_group_from_one_noise(make_config, tmp_path, same):
    """``same_start_noise``: with the window at steps 2..3, steps 0 and 1 are deterministic, so the group's
    videos reach step 2 at one latent (their rewards then differ only by the window's noise); by default
    each video starts from its own noise and reaches step 2 elsewhere. The window's noise differs either way."""
    from rewardfl.registry import load_resolved
    from rewardfl.training import Trainer

    options = {"name": "grpo", "group_size": 3, "inner_updates": 2, "same_start_noise": same}
    cfg, plugins = load_resolved(_grpo_config(make_config, tmp_path, algorithm=options, mid_timestep=2,
                                              max_steps=2))
    trainer = Trainer(cfg, plugins)
    trainer.train_step()
    state = trainer.algorithm.state_dict()
    assert int(state["0.step.0.plan"]) == 2
    x, x_next = state["0.step.0.x"], state["0.step.0.x_next"]
    assert x.shape[0] == 3
    for j in (1, 2):
        assert torch.equal(x[j], x[0]) == same
        assert not torch.equal(x_next[j], x_next[0])  # each video's own SDE noise
