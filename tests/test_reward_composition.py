"""Several rewards at once (issue 15): ``reward:`` as a list, trained as a weighted sum.

Checked against the same rewards built and called on their own (the independent reference), a
float64 hand computation of the running statistics, and a real two-reward training run."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import yaml

from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import run
from rewardfl.config import ConfigError, config_from_dict, load_config
from rewardfl.data import VideoDataset
from rewardfl.interfaces import Reward, RewardOutput, SampleContext
from rewardfl.registry import PluginInfo, load_plugin, resolve_config, resolve_plugins
from rewardfl.rewards import weighted_sum
from rewardfl.rewards.weighted_sum import RewardTerm, WeightedSumOutput, WeightedSumReward, select_frames
from rewardfl.training.outputs import read_metrics


def _terms(face_assets, refcache, **motion):
    return [
        {"name": "face_identity", "weight": 1.0, "landmark_fallback": True, "det_size": 160,
         "reference_cache_dir": str(refcache)},
        {"name": "motion", "weight": 0.5, "normalize": "fixed", "normalize_mean": -0.05, "normalize_std": 0.1,
         **motion},
    ]


@pytest.fixture
def clips(small_dataset):  # noqa: F811
    ds = VideoDataset(small_dataset, num_frames=5, max_pixels=4096, height=64, width=64)
    return [ds[i] for i in range(len(ds))]


def _resolved(face_assets, terms, **over):
    faces = any(t["name"] in ("face_identity", "identity_consistency") for t in terms)  # the pack's users
    top = {"reward_model_path": face_assets.scrfd_sface} if faces else {}
    cfg = config_from_dict({**top, "reward": terms, "seed": 7, **over})
    return resolve_config(cfg, resolve_plugins(cfg))


def test_the_list_trains_the_weighted_sum_of_each_rewards_own_loss(face_assets, clips, tmp_path):
    cfg = _resolved(face_assets, _terms(face_assets, tmp_path / "refcache"))
    assert cfg.reward.name == "weighted_sum"
    mix = WeightedSumReward(cfg, cfg.reward.options)
    face = load_plugin("reward", "face_identity")(cfg, cfg.reward.options.terms[0].options)
    motion = load_plugin("reward", "motion")(cfg, cfg.reward.options.terms[1].options)
    contexts = [SampleContext(c["sample_id"], c["video"], c["path"], c["prompt"]) for c in clips]
    assert mix.prepare(contexts).all() and face.prepare(contexts).all() and motion.prepare(contexts).all()
    base = torch.stack([c["video"].transpose(0, 1) for c in clips])
    noise = 0.05 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    videos = (base + noise).clamp(-1, 1).requires_grad_(True)
    out = mix(videos, contexts)
    loss = mix.loss(out)
    (grad,) = torch.autograd.grad(loss, videos)

    # the reference: each reward alone on a copy of the same videos
    alone = videos.detach().clone().requires_grad_(True)
    f, m = face(alone, contexts), motion(alone, contexts)
    want = 1.0 * face.loss(f) + 0.5 * (-((m.scores[m.valid] - (-0.05)) / 0.1).mean())
    (want_grad,) = torch.autograd.grad(want, alone)
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-7)
    total = 1.0 * f.scores.detach() + 0.5 * m.scores.detach()
    torch.testing.assert_close(out.scores, total.float(), rtol=1e-5, atol=1e-6)
    assert out.metrics["face_identity/score"] == pytest.approx(float(f.scores.mean()), rel=1e-5)
    assert out.metrics["motion/score"] == pytest.approx(float(m.scores.mean()), rel=1e-5)
    assert out.metrics["motion/motion_energy"] == pytest.approx(m.metrics["motion_energy"], rel=1e-5)


def test_a_reward_that_cannot_score_a_sample_masks_it_for_itself_only(face_assets, clips, tmp_path):
    cfg = _resolved(face_assets, _terms(face_assets, tmp_path / "refcache"))
    mix = WeightedSumReward(cfg, cfg.reward.options)
    c = clips[0]
    # a one-frame reference: motion has nothing to match (invalid), face identity still scores it
    ctx = [SampleContext(c["sample_id"] + "#still", c["video"][:1], c["path"], c["prompt"]),
           SampleContext(c["sample_id"], c["video"], c["path"], c["prompt"])]
    keep = mix.prepare(ctx)
    assert keep.tolist() == [True, True]  # skipped only when no reward can use it
    videos = torch.stack([c["video"].transpose(0, 1)] * 2).requires_grad_(True)
    out = mix(videos, ctx)
    face_out, motion_out = out.terms
    assert face_out.valid.tolist() == [True, True] and motion_out.valid.tolist() == [False, True]
    assert out.valid.tolist() == [True, True]
    assert out.metrics["motion/valid_fraction"] == 0.5
    # sample 0's total holds only the face reward's part
    assert float(out.scores[0]) == pytest.approx(float(face_out.scores[0]), rel=1e-6)
    # the motion part of the loss is over sample 1 alone
    face = load_plugin("reward", "face_identity")(cfg, cfg.reward.options.terms[0].options)
    face.prepare(ctx)
    want = face.loss(face(videos, ctx)) + 0.5 * -((motion_out.scores[1] + 0.05) / 0.1)
    assert float(mix.loss(out)) == pytest.approx(float(want), rel=1e-5)


def test_running_normalisation_matches_a_float64_hand_computation_and_resumes_exactly(face_assets, tmp_path):
    terms = [{"name": "motion", "weight": 2.0, "normalize": "running", "normalize_momentum": 0.9,
              "normalize_warmup": 2}]
    cfg = _resolved(face_assets, terms)
    mix = WeightedSumReward(cfg, cfg.reward.options)
    batches = [[0.1, 0.3], [0.2], [0.5, 0.4, 0.0], [0.25, 0.35]]

    def output(values):
        scores = torch.tensor(values, dtype=torch.float32)
        valid = torch.ones(len(values), dtype=torch.bool)
        return WeightedSumOutput(scores, valid, {}, terms=[RewardOutput(scores, valid)])

    n, m1, m2, b = 0, 0.0, 0.0, 0.9
    for i, values in enumerate(batches):
        if i == 2:  # a checkpoint: a new composition picks up from the state, exactly
            state = json.loads(json.dumps(mix.state_dict()))
            mix = WeightedSumReward(cfg, cfg.reward.options)
            mix.load_state_dict(state)
        loss = float(mix.loss(output(values)))
        if n >= 2:  # the statistics before this batch, bias-corrected
            mean = m1 / (1 - b ** n)
            std = math.sqrt(m2 / (1 - b ** n) - mean * mean)
        else:
            mean, std = 0.0, 1.0
        want = 2.0 * -sum((v - mean) / std for v in values) / len(values)
        assert loss == pytest.approx(want, rel=1e-5), i
        v = torch.tensor(values, dtype=torch.float32).double()  # as the scores arrive (float32)
        n, m1, m2 = n + 1, b * m1 + (1 - b) * float(v.mean()), b * m2 + (1 - b) * float((v ** 2).mean())
    # a non-finite score of a valid sample leaves the statistics alone (it must not poison them for good)
    before = [list(x) for x in mix.stats]
    mix.loss(output([float("nan"), 0.3]))
    assert all(math.isfinite(x) for x in mix.stats[0]) and mix.stats[0][0] == before[0][0] + 1
    with pytest.raises(ValueError, match="reward: the checkpoint's rewards"):
        WeightedSumReward(_resolved(face_assets, [{**terms[0], "label": "other"}]),
                        _resolved(face_assets, [{**terms[0], "label": "other"}]).reward.options).load_state_dict(state)


def test_rewards_on_the_same_frames_share_the_detections(face_assets, clips, tmp_path):
    cfg = _resolved(face_assets, [
        {"name": "face_identity", "landmark_fallback": True, "det_size": 160, "reference_cache_dir": "none"},
        {"name": "identity_consistency", "weight": 0.5, "landmark_fallback": True, "det_size": 160,
         "reference_cache_dir": "none"}])
    mix = WeightedSumReward(cfg, cfg.reward.options)
    contexts = [SampleContext(c["sample_id"], c["video"], c["path"], c["prompt"]) for c in clips]
    mix.prepare(contexts)
    videos = torch.stack([c["video"].transpose(0, 1) for c in clips])
    out = mix(videos, contexts)
    detections = {k: v for k, v in mix.last_cache.computed.items() if k.startswith("face_detections/")}
    assert list(detections.values()) == [1]  # detected once for both rewards
    assert mix.last_cache.hits[next(iter(detections))] == 1 and out.metrics["cache/hits"] >= 1


def test_frame_selection_is_deterministic_and_in_range():
    g = torch.Generator().manual_seed(0)
    assert select_frames(9, RewardTerm("x"), g) is None
    assert select_frames(9, RewardTerm("x", frames="stride", frame_stride=4), g) == (0, 4, 8)
    a = select_frames(17, RewardTerm("x", frames="random", frame_count=5), torch.Generator().manual_seed(3))
    b = select_frames(17, RewardTerm("x", frames="random", frame_count=5), torch.Generator().manual_seed(3))
    assert a == b and len(a) == 5 and list(a) == sorted(set(a)) and all(0 <= f < 17 for f in a)
    assert select_frames(3, RewardTerm("x", frames="random", frame_count=5), g) is None  # fewer frames than asked


class _LogOnly(Reward):
    """A reward without gradient (as an onnxruntime-only scorer is)."""

    differentiable = False

    @dataclasses.dataclass
    class Options:
        pass

    def __call__(self, videos, contexts):
        return RewardOutput(torch.zeros(len(contexts)), torch.ones(len(contexts), dtype=torch.bool))


def test_list_errors_name_the_entry_and_key(face_assets, monkeypatch):
    plugins = {"log_only": _LogOnly, "motion": load_plugin("reward", "motion")}
    monkeypatch.setattr(weighted_sum, "load_plugin", lambda kind, name: plugins[name])
    monkeypatch.setattr(weighted_sum, "list_plugins", lambda kind: [PluginInfo(kind, n, "tests", "0", "") for n in plugins])

    def resolve(terms):
        return WeightedSumReward.resolve_options({"terms": terms}, {}, "reward")

    # a weighted entry without gradient is a valid list (grpo and hybrid train on it); reward_backprop asks
    listed = resolve([{"name": "motion"}, {"name": "log_only", "weight": 0.3}])
    assert WeightedSumReward.gradient_problem(listed) == (
        "lists log_only (reward[1].weight: 0.3), which is not differentiable; set reward[1].weight: 0 to log "
        "and evaluate it only")
    ok = resolve([{"name": "motion"}, {"name": "log_only", "weight": 0}])
    assert [t.label for t in ok.terms] == ["motion", "log_only"]
    assert WeightedSumReward.gradient_problem(ok) is None
    with pytest.raises(ConfigError, match=r"reward\[0\]\.normalize: must be one of"):
        resolve([{"name": "motion", "normalize": "zscore"}])
    with pytest.raises(ConfigError, match=r"unknown key 'reward\[0\]\.resolutoin'"):
        resolve([{"name": "motion", "resolutoin": 32}])
    with pytest.raises(ConfigError, match="labels must differ"):
        resolve([{"name": "motion"}, {"name": "motion", "label": "motion"}])
    with pytest.raises(ConfigError, match="every weight is 0"):
        resolve([{"name": "motion", "weight": 0}])
    monkeypatch.undo()
    cfg = config_from_dict({"reward": [{"name": "face_identiti"}]})
    with pytest.raises(ConfigError, match=r"reward\[0\]\.name: .*face_identity"):
        resolve_plugins(cfg)


def test_a_two_reward_config_trains_and_logs_each_reward(make_config, face_assets, tmp_path, capsys):  # noqa: F811
    config = make_config(max_steps=2, save_steps=2, report_to=[],
                         reward=_terms(face_assets, tmp_path / "refcache", resolution=32))
    assert run.main([config]) == 0
    out = yaml.safe_load(open(config))["output_dir"]
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # batch 1, both rewards valid: the total is the weighted sum of the two scores
        assert r["reward_score"] == pytest.approx(r["reward/face_identity/score"] + 0.5 * r["reward/motion/score"],
                                                  rel=1e-5)
    # the checkpoint keeps the composition's state (call count, running statistics) for an exact resume
    state = json.load(open(os.path.join(out, "checkpoints", "checkpoint-2", "state.json")))
    assert state["reward"]["labels"] == ["face_identity", "motion"] and state["reward"]["calls"] == 2
    # the run's config.yaml holds the list (as weighted_sum's terms), and loads
    again = load_config(os.path.join(out, "config.yaml"), paths=False)
    assert again.reward.name == "weighted_sum" and [e["name"] for e in again.reward.options["terms"]] == [
        "face_identity", "motion"]
    resolve_config(again, resolve_plugins(again))
    capsys.readouterr()


def test_an_ensemble_of_recognizers_is_a_list_sharing_one_detection(face_assets, clips, tmp_path):
    """Several recognizers at once: one ``face_identity`` entry per recognizer file of the pack, a
    weight each. The total is the weighted sum of each entry scored alone, and the faces are detected
    once for all of them. (The second "recognizer" here is SFace fed BGR, the only differentiable
    recognizer the package registry gives us; what matters is that the two embed differently.)"""
    import shutil

    pack = tmp_path / "pack"
    pack.mkdir()
    shutil.copyfile(os.path.join(face_assets.scrfd_sface, "scrfd.onnx"), pack / "scrfd.onnx")
    for name in ("rec_a.onnx", "rec_b.onnx"):
        shutil.copyfile(os.path.join(face_assets.scrfd_sface, "face_recognition_sface_2021dec.onnx"), pack / name)
    common = {"name": "face_identity", "landmark_fallback": True, "det_size": 160, "reference_cache_dir": "none"}
    terms = [{**common, "label": "rec_a", "recognizer": "rec_a.onnx", "weight": 0.6},
             {**common, "label": "rec_b", "recognizer": "rec_b.onnx", "recognizer_channel_order": "bgr",
              "weight": 0.4}]
    cfg = resolve_config(*(lambda c: (c, resolve_plugins(c)))(config_from_dict(
        {"reward_model_path": str(pack), "reward": terms, "seed": 7})))
    mix = WeightedSumReward(cfg, cfg.reward.options)
    contexts = [SampleContext(c["sample_id"], c["video"], c["path"], c["prompt"]) for c in clips]
    assert mix.prepare(contexts).all()
    videos = torch.stack([c["video"].transpose(0, 1) for c in clips]).requires_grad_(True)
    out = mix(videos, contexts)
    detections = [v for k, v in mix.last_cache.computed.items() if k.startswith("face_detections/")]
    assert detections == [1]  # one detection for both recognizers

    alone = [load_plugin("reward", "face_identity")(cfg, t.options) for t in cfg.reward.options.terms]
    for r in alone:
        r.prepare(contexts)
    a, b = (r(videos.detach().clone().requires_grad_(True), contexts) for r in alone)
    assert (a.scores - b.scores).abs().max() > 1e-3  # the two recognizers do embed differently
    torch.testing.assert_close(out.scores.detach(), (0.6 * a.scores + 0.4 * b.scores).detach().float(),
                               rtol=1e-5, atol=1e-6)
    assert out.metrics["rec_a/score"] == pytest.approx(float(a.scores.mean()), rel=1e-5)
    assert out.metrics["rec_b/score"] == pytest.approx(float(b.scores.mean()), rel=1e-5)
