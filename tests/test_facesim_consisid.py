"""FaceSim-Arc / FaceSim-Cur as ConsisID's evaluation defines them (``eval/get_facesim_fid.py``):
16 frames at ``np.linspace(0, F - 1, 16, dtype=int)``, the largest face (a frame without one padded
by a quarter on each side with gray 128 and searched again), ``max(0, cos)`` against the reference
image's face, the mean over frames with a face (0 when none). Checked against a hand computation
(OpenCV padding, numpy sampling) on real face crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from rewardfl.config import config_from_dict
from rewardfl.registry import create
from rewardfl.rewards.face_identity.recognizer import FaceRecognizer
from rewardfl.rewards.face_identity.scoring import facesim_consisid

SIZE = 128


def _square(path, size=SIZE):
    image = cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1]
    h, w = image.shape[:2]
    s = min(h, w)
    image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.ascontiguousarray(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))


def _tensor(frame):
    return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 127.5 - 1.0


def _tight_crop(path, detector, margin=0.2):
    """The face with ``margin`` around its box: too tight for the detector until padded."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1]
    x1, y1, x2, y2 = detector(_tensor(image)[None]).boxes[0].tolist()
    w, h = x2 - x1, y2 - y1
    crop = image[max(0, int(y1 - margin * h)):int(y2 + margin * h), max(0, int(x1 - margin * w)):int(x2 + margin * w)]
    return np.ascontiguousarray(cv2.resize(crop, (SIZE, SIZE), interpolation=cv2.INTER_AREA))


def test_facesim_consisid_by_hand_on_synthetic_embeddings():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 8, generator=g, dtype=torch.float64)
    ref = torch.randn(8, generator=g, dtype=torch.float64)
    has = torch.tensor([True, False, True, True, True])
    idx = np.linspace(0, 4, 16, dtype=int)  # ConsisID's sampling: repeats on a 5-frame video
    cos = [float(emb[i] @ ref / (emb[i].norm() * ref.norm())) for i in idx if has[i]]
    assert min(cos) < 0  # the clipping matters here
    want = np.mean([max(0.0, c) for c in cos])
    assert float(facesim_consisid(emb, has, ref)) == pytest.approx(want, abs=1e-6)
    assert float(facesim_consisid(emb, torch.zeros(5, dtype=torch.bool), ref)) == 0.0  # no face: 0, as ConsisID


def test_consisid_protocol_against_a_hand_computation_on_real_faces(face_assets):
    from rewardfl.evaluation.evaluation import Evaluation

    cfg = config_from_dict({"reward_model_path": face_assets.scrfd_sface})
    judge = create("reward", "face_identity", cfg, {"eval_protocol": "consisid",
                                                    "facesim_cur_recognizer": face_assets.raw_sface})
    photos = face_assets.photos
    a1, a2, imp = _square(photos["person_a_1"]), _square(photos["person_a_2"]), _square(photos["impostor_1"])
    tight = _tight_crop(photos["person_a_1"], judge.detector)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]
    frames = [np.roll(a1, 2 * i, axis=1) for i in range(3)] + [tight, a2, np.roll(a2, 3, axis=0)] + noise + [imp]
    reference = np.roll(a1, -4, axis=0)

    # by hand: the largest face by box area; a frame without one padded as ConsisID's pad_np_bgr_image does
    cur = FaceRecognizer(face_assets.raw_sface)

    def hand_embeddings(frame):
        boxes_and_points = judge.detector(_tensor(frame)[None])
        shift = np.zeros(2)
        if len(boxes_and_points) == 0:
            top, left = int(SIZE * 0.25), int(SIZE * 0.25)
            padded = cv2.copyMakeBorder(frame, top, top, left, left, cv2.BORDER_CONSTANT, value=(128, 128, 128))
            boxes_and_points, shift = judge.detector(_tensor(padded)[None]), np.array([left, top])
        if len(boxes_and_points) == 0:
            return None
        b = boxes_and_points.boxes.double()
        k = int(torch.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
        points = boxes_and_points.landmarks[k:k + 1] - torch.tensor(shift, dtype=torch.float32)
        x = _tensor(frame)[None]
        return [r.embed(r.align(x, points, torch.zeros(1, dtype=torch.long)))[0].double().numpy()
                for r in (judge.recognizer, cur)]

    per_frame = [hand_embeddings(f) for f in frames]
    assert len(judge.detector(_tensor(tight)[None])) == 0 and per_frame[3] is not None  # found only when padded
    assert per_frame[6] is None and per_frame[7] is None
    ref = hand_embeddings(reference)
    want = {}
    for j, name in enumerate(("arc", "cur")):
        sims = [max(0.0, float(np.dot(e[j], ref[j]) / np.linalg.norm(e[j]) / np.linalg.norm(ref[j])))
                for e in (per_frame[i] for i in np.linspace(0, len(frames) - 1, 16, dtype=int)) if e is not None]
        want[name] = float(np.mean(sims))
    # SFace is the only recognizer the tests can fetch: the Cur slot loads the shipped (int8) file, whose
    # folded weights are the pack's, so here the two numbers coincide; the second recognizer still runs
    assert want["arc"] > 0.3

    video = torch.stack([_tensor(f) for f in frames], dim=1)  # (3, F, H, W) in [-1, 1]
    item = {"video": _tensor(reference)[None], "first_frame": _tensor(reference), "prompt": "", "sample_id": "ref",
            "path": "ref.png"}
    evaluation = Evaluation([item], judge, [("consisid", judge)], seeds=[0])
    (row,) = evaluation.score("base", [video])  # the row eval.json holds
    assert row["judge/consisid/facesim_arc_consisid"] == pytest.approx(want["arc"], abs=2e-5)
    assert row["judge/consisid/facesim_cur_consisid"] == pytest.approx(want["cur"], abs=2e-5)
