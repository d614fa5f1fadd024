"""face_identity detection: SCRFD and YuNet on real photos against OpenCV and hand counts."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from rewardfl.rewards.face_identity import FaceDetector


@pytest.fixture(scope="module")
def yunet(face_assets):
    return FaceDetector(os.path.join(face_assets.yunet_sface, "face_detection_yunet_2023mar.onnx"), "yunet")


@pytest.fixture(scope="module")
def scrfd(face_assets):
    return FaceDetector(os.path.join(face_assets.scrfd_sface, "scrfd.onnx"), "scrfd")


@pytest.fixture(scope="module")
def opencv_astronaut(face_assets, face_photo):
    """OpenCV's own FaceDetectorYN on the astronaut with the shipped YuNet file: (15,) row."""
    image = ((face_photo("astronaut") + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    detector = cv2.FaceDetectorYN.create(face_assets.raw_yunet, "", (image.shape[1], image.shape[0]), 0.6, 0.3)
    _, faces = detector.detect(np.ascontiguousarray(image[:, :, ::-1]))
    assert faces is not None and len(faces) == 1
    return faces[0]


def test_yunet_decoding_equals_opencv_at_the_same_input_size(face_assets, face_photo, opencv_astronaut):
    # the astronaut is 512x512: at a 512 canvas there is no resize, so decoding must agree exactly
    det = FaceDetector(face_assets.raw_yunet, "yunet", size=512)(face_photo("astronaut")[None])
    assert len(det) == 1
    x, y, w, h = opencv_astronaut[:4]
    np.testing.assert_allclose(det.boxes[0].numpy(), [x, y, x + w, y + h], atol=0.01)
    np.testing.assert_allclose(det.landmarks[0].numpy(), opencv_astronaut[4:14].reshape(5, 2), atol=0.01)
    np.testing.assert_allclose(float(det.scores[0]), opencv_astronaut[14], atol=1e-4)


@pytest.mark.parametrize("which, tolerance", [("yunet", 6.0), ("scrfd", 10.0)])
def test_astronaut_one_face_landmarks_near_opencv(which, tolerance, request, face_photo, opencv_astronaut):
    """YuNet at the default 640 canvas (the image is upscaled 1.25x, OpenCV's run is not), and
    SCRFD, a different model trained on differently placed points, against OpenCV's YuNet."""
    det = request.getfixturevalue(which)(face_photo("astronaut")[None])  # default 640 letterbox
    assert len(det) == 1
    error = np.linalg.norm(det.landmarks[0].numpy() - opencv_astronaut[4:14].reshape(5, 2), axis=1)
    assert error.max() < tolerance, error  # pixels, on a face ~90 px wide, eyes ~47 px apart
    assert det.frame_index.tolist() == [0]


@pytest.mark.parametrize("which, at_least", [("scrfd", 25), ("yunet", 25)])
def test_group_photo_finds_most_of_29_people(which, at_least, request, face_assets):
    image = cv2.imread(face_assets.photos["solvay_conference_1927"])[:, :, ::-1]
    frame = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    det = request.getfixturevalue(which)(frame)
    assert at_least <= len(det) <= 32
    # every face is inside the photo and its landmarks inside its box (loosely)
    h, w = image.shape[:2]
    assert bool((det.boxes[:, :2] > -20).all())
    assert bool((det.boxes[:, 2] < w + 20).all() and (det.boxes[:, 3] < h + 20).all())
    lm = det.landmarks
    inside = (lm[..., 0] >= det.boxes[:, None, 0] - 5) & (lm[..., 0] <= det.boxes[:, None, 2] + 5)
    assert bool(inside.all())


def _frames(face_photo):
    # 4 frames: two faces, a flipped face, no face (a flat grey frame)
    a = face_photo("person_a_1", 192)
    b = face_photo("impostor_1", 192)
    return torch.stack([a, b, a.flip(-1), torch.zeros_like(a)])


@pytest.mark.parametrize("which", ["yunet", "scrfd"])
def test_batched_detection_equals_per_frame(which, request, face_photo):
    detector = request.getfixturevalue(which)
    frames = _frames(face_photo)
    batched = detector(frames)
    assert sorted(set(batched.frame_index.tolist())) == [0, 1, 2]
    chunked = FaceDetector(detector.model.path, detector.kind, batch_size=3)(frames)  # 2 model calls
    assert chunked.frame_index.tolist() == batched.frame_index.tolist()
    torch.testing.assert_close(chunked.landmarks, batched.landmarks, atol=1e-3, rtol=0)
    for i in range(frames.shape[0]):
        single = detector(frames[i:i + 1])
        mine = batched.frame_index == i
        assert int(mine.sum()) == len(single)
        torch.testing.assert_close(batched.boxes[mine], single.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(batched.landmarks[mine], single.landmarks, atol=1e-3, rtol=0)
        torch.testing.assert_close(batched.scores[mine], single.scores, atol=1e-5, rtol=0)


def test_flip_mirrors_landmarks(yunet, face_photo):
    frames = _frames(face_photo)
    lm, _, found = yunet(frames[[0, 2]]).largest()
    assert found.all()
    mirrored = lm[1].clone()
    mirrored[:, 0] = frames.shape[-1] - 1 - mirrored[:, 0]
    mirrored = mirrored[[1, 0, 2, 4, 3]]  # left/right swap under a flip
    # YuNet is not exactly flip-equivariant (a few px); a wrong left/right order is ~30 px off
    assert float((mirrored - lm[0]).norm(dim=1).max()) < 8.0


def test_torch_twin_detection_equals_onnxruntime(scrfd, face_photo):
    frames = _frames(face_photo)[:2]
    via_ort = scrfd(frames, backend="onnxruntime")
    via_twin = scrfd(frames, backend="torch")
    assert via_ort.frame_index.tolist() == via_twin.frame_index.tolist()
    torch.testing.assert_close(via_twin.landmarks, via_ort.landmarks, atol=1e-2, rtol=0)


def test_largest_picks_the_biggest_face_per_frame(face_photo, scrfd):
    # a frame with a big and a small copy of the same face, and a frame with none
    big = face_photo("person_b_1", 256)
    small = torch.nn.functional.interpolate(big[None], size=(96, 96), mode="area")[0]
    frame = torch.full((3, 256, 384), -1.0)
    frame[:, :, :256] = big
    frame[:, 80:176, 280:376] = small
    det = scrfd(torch.stack([torch.zeros_like(frame), frame]))
    assert det.frame_index.tolist() == [1, 1]
    lm, boxes, found = det.largest()
    assert found.tolist() == [False, True]
    assert float(boxes[1, 2]) < 270 and float(det.areas.max()) == float(((boxes[1, 2:] - boxes[1, :2]).prod()))
    assert float(lm[0].abs().sum()) == 0.0
