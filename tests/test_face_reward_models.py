"""face_identity models: quantised-weight folding, model packs, recognizer backends vs OpenCV."""

from __future__ import annotations

import os
import shutil

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rewardfl.rewards.face_identity import FaceRecognizer, find_model_pack
from rewardfl.rewards.face_identity.onnx_fold import dequantize, fold_quantized_weights, prepare_graph

# --------------------------------------------------------------------------- folding


def test_block_dequantize_matches_hand_computation():
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 127, size=(3, 10), dtype=np.int8)
    scale = rng.random((3, 3), dtype=np.float32) + 0.1  # blocks of 4 along axis 1: 4 + 4 + 2 (short last)
    zp = rng.integers(-5, 5, size=(3, 3), dtype=np.int8)
    expected = np.empty((3, 10), np.float64)
    for i in range(3):
        for j in range(10):
            expected[i, j] = (float(q[i, j]) - float(zp[i, j // 4])) * float(scale[i, j // 4])
    np.testing.assert_allclose(dequantize(q, scale, zp, axis=1, block_size=4), expected, rtol=1e-6)
    # per-axis and per-tensor
    np.testing.assert_allclose(dequantize(q, scale[:, 0], zp[:, 0], axis=0),
                               (q.astype(np.float64) - zp[:, :1]) * scale[:, :1], rtol=1e-6)
    np.testing.assert_allclose(dequantize(q, np.float32(0.5), np.int8(3)), (q.astype(np.float64) - 3) * 0.5)


def test_onnxruntime_refuses_shipped_models_and_accepts_folded(face_assets):
    for path, size in ((face_assets.raw_yunet, 640), (face_assets.raw_sface, 112)):
        x = np.zeros((1, 3, size, size), np.float32)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        with pytest.raises(Exception, match="block_size|Required inputs"):
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            session.run(None, {session.get_inputs()[0].name: x})
        folded = fold_quantized_weights(onnx.load(path))
        onnx.checker.check_model(folded)
        session = ort.InferenceSession(folded.SerializeToString(), options, providers=["CPUExecutionProvider"])
        assert all(np.isfinite(o).all() for o in session.run(None, {session.get_inputs()[0].name: x}))


def test_folded_sface_equals_opencv_recognizer(face_assets, face_photo):
    """OpenCV's own alignment and FaceRecognizerSF (its DNN engine, on the pack's folded file)
    vs ours folding the int8 file as shipped in memory and running onnxruntime."""
    image = ((face_photo("astronaut") + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    detector = cv2.FaceDetectorYN.create(face_assets.raw_yunet, "", (512, 512), 0.6, 0.3)
    _, faces = detector.detect(bgr)
    recognizer = cv2.FaceRecognizerSF.create(
        os.path.join(face_assets.yunet_sface, "face_recognition_sface_2021dec.onnx"), "")
    aligned = recognizer.alignCrop(bgr, faces[0])
    reference = recognizer.feature(aligned).ravel()
    ours = FaceRecognizer(face_assets.raw_sface)
    crop = torch.from_numpy(np.ascontiguousarray(aligned[:, :, ::-1])).permute(2, 0, 1)[None].float()
    emb = ours.embed(crop)[0].numpy()
    cos = float(emb @ reference / np.linalg.norm(reference))
    assert cos > 0.9999


def test_batched_graph_equals_single_image_runs(face_assets):
    model, _ = prepare_graph(onnx.load(face_assets.raw_scrfd))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((2, 3, 640, 640), dtype=np.float32) * 2 - 1
    batched = session.run(None, {session.get_inputs()[0].name: x})
    single = onnx.load(face_assets.raw_scrfd)  # as shipped: batch 1
    ref = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
    for i in range(2):
        outs = ref.run(None, {ref.get_inputs()[0].name: x[i:i + 1]})
        for b, o in zip(batched, outs):
            np.testing.assert_allclose(b.reshape(2, -1, b.shape[-1])[i], o.reshape(-1, o.shape[-1]), atol=1e-5)


# --------------------------------------------------------------------------- recognizer


def test_preprocessing_autodetected(face_assets):
    sface = FaceRecognizer(os.path.join(face_assets.scrfd_sface, "face_recognition_sface_2021dec.onnx"))
    # SFace's graph starts with Sub 127.5 / Mul 1/128: it takes raw RGB 0..255
    assert (sface.preprocessing.size, sface.preprocessing.channel_order, sface.preprocessing.mean,
            sface.preprocessing.std) == (112, "rgb", 0.0, 1.0)
    assert sface.embedding_dim == 128
    custom = FaceRecognizer(face_assets.raw_sface, channel_order="bgr", mean=127.5, std=128.0)
    assert (custom.preprocessing.channel_order, custom.preprocessing.mean, custom.preprocessing.std) == \
        ("bgr", 127.5, 128.0)


def test_twin_matches_onnxruntime_on_real_faces(face_assets, face_photo):
    from rewardfl.rewards.face_identity import FaceDetector

    rec = FaceRecognizer(face_assets.raw_sface)
    det = FaceDetector(os.path.join(face_assets.yunet_sface, "face_detection_yunet_2023mar.onnx"), "yunet")
    frames = torch.stack([face_photo(n, 256) for n in ("person_a_1", "person_b_1", "impostor_1")])
    landmarks, _, found = det(frames).largest()
    assert found.all()
    crops = rec.align(frames, landmarks, torch.arange(3))
    via_ort = rec.embed(crops)
    via_twin = rec.embed(crops, grad=True)
    cos = (via_ort * via_twin).sum(1)
    assert bool((cos > 0.9999).all()), cos


# --------------------------------------------------------------------------- model packs


def _pack(tmp_path, *names):
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return str(tmp_path)


@pytest.mark.parametrize("names, detector, kind, recognizer", [
    (("scrfd_10g_bnkps.onnx", "glintr100.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
     "scrfd_10g_bnkps.onnx", "scrfd", "glintr100.onnx"),
    (("det_10g.onnx", "w600k_r50.onnx", "1k3d68.onnx", "genderage.onnx"), "det_10g.onnx", "scrfd", "w600k_r50.onnx"),
    (("face_detection_yunet_2023mar.onnx", "face_recognition_sface_2021dec.onnx"),
     "face_detection_yunet_2023mar.onnx", "yunet", "face_recognition_sface_2021dec.onnx"),
])
def test_packs_recognised_by_file_name(tmp_path, names, detector, kind, recognizer):
    pack = find_model_pack(_pack(tmp_path, *names))
    assert (os.path.basename(pack.detector), pack.detector_type, os.path.basename(pack.recognizer)) == \
        (detector, kind, recognizer)


def test_pack_errors_list_found_and_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no detector: found \['glintr100.onnx'\].*expected one detector"):
        find_model_pack(_pack(tmp_path, "glintr100.onnx"))
    with pytest.raises(ValueError, match=r"several recognizers \['glintr100.onnx', 'w600k_r50.onnx'\]"):
        find_model_pack(_pack(tmp_path, "det_10g.onnx", "w600k_r50.onnx"))
    with pytest.raises(FileNotFoundError, match="reward_model_path: not a directory"):
        find_model_pack(str(tmp_path / "missing"))
    _pack(tmp_path, "mine.onnx")
    with pytest.raises(ValueError, match="reward.detector_type: cannot tell"):
        find_model_pack(str(tmp_path), detector="mine.onnx", recognizer="glintr100.onnx")


def test_explicit_keys_override_names(tmp_path, face_assets):
    shutil.copy(face_assets.raw_scrfd, tmp_path / "my_detector.onnx")
    shutil.copy(face_assets.raw_sface, tmp_path / "my_embedder.onnx")
    pack = find_model_pack(str(tmp_path), detector="my_detector.onnx", detector_type="scrfd",
                           recognizer="my_embedder.onnx")
    assert pack.detector == str(tmp_path / "my_detector.onnx") and pack.detector_type == "scrfd"
    with pytest.raises(FileNotFoundError, match="reward.recognizer: file not found"):
        find_model_pack(str(tmp_path), detector="my_detector.onnx", detector_type="scrfd", recognizer="nope.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_match_cpu(face_assets, face_photo):
    """onnxruntime's CUDA provider through IOBinding, and the twin on the GPU, vs the CPU run."""
    from rewardfl.rewards.face_identity import FaceDetector

    det = FaceDetector(os.path.join(face_assets.scrfd_sface, "scrfd.onnx"), "scrfd")
    frames = torch.stack([face_photo(n, 256) for n in ("person_a_1", "person_b_1")])
    cpu = det(frames)
    for backend in ("onnxruntime", "torch"):
        gpu = det(frames.cuda(), backend=backend)
        assert gpu.landmarks.is_cuda
        torch.testing.assert_close(gpu.landmarks.cpu(), cpu.landmarks, atol=0.05, rtol=0)
    rec = FaceRecognizer(face_assets.raw_sface)
    crops = rec.align(frames, cpu.largest()[0], torch.arange(2))
    on_cpu = rec.embed(crops)
    for grad in (False, True):
        on_gpu = rec.embed(crops.cuda(), grad=grad)
        assert on_gpu.is_cuda and bool(((on_gpu.cpu() * on_cpu).sum(1) > 0.9999).all())
