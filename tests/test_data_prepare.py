"""``python -m rewardfl.data prepare``: a folder of real videos (rendered from the fetched face
photos) checked and written as the trainer's metadata.csv; skipped files with their reasons;
resuming after an interruption."""

from __future__ import annotations

import csv
import json
import os

import cv2
import numpy as np
import pytest

from rewardfl.data import VideoDataset
from rewardfl.data.__main__ import main
from rewardfl.data.prepare import prepare_videos, state_path
from rewardfl.evaluation.split import is_held_out
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_FRAMES = 5


def _square(path: str, size: int) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1]
    h, w = image.shape[:2]
    s = min(h, w)
    image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.ascontiguousarray(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))


def _write(path: str, frames, fps: int = 16) -> None:
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=None, pixelformat="yuv420p",
                            macro_block_size=1, output_params=["-crf", "12"], ffmpeg_log_level="error") as w:
        for frame in frames:
            w.append_data(frame)


def _moving(image: np.ndarray, count: int) -> list:
    """``count`` frames: the image shifted one pixel a frame (a slow pan)."""
    return [np.ascontiguousarray(np.roll(image, i, axis=1)) for i in range(count)]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory, face_assets):
    """The folder and what each file is (the independent reference: how it was built)."""
    root = str(tmp_path_factory.mktemp("videos"))
    a, b = _square(face_assets.photos["person_a_1"], 128), _square(face_assets.photos["person_b_1"], 128)
    rng = np.random.default_rng(0)
    small = np.full((128, 128, 3), 128, np.uint8)
    small[52:76, 52:76] = cv2.resize(a, (24, 24), interpolation=cv2.INTER_AREA)
    clips = {
        "a_one_face.mp4": _moving(a, 9),
        "nested/b_one_face.mov": _moving(b, 7),
        "c_two_faces.mp4": _moving(np.concatenate([a, b], axis=1), 9),
        "d_noise.mp4": [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(9)],
        "e_too_short.mp4": _moving(a, 3),
        "f_small_face.mp4": _moving(small, 9),
    }
    for name, frames in clips.items():
        _write(os.path.join(root, name), frames)
    with open(os.path.join(root, "g_broken.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)  # an mp4 header, then garbage
    with open(os.path.join(root, "notes.txt"), "w") as f:  # not a video: not listed
        f.write("shot on a phone")
    with open(os.path.join(root, "a_one_face.txt"), "w") as f:  # a prompt beside the video
        f.write("a woman smiles\n")
    expected_skips = {"c_two_faces.mp4": "several faces", "d_noise.mp4": "no face", "e_too_short.mp4": "too few frames",
                      "f_small_face.mp4": "face too small", "g_broken.mp4": "unreadable"}
    return root, ["a_one_face.mp4", "nested/b_one_face.mov"], expected_skips


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prepare_writes_the_csv_the_trainer_reads_and_lists_every_skip(video_dir, face_assets, tmp_path, capsys):
    root, kept, skips = video_dir
    out = str(tmp_path / "ds" / "metadata.csv")
    code, stdout, stderr = _cli(capsys, "prepare", root, "--out", out, "--reward-model-path", face_assets.scrfd_sface,
                                "--num-frames", str(NUM_FRAMES), "--no-progress")
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    skipped = {ln.split(":", 1)[0].removeprefix("skipped "): ln.split(": ", 1)[1] for ln in lines[:-1]}
    assert {k: v.split(":")[0] for k, v in skipped.items()} == skips
    assert "3 found" not in skipped["c_two_faces.mp4"] and "2 found" in skipped["c_two_faces.mp4"]
    assert "3" in skipped["e_too_short.mp4"] and str(NUM_FRAMES) in skipped["e_too_short.mp4"]
    assert lines[-1] == (f"wrote {out}: 2 videos; skipped 5 (face too small 1, no face 1, several faces 1, "
                         "too few frames 1, unreadable 1)")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [os.path.normpath(os.path.join(os.path.dirname(out), r["video"])) for r in rows] == \
           [os.path.join(root, k) for k in kept]
    assert [r["prompt"] for r in rows] == ["a woman smiles", ""]
    ds = VideoDataset(out, num_frames=NUM_FRAMES, max_pixels=480 * 832)  # the trainer's reader takes it as is
    assert [tuple(ds[i]["video"].shape) for i in range(len(ds))] == [(NUM_FRAMES, 3, 128, 128)] * 2
    # frame count, size and fps against OpenCV's reading of the same files
    with open(state_path(out)) as f:
        state = {r["video"]: r for r in map(json.loads, f.read().splitlines()[1:])}
    for name in ("a_one_face.mp4", "nested/b_one_face.mov", "c_two_faces.mp4", "e_too_short.mp4"):
        cap = cv2.VideoCapture(os.path.join(root, name))
        ref = (int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
               int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), cap.get(cv2.CAP_PROP_FPS))
        cap.release()
        got = state[name]
        assert (got["frames"], got["width"], got["height"]) == ref[:3] and got["fps"] == pytest.approx(ref[3])
    assert state["c_two_faces.mp4"]["width"] == 256 and state["e_too_short.mp4"]["frames"] == 3


def test_prepare_resumes_after_an_interruption(video_dir, face_assets, tmp_path):
    from rewardfl.config import config_from_dict
    from rewardfl.registry import create

    root, kept, skips = video_dir
    reward = create("reward", "face_identity", config_from_dict({"reward_model_path": face_assets.scrfd_sface}), {})
    checked = []

    def problem(frame):
        checked.append(frame)
        return reward.reference_problem(frame)

    def interrupted_after(n):
        def progress(videos):
            for i, v in enumerate(videos):
                if i == n:
                    raise KeyboardInterrupt
                yield v
        return progress

    out = str(tmp_path / "metadata.csv")
    kw = dict(num_frames=NUM_FRAMES, max_pixels=480 * 832, reference_problem=problem, checker="face")
    with pytest.raises(KeyboardInterrupt):
        prepare_videos(root, out, progress=interrupted_after(4), **kw)
    assert not os.path.exists(out)  # nothing half-written
    first = len(checked)  # videos whose first frame reached the checker (decodable and long enough)
    assert first == 3  # a_one_face, c_two_faces, d_noise; e_too_short (4th) never got there
    with open(state_path(out), "ab") as f:
        f.write(b'{"video": "f_small_fa')  # a line torn by the interruption
    summary = prepare_videos(root, out, **kw)
    assert summary.reused == 4
    assert len(checked) - first == 2  # only f_small_face and nested/b_one_face are read now
    assert [r.video for r in summary.kept] == kept
    assert {r.video: r.kind for r in summary.skipped} == skips
    # a changed file is checked again; an unchanged folder is not read at all
    os.utime(os.path.join(root, "d_noise.mp4"), ns=(1, 1))
    before = len(checked)
    again = prepare_videos(root, out, **kw)
    assert again.reused == 6 and len(checked) - before == 1
    # other settings start over
    before = len(checked)
    other = prepare_videos(root, out, **{**kw, "num_frames": 9})
    assert other.reused == 0 and {r.video for r in other.kept} == {"a_one_face.mp4"}  # b has 7 frames
    assert len(checked) - before == 4


@pytest.mark.parametrize("argv, message", [
    (["--num-frames", "6"], "data.num_frames: must be of the form 4k+1"),
    (["--reward-model-path", "/nonexistent/pack"], "--reward-model-path: not a folder: /nonexistent/pack"),
    (["--reward", "face_identiti"], "did you mean 'face_identity'"),
])
def test_user_errors_are_one_line(video_dir, tmp_path, capsys, argv, message):
    root, _, _ = video_dir
    code, stdout, stderr = _cli(capsys, "prepare", root, "--out", str(tmp_path / "m.csv"), "--no-progress", *argv)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("rewardfl.data: error: ") and message in stderr


def test_a_folder_without_usable_videos_is_an_error(tmp_path, capsys):
    folder = tmp_path / "v"
    folder.mkdir()
    _write(str(folder / "noise.mp4"), [np.zeros((32, 32, 3), np.uint8)] * 5)
    code, _, stderr = _cli(capsys, "prepare", str(folder), "--out", str(tmp_path / "m.csv"), "--reward", "none",
                           "--num-frames", "9", "--no-progress")
    assert code == 2 and "no usable video among 1" in stderr and not (tmp_path / "m.csv").exists()


def test_python_dash_m_runs_the_command(video_dir, tmp_path):
    import subprocess
    import sys

    root, _, _ = video_dir
    out = tmp_path / "m.csv"
    proc = subprocess.run([sys.executable, "-m", "rewardfl.data", "prepare", root, "--out", str(out), "--reward", "none",
                           "--num-frames", "9", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # without a face check: every decodable video with 9 frames is kept (b has 7, e 3; g is broken)
    assert proc.stdout.strip().splitlines()[-1] == (f"wrote {out}: 4 videos; skipped 3 (too few frames 2, "
                                                    "unreadable 1)")


def test_the_readme_recipe_runs_on_the_test_videos(video_dir, face_assets, tiny_dir, tmp_path):  # noqa: F811
    """README "Train on your own videos", command by command as written, on this module's videos: the
    paths are put where the files are, the video size and step count are cut to the tiny twin's, one of
    the two usable clips is held out (0.1 of two is none), and the
    Wan2.2 recipe's weight files are the twin's (the only changes, all made by ``--set`` or by replacing a
    path in the command line)."""
    import re
    import shlex
    import shutil
    import subprocess
    import sys

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("## Train on your own videos", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [shlex.split(re.sub(r"#.*", "", c)) for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    root, kept, _ = video_dir
    where = {"my_videos/": root, "models/antelopev2": face_assets.scrfd_sface,
             "my_dataset/metadata.csv": str(tmp_path / "my_dataset" / "metadata.csv"),
             "my_run.yaml": str(tmp_path / "my_run.yaml"), "output/final": str(tmp_path / "out" / "final"),
             "examples/reward_fl_wan22.yaml": os.path.join(ROOT, "examples", "reward_fl_wan22.yaml")}
    cut = {"--num-frames": "5", "--height": "64", "--width": "64"}
    twin = ["--set", f"model_paths={os.path.join(tiny_dir, 'model_paths.json')}",
            "--set", f"tokenizer_path={os.path.join(tiny_dir, 'tokenizer')}", "--set", "lora_rank=4",
            "--set", "data.num_frames=5", "--set", "data.height=64", "--set", "data.width=64",
            "--set", "data.max_pixels=4096", "--set", "num_inference_steps=4", "--set", "mid_timestep=2",
            "--set", "final_timestep=3", "--set", "max_steps=1", "--set", "warmup_steps=0",
            "--set", "device=cpu", "--set", "mixed_precision=fp32", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "reward.name=face_identity", "--set", "reward.det_size=160",
            "--set", "reward.landmark_fallback=true"]
    ran = []
    for argv in commands:
        for path, here in where.items():  # also inside KEY=VALUE
            argv = [a.replace(path, here) for a in argv]
        argv = [cut.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
        if argv[0] == "cp":
            shutil.copy(argv[1], argv[2])
            continue
        if argv[:3] == ["python", "-m", "rewardfl.plan"]:
            continue  # the memory planner sizes the real 14B model (tests/test_plan.py); nothing to run here
        assert argv[0] == "python", argv
        if "data.eval_fraction=0.1" in argv:  # of 2 clips 0.1 holds out none: the smallest that holds out one
            rows = VideoDataset(where["my_dataset/metadata.csv"], num_frames=5, max_pixels=4096).rows
            fraction = next(f / 20 for f in range(1, 20)
                            if sum(is_held_out(42, r["sample_id"], f / 20) for r in rows) == 1)
            argv = [a.replace("data.eval_fraction=0.1", f"data.eval_fraction={fraction}") for a in argv]
        argv = [sys.executable] + argv[1:] + (twin if argv[2] in ("rewardfl.run", "rewardfl.evaluate") else [])
        if argv[2] == "rewardfl.evaluate":
            argv += ["--set", "eval.seeds=1"]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(tmp_path), timeout=900)
        assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
        ran.append(argv[2])
    assert ran == ["rewardfl.data", "rewardfl.run", "rewardfl.run", "rewardfl.evaluate"]
    listed = tmp_path / "my_dataset" / "metadata.csv"
    rows = list(csv.DictReader(open(listed, encoding="utf-8")))
    assert (sorted(os.path.normpath(os.path.join(listed.parent, r["video"])) for r in rows)
            == sorted(os.path.join(root, k) for k in kept))
    assert os.path.isdir(tmp_path / "out" / "final")
