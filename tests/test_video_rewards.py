"""Video rewards beside face_identity: identity_consistency (real face models) and motion, and the
step cache the face rewards share (issue 15: several rewards at once).

References: hand computations in float64 (numpy loops over frames), central finite differences in
float64, onnxruntime embeddings against the reward's torch-twin ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewardfl.config import build_dataclass, config_from_dict
from rewardfl.evaluation.evaluation import Evaluation
from rewardfl.evaluation.metrics import motion as motion_metric
from rewardfl.interfaces import SampleContext, StepCache
from rewardfl.rewards.face_identity import (FaceIdentityReward, IdentityConsistencyReward,
                                            identity_consistency_score)
from rewardfl.rewards.motion import MotionReward, motion_energy

SIZE = 128


def context(sample_id, frames):
    return SampleContext(sample_id=sample_id, reference=frames)


def face_reward(cls, pack, **options):
    opts = build_dataclass(cls.Options, {"reference_cache_dir": "none", "reward_model_path": pack, **options},
                           prefix="reward")
    return cls(config_from_dict({}), opts)


@pytest.fixture(scope="module")
def identity(face_assets):
    return face_reward(FaceIdentityReward, face_assets.scrfd_sface)


@pytest.fixture(scope="module")
def consistency(face_assets):
    return face_reward(IdentityConsistencyReward, face_assets.scrfd_sface)


def faces_video(face_photo, names):
    """``(3, F, 192, 256)`` in [-1, 1]: per frame the named photo (``None``: no face) on a grey
    canvas, shifted a little from frame to frame (the face moves)."""
    frames = torch.full((len(names), 3, 192, 256), -0.2)
    for f, name in enumerate(names):
        if name is not None:
            face = face_photo(name.removesuffix("~"), SIZE)
            face = face.flip(-1) if name.endswith("~") else face
            y, x = 32 + 4 * f, 16 + 12 * f
            frames[f, :, y:y + SIZE, x:x + SIZE] = face
    return frames.transpose(0, 1).contiguous()


def consistency_by_hand(embeddings, reference, spread_weight=1.0, reference_weight=1.0):
    """The documented formula, literally, in float64: ``embeddings`` the scored frames' (n, D)."""
    e = [np.asarray(v, dtype=np.float64) for v in embeddings]
    m = np.mean(e, axis=0)
    m_hat = m / np.linalg.norm(m)
    r_hat = np.asarray(reference, dtype=np.float64) / np.linalg.norm(reference)
    spread = np.mean([1.0 - v @ m_hat / np.linalg.norm(v) for v in e])
    cos = [v @ r_hat / np.linalg.norm(v) for v in e]
    return -(spread_weight * spread + reference_weight * np.std(cos)), spread, np.std(cos)


# --------------------------------------------------------------------------- identity_consistency: the score


def test_consistency_score_by_hand_with_masks():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    ref = torch.randn(3, 8, generator=g, dtype=torch.float64)  # means of unit vectors need not be unit
    # sample 0: faces in 4 frames; sample 1: 1 frame (too few); sample 2: 1 frame
    sample = torch.tensor([0, 0, 1, 0, 2, 0])
    scores, frames, spread, ref_std = identity_consistency_score(emb, sample, ref, spread_weight=0.7,
                                                                 reference_weight=2.0)
    expected, exp_spread, exp_std = consistency_by_hand(emb[[0, 1, 3, 5]], ref[0], 0.7, 2.0)
    assert frames.tolist() == [4, 1, 1]
    assert abs(float(scores[0]) - expected) < 1e-12
    assert abs(float(spread[0]) - exp_spread) < 1e-12 and abs(float(ref_std[0]) - exp_std) < 1e-12
    assert scores[1:].tolist() == [0.0, 0.0] and spread[1:].tolist() == [0.0, 0.0]
    assert 0 < exp_spread < 1 and expected < 0


def test_consistency_score_of_identical_frames_is_zero_with_a_finite_gradient():
    """A still video: every frame the same embedding. Spread 0, std 0, and no NaN from sqrt at 0."""
    e = F.normalize(torch.randn(1, 16, dtype=torch.float64), dim=1).repeat(5, 1).requires_grad_()
    scores, _, _, _ = identity_consistency_score(e, torch.zeros(5, dtype=torch.long), torch.randn(1, 16).double(),
                                                 spread_weight=1.0, reference_weight=1.0)
    assert abs(float(scores.detach()[0])) < 1e-12
    scores.sum().backward()
    assert torch.isfinite(e.grad).all()


def _chain(reward, frames, landmarks, index, ref_mean, num_frames):
    """The differentiable path in float64 with fixed landmarks: align, recognizer twin, consistency score."""
    twin = reward.recognizer.model.twin("cpu", torch.float64)
    crops = reward.recognizer.align(frames, landmarks.double(), index)
    emb = F.normalize(twin(crops).flatten(1), dim=1)
    return identity_consistency_score(emb, index // num_frames, ref_mean, spread_weight=1.0,
                                      reference_weight=1.0)[0][0]


def _counted_landmarks(reward, frames):
    """The largest face's landmarks of frames 1.. (frame 0 excluded, as the reward does)."""
    landmarks, _, found = reward.detector(frames.float()).largest()
    index = found.nonzero().flatten()
    index = index[index != 0]
    return landmarks[index], index


def test_consistency_gradient_matches_finite_differences(consistency, face_photo):
    """Align + recognizer twin + consistency score in float64 on real faces: gradient = central differences."""
    video = faces_video(face_photo, ["person_a_1", "person_a_1", "person_a_2~"]).transpose(0, 1).double()
    ref_mean = consistency.reference(context("fd", face_photo("person_a_2", SIZE)[None])).mean_embedding(True)
    landmarks, index = _counted_landmarks(consistency, video)
    assert index.tolist() == [1, 2]
    ref_mean = ref_mean[None].double()
    frames = video.clone().requires_grad_()
    _chain(consistency, frames, landmarks, index, ref_mean, 3).backward()
    grad = frames.grad.flatten()
    picks = torch.topk(grad.abs(), 300).indices[::60].tolist()
    eps = 1e-6
    for i in picks:
        plus, minus = video.clone().flatten(), video.clone().flatten()
        plus[i] += eps
        minus[i] -= eps
        with torch.no_grad():
            fd = (_chain(consistency, plus.view_as(video), landmarks, index, ref_mean, 3)
                  - _chain(consistency, minus.view_as(video), landmarks, index, ref_mean, 3)) / (2 * eps)
        assert abs(float(fd) - float(grad[i])) < 1e-7 + 1e-3 * abs(float(fd)), (i, float(fd), float(grad[i]))


def test_consistency_reward_gradient_equals_the_float64_chain(consistency, face_photo):
    """The reward's own gradient (float32 twin, detected landmarks) equals the checked float64 chain's."""
    video = faces_video(face_photo, ["person_a_1", "person_a_1", "person_a_2~", "person_b_1"])
    ref = face_photo("person_a_2", SIZE)[None]
    moving = video[None].clone().requires_grad_()
    out = consistency(moving, [context("g", ref)])
    assert out.valid.tolist() == [True]
    consistency.loss(out).backward()  # -mean(score) over the valid samples
    frames = video.transpose(0, 1).double().requires_grad_()
    landmarks, index = _counted_landmarks(consistency, frames.detach())
    assert index.tolist() == [1, 2, 3]
    ref_mean = consistency.reference(context("g", ref)).mean_embedding(True)[None].double()
    score = _chain(consistency, frames, landmarks, index, ref_mean, 4)
    (-score).backward()
    assert abs(float(out.scores.detach()[0]) - float(score.detach())) < 1e-4
    expected = frames.grad.transpose(0, 1)[None].float()
    assert float(moving.grad[:, :, 0].abs().sum()) == 0.0  # frame 0 (the conditioning image) does not count
    # float32 twin against float64: 2.4e-3 here; 10% off one term's weight would give 6e-2
    error = float((moving.grad - expected).norm() / expected.norm())
    assert error < 1e-2, error


# --------------------------------------------------------------------------- identity_consistency: real videos


def test_consistency_score_equals_float64_recomputation_from_onnxruntime_embeddings(consistency, identity,
                                                                                    face_photo):
    names = ["person_a_1", "person_a_1", "person_a_2~", "person_a_2", "person_b_1"]
    video = faces_video(face_photo, names)
    steady = faces_video(face_photo, ["person_a_1"] * 5)
    ref = face_photo("person_a_2", SIZE)[None]
    ctx = [context("mixed", ref), context("steady", ref)]
    assert consistency.prepare(ctx).tolist() == [True, True]
    out = consistency(torch.stack([video, steady]), ctx)
    assert out.valid.tolist() == [True, True]
    # onnxruntime (no gradient) embeddings of every frame's largest face, through face_identity
    emb, found = identity.frame_embeddings(video.transpose(0, 1))
    assert found.all()
    ref_mean = identity.reference(ctx[0]).mean_embedding(True)
    expected, spread, ref_std = consistency_by_hand(emb[1:].double(), ref_mean.double())
    assert abs(float(out.scores.detach()[0]) - expected) < 2e-3, (float(out.scores.detach()[0]), expected)
    assert spread > 0.05 and ref_std > 0.02  # a different person in the last frame: a real spread
    # the same face moving across the frame is nearly perfectly consistent
    assert -0.02 < float(out.scores.detach()[1]) <= 0.0
    assert out.metrics["face_frames"] == 8.0 and out.metrics["samples_under_2_face_frames"] == 0.0


def test_consistency_masks_videos_with_fewer_than_2_face_frames(consistency, identity, face_photo):
    ref = face_photo("person_a_1", SIZE)[None]
    videos = torch.stack([
        faces_video(face_photo, ["person_a_1", "person_a_2", None]),  # one counted face frame
        faces_video(face_photo, ["person_a_1", None, None]),  # a face only in frame 0, which does not count
        faces_video(face_photo, ["person_a_1", "person_a_2", "person_a_1~"]),  # two counted frames
    ]).requires_grad_()
    ctx = [context(f"m{i}", ref) for i in range(3)]
    out = consistency(videos, ctx)
    assert out.valid.tolist() == [False, False, True]
    assert out.metrics["samples_under_2_face_frames"] == 2.0 and out.metrics["face_frames"] == 3.0
    assert out.scores[:2].tolist() == [0.0, 0.0]
    consistency.loss(out).backward()
    assert float(videos.grad[:2].abs().sum()) == 0.0 and float(videos.grad[2].abs().sum()) > 0
    # the mask is this reward's only: face_identity scores the one-frame video
    assert identity(videos.detach(), ctx).valid.tolist() == [True, False, True]
    # a reference without a face masks the sample as well
    grey = torch.zeros(1, 3, 96, 96)
    assert consistency.prepare([context("grey", grey)]).tolist() == [False]
    out = consistency(videos[2:].detach(), [context("grey", grey)])
    assert out.valid.tolist() == [False] and out.metrics["references_without_face"] == 1.0


def test_consistency_options_validated_with_key_names():
    def build(**values):
        return build_dataclass(IdentityConsistencyReward.Options, values, prefix="reward")

    with pytest.raises(ValueError, match="reward.face_select: identity_consistency needs one face per frame"):
        build(face_select="all")
    with pytest.raises(ValueError, match="reward.reference_weight: must be a finite number >= 0"):
        build(reference_weight=-1.0)
    with pytest.raises(ValueError, match="both are 0"):
        build(spread_weight=0.0, reference_weight=0.0)
    with pytest.raises(ValueError, match="unknown key 'reward.spread_weigth'.*did you mean 'spread_weight'"):
        build(spread_weigth=1.0)
    with pytest.raises(ValueError, match="reward.det_size: must be a positive multiple of 32"):
        build(det_size=100)  # face_identity's checks hold here too
    assert build(face_select="most_similar", spread_weight=0.0).reference_weight == 1.0


def test_face_rewards_exclude_the_full_videos_frame0_when_given_a_subset(consistency, identity, face_photo):
    """A composition's frame subset (``SampleContext.frames``): frame 0 of the full video is the conditioning
    image, not the first frame given."""
    video = faces_video(face_photo, ["person_a_1", "person_a_2"])[None]
    ref = face_photo("person_a_1", SIZE)[None]
    whole = SampleContext(sample_id="sub", reference=ref)
    subset = SampleContext(sample_id="sub", reference=ref, frames=(2, 4))  # frames 2 and 4 of a longer video
    assert consistency(video, [whole]).valid.tolist() == [False]  # frame 0 left out: one frame
    out = consistency(video, [subset])
    assert out.valid.tolist() == [True] and out.metrics["face_frames"] == 2.0
    assert identity(video, [whole]).metrics["face_frames"] == 1.0
    assert identity(video, [subset]).metrics["face_frames"] == 2.0
    with_frame0 = SampleContext(sample_id="sub", reference=ref, frames=(0, 4))
    assert identity(video, [with_frame0]).metrics["face_frames"] == 1.0


# --------------------------------------------------------------------------- the shared step cache


def test_face_rewards_of_one_step_detect_and_embed_once(identity, consistency, face_assets, face_photo):
    videos = torch.stack([faces_video(face_photo, ["person_a_1", "person_a_2", "person_a_1~"]),
                          faces_video(face_photo, ["person_b_1", "person_b_1", "person_a_2"])])
    ctx = [context("c0", face_photo("person_a_2", SIZE)[None]), context("c1", face_photo("person_b_2", SIZE)[None])]
    # each alone (a fresh cache per call): the reference values and gradients
    alone = {}
    for name, reward in (("identity", identity), ("consistency", consistency)):
        reward.cache = None
        moving = videos.clone().requires_grad_()
        out = reward(moving, ctx)
        reward.loss(out).backward()
        alone[name] = (out.scores.detach(), moving.grad)
    # together: one cache, the same tensor
    cache = StepCache()
    identity.cache = consistency.cache = cache
    moving = videos.clone().requires_grad_()
    try:
        first = identity(moving, ctx)
        second = consistency(moving, ctx)
    finally:
        identity.cache = consistency.cache = None
    detections, faces = identity.detections_key, f"{identity.faces_key}/grad=True"
    assert detections == consistency.detections_key and detections.startswith("face_detections/")
    assert cache.computed == {detections: 1, faces: 1}
    assert cache.hits == {detections: 1, faces: 1}
    assert torch.equal(first.scores.detach(), alone["identity"][0])
    assert torch.equal(second.scores.detach(), alone["consistency"][0])
    (identity.loss(first) + consistency.loss(second)).backward()  # one graph through the shared embeddings
    torch.testing.assert_close(moving.grad, alone["identity"][1] + alone["consistency"][1], atol=1e-6, rtol=1e-5)
    # other detection options: nothing shared, both computed
    other = face_reward(IdentityConsistencyReward, face_assets.scrfd_sface, det_size=320)
    cache = StepCache()
    identity.cache = other.cache = cache
    try:
        identity(videos, ctx)
        other(videos, ctx)
    finally:
        identity.cache = other.cache = None
    assert other.detections_key != identity.detections_key
    assert sorted(cache.computed.values()) == [1, 1, 1, 1] and cache.hits == {}


# --------------------------------------------------------------------------- motion


def alternating(a, b, num_frames):
    """``(3, F, H, W)``: frames a, b, a, b, ..."""
    return torch.stack([a if f % 2 == 0 else b for f in range(num_frames)], dim=1)


def test_motion_energy_by_hand():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 12, 20, generator=g) * 2 - 1, torch.rand(3, 12, 20, generator=g) * 2 - 1
    still = alternating(a, a, 5)
    flat = alternating(torch.full((3, 12, 20), -0.5, dtype=torch.float64),
                       torch.full((3, 12, 20), 0.3, dtype=torch.float64), 5)
    pair = alternating(a, b, 5)
    energy = motion_energy(torch.stack([still.double(), flat, pair.double()]), resolution=None)
    # [0, 1] units: |0.3 - (-0.5)| / 2 = 0.4 at every pixel of every pair of frames
    hand = np.abs(b.double().numpy() - a.double().numpy()).mean() / 2
    assert energy.tolist()[:2] == [0.0, pytest.approx(0.4, abs=1e-12)]
    assert abs(float(energy[2]) - hand) < 1e-12
    assert abs(float(energy[2]) - motion_metric(pair.transpose(0, 1))) < 1e-12  # the evaluation metric agrees
    # black/white flicker: 1, the top of the range
    assert float(motion_energy(alternating(-torch.ones(3, 4, 4), torch.ones(3, 4, 4), 3)[None])[0]) == 1.0


def test_motion_energy_shrinks_frames_by_area_average():
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 4, 96, 128, generator=g, dtype=torch.float64) * 2 - 1
    x = (video[0].numpy() + 1) / 2  # (3, F, 96, 128) in [0, 1]
    small = x.reshape(3, 4, 48, 2, 64, 2).mean(axis=(3, 5))  # shorter side 96 -> 48: 2x2 blocks
    hand = np.abs(small[:, 1:] - small[:, :-1]).mean()
    assert abs(float(motion_energy(video, resolution=48)[0]) - hand) < 1e-12
    full = np.abs(x[:, 1:] - x[:, :-1]).mean()
    assert abs(float(motion_energy(video, resolution=96)[0]) - full) < 1e-12  # already that small: unchanged
    assert float(motion_energy(video, resolution=48)[0]) < full  # averaging removes pixel noise


def test_motion_energy_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 3, 20, 30, generator=g, dtype=torch.float64) * 2 - 1
    for resolution in (None, 7):  # 20x30 -> 7x10: uneven area windows
        x = video.clone().requires_grad_()
        (motion_energy(x, resolution) * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
        flat = video.flatten()
        for i in torch.randperm(flat.numel(), generator=g)[:12].tolist():
            eps = 1e-6
            plus, minus = flat.clone(), flat.clone()
            plus[i] += eps
            minus[i] -= eps
            fd = ((motion_energy(plus.view_as(video), resolution) - motion_energy(minus.view_as(video), resolution))
                  * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum() / (2 * eps)
            assert abs(float(fd) - float(x.grad.flatten()[i])) < 1e-8, (resolution, i)


def test_motion_score_target_and_gradient_by_hand():
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(3, 16, 16, generator=g) * 2 - 1, torch.rand(3, 16, 16, generator=g) * 2 - 1
    ref = alternating(a, b, 5).transpose(0, 1)  # (F, 3, H, W)
    ref_energy = np.abs(b.double().numpy() - a.double().numpy()).mean() / 2
    generated = torch.stack([alternating(a, a, 5),  # collapsed to a still image
                             alternating(a, (a + b) / 2, 5),  # half the reference's motion
                             alternating(a, b, 5)])  # the reference's motion
    ctx = [context(f"s{i}", ref) for i in range(3)]
    half = np.abs((b.double().numpy() - a.double().numpy()) / 2).mean() / 2
    for distance, scale in (("absolute", 1.0), ("absolute", 1.5), ("relative", 1.0)):
        reward = MotionReward(None, MotionReward.Options(target_scale=scale, resolution=None, distance=distance))
        assert reward.prepare(ctx).tolist() == [True, True, True]
        moving = generated.clone().requires_grad_()
        out = reward(moving, ctx)
        target = scale * ref_energy
        errors = [abs(e - target) / (target if distance == "relative" else 1.0) for e in (0.0, half, ref_energy)]
        assert out.valid.all()
        torch.testing.assert_close(out.scores.double(), -torch.tensor(errors, dtype=torch.float64), atol=1e-6, rtol=0)
        # the still video scores worst: the collapse this reward is there to stop
        assert float(out.scores.detach()[0]) < float(out.scores.detach()[1])
        assert out.metrics["motion_target"] == pytest.approx(target, abs=1e-6)
        if distance == "relative":
            continue
        # gradient of -mean(score) against the float64 formula's: d/dx |E(x) - T| / B
        reward.loss(out).backward()
        x = generated.double().requires_grad_()
        hand = (((x[:, :, 1:] - x[:, :, :-1]).abs().flatten(1).mean(1) / 2 - target).abs().mean())
        hand.backward()
        torch.testing.assert_close(moving.grad.double()[1:], x.grad[1:], atol=1e-9, rtol=1e-5)
        assert float(moving.grad[0].abs().sum()) == 0.0  # exactly still: |d| has zero slope at 0


def test_motion_reference_too_short_is_invalid_and_counted():
    g = torch.Generator().manual_seed(5)
    clip = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    ctx = [context("one_frame", clip[:1]), context("ok", clip)]
    reward = MotionReward(None, MotionReward.Options())
    assert reward.prepare(ctx).tolist() == [False, True]
    videos = clip.transpose(0, 1)[None].repeat(2, 1, 1, 1, 1).requires_grad_()
    out = reward(videos, ctx)
    assert out.valid.tolist() == [False, True] and out.metrics["references_too_short"] == 1.0
    scores = out.scores.detach()
    assert float(scores[0]) == 0.0 and abs(float(scores[1])) < 1e-6  # the reference itself: on target
    reward.loss(out).backward()
    assert float(videos.grad[0].abs().sum()) == 0.0
    # relative distance: a still reference gives no target to divide by
    relative = MotionReward(None, MotionReward.Options(distance="relative"))
    still = clip[:1].repeat(3, 1, 1, 1)
    assert relative.prepare([context("still", still)]).tolist() == [False]
    out = relative(videos[:1].detach(), [context("still", still)])
    assert out.valid.tolist() == [False] and out.metrics["references_without_motion"] == 1.0
    # ... and so does a nearly still one (a target under min_target), which it would otherwise divide by:
    # a reference whose middle frame is 4e-4 ([0, 1] units) brighter: energy 4e-4, under the default 1e-3
    nearly = still.clone()
    nearly[1] += 8e-4  # [-1, 1] units: 4e-4 in [0, 1] units at every pixel of pairs (0, 1) and (1, 2)
    energy = float(motion_energy(nearly.transpose(0, 1)[None], None)[0])
    assert energy == pytest.approx(4e-4, rel=1e-3)
    for min_target, expect_valid in ((1e-3, False), (1e-4, True)):
        r = MotionReward(None, MotionReward.Options(distance="relative", resolution=None, min_target=min_target))
        out = r(videos[:1, :, :3].detach(), [context("nearly", nearly)])
        assert out.valid.tolist() == [expect_valid], min_target
        assert out.metrics["references_without_motion"] == (0.0 if expect_valid else 1.0)
        if expect_valid:  # divided by the tiny target: thousands of times the energy difference
            gen = float(motion_energy(videos[:1, :, :3].detach(), None)[0])
            assert float(out.scores[0]) == pytest.approx(-abs(gen - energy) / energy, rel=1e-3)
        else:
            assert float(out.scores[0]) == 0.0
    # an absolute distance keeps every reference with 2 frames: the target is matched, not divided by
    assert MotionReward(None, MotionReward.Options(resolution=None)).prepare([context("nearly", nearly)]).tolist() == [True]
    with pytest.raises(ValueError, match="data.num_frames"):
        reward(videos[:, :, :1].detach(), ctx)


def test_a_held_out_clip_named_like_a_training_clip_is_scored_against_its_own_reference(tmp_path):
    """A metadata row's ``video`` cell is relative to its CSV: the held-out set's ``videos/a.mp4`` and the
    training set's are other clips (in the demo, other people). A reward that scored the training clip
    (its reference cached) must score the held-out one against the held-out clip's own reference, as a
    fresh reward does. Motion in [0, 1] units, by hand: consecutive frames differ by the amplitude in
    [-1, 1] units, so the energy is amplitude / 2."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 16, 16, generator=g, dtype=torch.float64) * 0.8 - 0.4

    def clip(amplitude):  # (F, 3, H, W)
        return torch.stack([base + amplitude * (f % 2) for f in range(5)]).float()

    def item(folder, amplitude):
        video = clip(amplitude)
        return {"sample_id": "videos/a.mp4", "path": str(tmp_path / folder / "videos" / "a.mp4"), "video": video,
                "first_frame": video[0], "prompt": ""}

    train, held = [item("train", 0.6)], [item("heldout", 0.1)]  # energies 0.3 and 0.05
    generated = clip(0.2).transpose(0, 1)  # (3, F, H, W), energy 0.1

    def options():
        return MotionReward.Options(distance="relative", resolution=None)

    used = MotionReward(None, options())
    Evaluation(train, used, [], [0]).score("train", [generated])  # the training clip's reference cached
    after_training = Evaluation(held, used, [], [0]).score("held", [generated])[0]["reward_score"]
    fresh = Evaluation(held, MotionReward(None, options()), [], [0]).score("held", [generated])[0]["reward_score"]
    assert after_training == pytest.approx(-abs(0.1 - 0.05) / 0.05, abs=1e-5)  # not -|0.1 - 0.3| / 0.3
    assert after_training == fresh


def test_motion_reference_uses_the_same_frame_subset():
    """Given every 2nd frame (``SampleContext.frames``), the target is the reference's energy over the
    same frames: a reference alternating a, b has energy |b - a| / 2 over frames 0, 1, 2 and 0 over 0, 2, 4."""
    g = torch.Generator().manual_seed(6)
    a = torch.rand(3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    b = torch.rand(3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    ref = alternating(a, b, 6).transpose(0, 1)
    generated = alternating(a, b, 3)[None]  # the 3 frames given, whatever their source
    reward = MotionReward(None, MotionReward.Options(resolution=None))
    pair = float((b - a).abs().mean()) / 2
    for frames, target in (((0, 1, 2), pair), ((0, 2, 4), 0.0), ((0, 2, 7), 0.0), (None, pair)):
        out = reward(generated, [SampleContext(sample_id="s", reference=ref, frames=frames)])
        assert out.metrics["motion_target"] == pytest.approx(target, abs=1e-7), frames
        assert float(out.scores[0]) == pytest.approx(-abs(pair - target), abs=1e-6), frames
    # frames 0 and 9 of a 6-frame reference: one frame left, nothing to match
    out = reward(generated[:, :, :2], [SampleContext(sample_id="s", reference=ref, frames=(0, 9))])
    assert out.valid.tolist() == [False] and out.metrics["references_too_short"] == 1.0


def test_motion_options_validated_with_key_names():
    def build(**values):
        return build_dataclass(MotionReward.Options, values, prefix="reward")

    with pytest.raises(ValueError, match="reward.resolution: must be a positive number of pixels"):
        build(resolution=0)
    with pytest.raises(ValueError, match="reward.target_scale: must be a finite number >= 0"):
        build(target_scale=-0.5)
    with pytest.raises(ValueError, match="reward.target_scale: 0 makes every target 0"):
        build(target_scale=0.0, distance="relative")
    with pytest.raises(ValueError, match="reward.min_target: must be a finite number > 0"):
        build(distance="relative", min_target=0.0)
    with pytest.raises(ValueError, match="reward.distance: must be one of"):
        build(distance="squared")
    assert build(resolution=None).resolution is None
