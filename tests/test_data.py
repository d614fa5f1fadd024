"""The dataset (rewardfl.data) and the example dataset builder (rewardfl.demo.example_data).

References: frames resized with PIL's BILINEAR (antialiased) and cropped at
offsets computed by hand in the comments; mp4s written losslessly (libx264rgb,
crf 0) or decoded independently with OpenCV's own ffmpeg build.
"""

import json
import os

import cv2
import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from rewardfl.data import VideoDataset, collate, load_clip
from rewardfl.demo.example_data import build_example_dataset, crop_windows, main as example_main

LEVEL = 1 / 127.5  # one uint8 level in [-1, 1] units
ASTRONAUT_FACE = (175, 60, 270, 180)  # x0, y0, x1, y1, by eye (hair to chin)


def _frames(num, h=90, w=160):
    """Real image content, each frame shifted 7 px further right: ``num`` RGB (h, w, 3) uint8."""
    photo = skdata.astronaut()
    return [np.ascontiguousarray(np.roll(photo, 7 * i, axis=1)[100:100 + h, 150:150 + w]) for i in range(num)]


def _write_mp4(path, frames, lossless=True):
    params = (dict(codec="libx264rgb", pixelformat="rgb24", output_params=["-crf", "0"]) if lossless
              else dict(codec="libx264", pixelformat="yuv420p", output_params=["-crf", "18"]))
    with imageio.get_writer(path, fps=16, macro_block_size=1, quality=None, ffmpeg_log_level="error",
                            **params) as w:
        for f in frames:
            w.append_data(f)


def _reference(frame, resized_hw, top, left, size):
    """PIL BILINEAR resize to ``resized_hw`` then crop ``size`` at (top, left); (3, H, W) in [-1, 1]."""
    rh, rw = resized_hw
    im = np.asarray(Image.fromarray(frame).resize((rw, rh), Image.BILINEAR)).astype(np.float64)
    crop = im[top:top + size[0], left:left + size[1]]
    return torch.from_numpy(crop / 127.5 - 1.0).permute(2, 0, 1)


def _csv(folder, text):
    path = os.path.join(folder, "metadata.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def test_mp4_frames_are_resized_and_centre_cropped_like_pil(tmp_path):
    frames = _frames(12)
    os.makedirs(tmp_path / "videos")
    _write_mp4(str(tmp_path / "videos" / "a.mp4"), frames)
    csv_path = _csv(tmp_path, "video,prompt,camera\nvideos/a.mp4,a face,static\n")
    ds = VideoDataset(csv_path, num_frames=9, max_pixels=48 * 80)
    item = ds[0]
    # 160x90 (WxH) has 14400 px > 3840: scale sqrt(14400/3840) = 1.9365 -> 82x46 -> multiples of 16: 80x32
    assert item["video"].shape == (9, 3, 32, 80) and item["video"].dtype == torch.float32
    # cover 80x32: scale max(32/90, 80/160) = 0.5 -> 80x45, crop top round(13/2) = 6, left 0
    ref = torch.stack([_reference(f, (45, 80), 6, 0, (32, 80)) for f in frames[:9]])
    assert (item["video"].double() - ref).abs().max() <= LEVEL + 1e-6
    assert torch.equal(item["first_frame"], item["video"][0])
    assert item["prompt"] == "a face" and item["camera"] == "static"
    assert item["path"] == str(tmp_path / "videos" / "a.mp4")
    assert item["sample_id"] == "videos/a.mp4" and item["index"] == 0 and item["line"] == 2


def test_exact_height_width_and_independent_decoder(tmp_path):
    frames = _frames(5)
    path = str(tmp_path / "b.mp4")
    _write_mp4(path, frames, lossless=False)  # H.264 yuv420p: what users have
    clip = load_clip(path, num_frames=5, max_pixels=10**6, height=48, width=48)
    cap = cv2.VideoCapture(path)
    decoded = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        decoded.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    assert len(decoded) == 5
    # cover 48x48: scale max(48/90, 48/160) = 0.5333 -> 85x48, crop left round(37/2) = 18 (half to even), top 0
    ref = torch.stack([_reference(f, (48, 85), 0, 18, (48, 48)) for f in decoded])
    assert clip.shape == (5, 3, 48, 48)
    assert (clip.double() - ref).abs().max() <= 2 * LEVEL + 1e-6


def test_no_downscale_below_max_pixels_and_only_first_frames(tmp_path):
    frames = _frames(40, h=64, w=96)
    path = str(tmp_path / "long.mp4")
    _write_mp4(path, frames)
    clip = load_clip(path, num_frames=5, max_pixels=10**6)
    # 96x64 is under max_pixels and already multiples of 16: the frames come back unchanged
    expected = torch.from_numpy(np.stack(frames[:5]).astype(np.float64) / 127.5 - 1).permute(0, 3, 1, 2)
    assert clip.shape == (5, 3, 64, 96)
    assert (clip.double() - expected).abs().max() < 1e-6


def test_folder_of_frames_in_natural_order(tmp_path):
    folder = tmp_path / "frames"
    os.makedirs(folder)
    frames = _frames(12, h=40, w=40)
    for i, f in enumerate(frames):  # f1.png ... f12.png: "f10" sorts after "f9"
        Image.fromarray(f).save(folder / f"f{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    csv_path = _csv(tmp_path, "video,prompt\nframes,p\n")
    item = VideoDataset(csv_path, num_frames=9, max_pixels=10**6)[0]
    # 40x40 -> multiples of 16: 32x32, cover scale 0.8 -> 32x32, no crop
    ref = torch.stack([_reference(f, (32, 32), 0, 0, (32, 32)) for f in frames[:9]])
    assert item["video"].shape == (9, 3, 32, 32)
    assert (item["video"].double() - ref).abs().max() <= LEVEL + 1e-6


def test_single_image_is_a_one_frame_reference(tmp_path):
    photo = skdata.astronaut()[:200, :300]
    Image.fromarray(photo).save(tmp_path / "face.jpg", quality=95)
    decoded = np.asarray(Image.open(tmp_path / "face.jpg").convert("RGB"))
    csv_path = _csv(tmp_path, "video,prompt\nface.jpg,p\n")
    item = VideoDataset(csv_path, num_frames=9, max_pixels=64 * 64)[0]
    # 300x200 -> scale sqrt(60000/4096) = 3.827 -> 78x52 -> 64x48; cover: max(48/200, 64/300) = 0.24
    # -> 72x48, crop left round(8/2) = 4
    assert item["video"].shape == (1, 3, 48, 64)
    assert (item["video"][0].double() - _reference(decoded, (48, 72), 0, 4, (48, 64))).abs().max() <= LEVEL + 1e-6


def test_collate_stacks_same_shapes_and_refuses_mixed(tmp_path):
    os.makedirs(tmp_path / "v")
    _write_mp4(str(tmp_path / "v" / "a.mp4"), _frames(5))
    _write_mp4(str(tmp_path / "v" / "b.mp4"), _frames(6)[1:])
    Image.fromarray(_frames(1)[0]).save(tmp_path / "v" / "c.png")
    csv_path = _csv(tmp_path, "video,prompt\nv/a.mp4,one\nv/b.mp4,two\nv/c.png,three\n")
    ds = VideoDataset(csv_path, num_frames=5, max_pixels=32 * 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, 1]), batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["video"].shape == (2, 5, 3, 32, 48)
    assert torch.equal(batch["video"][1], ds[1]["video"]) and torch.equal(batch["first_frame"][0], ds[0]["video"][0])
    assert batch["prompt"] == ["one", "two"] and batch["index"] == [0, 1] and batch["sample_id"] == ["v/a.mp4", "v/b.mp4"]
    with pytest.raises(ValueError, match=r"different shapes.*'v/c.png' \(1, 3, 32, 48\).*data.height"):
        collate([ds[0], ds[2]])


# --------------------------------------------------------------------------- errors name the CSV line


def test_missing_column_names_header_line(tmp_path):
    csv_path = _csv(tmp_path, "file,prompt\na.mp4,p\n")
    with pytest.raises(ValueError, match=r"metadata.csv:1: missing column video .*found: file, prompt"):
        VideoDataset(csv_path, num_frames=5, max_pixels=4096)


def test_missing_file_names_line_and_counts_the_rest(tmp_path):
    Image.fromarray(_frames(1)[0]).save(tmp_path / "ok.png")
    # line 2's prompt spans two physical lines, so the rows start at lines 2, 4, 5, 6
    csv_path = _csv(tmp_path, 'video,prompt\nok.png,"two\nlines"\nmissing.mp4,p\nok.png,p\ngone/,p\n')
    with pytest.raises(FileNotFoundError) as e:
        VideoDataset(csv_path, num_frames=5, max_pixels=4096)
    msg = str(e.value)
    assert f"{csv_path}:4: video 'missing.mp4' not found: {tmp_path / 'missing.mp4'}" in msg
    assert "1 more row(s) too (line 6)" in msg and "relative to the CSV's folder" in msg


def test_unreadable_video_names_line(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"this is not a video" * 100)
    csv_path = _csv(tmp_path, "video,prompt\n\nbad.mp4,p\n")  # an empty line 2 is skipped
    ds = VideoDataset(csv_path, num_frames=5, max_pixels=4096)
    with pytest.raises(ValueError, match=rf"{csv_path}:3: video 'bad.mp4': cannot read video file .*bad.mp4"):
        ds[0]


def test_too_short_video_and_folder_name_line(tmp_path):
    _write_mp4(str(tmp_path / "short.mp4"), _frames(3))
    os.makedirs(tmp_path / "fr")
    for i, f in enumerate(_frames(2)):
        Image.fromarray(f).save(tmp_path / "fr" / f"{i}.png")
    csv_path = _csv(tmp_path, "video,prompt\nshort.mp4,p\nfr,p\n")
    ds = VideoDataset(csv_path, num_frames=5, max_pixels=4096)
    with pytest.raises(ValueError, match=rf"{csv_path}:2: .*video file has only 3 frames but data.num_frames is 5"):
        ds[0]
    with pytest.raises(ValueError, match=rf"{csv_path}:3: .*folder has only 2 frames"):
        ds[1]
    assert VideoDataset(csv_path, num_frames=1, max_pixels=4096)[1]["video"].shape[0] == 1


def test_bad_frames_in_a_folder_name_line_and_file(tmp_path):
    for name, (h, w) in {"a": (40, 40), "b": (40, 48)}.items():
        os.makedirs(tmp_path / name)
        for i, f in enumerate(_frames(5, h=40, w=48)):  # frames 0, 1 are 40x40; from 2 on h x w
            Image.fromarray(np.ascontiguousarray(f[:, :40] if i < 2 else f[:h, :w])).save(tmp_path / name / f"{i}.png")
    (tmp_path / "a" / "3.png").write_bytes(b"broken")
    csv_path = _csv(tmp_path, "video,prompt\na,p\nb,p\n")
    ds = VideoDataset(csv_path, num_frames=5, max_pixels=4096)
    with pytest.raises(ValueError, match=rf"{csv_path}:2: video 'a': cannot read folder .*3.png"):
        ds[0]
    with pytest.raises(ValueError, match=rf"{csv_path}:3: .*frame 2 is 48x40 \(WxH\) but frame 0 is 40x40"):
        ds[1]


def test_truncated_mp4_shows_ffmpegs_reason_not_its_banner(tmp_path):
    """A download cut short: the first half of a real mp4. The reason is ffmpeg's last stderr line."""
    _write_mp4(str(tmp_path / "full.mp4"), _frames(9), lossless=False)
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    csv_path = _csv(tmp_path, "video,prompt\ncut.mp4,p\n")
    with pytest.raises(ValueError) as e:
        VideoDataset(csv_path, num_frames=5, max_pixels=4096)[0]
    msg = str(e.value)
    assert msg.startswith(f"{csv_path}:2: video 'cut.mp4': cannot read video file {tmp_path / 'cut.mp4'}: ")
    # imageio writes mp4s with the index (moov atom) at the end: the half file has none
    assert "ffmpeg says:" in msg and "moov atom not found" in msg, msg
    assert "ffmpeg version" not in msg and "configuration:" not in msg and "\n" not in msg


def test_non_utf8_csv_names_file_and_line(tmp_path):
    Image.fromarray(_frames(1)[0]).save(tmp_path / "a.png")
    path = tmp_path / "metadata.csv"
    # what Excel's plain "CSV" writes on a Western Windows: cp1252, where "é" is the single byte 0xe9
    path.write_bytes("video,prompt\na.png,a face\na.png,un café\n".encode("cp1252"))
    with pytest.raises(ValueError, match=rf"^{path}:3: not UTF-8 text \(byte 0xe9\); save the CSV as UTF-8"):
        VideoDataset(str(path), num_frames=5, max_pixels=4096)
    # a spreadsheet's "CSV UTF-8" starts with a byte-order mark: still read, header found
    path.write_bytes("video,prompt\na.png,un café\n".encode("utf-8-sig"))
    ds = VideoDataset(str(path), num_frames=5, max_pixels=4096)
    assert ds.rows[0]["prompt"] == "un café" and ds.rows[0]["line"] == 2


@pytest.mark.parametrize("text, pattern", [
    ("", r"metadata.csv: the file is empty"),
    ("video,prompt\n\n", r"metadata.csv: no data rows after the header"),
    ("video,prompt\na.png\n", r"metadata.csv:2: 1 fields but the header has 2"),
    ("video,prompt\n ,p\n", r"metadata.csv:2: empty 'video' cell"),
    ("video,prompt,index\na.png,p,1\n", r"metadata.csv:1: column name index clash"),
])
def test_malformed_csv(tmp_path, text, pattern):
    with pytest.raises(ValueError, match=pattern):
        VideoDataset(_csv(tmp_path, text), num_frames=5, max_pixels=4096)


def test_arguments_are_checked(tmp_path, capsys):
    # frame count and size are checked once, where the config enters (data.* keys)
    from rewardfl import run

    cfg = tmp_path / "cfg.yaml"
    for data, pattern in (("{num_frames: 8}", "data.num_frames: must be of the form 4k+1"),
                          ("{height: 40, width: 48}", "data.height: must be a positive multiple of 16")):
        cfg.write_text(f"data: {data}\n")
        assert run.main([str(cfg), "--check"]) == 2
        assert pattern in capsys.readouterr().err
    csv_path = _csv(tmp_path, "video,prompt\na.png,p\n")
    with pytest.raises(FileNotFoundError, match="data.metadata_path"):
        VideoDataset(str(tmp_path / "nope.csv"), num_frames=5, max_pixels=4096)
    Image.fromarray(np.zeros((12, 100, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"metadata.csv:2: .*100x12 \(WxH\) give a 96x0 clip"):
        VideoDataset(csv_path, num_frames=5, max_pixels=4096)[0]


def test_from_config_resolves_relative_to_config_dir(tmp_path):
    from rewardfl.config import config_from_dict

    Image.fromarray(_frames(1)[0]).save(tmp_path / "a.png")
    _csv(tmp_path, "video,prompt\na.png,p\n")
    cfg = config_from_dict({"data": {"metadata_path": "metadata.csv", "num_frames": 5, "max_pixels": 4096}},
                           base_dir=str(tmp_path))
    ds = VideoDataset.from_config(cfg)
    assert ds.metadata_path == str(tmp_path / "metadata.csv") and ds[0]["video"].shape == (1, 3, 48, 80)


# --------------------------------------------------------------------------- the example dataset


def test_crop_windows_frame_the_face():
    # face box long side 120 / face_fraction 0.5 = 240 px window around the box centre (222.5, 120)
    win = crop_windows((512, 512), ASTRONAUT_FACE, "zoom_in", num_frames=5, size=(64, 64))
    np.testing.assert_allclose(win[0], [102.5, 0.0, 342.5, 240.0])
    np.testing.assert_allclose(win[-1], [126.5, 24.0, 318.5, 216.0])  # zoom 0.8: 192 px
    # a window sliding off the photo is shifted back inside; a too-large one shrinks to the photo
    # (box side 150 / 0.5 = 300, zoom 0.9 -> 270 px > the photo's 200 px height)
    win = crop_windows((300, 200), (0, 0, 150, 150), "pan_left", num_frames=5, size=(64, 64))
    assert (win[:, :2] >= 0).all() and (win[:, 2] <= 300).all() and (win[:, 3] <= 200).all()
    np.testing.assert_allclose(win[:, 3] - win[:, 1], 200.0)
    np.testing.assert_allclose(win[:, 0], 0.0)  # centre 75 + 0.08 * 300 is left of 100: pushed inside


def test_example_dataset_builds_loadable_clips_once(tmp_path):
    photo = str(tmp_path / "astronaut.png")
    Image.fromarray(skdata.astronaut()).save(photo)
    out = str(tmp_path / "ds")
    csv_path = build_example_dataset(out, [photo, photo], face_boxes=[ASTRONAUT_FACE, None], num_frames=5,
                                     size=(64, 64), clips_per_photo=2, subjects=["a woman", "an astronaut"])
    ds = VideoDataset(csv_path, num_frames=5, max_pixels=64 * 64)
    assert len(ds) == 4
    assert [r["sample_id"] for r in ds.rows] == ["videos/00_astronaut_zoom_in.mp4", "videos/00_astronaut_pan_right.mp4",
                                                 "videos/01_astronaut_pan_right.mp4", "videos/01_astronaut_zoom_out.mp4"]
    assert ds.rows[0]["prompt"] == "a woman looks at the camera, the camera slowly zooms in, close-up portrait"
    clip = ds[0]["video"]
    assert clip.shape == (5, 3, 64, 64)
    # frame 0 shows the photo's window (102.5, 0, 342.5, 240) (see test_crop_windows_frame_the_face);
    # reference: OpenCV area resize of the integer-rounded window, H.264 yuv420p loss allowed
    ref = cv2.resize(skdata.astronaut()[0:240, 102:342], (64, 64), interpolation=cv2.INTER_AREA)
    ref = torch.from_numpy(ref.astype(np.float64) / 127.5 - 1).permute(2, 0, 1)
    assert (clip[0].double() - ref).abs().mean() < 6 * LEVEL
    # the zoom moves the picture: the last frame differs from the first
    assert (clip[-1] - clip[0]).abs().mean() > 10 * LEVEL

    stamp = os.path.getmtime(os.path.join(out, ds.rows[0]["sample_id"]))
    assert build_example_dataset(out, [photo, photo], face_boxes=[ASTRONAUT_FACE, None], num_frames=5,
                                 size=(64, 64), clips_per_photo=2, subjects=["a woman", "an astronaut"]) == csv_path
    assert os.path.getmtime(os.path.join(out, ds.rows[0]["sample_id"])) == stamp  # up to date: nothing rewritten
    build_example_dataset(out, [photo], face_boxes=[ASTRONAUT_FACE], num_frames=9, size=(64, 64), clips_per_photo=1)
    ds = VideoDataset(csv_path, num_frames=9, max_pixels=64 * 64)
    assert len(ds) == 1 and ds[0]["video"].shape == (9, 3, 64, 64)
    # a CSV the builder did not write is never overwritten
    os.makedirs(tmp_path / "user")
    user_csv = _csv(tmp_path / "user", "video,prompt\nmine.mp4,p\n")
    with pytest.raises(ValueError, match="not written by the example builder"):
        build_example_dataset(str(tmp_path / "user"), [photo], num_frames=5, size=(64, 64))
    assert open(user_csv).read() == "video,prompt\nmine.mp4,p\n"


def test_example_cli(tmp_path, capsys):
    photo = str(tmp_path / "astronaut.png")
    Image.fromarray(skdata.astronaut()).save(photo)
    out = str(tmp_path / "cli")
    assert example_main([out, f"{photo}@175,60,270,180", "--num-frames", "5", "--size", "64x48"]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "metadata.csv")
    assert VideoDataset(os.path.join(out, "metadata.csv"), num_frames=5, max_pixels=10**6)[1]["video"].shape == (5, 3, 64, 48)
    assert example_main([out, photo, "--num-frames", "4"]) == 2
    assert "4k+1" in capsys.readouterr().err


def test_example_faces_stay_detectable_at_64px(tmp_path):
    """The fetched portraits, framed by YuNet, still show a face YuNet finds in every 64x64 frame."""
    from rewardfl.demo.assets import fetch_face_assets
    from rewardfl.demo.example_data import build_from_face_assets

    assets = fetch_face_assets()
    csv_path = build_from_face_assets(str(tmp_path / "faces"), assets=assets, num_frames=5, size=(128, 128),
                                      clips_per_photo=1)
    ds = VideoDataset(csv_path, num_frames=5, max_pixels=64 * 64)
    model = os.path.join(assets.yunet_sface, "face_detection_yunet_2023mar.onnx")
    detector = cv2.FaceDetectorYN.create(model, "", (64, 64), 0.6)
    assert len(ds) == 4
    for i in range(len(ds)):
        frames = ((ds[i]["video"] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for f in frames:
            _, faces = detector.detect(np.ascontiguousarray(f[:, :, ::-1]))
            assert faces is not None and len(faces) >= 1, ds.rows[i]["sample_id"]
            assert faces[0][2] >= 20  # the face is at least 20 px wide at 64x64


def test_heldout_clips_show_twelve_other_people_each_detectable(tmp_path):
    """The demo's held-out clips: twelve distinct faces of the Solvay photo (no box holds
    another's centre), none of the example photos, each found by YuNet in every 256x256 frame."""
    from rewardfl.demo.assets import fetch_face_assets
    from rewardfl.demo.example_data import (EXAMPLE_PHOTOS, HELDOUT_PEOPLE, build_heldout_from_face_assets,
                                            face_boxes)

    assets = fetch_face_assets()
    photo = assets.photo("solvay_conference_1927")
    boxes = face_boxes(photo, os.path.join(assets.yunet_sface, "face_detection_yunet_2023mar.onnx"))
    assert len(boxes) == 29  # the photo's 29 people, as docs/design.md section 5 says
    csv_path = build_heldout_from_face_assets(str(tmp_path / "heldout"), assets=assets, num_frames=5)
    ds = VideoDataset(csv_path, num_frames=5, max_pixels=256 * 256, height=256, width=256)
    from rewardfl.evaluation.metrics import MIN_CLIPS_FOR_CLAIM

    assert HELDOUT_PEOPLE == 12 >= MIN_CLIPS_FOR_CLAIM  # enough clips for the intervals to call a difference
    assert len(ds) == 12 and not any(name in row["sample_id"] for row in ds.rows for name in EXAMPLE_PHOTOS)
    largest = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))[:12]
    for a in range(12):  # twelve different faces: no box holds another's centre (neighbours' boxes touch
        for b in range(12):  # in the crowded photo, by a few pixels)
            p, (cx, cy) = largest[a], ((largest[b][0] + largest[b][2]) / 2, (largest[b][1] + largest[b][3]) / 2)
            assert a == b or not (p[0] <= cx <= p[2] and p[1] <= cy <= p[3]), (largest[a], largest[b])
    detector = cv2.FaceDetectorYN.create(os.path.join(assets.yunet_sface, "face_detection_yunet_2023mar.onnx"), "",
                                         (256, 256), 0.6)
    for i in range(len(ds)):
        frames = ((ds[i]["video"] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for f in frames:
            _, faces = detector.detect(np.ascontiguousarray(f[:, :, ::-1]))
            assert faces is not None and len(faces) >= 1, ds.rows[i]["sample_id"]


def test_demo_training_people_from_the_solvay_photo_are_not_held_out(tmp_path):
    """``build_from_face_assets(solvay_people=n)``: the four portraits (two clips each) plus n more
    Solvay faces, none held out, and no frame of any of their clips shows any part of a held-out face
    box (checked on the crop windows of the clips as built, recomputed here); YuNet finds a face in
    every frame. The crowded photo has neighbours that a clip would show: they are left out."""
    from PIL import Image

    from rewardfl.demo.assets import fetch_face_assets
    from rewardfl.demo.example_data import (HELDOUT_PEOPLE, MOTIONS, TRAINING_SOLVAY_PEOPLE, build_from_face_assets,
                                            face_boxes)

    assets = fetch_face_assets()
    yunet = os.path.join(assets.yunet_sface, "face_detection_yunet_2023mar.onnx")
    photo = assets.photo("solvay_conference_1927")
    by_size = sorted(face_boxes(photo, yunet), key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    held = by_size[:HELDOUT_PEOPLE]
    csv_path = build_from_face_assets(str(tmp_path / "train"), assets=assets, num_frames=9,
                                      solvay_people=TRAINING_SOLVAY_PEOPLE)
    ds = VideoDataset(csv_path, num_frames=9, max_pixels=256 * 256, height=256, width=256)
    assert TRAINING_SOLVAY_PEOPLE == 8 and len(ds) == 2 * (4 + 8)
    manifest = json.load(open(os.path.join(tmp_path, "train", "videos", ".build.json")))
    train = [tuple(p["face_box"]) for p in manifest["photos"][4:]]
    assert len(set(train)) == 8 and not set(train) & set(held) and set(train) <= set(by_size)
    with Image.open(photo) as im:
        size = im.size
    motions = list(MOTIONS)
    shown = []
    for i, box in enumerate(train):
        for j in range(2):  # the clips' motions, as build_example_dataset assigns them
            for x0, y0, x1, y1 in crop_windows(size, box, motions[(4 + i + j) % 5], num_frames=9, size=(128, 128)):
                shown += [h for h in held if min(x1, h[2]) > max(x0, h[0]) and min(y1, h[3]) > max(y0, h[1])]
    assert shown == []
    # the rule is not vacuous: taking the next 8 by size would show a held-out face
    naive = by_size[HELDOUT_PEOPLE:HELDOUT_PEOPLE + 8]
    assert any(min(w[2], h[2]) > max(w[0], h[0]) and min(w[3], h[3]) > max(w[1], h[1])
               for b in naive for m in motions for w in crop_windows(size, b, m, num_frames=9, size=(128, 128))
               for h in held)
    detector = cv2.FaceDetectorYN.create(yunet, "", (256, 256), 0.6)
    for i in range(len(ds)):
        frames = ((ds[i]["video"] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for f in frames:
            _, faces = detector.detect(np.ascontiguousarray(f[:, :, ::-1]))
            assert faces is not None and len(faces) >= 1, ds.rows[i]["sample_id"]
    with pytest.raises(ValueError, match="solvay_people: the Solvay photo holds 29 faces"):
        build_from_face_assets(str(tmp_path / "too_many"), assets=assets, num_frames=9, solvay_people=15)
