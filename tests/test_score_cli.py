"""rewardfl-score: face identity of videos against a reference, JSON per video."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest


def _write_frames(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(os.path.join(folder, f"f{i}.png"), image)
    return str(folder)


def _photo(face_photo, name, size=160):
    """A photo as BGR uint8 (what cv2.imwrite takes)."""
    rgb = ((face_photo(name, size) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _run(*args):
    return subprocess.run([sys.executable, "-m", "rewardfl.rewards.face_identity.score", *args], capture_output=True,
                          text=True, timeout=300)


def test_scores_each_video_as_json(face_assets, face_photo, tmp_path):
    a2, b1 = _photo(face_photo, "person_a_2"), _photo(face_photo, "person_b_1")
    video_a = _write_frames(tmp_path / "a", [a2, a2[:, ::-1], a2])
    video_b = _write_frames(tmp_path / "b", [b1, b1[:, ::-1], np.zeros_like(b1)])
    reference = str(tmp_path / "ref.jpg")
    cv2.imwrite(reference, _photo(face_photo, "person_a_1"))
    proc = _run("--reward-model-path", face_assets.yunet_sface, "--reference", reference, video_a, video_b,
                "--set", f"reference_cache_dir={tmp_path / 'refs'}")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["video"] for r in lines] == [video_a, video_b]
    a, b = lines
    assert a["frames"] == 3 and a["frames_with_face"] == 3 and b["frames_with_face"] == 2
    assert a["frame_similarity"][0] is None  # the conditioning frame does not count
    assert b["frame_similarity"][2] is None  # no face
    assert a["score"] == pytest.approx(np.mean(a["frame_similarity"][1:]), abs=1e-5)
    assert a["score"] > b["score"] + 0.3
    assert a["facesim_arc"] > b["facesim_arc"]


@pytest.mark.parametrize("case, message", [
    ("missing_video", "rewardfl.rewards.face_identity.score: error: not found:"),
    ("no_face_reference", "rewardfl.rewards.face_identity.score: error: --reference: no face found in"),
    ("bad_pack", "rewardfl.rewards.face_identity.score: error: --reward-model-path: not a directory"),
    ("bad_option", "rewardfl.rewards.face_identity.score: error: unknown key 'reward.face_selekt'"),
    ("truncated_video", "rewardfl.rewards.face_identity.score: error: cannot read "),
])
def test_bad_input_is_one_line_and_exit_2(face_assets, face_photo, tmp_path, capsys, case, message):
    from rewardfl.rewards.face_identity.score import main

    reference = str(tmp_path / "ref.png")
    cv2.imwrite(reference, _photo(face_photo, "person_a_1") if case != "no_face_reference"
                else np.full((96, 96, 3), 128, np.uint8))
    video = _write_frames(tmp_path / "v", [_photo(face_photo, "person_a_2")])
    pack = face_assets.yunet_sface if case != "bad_pack" else str(tmp_path / "nope")
    if case == "truncated_video":  # a download cut short: the first half of a real mp4
        import imageio.v2 as imageio

        with imageio.get_writer(str(tmp_path / "full.mp4"), fps=8, macro_block_size=1, ffmpeg_log_level="error") as w:
            for _ in range(5):
                w.append_data(np.full((64, 64, 3), 128, np.uint8))
        data = (tmp_path / "full.mp4").read_bytes()
        video = str(tmp_path / "cut.mp4")
        (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    args = ["--reward-model-path", pack, "--reference", reference,
            str(tmp_path / "missing.mp4") if case == "missing_video" else video]
    if case == "bad_option":
        args += ["--set", "face_selekt=largest"]
    assert main(args) == 2  # in process: the subprocess path is covered above
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(message), err
    if case == "truncated_video":  # ffmpeg's reason, not its version banner
        assert f"cannot read {video}: " in err and "ffmpeg says: " in err and "ffmpeg version" not in err, err


def _device_cases():
    import torch

    n = torch.cuda.device_count()
    # one past the last GPU: without a GPU that is plain "cuda:0"/"cuda", so the case runs everywhere
    missing = ("cuda", "no CUDA GPU is visible to torch here; use --device cpu") if n == 0 else \
        (f"cuda:{n}", f"only {n} CUDA device(s) visible (cuda:0 to cuda:{n - 1})")
    return [("banana", "--device: unknown device 'banana'; use cpu or cuda[:N]"),
            ("meta", "--device: 'meta' is not supported; use cpu or cuda[:N]"),
            (missing[0], f"--device {missing[0]}: {missing[1]}")]


@pytest.mark.parametrize("device, message", _device_cases())
def test_unusable_device_is_one_line(tmp_path, capsys, device, message):
    from rewardfl.rewards.face_identity.score import main

    # checked before anything is read: the pack and the videos need not exist
    assert main(["--reward-model-path", str(tmp_path), "--reference", "r.png", "v.mp4", "--device", device]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err == f"rewardfl.rewards.face_identity.score: error: {message}\n"


@pytest.mark.parametrize("value, shown", [("nan", "'nan'"), (".inf", "inf")])  # YAML: `nan` is text, .inf a float
def test_non_finite_option_is_one_line(tmp_path, capsys, value, shown):
    from rewardfl.rewards.face_identity.score import main

    assert main(["--reward-model-path", str(tmp_path), "--reference", "r.png", "v.mp4",
                 "--set", f"score_std={value}"]) == 2
    assert capsys.readouterr().err == ("rewardfl.rewards.face_identity.score: error: reward.score_std: must be a "
                                       f"finite number, got {shown}\n")
