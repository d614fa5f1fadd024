"""The face reward's expectation over transformations (``augment_*``): each transformation against
OpenCV or a hand computation, and the reward's augmented score against the mean of its views' scores."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from rewardfl.config import ConfigError, config_from_dict
from rewardfl.interfaces import SampleContext
from rewardfl.registry import create
from rewardfl.ops import face_align
from rewardfl.rewards.face_identity.augment import (AugmentOptions, Views, color_jitter, draw_views, gaussian_blur,
                                                    transform_landmarks)
from rewardfl.rewards.face_identity.scoring import pooled_identity_score

LANDMARKS = torch.tensor([[[38.0, 51.0], [74.0, 52.0], [56.0, 72.0], [42.0, 92.0], [70.0, 91.0]],
                          [[120.0, 40.0], [150.0, 44.0], [133.0, 60.0], [122.0, 75.0], [146.0, 78.0]]],
                         dtype=torch.float64)


def _views(n, **fields):
    zeros = dict(scale=torch.ones(n, dtype=torch.float64), angle=torch.zeros(n, dtype=torch.float64),
                 shift=torch.zeros(n, 2, dtype=torch.float64), jitter=torch.zeros(n, 5, 2, dtype=torch.float64),
                 sigma=torch.zeros(n, dtype=torch.float64), contrast=torch.ones(n, dtype=torch.float64),
                 brightness=torch.zeros(n, dtype=torch.float64), gain=torch.ones(n, 3, dtype=torch.float64))
    zeros.update(fields)
    return Views(**zeros)


def test_landmark_similarity_matches_opencv():
    scale = torch.tensor([1.07, 0.95], dtype=torch.float64)
    degrees = [4.0, -6.5]
    # OpenCV's angle turns counter-clockwise on the screen (y down): our angle is its negative
    views = _views(2, scale=scale, angle=-torch.tensor(degrees, dtype=torch.float64).deg2rad())
    moved = transform_landmarks(LANDMARKS, views).numpy()
    for i in range(2):
        pts = LANDMARKS[i].numpy()
        centre = tuple(float(c) for c in pts.mean(0))
        m = cv2.getRotationMatrix2D(centre, degrees[i], float(scale[i]))
        expected = cv2.transform(pts[None], m)[0]
        np.testing.assert_allclose(moved[i], expected, rtol=0, atol=1e-6)  # OpenCV rounds cos/sin to float


def test_shift_and_jitter_are_in_face_sizes():
    shift = torch.tensor([[0.1, -0.05]], dtype=torch.float64)
    jitter = torch.zeros(1, 5, 2, dtype=torch.float64)
    jitter[0, 2, 1] = 0.02
    moved = transform_landmarks(LANDMARKS[:1], _views(1, shift=shift, jitter=jitter)).numpy()[0]
    pts = LANDMARKS[0].numpy()
    size = math.sqrt(((pts - pts.mean(0)) ** 2).sum(1).mean())
    expected = pts + size * np.array([0.1, -0.05])
    expected[2, 1] += 0.02 * size
    np.testing.assert_allclose(moved, expected, rtol=0, atol=1e-9)


def test_blur_matches_opencv_per_crop():
    g = torch.Generator().manual_seed(0)
    crops = torch.rand(3, 3, 20, 24, generator=g) * 255
    sigma = torch.tensor([0.8, 0.0, 1.4], dtype=torch.float64)
    out = gaussian_blur(crops, sigma)
    radius = math.ceil(3 * 1.4)
    for i in range(3):
        img = crops[i].permute(1, 2, 0).numpy()
        if sigma[i] == 0:
            expected = img
        else:
            expected = cv2.GaussianBlur(img, (2 * radius + 1, 2 * radius + 1), float(sigma[i]),
                                        borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), expected, rtol=0, atol=2e-3)


def test_color_jitter_by_hand():
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64) * 255
    mean, std = 127.5, 127.5
    views = _views(2, contrast=torch.tensor([1.1, 0.9], dtype=torch.float64),
                   brightness=torch.tensor([12.0, -5.0], dtype=torch.float64),
                   gain=torch.tensor([[1.0, 1.05, 0.97], [0.99, 1.0, 1.02]], dtype=torch.float64))
    out = color_jitter((pixels - mean) / std, views, mean, std) * std + mean
    for i in range(2):
        p = pixels[i].numpy()
        c = p.mean()
        expected = ((p - c) * views.contrast[i].item() + c + views.brightness[i].item()) \
            * views.gain[i].numpy()[:, None, None]
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=0, atol=1e-9)


def test_draws_stay_in_their_ranges():
    o = AugmentOptions(views=4, scale=0.1, rotation=8.0, shift=0.05, jitter=0.02, blur=1.5, color=0.2)
    v = draw_views(o, 50, torch.Generator().manual_seed(3))
    assert v.scale.shape == (200,)
    assert (v.scale - 1).abs().max() <= 0.1 and v.angle.abs().max() <= math.radians(8.0)
    assert v.shift.abs().max() <= 0.05 and v.jitter.abs().max() <= 0.02
    assert 0 <= v.sigma.min() and v.sigma.max() <= 1.5 and (v.gain - 1).abs().max() <= 0.1
    # every range is actually used (not a constant)
    assert v.angle.std() > 0.02 and v.sigma.std() > 0.1


# --------------------------------------------------------------------------- the reward


def _reward(face_assets, tmp_path, **options):
    cfg = config_from_dict({"reward_model_path": face_assets.scrfd_sface, "seed": 5})
    return create("reward", "face_identity", cfg, {"reference_cache_dir": str(tmp_path / "refs"), **options})


def _video(face_photo):
    """(1, 3, 3, 160, 160): a face photo, then two slightly shifted copies; its reference clip too."""
    face = face_photo("person_a_1", 160)
    frames = torch.stack([face, torch.roll(face, 2, dims=2), torch.roll(face, -3, dims=1)], 1)
    reference = torch.stack([face_photo("person_a_2", 160)] * 3)
    return frames[None], [SampleContext(sample_id="a", reference=reference)]


def test_augmented_score_is_the_mean_of_its_views_scores(face_assets, face_photo, tmp_path):
    reward = _reward(face_assets, tmp_path, augment_views=3, augment_blur=1.2, augment_color=0.15)
    videos, contexts = _video(face_photo)
    videos = videos.clone().requires_grad_(True)
    out = reward(videos, contexts)
    out.scores.sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    assert reward.state_dict() == {"augment_calls": 1}

    # the same views, scored one by one through face_align, the blur, the colour and the recognizer
    plain = _reward(face_assets, tmp_path)
    frames = videos.detach().transpose(1, 2).reshape(3, 3, 160, 160)
    det = plain.detector(frames)
    keep = det.frame_index != 0
    lm, idx = det.landmarks[keep], det.frame_index[keep]
    views = draw_views(reward.options.augment, idx.numel(), torch.Generator().manual_seed(5 * 1_000_003 + 0))
    p = plain.recognizer.preprocessing
    _, ref_mean, _ = plain.reference_means(contexts, torch.device("cpu"))
    per_view = []
    n = idx.numel()
    moved = transform_landmarks(lm.repeat(3, 1, 1), views)
    for k in range(3):
        s = slice(k * n, (k + 1) * n)
        crops, _ = face_align(frames, moved[s].float(), idx, size=p.size, input_range=(-1.0, 1.0),
                              channel_order=p.channel_order, mean=p.mean, std=p.std)
        part = Views(*(getattr(views, f.name)[s] for f in Views.__dataclass_fields__.values()))
        crops = color_jitter(gaussian_blur(crops, part.sigma), part, p.mean, p.std)
        emb = torch.nn.functional.normalize(plain.recognizer.model.run_twin(crops)[0].flatten(1), dim=1)
        score, _, _ = pooled_identity_score(emb, torch.zeros_like(idx), idx, ref_mean, 3)
        per_view.append(score)
    expected = torch.stack(per_view).mean(0)
    torch.testing.assert_close(out.scores.detach(), expected.float(), rtol=0, atol=1e-5)
    # and it differs from the plain score (the views do change the crops)
    with torch.no_grad():
        baseline = plain(videos.detach().requires_grad_(True), contexts).scores
    assert (out.scores.detach() - baseline).abs().max() > 1e-4


def test_views_with_zero_ranges_score_like_the_plain_crop(face_assets, face_photo, tmp_path):
    reward = _reward(face_assets, tmp_path, augment_views=2, augment_scale=0, augment_rotation=0, augment_shift=0,
                     augment_jitter=0, augment_blur=0, augment_color=0)
    plain = _reward(face_assets, tmp_path)
    videos, contexts = _video(face_photo)
    a = reward(videos.clone().requires_grad_(True), contexts).scores
    b = plain(videos.clone().requires_grad_(True), contexts).scores
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_no_views_without_gradient_and_resume_draws_the_same(face_assets, face_photo, tmp_path):
    reward = _reward(face_assets, tmp_path, augment_views=2)
    plain = _reward(face_assets, tmp_path)
    videos, contexts = _video(face_photo)
    with torch.no_grad():  # evaluation: the plain crop, nothing drawn
        torch.testing.assert_close(reward(videos, contexts).scores, plain(videos, contexts).scores)
    assert reward.state_dict() == {"augment_calls": 0}
    first = reward(videos.clone().requires_grad_(True), contexts).scores.detach()
    second = reward(videos.clone().requires_grad_(True), contexts).scores.detach()
    assert not torch.equal(first, second)  # another call, other views
    resumed = _reward(face_assets, tmp_path, augment_views=2)
    resumed.load_state_dict({"augment_calls": 1})
    assert torch.equal(resumed(videos.clone().requires_grad_(True), contexts).scores.detach(), second)


@pytest.mark.parametrize("key, value", [("augment_views", -1), ("augment_scale", 1.0), ("augment_color", -0.1),
                                        ("augment_blur", float("inf")), ("augment_rotation", 180.0)])
def test_bad_augment_options_name_the_key(face_assets, tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"reward.{key}"):
        _reward(face_assets, tmp_path, **{key: value})
