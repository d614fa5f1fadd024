"""``algorithm: hybrid``: real runs on the tiny model. With only rewards that give gradients it is
``reward_backprop``, with only rewards that give none it is ``grpo`` (metrics equal step by step);
with both, one step's loss is the backprop half's plus ``policy_weight`` times the policy half's, each
measured by its own algorithm on the same clips. The reward without gradient is the ``command``
reward with a real scorer program (mean brightness of the PNG frames it is handed)."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from rewardfl import run
from rewardfl.registry import load_resolved
from rewardfl.training import Trainer
from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)
from test_train import read_metrics, stable

SCORER = """\
import glob, json, sys
import numpy as np
from PIL import Image
request = json.load(sys.stdin)
scores = [float(np.mean([np.asarray(Image.open(f), dtype=np.float64).mean() / 255.0
                         for f in sorted(glob.glob(v["path"] + "/*.png"))])) for v in request["videos"]]
print(json.dumps({"scores": scores}))
"""

POLICY = {"group_size": 2, "noise_level": 0.7, "beta": 0.04}


@pytest.fixture
def brightness(tmp_path):
    """A ``command`` reward entry scoring brightness with a real program (no gradient)."""
    script = tmp_path / "brightness.py"
    script.write_text(SCORER)
    return {"name": "command", "command": [sys.executable, str(script)], "video_format": "frames"}


def _config(make_config, tmp_path, name, algorithm, reward, **overrides):
    path = make_config(**{"algorithm": algorithm, "mid_timestep": 1, "final_timestep": 3, "learning_rate": 3e-3,
                          "max_steps": 2, "save_steps": 100, "output_dir": str(tmp_path / name), **overrides})
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["reward"] = reward  # as written (make_config would merge a mapping into its face reward's)
    if "face_identity" not in str(reward):
        raw.pop("reward_model_path", None)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def _face(tmp_path):
    return {"name": "face_identity", "landmark_fallback": True, "det_size": 160,
            "reference_cache_dir": str(tmp_path / "refcache")}


def test_with_only_rewards_with_gradients_hybrid_is_reward_backprop(make_config, tmp_path):
    face = _face(tmp_path)
    ref = _config(make_config, tmp_path, "backprop", {"name": "reward_backprop"}, face)
    hybrid = _config(make_config, tmp_path, "hybrid", {"name": "hybrid", "policy": POLICY}, face)
    assert run.main([ref]) == 0 and run.main([hybrid]) == 0
    expected, got = stable(read_metrics(str(tmp_path / "backprop"))), stable(read_metrics(str(tmp_path / "hybrid")))
    assert [r["step"] for r in got] == [1, 2] and got == expected


def test_with_only_rewards_without_gradients_hybrid_is_grpo(make_config, tmp_path, brightness):
    ref = _config(make_config, tmp_path, "grpo", {"name": "grpo", **POLICY}, brightness)
    hybrid = _config(make_config, tmp_path, "hybrid", {"name": "hybrid", "policy": POLICY}, brightness)
    assert run.main([ref]) == 0 and run.main([hybrid]) == 0
    expected, got = stable(read_metrics(str(tmp_path / "grpo"))), stable(read_metrics(str(tmp_path / "hybrid")))
    assert [r["step"] for r in got] == [1, 2] and got == expected
    assert got[0]["reward/grpo/ratio_max_dev"] == 0.0


def test_both_halves_add_with_the_policy_weight(make_config, tmp_path, brightness):
    """One step of hybrid on [face_identity x1, command x0.5] against reward_backprop on the same list with
    the command at weight 0 (logged only) and grpo on it with the face at weight 0: the same clips, noise
    and weights, so the losses must add as documented, and the step's score is the backprop videos' face
    score plus the mean over each group of 0.5 x brightness."""
    face, w = _face(tmp_path), 0.7

    def first_step(name, algorithm, face_weight, command_weight):
        reward = [{**face, "weight": face_weight}, {**brightness, "weight": command_weight}]
        cfg, plugins = load_resolved(_config(make_config, tmp_path, name, algorithm, reward, max_steps=1))
        return Trainer(cfg, plugins).train_step()

    hybrid = first_step("hybrid", {"name": "hybrid", "policy": POLICY, "policy_weight": w}, 1.0, 0.5)
    backprop = first_step("backprop", {"name": "reward_backprop"}, 1.0, 0.0)
    grpo = first_step("grpo", {"name": "grpo", **POLICY}, 0.0, 0.5)
    assert hybrid["updated"] and backprop["updated"] and grpo["updated"]
    assert hybrid["reward/hybrid/backprop_loss"] == pytest.approx(backprop["reward_loss"], rel=1e-6)
    assert hybrid["reward/hybrid/policy_loss"] == pytest.approx(grpo["reward_loss"], rel=1e-6, abs=1e-9)
    assert hybrid["loss"] == pytest.approx(backprop["loss"] + w * grpo["loss"], rel=1e-5, abs=1e-8)
    assert hybrid["reward_score"] == pytest.approx(backprop["reward/face_identity/score"]
                                                   + 0.5 * grpo["reward/command/score"], rel=1e-5)
    assert hybrid["reward/command/score"] == pytest.approx(grpo["reward/command/score"], rel=1e-6)
    assert hybrid["reward/face_identity/score"] == pytest.approx(backprop["reward/face_identity/score"], rel=1e-6)
    assert hybrid["reward/grpo/ratio_max_dev"] == 0.0


@pytest.mark.parametrize("algorithm, key", [
    ({"name": "hybrid", "policy": {"group_size": 1}}, "algorithm.policy.group_size"),
    ({"name": "hybrid", "policy": {"inner_updates": 2}}, "algorithm.policy.inner_updates"),
    ({"name": "hybrid", "policy": {"bogus": 1}}, "algorithm.policy.bogus"),
    ({"name": "hybrid", "policy_weight": 0}, "algorithm.policy_weight"),
])
def test_bad_hybrid_options_name_the_key(make_config, tmp_path, capsys, algorithm, key):
    assert run.main([make_config(algorithm=algorithm), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and "\n" not in err


def test_check_says_how_the_list_is_split(make_config, tmp_path, capsys, brightness):
    cfg = _config(make_config, tmp_path, "out", {"name": "hybrid", "policy": POLICY, "policy_weight": 0.5},
                  [{**_face(tmp_path), "weight": 1.0}, {**brightness, "weight": 0.5}])
    assert run.main([cfg, "--check"]) == 0
    out = capsys.readouterr().out
    assert ("hybrid: the rewards with gradients by reward backprop; the others by grpo: 2 videos per clip, "
            "stochastic steps 1..3") in out and "(policy_weight 0.5)" in out


def test_reward_backprop_names_the_weighted_entry_without_gradient(make_config, tmp_path, capsys, brightness):
    cfg = _config(make_config, tmp_path, "out", {"name": "reward_backprop"},
                  [{**_face(tmp_path), "weight": 1.0}, {**brightness, "weight": 0.5}])
    assert run.main([cfg, "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rewardfl.run: error: algorithm: reward_backprop needs a reward with gradients; "
                          "weighted_sum lists command (reward[1].weight: 0.5), which is not differentiable; "
                          "set reward[1].weight: 0 to log and evaluate it only. Use algorithm: grpo"), err
    with open(cfg) as f:
        raw = yaml.safe_load(f)
    raw["reward"][1]["weight"] = 0  # logged only: reward backprop accepts the list
    with open(cfg, "w") as f:
        yaml.safe_dump(raw, f)
    assert run.main([cfg, "--check"]) == 0


def test_an_entry_with_gradient_false_is_trained_by_the_policy_gradient(make_config, tmp_path, capsys):
    """``gradient: false`` on a differentiable reward: hybrid on that list alone is grpo on it (metrics equal
    step by step), the split puts it on the policy side, and reward_backprop names the key."""
    face = _face(tmp_path)
    ref = _config(make_config, tmp_path, "grpo", {"name": "grpo", **POLICY}, [face])
    hybrid = _config(make_config, tmp_path, "hybrid", {"name": "hybrid", "policy": POLICY},
                     [{**face, "gradient": False}])
    assert run.main([ref]) == 0 and run.main([hybrid]) == 0
    expected, got = stable(read_metrics(str(tmp_path / "grpo"))), stable(read_metrics(str(tmp_path / "hybrid")))
    assert [r["step"] for r in got] == [1, 2] and got == expected

    both = [{**face, "weight": 1.0}, {"name": "identity_consistency", "weight": 0.5, "gradient": False,
                                      "landmark_fallback": True, "det_size": 160}]
    cfg, plugins = load_resolved(_config(make_config, tmp_path, "split", {"name": "hybrid", "policy": POLICY}, both))
    gradient, policy = plugins["reward"](cfg, cfg.reward.options).gradient_split()
    assert [t.label for t in gradient.terms] == ["face_identity"]
    assert [t.label for t in policy.terms] == ["identity_consistency"]
    bad = _config(make_config, tmp_path, "bad", {"name": "reward_backprop"}, both)
    capsys.readouterr()
    assert run.main([bad, "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weighted_sum lists identity_consistency with reward[1].gradient: false (weight 0.5)" in err
    assert "\n" not in err


def test_the_split_shares_the_rewards_and_their_state(make_config, tmp_path, brightness):
    cfg, plugins = load_resolved(_config(make_config, tmp_path, "out", {"name": "hybrid", "policy": POLICY},
                                         [{**_face(tmp_path), "weight": 1.0, "normalize": "running"},
                                          {**brightness, "weight": 0.5}, {"name": "motion", "weight": 0}]))
    reward = plugins["reward"](cfg, cfg.reward.options)
    gradient, policy = reward.gradient_split()
    assert [t.label for t in gradient.terms] == ["face_identity", "motion"]
    assert [t.label for t in policy.terms] == ["command"]
    assert gradient.rewards[0] is reward.rewards[0] and policy.rewards[0] is reward.rewards[1]
    gradient.stats[0][:] = [3, 0.5, 0.25]
    gradient.calls += 2
    policy.calls += 1
    state = reward.state_dict()
    assert state["calls"] == 3 and state["stats"][0] == [3, 0.5, 0.25]
    reward.load_state_dict({**state, "calls": 7, "stats": [[1, 0.1, 0.01], [0, 0.0, 0.0], [0, 0.0, 0.0]]})
    assert gradient.calls == 7 and policy.calls == 7 and gradient.stats[0] == [1, 0.1, 0.01]
    reward.reduce_sum = lambda t: t * 2  # the trainer's all-reduce, set on the whole reward: the parts use it
    assert float(gradient.reduce_sum(torch.ones(()))) == 2.0 and float(policy.reduce_sum(torch.ones(()))) == 2.0
