"""The trackers (report_to): what TensorBoard and wandb hold after a run, read back from their own files.

TensorBoard is read with tensorboard's EventAccumulator; wandb runs offline (no network) and its
``run-<id>.wandb`` transaction log is read with the small reader below (wandb 0.31 ships no Python
reader for it; the format is LevelDB's log format with wandb's 7-byte header, records are
``wandb_internal_pb2.Record`` protobufs). Nothing of wandb or tensorboard is mocked; the two
"not installed" tests only block the import.
"""

import glob
import io
import json
import math
import os
import struct
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from rewardfl.training.outputs import MetricsLog, read_metrics
from rewardfl.training.trackers import WANDB_RUN_ID_FILE, build_trackers, wandb_run_id

# ---------------------------------------------------------------- inputs with hand-computed pixels

# uint8 levels k whose [-1, 1] value -1 + 2k/255 maps back to exactly k
COLOURS = [((255, 0, 51), (0, 102, 204)), ((0, 255, 102), (153, 51, 0)), ((51, 102, 255), (255, 255, 255))]
F, H, W = 3, 8, 12


def expected_frames() -> np.ndarray:
    """(F, H, W, 3) uint8: frame f has COLOURS[f][0] on its left half and COLOURS[f][1] on its right."""
    out = np.zeros((F, H, W, 3), np.uint8)
    for f, (left, right) in enumerate(COLOURS):
        out[f, :, : W // 2] = left
        out[f, :, W // 2:] = right
    return out


def video_in_minus1_1() -> torch.Tensor:
    """The same video as a (3, F, H, W) float in [-1, 1]."""
    return torch.from_numpy(expected_frames()).double().div(255).mul(2).sub(1).permute(3, 0, 1, 2).float()


def image_in_minus1_1() -> torch.Tensor:
    """(3, H, W) float in [-1, 1]: the second frame."""
    return video_in_minus1_1()[:, 1]


def event_accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_the_scalars_video_and_image(tmp_path):
    trackers = build_trackers(["tensorboard"], str(tmp_path), {}, is_main=True)
    assert trackers.names == ["tensorboard"]
    trackers.log_scalars(1, {"step": 1, "loss": 0.5, "reward_score": 0.25, "grad_norm": float("nan"),
                             "kl_loss": None, "updated": True, "sampler": "euler"})
    trackers.log_scalars(2, {"step": 2, "loss": 0.125, "reward_score": float("inf")})
    trackers.log_video("samples/video", 2, video_in_minus1_1(), fps=10)
    trackers.log_image("samples/frame", 3, image_in_minus1_1())
    trackers.log_image("samples/frame_uint8", 3, expected_frames()[2])
    trackers.close()

    acc = event_accumulator(tmp_path / "tensorboard")
    tags = acc.Tags()
    # None, NaN, inf, bools, strings and "step" are not scalars
    assert set(tags["scalars"]) == {"loss", "reward_score"}
    assert scalars(acc, "loss") == [(1, 0.5), (2, 0.125)]
    assert scalars(acc, "reward_score") == [(1, 0.25)]

    (video,) = acc.Images("samples/video")
    assert (video.step, video.width, video.height) == (2, W, H)
    gif = Image.open(io.BytesIO(video.encoded_image_string))
    assert gif.format == "GIF"
    frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == F
    np.testing.assert_array_equal(np.stack(frames), expected_frames())  # <= 256 colours: exact in a GIF
    assert gif.info["duration"] == 100  # ms a frame at 10 fps

    for tag, want in (("samples/frame", expected_frames()[1]), ("samples/frame_uint8", expected_frames()[2])):
        (image,) = acc.Images(tag)
        assert (image.step, image.width, image.height) == (3, W, H)
        png = Image.open(io.BytesIO(image.encoded_image_string))
        assert png.format == "PNG"
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), want)


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    first = build_trackers(["tensorboard"], str(tmp_path), {}, is_main=True)
    for step in (1, 2, 3, 4):
        first.log_scalars(step, {"loss": float(step)})
    first.close()
    time.sleep(1.05)  # event files are ordered by name, whose first field is the time in seconds
    resumed = build_trackers(["tensorboard"], str(tmp_path), {}, is_main=True, resume_step=2)
    for step in (3, 4, 5):
        resumed.log_scalars(step, {"loss": 10.0 * step})
    resumed.close()
    assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 2
    assert scalars(event_accumulator(tmp_path / "tensorboard"), "loss") == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_metrics_log_keeps_its_jsonl_and_sends_the_numbers_to_the_trackers(tmp_path):
    trackers = build_trackers(["tensorboard"], str(tmp_path), {}, is_main=True)
    log = MetricsLog(str(tmp_path), enabled=True, trackers=trackers)
    log.write({"step": 1, "reward_score": float("nan"), "loss": 0.5, "updated": True})
    log.write({"step": 2, "reward_score": 0.75, "loss": float("inf"), "updated": 1})
    log.close()
    trackers.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "reward_score": None, "loss": 0.5, "updated": True},
        {"step": 2, "reward_score": 0.75, "loss": None, "updated": 1}]
    acc = event_accumulator(tmp_path / "tensorboard")
    assert scalars(acc, "reward_score") == [(2, 0.75)]
    assert scalars(acc, "loss") == [(1, 0.5)]
    assert scalars(acc, "updated") == [(2, 1.0)]  # a count of updates is a number, a flag is not


def test_other_ranks_write_nothing(tmp_path):
    trackers = build_trackers(["tensorboard", "wandb"], str(tmp_path / "out"), {"a": 1}, is_main=False)
    assert trackers.names == []
    trackers.log_scalars(1, {"loss": 0.5})
    trackers.log_video("v", 1, video_in_minus1_1(), fps=8)
    trackers.log_image("i", 1, image_in_minus1_1())
    trackers.close()
    log = MetricsLog(str(tmp_path / "out"), enabled=False, trackers=trackers)
    log.write({"step": 1, "loss": 0.5})
    assert not (tmp_path / "out").exists()


def test_an_unknown_tracker_names_report_to_and_the_known_ones(tmp_path):
    with pytest.raises(ValueError) as e:
        build_trackers(["tensorboard", "mlflow"], str(tmp_path), {}, is_main=False)
    assert str(e.value) == "report_to[1]: unknown 'mlflow'; known: tensorboard, wandb"
    with pytest.raises(ValueError, match=r"^report_to: expected a list"):
        build_trackers("tensorboard", str(tmp_path), {}, is_main=True)
    assert list(tmp_path.iterdir()) == []


def test_wandb_not_installed_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ValueError) as e:
        build_trackers(["wandb"], str(tmp_path), {}, is_main=True)
    assert str(e.value) == ('report_to: wandb is not installed; install it with pip install "rewardfl[wandb]", '
                            'or remove wandb from report_to')


def test_tensorboard_not_installed_is_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    trackers = build_trackers(["tensorboard"], str(tmp_path), {}, is_main=True)
    assert trackers.names == []
    trackers.log_scalars(1, {"loss": 0.5})
    trackers.close()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "tensorboard is not installed" in warnings[0].getMessage()
    assert not (tmp_path / "tensorboard").exists()


def test_bad_media_shapes_are_refused(tmp_path):
    trackers = build_trackers(["tensorboard"], str(tmp_path), {}, is_main=True)
    with pytest.raises(ValueError, match=r"expected a \(3, F, H, W\) video, got shape \(3, 8, 12\)"):
        trackers.log_video("v", 1, image_in_minus1_1(), fps=8)
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) float image"):
        trackers.log_image("i", 1, torch.zeros(8, 12, 3))  # HWC float: ambiguous range, refused
    trackers.close()


# ---------------------------------------------------------------- wandb


def test_the_wandb_run_id_is_kept_for_a_resume_and_renewed_for_a_fresh_run(tmp_path):
    first = wandb_run_id(str(tmp_path), resume_step=0)
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text() == first + "\n"
    assert len(first) == 8 and first.isalnum() and first == first.lower()
    assert wandb_run_id(str(tmp_path), resume_step=40) == first  # resumed from step 40: the same run
    fresh = wandb_run_id(str(tmp_path), resume_step=0)  # starts again at step 0: a new run
    assert fresh != first and (tmp_path / WANDB_RUN_ID_FILE).read_text() == fresh + "\n"
    assert wandb_run_id(str(tmp_path), resume_step=1) == fresh


def wandb_records(path):
    """The protobuf records of a ``run-<id>.wandb`` file (LevelDB log format behind a ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    block, pos, chunks = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zeros: the rest of this block is unwritten; go on at the next one
            pos += block - pos % block
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_history(records) -> dict:
    """{step: {key: value}} of the history records; media entries are dicts of their fields."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in r.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            target = row
            for k in keys[:-1]:
                target = target.setdefault(k, {})
            target[keys[-1]] = json.loads(item.value_json)
        rows[r.history.step.num] = row
    return rows


def test_wandb_offline_run_holds_the_scalars_video_image_and_config(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "out"
    trackers = build_trackers(["wandb"], str(out), {"learning_rate": 1e-5, "model": "wan2_2_tiny"}, is_main=True,
                              run_name="tiny-run", resume_step=0)
    assert trackers.names == ["wandb"]
    trackers.log_scalars(1, {"step": 1, "loss": 0.5, "reward_score": 0.25, "grad_norm": float("nan")})
    trackers.log_scalars(2, {"step": 2, "loss": 0.125, "reward_score": None})
    trackers.log_video("samples/video", 2, video_in_minus1_1(), fps=8)
    trackers.log_image("samples/frame", 2, image_in_minus1_1())
    trackers.close()

    run_id = (out / WANDB_RUN_ID_FILE).read_text().strip()
    (run_dir,) = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}"))
    path = os.path.join(run_dir, f"run-{run_id}.wandb")
    for _ in range(60):  # wandb's service process may still be writing its file after finish() returns
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "run" for r in records) and len(wandb_history(records)) == 2:
            break
        time.sleep(0.5)

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name) == (run_id, "rewardfl", "tiny-run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["learning_rate"] == 1e-5 and config["model"] == "wan2_2_tiny"

    history = wandb_history(records)
    assert sorted(history) == [1, 2]
    assert history[1]["loss"] == 0.5 and history[1]["reward_score"] == 0.25 and "grad_norm" not in history[1]
    assert "step" not in history[1]
    assert history[2]["loss"] == 0.125 and "reward_score" not in history[2]

    video = history[2]["samples/video"]
    assert video["_type"] == "video-file"
    mp4 = os.path.join(run_dir, "files", video["path"])
    with imageio.get_reader(mp4) as reader:
        assert reader.get_meta_data()["fps"] == 8
    frames = np.stack(imageio.mimread(mp4))
    assert frames.shape == (F, H, W, 3)
    # mp4 is lossy: flat colours come back within a few levels
    assert np.abs(frames.astype(int) - expected_frames()).max() <= 6

    image = history[2]["samples/frame"]
    assert (image["_type"], image["width"], image["height"]) == ("image-file", W, H)
    png = Image.open(os.path.join(run_dir, "files", image["path"]))
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), expected_frames()[1])
    assert not math.isnan(history[2]["_runtime"])
