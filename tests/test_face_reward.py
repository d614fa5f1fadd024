"""The face_identity reward on real models and photos: identity, gradients, masks, caching."""

from __future__ import annotations

import logging
import os

import cv2
import numpy as np
import pytest
import torch

from rewardfl.config import config_from_dict
from rewardfl.interfaces import SampleContext
from rewardfl.registry import create
from rewardfl.rewards.face_identity import FaceIdentityReward, facesim_arc, pooled_identity_score

SIZE = 160


def make_reward(pack, tmp_path, **options):
    cfg = config_from_dict({"reward_model_path": pack})
    return create("reward", "face_identity", cfg, {"reference_cache_dir": str(tmp_path / "refs"), **options})


@pytest.fixture(scope="module")
def reward(face_assets, tmp_path_factory):
    return make_reward(face_assets.scrfd_sface, tmp_path_factory.mktemp("reward"))


def as_uint8(frame):
    return np.ascontiguousarray(((frame + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def from_uint8(image):
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1


def edits(frame):
    """Nine edits that keep the identity: flip, crops, JPEG, rotations, light, blur, noise."""
    img = as_uint8(frame)
    h, w = img.shape[:2]
    out = [img[:, ::-1]]
    for m in (12, 20):
        out.append(cv2.resize(img[m:h - m, m:w - m], (w, h), interpolation=cv2.INTER_LINEAR))
    out.append(cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 25])[1], cv2.IMREAD_COLOR))
    for angle in (-10, 12):
        rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        out.append(cv2.warpAffine(img, rot, (w, h), borderMode=cv2.BORDER_REFLECT))
    out.append(np.clip(img.astype(np.int16) + 35, 0, 255).astype(np.uint8))
    out.append(cv2.GaussianBlur(img, (5, 5), 1.2))
    noise = np.random.default_rng(0).normal(0, 8, img.shape)
    out.append(np.clip(img + noise, 0, 255).astype(np.uint8))
    return torch.stack([from_uint8(e) for e in out])


def context(sample_id, frames, path=None):
    return SampleContext(sample_id=sample_id, reference=frames, reference_path=path)


# --------------------------------------------------------------------------- identity


def test_same_face_under_edits_scores_high(reward, face_photo):
    base = face_photo("person_b_1", SIZE)
    frames = torch.cat([base[None], edits(base)])
    emb, found = reward.frame_embeddings(frames)
    assert found.all()
    sims = emb[1:] @ emb[0]
    assert bool((sims >= 0.8).all()), sims


def test_same_person_years_apart_beats_every_different_pair(reward, face_photo):
    names = ["person_a_1", "person_a_2", "person_b_1", "person_b_2", "impostor_1", "impostor_2"]
    emb, found = reward.frame_embeddings(torch.stack([face_photo(n, SIZE) for n in names]))
    assert found.all()
    sim = emb @ emb.T
    same = [sim[0, 1], sim[2, 3]]
    person = [0, 0, 1, 1, 2, 3]
    different = [sim[i, j] for i in range(6) for j in range(i + 1, 6) if person[i] != person[j]]
    assert min(same) > max(different), (same, max(different))


def test_video_scores_higher_against_its_own_person(reward, face_photo):
    a1, a2 = face_photo("person_a_1", SIZE), face_photo("person_a_2", SIZE)
    b1 = face_photo("person_b_1", SIZE)
    video = torch.stack([a1, a2, a2.flip(-1), a1.flip(-1)], dim=1)  # (3, F, H, W)
    ref_a = torch.stack([a1, a1.flip(-1)])
    ref_b = torch.stack([b1, b1.flip(-1)])
    ctx = [context("a", ref_a), context("b", ref_b)]
    assert reward.prepare(ctx).tolist() == [True, True]
    out = reward(torch.stack([video, video]), ctx)
    assert out.valid.tolist() == [True, True]
    assert float(out.scores[0]) > float(out.scores[1]) + 0.3
    assert out.metrics["face_frames"] == 6.0  # 3 counted frames per video (frame 0 excluded)


def test_pooled_score_matches_hand_computation(reward, face_photo):
    a1, a2 = face_photo("person_a_1", SIZE), face_photo("person_a_2", SIZE)
    ref = torch.stack([a2, a1, a1.flip(-1)])  # frame 0 (a2) must not count
    video = torch.stack([a2, a1.flip(-1), a2, torch.zeros_like(a1)], dim=1)
    out = reward(video[None], [context("hand", ref)])
    emb_ref, _ = reward.frame_embeddings(ref)
    emb_gen, found = reward.frame_embeddings(video.transpose(0, 1))
    assert found.tolist() == [True, True, True, False]
    e_ref, e_gen = emb_ref.double(), emb_gen.double()
    # frames 1, 2 (frame 0 excluded, frame 3 has no face) x reference frames 1, 2
    expected = np.mean([float(e_gen[g] @ e_ref[r]) for g in (1, 2) for r in (1, 2)])
    assert abs(float(out.scores[0]) - expected) < 2e-3
    assert reward.last_frame_similarity[0, 0].isnan() and reward.last_frame_similarity[0, 3].isnan()


def test_pooled_identity_score_masks():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    ref_mean = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # sample 0: frame 1 has two faces (mean 0.8), frame 2 one (1.0 . e2 = 0); sample 1: none
    scores, has_face, frame_sim = pooled_identity_score(emb, torch.tensor([0, 0, 0]), torch.tensor([1, 1, 2]),
                                                        ref_mean, num_frames=3)
    assert torch.allclose(scores, torch.tensor([((1.0 + 0.6) / 2 + 0.0) / 2, 0.0]))
    assert has_face.tolist() == [True, False]
    assert frame_sim[0, 0].isnan() and frame_sim[1].isnan().all()


def test_facesim_arc_by_hand():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    ref = torch.nn.functional.normalize(torch.randn(2, 8, generator=g, dtype=torch.float64), dim=1)
    has_face = torch.tensor([True, True, False, True, True])
    # 3 uniformly spaced frames of 5: 0, 2, 4; frame 2 has no face
    expected = np.mean([max(float(emb[f] @ ref[r]), 0.0) for f in (0, 4) for r in (0, 1)])
    assert abs(float(facesim_arc(emb, has_face, ref, num_frames=3)) - expected) < 1e-6
    assert facesim_arc(emb, torch.zeros(5, dtype=torch.bool), ref).isnan()


# --------------------------------------------------------------------------- gradients


def _face_on_canvas(face_photo):
    """(1, 3, 3, 192, 256): frame 0 and 2 the face at the left, frame 1 the face shifted."""
    face = face_photo("person_b_1", 128)
    frames = torch.full((3, 3, 192, 256), -0.2)
    frames[0, :, 32:160, 16:144] = face
    frames[1, :, 40:168, 24:152] = face
    frames[2, :, 32:160, 16:144] = face
    return frames.transpose(0, 1)[None].contiguous()


def test_gradient_inside_face_box_zero_far_outside(reward, face_photo):
    video = _face_on_canvas(face_photo).requires_grad_()
    ref = face_photo("person_b_2", SIZE)[None]
    ctx = [context("grad", ref)]
    out = reward(video, ctx)
    assert out.valid.tolist() == [True]
    reward.loss(out).backward()
    grad = video.grad[0].abs().sum(0)  # (F, H, W)
    assert float(grad[0].sum()) == 0.0  # generated frame 0 is the conditioning image: excluded
    det = reward.detector(video.detach()[0].transpose(0, 1))
    for f in (1, 2):
        x1, y1, x2, y2 = det.boxes[det.frame_index == f][0].round().int().tolist()
        assert float(grad[f, y1:y2, x1:x2].sum()) > 0
        inside = float(grad[f, y1:y2, x1:x2].sum())
        assert inside > 0.5 * float(grad[f].sum())  # most of the signal is on the face
        far = grad[f].clone()
        far[max(0, y1 - 40):y2 + 40, max(0, x1 - 40):x2 + 40] = 0  # far: > 40 px outside the box
        assert float(far.sum()) == 0.0


def test_gradient_matches_finite_differences(reward, face_photo):
    """The differentiable chain (align + recognizer twin + pooled score) in float64, landmarks fixed."""
    video = _face_on_canvas(face_photo)[0, :, 1:2].transpose(0, 1).double()  # (1, 3, H, W): one frame
    ref = reward.reference(context("fd", face_photo("person_b_2", SIZE)[None]))
    ref_mean = ref.mean_embedding(True)[None].double()
    landmarks, _, found = reward.detector(video.float()).largest()
    assert found.all()
    index = torch.tensor([0])
    twin = reward.recognizer.model.twin("cpu", torch.float64)

    def score(frames):
        crops = reward.recognizer.align(frames, landmarks[index].double(), index)
        emb = torch.nn.functional.normalize(twin(crops).flatten(1), dim=1)
        return pooled_identity_score(emb, torch.zeros_like(index), index, ref_mean, 1)[0][0]

    frames = video.clone().requires_grad_()
    score(frames).backward()
    grad = frames.grad
    flat = grad.abs().flatten()
    picks = torch.topk(flat, 200).indices[::70].tolist() + [int(flat.argmin())]
    eps = 1e-6  # float64; small enough not to cross PReLU kinks
    for i in picks:
        bumped = [video.clone().flatten(), video.clone().flatten()]
        bumped[0][i] += eps
        bumped[1][i] -= eps
        with torch.no_grad():
            fd = (score(bumped[0].view_as(video)) - score(bumped[1].view_as(video))) / (2 * eps)
        assert abs(float(fd) - float(grad.flatten()[i])) < 1e-6 + 1e-3 * abs(float(fd)), (i, float(fd))


def test_no_face_anywhere_gives_zero_gradient_and_is_counted(reward, face_photo):
    video = torch.zeros(2, 3, 3, 96, 96).requires_grad_()
    ref = face_photo("person_a_1", SIZE)[None]
    out = reward(video, [context("nf1", ref), context("nf2", ref)])
    assert out.valid.tolist() == [False, False]
    assert out.metrics["samples_without_face"] == 2.0
    loss = reward.loss(out)
    assert float(loss.detach()) == 0.0
    loss.backward()  # no "does not require grad" error: the graph is kept
    assert float(video.grad.abs().sum()) == 0.0


def _spoil(landmarks, how):
    """Real landmarks ``(K, 5, 2)`` made unalignable: the five points on one line, all at the nose,
    or NaN (what a diverged generator or an odd detection can give)."""
    out = landmarks.clone()
    if how == "collinear":
        out[:, :, 1] = out[:, :, 0] * 0.5 + 10.0
    elif how == "coincide":
        out[:] = out[:, 2:3]
    else:
        out[:] = float("nan")
    return out


@pytest.mark.parametrize("face_select", ["largest", "most_similar", "all"])
def test_unalignable_detections_count_as_frames_without_a_face(face_select, face_assets, face_photo, tmp_path,
                                                               monkeypatch):
    """The real detector's output on real faces, with some frames' landmarks spoiled on the way out
    (the recognizer and the alignment op are real): the step goes on, those frames score as frames
    without a face would (the reference: the same frames blanked), in the generated video and in
    the reference alike, and the spoiled faces are counted."""
    from rewardfl.rewards.face_identity import FaceDetector

    a1, a2 = face_photo("person_a_1", SIZE), face_photo("person_a_2", SIZE)
    blank = torch.zeros_like(a1)
    video = torch.stack([a2, a1, a2.flip(-1), a1.flip(-1), a2], dim=1)[None]  # (1, 3, 5, H, W)
    ref = torch.stack([a1, a2, a1.flip(-1), a2.flip(-1)])
    spoiled: dict[int, str] = {}  # frame -> how, for the next detector call
    detect = FaceDetector.__call__

    def detect_and_spoil(self, frames, **kwargs):
        det = detect(self, frames, **kwargs)
        for frame, how in spoiled.items():
            rows = det.frame_index == frame
            det.landmarks[rows] = _spoil(det.landmarks[rows], how)
        return det

    monkeypatch.setattr(FaceDetector, "__call__", detect_and_spoil)
    r = make_reward(face_assets.scrfd_sface, tmp_path, face_select=face_select, det_size=160)
    spoiled[2] = "coincide"
    r.reference(context("spoiled", ref))
    spoiled.clear()
    spoiled.update({1: "nan", 3: "collinear"})
    moving = video.clone().requires_grad_()
    out = r(moving, [context("spoiled", ref)])  # must not raise
    spoiled.clear()
    sims = r.last_frame_similarity.clone()
    # what it must equal: the same frames blanked (no face there), nothing spoiled
    blanked_video = video.clone()
    blanked_video[:, :, [1, 3]] = blank[:, None]
    blanked_ref = ref.clone()
    blanked_ref[2] = blank
    expected = r(blanked_video, [context("blanked", blanked_ref)])
    torch.testing.assert_close(out.scores.detach(), expected.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(sims, r.last_frame_similarity, atol=1e-5, rtol=0, equal_nan=True)
    assert sims[0, [1, 3]].isnan().all() and not sims[0, [2, 4]].isnan().any()
    assert out.metrics["face_frames"] == expected.metrics["face_frames"] == 2.0
    # counted: every detection in the spoiled frames (a frame may hold more than one)
    in_video = r.detector(video[0].transpose(0, 1)).frame_index
    in_ref = r.detector(ref).frame_index
    spoiled_in_video = int(((in_video == 1) | (in_video == 3)).sum())
    assert spoiled_in_video >= 2 and out.metrics["degenerate_faces"] == spoiled_in_video
    assert out.metrics["reference_degenerate_faces"] == int((in_ref == 2).sum()) >= 1
    assert expected.metrics["degenerate_faces"] == expected.metrics["reference_degenerate_faces"] == 0.0
    r.loss(out).backward()  # the spoiled frames carry no gradient; the others do
    assert float(moving.grad[:, :, [1, 3]].abs().sum()) == 0.0 and float(moving.grad[:, :, 2].abs().sum()) > 0
    if face_select != "largest":
        return  # evaluation always takes the largest face
    # evaluation (no gradient) drops them the same way
    spoiled.update({1: "nan", 3: "collinear"})
    evaluation = r.evaluate(video[0], context("spoiled", ref))
    spoiled.clear()
    assert evaluation["degenerate_faces"] == spoiled_in_video
    assert evaluation["score"] == pytest.approx(r.evaluate(blanked_video[0], context("blanked", blanked_ref))["score"],
                                               abs=1e-5)


def test_loss_shaping_by_hand(reward):
    from rewardfl.interfaces import RewardOutput

    scores = torch.tensor([0.70, 0.30, 0.99])
    out = RewardOutput(scores=scores, valid=torch.tensor([True, True, False]))
    expected = (-(0.70 - 0.54) / 0.16 * 0.1 + -(0.30 - 0.54) / 0.16 * 0.1) / 2
    assert abs(float(reward.loss(out)) - expected) < 1e-6


# --------------------------------------------------------------------------- references, options


def test_reference_without_face_is_skipped_with_a_warning(reward, caplog):
    grey = torch.zeros(2, 3, 96, 96)
    with caplog.at_level(logging.WARNING, logger="rewardfl"):
        valid = reward.prepare([context("noface", grey)])
    assert valid.tolist() == [False]
    assert "no face found in the reference of sample 'noface'" in caplog.text


def test_reference_embeddings_cached_on_disk(face_assets, face_photo, tmp_path):
    image = as_uint8(face_photo("person_a_2", SIZE))
    path = str(tmp_path / "ref.png")
    cv2.imwrite(path, image[:, :, ::-1])
    ref = from_uint8(image)[None]
    first = make_reward(face_assets.yunet_sface, tmp_path)
    faces = first.reference(context("disk", ref, path))
    files = os.listdir(tmp_path / "refs")
    assert len(files) == 1 and files[0].endswith(f"-{first.model_key()}-1x3x{SIZE}x{SIZE}.pt")
    # tamper with the cache entry: a new reward instance must read it, not recompute
    entry = torch.load(tmp_path / "refs" / files[0], weights_only=True)
    entry["embeddings"] = -entry["embeddings"]
    torch.save(entry, tmp_path / "refs" / files[0])
    second = make_reward(face_assets.yunet_sface, tmp_path)
    cached = second.reference(context("disk", ref, path))
    assert torch.equal(cached.embeddings, -faces.embeddings)


def test_landmark_fallback_uses_reference_landmarks(face_assets, face_photo, tmp_path):
    a1 = face_photo("person_a_1", SIZE)
    hidden = a1.clone()
    hidden[:, 40:120, 30:130] = 0.0  # the face is covered: the detector finds nothing
    video = torch.stack([a1, a1, hidden], dim=1)[None]
    ref = torch.stack([a1, a1, a1])
    plain = make_reward(face_assets.scrfd_sface, tmp_path)
    out = plain(video, [context("fb", ref)])
    assert out.metrics["face_frames"] == 1.0 and out.metrics["fallback_frames"] == 0.0
    fallback = make_reward(face_assets.scrfd_sface, tmp_path, landmark_fallback=True)
    out = fallback(video.clone().requires_grad_(), [context("fb", ref)])
    assert out.metrics["face_frames"] == 2.0 and out.metrics["fallback_frames"] == 1.0
    assert not fallback.last_frame_similarity[0, 2].isnan()


def test_most_similar_face_select(face_assets, face_photo, tmp_path):
    big = face_photo("person_a_1", 160)
    small = face_photo("person_b_1", 96)
    frame = torch.full((3, 160, 288), -1.0)
    frame[:, :, :160] = big
    frame[:, 32:128, 180:276] = small
    video = torch.stack([frame, frame], dim=1)[None]
    ref = face_photo("person_b_2", SIZE)[None]
    scores = {}
    for how in ("largest", "most_similar", "all"):
        r = make_reward(face_assets.scrfd_sface, tmp_path, face_select=how)
        scores[how] = float(r(video, [context("ms", ref)]).scores[0])
    assert scores["most_similar"] > scores["all"] > scores["largest"]


def test_batch_equals_single_samples(reward, face_photo):
    a1, b1 = face_photo("person_a_1", SIZE), face_photo("person_b_1", SIZE)
    videos = torch.stack([torch.stack([a1, a1, b1], 1), torch.stack([b1, b1.flip(-1), a1], 1)])
    ctx = [context("s0", a1[None]), context("s1", b1[None])]
    both = reward(videos, ctx).scores
    single = torch.cat([reward(videos[i:i + 1], ctx[i:i + 1]).scores for i in range(2)])
    torch.testing.assert_close(both, single, atol=1e-5, rtol=0)


def test_options_validated_with_key_names(face_assets):
    cfg = config_from_dict({"reward_model_path": face_assets.yunet_sface})
    with pytest.raises(ValueError, match="reward.face_select: must be one of"):
        create("reward", "face_identity", cfg, {"face_select": "biggest"})
    with pytest.raises(ValueError, match="unknown key 'reward.landmark_fallbak'.*did you mean 'landmark_fallback'"):
        create("reward", "face_identity", cfg, {"landmark_fallbak": True})
    with pytest.raises(ValueError, match="reward_model_path: not set"):
        FaceIdentityReward(config_from_dict({}), FaceIdentityReward.Options())


def test_bfloat16_videos_score_like_float32(reward, face_photo):
    a1, a2 = face_photo("person_a_1", SIZE), face_photo("person_a_2", SIZE)
    video = torch.stack([a2, a2, a1.flip(-1)], dim=1)[None]
    ctx = [context("bf16", a1[None])]
    full = reward(video, ctx).scores.detach()
    half = video.to(torch.bfloat16).requires_grad_()
    out = reward(half, ctx)
    assert out.scores.dtype == torch.float32
    assert abs(float(out.scores.detach()[0]) - float(full[0])) < 0.02
    reward.loss(out).backward()
    assert half.grad.dtype == torch.bfloat16 and float(half.grad.float().abs().sum()) > 0


def test_judge_scores_detect_a_video_once_for_every_clip_with_the_same_numbers(face_photo, face_assets, tmp_path,
                                                                                monkeypatch):
    """rewardfl.evaluate scores each video against every held-out clip (specificity): the face judge
    finds the video's faces once per video, not once per clip, and the numbers equal separate
    ``evaluate`` calls (each with its own detection)."""
    from rewardfl.evaluation.evaluation import judge_scores

    judge = make_reward(face_assets.scrfd_sface, tmp_path)
    names = ("person_a_1", "person_b_1", "impostor_1")
    contexts = [context(n, torch.stack([face_photo(n, SIZE)] * 2)) for n in names]
    judge.prepare(contexts)
    video = torch.stack([face_photo("person_a_2", SIZE), edits(face_photo("person_a_2", SIZE))[0]], dim=1)
    calls, embed = [], judge.embed_reference

    def counted(frames):  # the real detection and embedding, its calls counted
        calls.append(frames.shape[0])
        return embed(frames)

    monkeypatch.setattr(judge, "embed_reference", counted)
    separate = [judge.evaluate(video, c) for c in contexts]
    assert calls == [2, 2, 2]  # alone, each call detects the video's two frames
    calls.clear()
    scores, details = judge_scores(judge, video, contexts)
    assert calls == [2]  # once for the three clips
    assert details == separate and scores == [d["score"] for d in separate]
    assert scores[0] > max(scores[1:])  # person a's video is nearest person a's clip
    judge_scores(judge, video.clone(), contexts)  # another video: found again (a cache per call)
    assert calls == [2, 2]
