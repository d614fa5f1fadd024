"""Batched face detection whatever the export's head layout; recognizers exported at batch 1;
model files given in the wrong role.

insightface's own packs (``det_10g.onnx``, ``scrfd_10g_bnkps.onnx``, ...) were exported with
``permute(2, 3, 0, 1).reshape(-1, C)`` per head: rows ordered (h, w, batch, anchor). The registry
SCRFD-2.5G we test with does ``Transpose [0, 2, 3, 1] + Reshape [1, -1, C]`` (rows per frame).
``insightface_twin`` rewrites the registry model's heads into insightface's layout (same weights), so
batched detection can be checked against per-frame detection on that layout.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from rewardfl.config import config_from_dict
from rewardfl.interfaces import SampleContext
from rewardfl.registry import create
from rewardfl.rewards.face_identity import FaceDetector, FaceRecognizer

FRAME = 128  # frame side (pixels)
DET_SIZE = 128  # letterbox canvas = the frame: no resize, and fast
SFACE = "face_recognition_sface_2021dec.onnx"


def _session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _resize_sizes_to_scales(model: onnx.ModelProto) -> None:
    """insightface's exports take any input size; the registry file resizes to fixed sizes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Resize" and len(n.input) == 4 and n.input[3] in consts:
            scales = consts[n.input[3]].astype(np.float32) / np.asarray(shapes[n.input[0]], np.float32)
            model.graph.initializer.append(numpy_helper.from_array(scales, n.output[0] + "_scales"))
            n.input[2] = n.output[0] + "_scales"
            del n.input[3]


@pytest.fixture(scope="module")
def insightface_twin(face_assets, tmp_path_factory):
    """The registry SCRFD-2.5G with each head ``Conv (N, A*C, H, W) -> Transpose [2, 3, 0, 1] ->
    Reshape [-1, C] (-> Sigmoid)``, any batch and input size: a file like insightface's packs."""
    model = onnx.load(face_assets.raw_scrfd)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        node = producer[out.name]
        reshape = producer[node.input[0]] if node.op_type == "Sigmoid" else node  # scores: sigmoid last
        transpose = producer[reshape.input[0]]
        perm = next(a for a in transpose.attribute if a.name == "perm")
        assert reshape.op_type == "Reshape" and list(perm.ints) == [0, 2, 3, 1]  # the registry layout
        perm.ints[:] = [2, 3, 0, 1]
        channels = out.type.tensor_type.shape.dim[2].dim_value
        graph.initializer.append(numpy_helper.from_array(np.array([-1, channels], np.int64), out.name + "_rows"))
        reshape.input[1] = out.name + "_rows"
        del out.type.tensor_type.shape.dim[:]
        out.type.tensor_type.shape.dim.add().dim_param = "rows"
        out.type.tensor_type.shape.dim.add().dim_value = channels
    _resize_sizes_to_scales(model)
    for j, name in ((0, "batch"), (2, "height"), (3, "width")):
        graph.input[0].type.tensor_type.shape.dim[j].Clear()
        graph.input[0].type.tensor_type.shape.dim[j].dim_param = name
    onnx.checker.check_model(model)
    path = str(tmp_path_factory.mktemp("insightface") / "det_2.5g.onnx")  # a buffalo-style name
    onnx.save(model, path)
    return path


def _canvas(face_photo, names, size=640):
    """Real faces as detector input ``(N, 3, size, size)``: SCRFD's ``(p - 127.5) / 128``."""
    return np.stack([((face_photo(n, size) + 1) * 127.5 - 127.5).numpy() / 128.0 for n in names]).astype(np.float32)


def test_twin_equals_registry_model_at_batch_1_and_interleaves_frames(face_assets, insightface_twin, face_photo):
    x = _canvas(face_photo, ["person_a_1", "person_b_1"])
    original, twin = _session(onnx.load(face_assets.raw_scrfd)), _session(onnx.load(insightface_twin))
    singles = []
    for i in range(2):
        mine = original.run(None, {original.get_inputs()[0].name: x[i:i + 1]})
        theirs = twin.run(None, {twin.get_inputs()[0].name: x[i:i + 1]})
        for a, b in zip(mine, theirs):
            assert b.ndim == 2
            np.testing.assert_allclose(b, a.reshape(-1, a.shape[-1]), atol=1e-6, rtol=0)
        singles.append(mine)
    # the premise: at batch 2 the twin's rows are (h, w, frame, anchor), frames interleaved
    both = twin.run(None, {twin.get_inputs()[0].name: x})
    for level, (stride, out) in enumerate(zip((8, 16, 32) * 3, both)):
        cells = (640 // stride) ** 2
        rows = out.reshape(cells, 2, -1, out.shape[-1])
        for i in range(2):
            np.testing.assert_allclose(rows[:, i].reshape(-1, out.shape[-1]),
                                       singles[i][level].reshape(-1, out.shape[-1]), atol=1e-4, rtol=0)


def _clip(face_photo):
    """16 frames ``(16, 3, 128, 128)`` in [-1, 1]: real faces (two people) pasted at different
    places and sizes on a dark textured background; frame 9 has no face."""
    rng = np.random.default_rng(0)
    names = ["person_a_1", "person_a_2", "person_b_1", "person_b_2"]
    frames = torch.from_numpy(rng.uniform(-1.0, -0.6, (16, 3, FRAME, FRAME)).astype(np.float32))
    for i in range(16):
        if i == 9:
            continue
        side = int(rng.integers(56, 100))
        y, x = (int(v) for v in rng.integers(0, FRAME - side + 1, 2))
        frames[i, :, y:y + side, x:x + side] = face_photo(names[i % 4], side)
    return frames


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_batched_detection_equals_per_frame_on_insightface_layout(backend, insightface_twin, face_photo):
    frames = _clip(face_photo)
    batched = FaceDetector(insightface_twin, "scrfd", size=DET_SIZE, batch_size=16)(frames, backend=backend)
    single = FaceDetector(insightface_twin, "scrfd", size=DET_SIZE, batch_size=1)(frames, backend=backend)
    found = set(single.frame_index.tolist())
    assert 9 not in found and len(found) >= 13, sorted(found)  # the reference itself finds the faces
    assert batched.frame_index.tolist() == single.frame_index.tolist()
    torch.testing.assert_close(batched.boxes, single.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(batched.landmarks, single.landmarks, atol=1e-3, rtol=0)
    torch.testing.assert_close(batched.scores, single.scores, atol=1e-5, rtol=0)


def test_unrecognised_head_layout_detects_one_frame_per_call(insightface_twin, face_photo, tmp_path, caplog):
    """The twin with each head's Reshape shape computed by a Concat (as exports without constant
    folding have it): the rows' layout cannot be told from the graph, so frames go one per call."""
    model = onnx.load(insightface_twin)
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    computed = []
    for out in model.graph.output:
        node = producer[out.name]
        reshape = producer[node.input[0]] if node.op_type == "Sigmoid" else node
        parts = []
        for j, value in enumerate(shapes[reshape.input[1]]):
            parts.append(f"{out.name}_shape_{j}")
            computed.append(onnx.helper.make_node("Constant", [], [parts[-1]],
                                                  value=numpy_helper.from_array(np.array([value], np.int64))))
        computed.append(onnx.helper.make_node("Concat", parts, [f"{out.name}_shape"], axis=0))
        reshape.input[1] = f"{out.name}_shape"
    nodes = computed + list(model.graph.node)  # the shapes first: topological order
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    path = str(tmp_path / "det_unknown_layout.onnx")
    onnx.save(model, path)
    frames = _clip(face_photo)[6:12]  # frame 9 has no face
    with caplog.at_level(logging.WARNING, logger="rewardfl"):
        detector = FaceDetector(path, "scrfd", size=DET_SIZE, batch_size=16)
    assert detector.frames_per_call == 1 and "one frame per call" in caplog.text and path in caplog.text
    batched = detector(frames)
    single = FaceDetector(insightface_twin, "scrfd", size=DET_SIZE, batch_size=1)(frames)
    assert batched.frame_index.tolist() == single.frame_index.tolist() and len(set(single.frame_index.tolist())) >= 4
    torch.testing.assert_close(batched.landmarks, single.landmarks, atol=1e-3, rtol=0)
    torch.testing.assert_close(batched.scores, single.scores, atol=1e-5, rtol=0)


def test_face_reward_same_with_det_batch_16_and_1(insightface_twin, face_assets, face_photo, tmp_path):
    """The reward on a pack whose detector has insightface's layout: the reference's embeddings and
    the generated clip's detections must not depend on how many frames share a detector call."""
    pack = tmp_path / "pack"
    pack.mkdir()
    shutil.copy(insightface_twin, pack / "det_2.5g.onnx")
    shutil.copy(os.path.join(face_assets.scrfd_sface, SFACE), pack / SFACE)
    clip = _clip(face_photo)
    video = clip.transpose(0, 1)  # (3, F, H, W)
    reference = torch.flip(clip[[3, 0, 1, 9, 2, 4, 5, 6]], dims=[-1])  # mirrored frames, one without a face
    context = SampleContext(sample_id="clip", reference=reference)
    results = []
    for det_batch_size in (16, 1):
        cfg = config_from_dict({"reward_model_path": str(pack)})
        reward = create("reward", "face_identity", cfg, {"det_size": DET_SIZE, "det_batch_size": det_batch_size,
                                                         "reference_cache_dir": "none"})
        evaluation = reward.evaluate(video, context)
        out = reward(video[None], [context])
        results.append((evaluation, out.scores, reward.last_frame_similarity))
    (eval16, scores16, sims16), (eval1, scores1, sims1) = results
    assert eval1["frames_with_face"] >= 13 and eval1["reference_frames_with_face"] >= 5
    for key in ("frames_with_face", "reference_frames_with_face"):
        assert eval16[key] == eval1[key]
    assert eval16["score"] == pytest.approx(eval1["score"], abs=1e-5)
    assert eval16["facesim_arc"] == pytest.approx(eval1["facesim_arc"], abs=1e-5)
    assert [s is None for s in eval16["frame_similarity"]] == [s is None for s in eval1["frame_similarity"]]
    np.testing.assert_allclose([s for s in eval16["frame_similarity"] if s is not None],
                               [s for s in eval1["frame_similarity"] if s is not None], atol=1e-5)
    torch.testing.assert_close(scores16, scores1, atol=1e-5, rtol=0)
    torch.testing.assert_close(sims16, sims1, atol=1e-5, rtol=0, equal_nan=True)


# --------------------------------------------------------------------------- recognizers


@pytest.fixture(scope="module")
def sface_batch_fixed_at_1(face_assets, tmp_path_factory):
    """The fp32 SFace with its ``Flatten`` replaced by ``Reshape [1, C*H*W]``: what an export
    traced at batch 1 and constant-folded looks like. Same numbers at batch 1."""
    model = onnx.load(os.path.join(face_assets.scrfd_sface, SFACE))
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    features = int(np.prod(shapes[flatten.input[0]][1:]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, features], np.int64), "batch_of_one"))
    flatten.op_type = "Reshape"
    del flatten.attribute[:]
    flatten.input.append("batch_of_one")
    onnx.checker.check_model(model)
    path = str(tmp_path_factory.mktemp("baked") / "w600k_baked.onnx")
    onnx.save(model, path)
    return path


def test_recognizer_exported_at_batch_1_embeds_batches(sface_batch_fixed_at_1, face_assets, face_photo, caplog):
    crops = torch.stack([(face_photo(n, 112) + 1) * 127.5 for n in ("person_a_1", "person_b_1", "impostor_1")])
    original = FaceRecognizer(os.path.join(face_assets.scrfd_sface, SFACE))
    one_by_one = torch.cat([original.embed(crops[i:i + 1]) for i in range(3)])
    with caplog.at_level(logging.INFO, logger="rewardfl"):
        baked = FaceRecognizer(sface_batch_fixed_at_1)
    assert "batch" in caplog.text and os.path.basename(sface_batch_fixed_at_1) in caplog.text
    for grad in (False, True):  # onnxruntime, the torch twin
        torch.testing.assert_close(baked.embed(crops, grad=grad), one_by_one, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- model files in the wrong role


def test_detector_and_recognizer_swapped_are_one_line_errors(face_assets, tmp_path):
    detector = os.path.join(face_assets.scrfd_sface, "scrfd.onnx")
    recognizer = os.path.join(face_assets.scrfd_sface, SFACE)
    cfg = config_from_dict({"reward_model_path": face_assets.scrfd_sface})
    swapped = create("reward", "face_identity", cfg, {"detector": recognizer, "detector_type": "scrfd",
                                                      "recognizer": detector, "reference_cache_dir": "none"})
    with pytest.raises(ValueError) as detector_error:
        swapped.detector
    with pytest.raises(ValueError) as recognizer_error:
        swapped.recognizer
    for error, path, expected in ((detector_error, recognizer, "face detector"),
                                  (recognizer_error, detector, "face recognizer")):
        message = str(error.value)
        assert "\n" not in message and path in message and f"expected a {expected}" in message, message
