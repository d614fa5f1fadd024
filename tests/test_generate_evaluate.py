"""Held-out clips, ``rewardfl.generate`` and ``rewardfl.evaluate`` (issue 14).

Metrics are checked against float64 hand computations and numpy; generation and evaluation run
the tiny Wan twin, the real face models and real clips (a one-step training run gives the
checkpoint)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import yaml

from train_fixtures import small_dataset  # noqa: F401  (session fixture)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import evaluate as evaluate_cli
from rewardfl import generate as generate_cli
from rewardfl import run
from rewardfl.config import load_config
from rewardfl.data import VideoDataset
from rewardfl.evaluation.metrics import identity_specificity, motion, paired_difference, psnr
from rewardfl.evaluation.split import eval_dataset, training_dataset
from rewardfl.training import Trainer, TrainState
from rewardfl.training.batches import MicroBatches


# --------------------------------------------------------------------------- held-out clips


def _image_dataset(folder, n=24, reverse=False):
    """``n`` one-frame clips (16x16 PNGs) and their metadata.csv; returns the CSV path."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    names = [f"clip_{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):
        Image.fromarray(np.full((16, 16, 3), i * 10, np.uint8)).save(os.path.join(folder, name))
    rows = names[::-1] if reverse else names
    path = os.path.join(folder, "reversed.csv" if reverse else "metadata.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("video,prompt\n" + "".join(f"{name},a face\n" for name in rows))
    return path


def _data_config(tmp_path, csv, fraction, seed=5):
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump({"seed": seed, "data": {"metadata_path": csv, "num_frames": 1, "height": 16,
                                                           "width": 16, "eval_fraction": fraction}}))
    return load_config(str(path), paths=False)


def _training_epoch_ids(cfg):
    """The sample_ids the Trainer's data order draws over one epoch (its own data half, no model)."""
    data = MicroBatches(training_dataset(cfg, VideoDataset.from_config(cfg)), batch_size=1, seed=cfg.seed)
    state = TrainState()
    ids = [data.next(state)["sample_id"][0] for _ in range(data.per_epoch)]
    assert state.epoch == 0
    return ids


def test_held_out_clips_are_never_drawn_for_training_and_do_not_depend_on_row_order(tmp_path):
    csv = _image_dataset(str(tmp_path / "clips"))
    cfg = _data_config(tmp_path, csv, 0.3)
    drawn = _training_epoch_ids(cfg)
    held = [eval_dataset(cfg)[i]["sample_id"] for i in range(len(eval_dataset(cfg)))]
    everything = {f"clip_{i:02d}.png" for i in range(24)}
    assert len(drawn) == len(set(drawn))  # an epoch draws each training clip once
    assert set(drawn).isdisjoint(held) and set(drawn) | set(held) == everything
    # which clips: by hand, sha256("rewardfl-heldout:<seed>:<sample_id>") as a fraction below 0.3
    by_hand = {s for s in everything
               if int.from_bytes(hashlib.sha256(f"rewardfl-heldout:5:{s}".encode()).digest()[:8], "little") / 2**64 < 0.3}
    assert set(held) == by_hand and 0 < len(by_hand) < 24
    # the same clips whatever the row order
    reversed_cfg = _data_config(tmp_path, _image_dataset(str(tmp_path / "clips"), reverse=True), 0.3)
    ds = eval_dataset(reversed_cfg)
    assert {ds[i]["sample_id"] for i in range(len(ds))} == by_hand
    # eval_fraction 0: training sees every clip, in the order it always had
    assert sorted(_training_epoch_ids(_data_config(tmp_path, csv, 0.0))) == sorted(everything)


def test_the_trainer_itself_leaves_the_held_out_clips_out(tmp_path, tiny_dir, face_assets):  # noqa: F811
    from rewardfl.registry import resolve_plugins

    csv = _image_dataset(str(tmp_path / "clips"))
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({
        "model_name": "wan2_2_tiny", "model_paths": os.path.join(tiny_dir, "model_paths.json"),
        "reward_model_path": face_assets.scrfd_sface, "lora_rank": 4, "mixed_precision": "fp32", "device": "cpu",
        "num_inference_steps": 4, "mid_timestep": 2, "final_timestep": 3, "seed": 5,
        "output_dir": str(tmp_path / "out"),
        "data": {"metadata_path": csv, "num_frames": 1, "height": 16, "width": 16, "eval_fraction": 0.3}}))
    cfg = load_config(str(path))
    trainer = Trainer(cfg, resolve_plugins(cfg))
    held = eval_dataset(cfg)
    trained_ids = {trainer.dataset[i]["sample_id"] for i in range(len(trainer.dataset))}
    held_ids = {held[i]["sample_id"] for i in range(len(held))}
    assert trained_ids.isdisjoint(held_ids) and len(trained_ids) + len(held_ids) == 24
    assert trainer.batches.per_epoch == len(trained_ids) < 24


def test_held_out_configuration_errors_name_the_key(tmp_path):
    from rewardfl.config import ConfigError

    csv = _image_dataset(str(tmp_path / "clips"), n=2)
    with pytest.raises(ConfigError, match=r"^data\.eval_fraction: must be in \[0, 1\), got 1\.0$"):
        _data_config(tmp_path, csv, 1.0)
    with pytest.raises(ValueError, match=r"data\.eval_metadata_path / data\.eval_fraction: no held-out clips"):
        eval_dataset(_data_config(tmp_path, csv, 0.0))


# --------------------------------------------------------------------------- metrics by hand


def test_motion_and_psnr_against_hand_computations():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1  # (F, 3, H, W) in [-1, 1]
    v = video.tolist()
    total, count = 0.0, 0
    for f in range(2):
        for c in range(3):
            for y in range(2):
                for x in range(2):
                    total += abs((v[f + 1][c][y][x] + 1) / 2 - (v[f][c][y][x] + 1) / 2)
                    count += 1
    assert motion(video.float()) == pytest.approx(total / count, rel=1e-6)
    assert motion(video[:1]) == 0.0

    a, b = video[0], video[1]
    mse = sum(((p - q) / 2) ** 2 for p, q in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)
    # a known case: every pixel off by 0.2 of the range in [-1, 1] (0.1 in [0, 1]): 20 dB
    assert psnr(torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.2)) == pytest.approx(20.0, rel=1e-6)
    assert psnr(a, a) == 100.0


def test_paired_difference_pairs_videos_and_averages_seeds_within_a_clip():
    """Pairs where both sides are numbers; clip a's two seeds averaged (0.75), clip b's one (-1.0)."""
    d = paired_difference([1.0, 2.0, None, 4.0], [0.5, 1.0, 3.0, 5.0], ["a", "a", "b", "b"])
    assert d["n"] == 3 and d["n_clips"] == 2 and d["mean"] == pytest.approx((0.75 - 1.0) / 2)
    from scipy.stats import ttest_1samp

    ref = ttest_1samp([0.75, -1.0], 0.0).confidence_interval(0.95)
    assert d["ci"] == pytest.approx([ref.low, ref.high], rel=1e-12)


def test_identity_specificity_on_a_hand_made_matrix():
    # rows: videos; columns: the clip whose reference they are scored against
    sim = np.array([[0.9, 0.2, 0.1],
                    [0.3, 0.8, np.nan],   # a clip the judge could not score is left out
                    [0.4, 0.4, 0.4],
                    [np.nan, 0.5, 0.1]])  # own score missing: no specificity
    got = identity_specificity(sim, [0, 1, 2, 0])
    np.testing.assert_allclose(got[:3], [0.9 - 0.15, 0.8 - 0.3, 0.0], rtol=1e-12)
    assert np.isnan(got[3])


# --------------------------------------------------------------------------- generate and evaluate, end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir, small_dataset, face_assets):  # noqa: F811
    """A one-step training run on the two real clips: its config, checkpoint-1 and final/."""
    root = tmp_path_factory.mktemp("trained")
    raw = {
        "model_name": "wan2_2_tiny", "model_paths": os.path.join(tiny_dir, "model_paths.json"),
        "reward_model_path": face_assets.scrfd_sface, "lora_rank": 4, "mixed_precision": "fp32", "device": "cpu",
        "num_inference_steps": 4, "mid_timestep": 2, "final_timestep": 3, "learning_rate": 2e-2,
        "warmup_steps": 0, "max_steps": 1, "save_steps": 1, "seed": 3, "output_dir": str(root / "out"),
        "reward": {"name": "face_identity", "landmark_fallback": True, "det_size": 160,
                   "reference_cache_dir": str(root / "refcache")},
        "data": {"metadata_path": small_dataset, "num_frames": 5, "height": 64, "width": 64,
                 "eval_metadata_path": small_dataset},
        "eval": {"judges": [{"name": "face_identity", "label": "face_strict", "det_size": 160,
                             "reference_cache_dir": "none"}], "seeds": 1},
    }
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert run.main([str(config)]) == 0
    out = root / "out"
    return {"config": str(config), "checkpoint": str(out / "checkpoints" / "checkpoint-1"), "final": str(out / "final"),
            "root": root}


def _decoded(path):
    """The frames of an mp4 as written, ``(F, H, W, 3)`` uint8 (ffmpeg)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    w, h = next(reader)["size"]
    return np.stack([np.frombuffer(raw, np.uint8).reshape(h, w, 3) for raw in reader])


def test_generate_is_bit_identical_and_reads_checkpoints_and_exports(trained, capsys):
    full_csv = load_config(trained["config"]).data.eval_metadata_path
    one_clip = os.path.join(os.path.dirname(full_csv), "one_clip.csv")  # beside it: paths are relative to it
    with open(full_csv, encoding="utf-8") as f:
        header, first = f.read().splitlines()[:2]
    with open(one_clip, "w", encoding="utf-8") as f:
        f.write(f"{header}\n{first}\n")
    out = {}
    for name, ckpt in (("a", trained["checkpoint"]), ("b", trained["checkpoint"]), ("final", trained["final"])):
        out[name] = str(trained["root"] / f"gen-{name}")
        seeds = "0,1" if name in ("a", "b") else "1"
        assert generate_cli.main([trained["config"], "--checkpoint", ckpt, "--metadata", one_clip, "--out", out[name],
                                  "--seeds", seeds, "--batch-size", "2"]) == 0
    index = json.load(open(os.path.join(out["a"], "index.json")))
    assert index["num_inference_steps"] == 4 and index["dtype"] == "float32" and len(index["videos"]) == 2
    assert [v["seed"] for v in index["videos"]] == [0, 1]
    for v in index["videos"]:
        a, b = _decoded(os.path.join(out["a"], v["video"])), _decoded(os.path.join(out["b"], v["video"]))
        assert a.shape == (5, 64, 64, 3) and np.array_equal(a, b)  # same checkpoint, seed, device: identical
        if v["seed"] != 1:
            continue
        final = _decoded(os.path.join(out["final"], v["video"]))
        assert np.abs(a.astype(int) - final).max() <= 2  # the export is the same LoRA (scale folded in and out)
    seeds = [v for v in index["videos"] if v["sample_id"] == index["videos"][0]["sample_id"]]
    assert not np.array_equal(_decoded(os.path.join(out["a"], seeds[0]["video"])),
                              _decoded(os.path.join(out["a"], seeds[1]["video"])))  # seeds differ


def test_generate_refuses_a_checkpoint_of_another_model_in_one_line(trained, capsys):
    code = generate_cli.main([trained["config"], "--checkpoint", trained["checkpoint"], "--out",
                              str(trained["root"] / "gen-wrong"), "--set", "lora_rank=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.match(r"rewardfl\.generate: error: --checkpoint .*checkpoint-1: does not match the model: expert dit2, "
                    r"first mismatching key dit2\.\S+lora_A\.weight \(shape \(4, \d+\) in the checkpoint, \(8, \d+\) in "
                    r"the model", err[0]), err[0]
    code = generate_cli.main([trained["config"], "--checkpoint", str(trained["root"] / "nope"), "--out",
                              str(trained["root"] / "gen-wrong")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rewardfl.generate: error: --checkpoint "), err


def test_generate_from_one_image_and_prompt(trained, face_assets):
    out = str(trained["root"] / "gen-image")
    exported = os.path.join(trained["final"], "trainable_low_noise.safetensors")  # one exported file
    assert generate_cli.main([trained["config"], "--checkpoint", exported, "--image",
                              face_assets.photos["person_a_1"], "--prompt", "a face", "--out", out]) == 0
    (video,) = json.load(open(os.path.join(out, "index.json")))["videos"]
    assert video["prompt"] == "a face" and video["seed"] == 0
    assert _decoded(os.path.join(out, video["video"])).shape == (5, 64, 64, 3)


def test_evaluate_writes_metrics_table_and_contact_sheets(trained, capsys):
    out = str(trained["root"] / "eval")
    assert evaluate_cli.main([trained["config"], "--checkpoint", trained["checkpoint"], "--out", out]) == 0
    printed = capsys.readouterr().out
    result = json.load(open(os.path.join(out, "eval.json")))
    assert [c["label"] for c in result["checkpoints"]] == ["base", "checkpoint-1"]
    rows = result["videos"]
    assert len(rows) == 2 * 2 * 1  # checkpoints x clips x seeds
    metrics = {"reward_score", "motion", "first_frame_psnr", "judge/face_strict/score",
               "judge/face_strict/facesim_arc", "judge/face_strict/specificity"}
    assert metrics <= set(result["summary"])
    for metric in ("motion", "first_frame_psnr"):
        for label in ("base", "checkpoint-1"):
            values = [r[metric] for r in rows if r["checkpoint"] == label]
            entry = result["summary"][metric][label]
            assert entry["mean"] == pytest.approx(np.mean(values), rel=1e-12) and entry["n"] == 2
            assert entry["n_clips"] == 2  # one seed per clip: a t interval over the 2 values, 1 df
            from scipy.stats import ttest_1samp

            ref = ttest_1samp(values, 0.0).confidence_interval(0.95)
            assert entry["ci"] == pytest.approx([ref.low, ref.high], rel=1e-9)
        base = [r[metric] for r in rows if r["checkpoint"] == "base"]
        assert base != [r[metric] for r in rows if r["checkpoint"] == "checkpoint-1"]  # the trained LoRA acts
        trained_values = [r[metric] for r in rows if r["checkpoint"] == "checkpoint-1"]
        diff = result["summary"][metric]["checkpoint-1"]["diff_to_base"]
        assert diff["mean"] == pytest.approx(np.mean(np.subtract(trained_values, base)), rel=1e-9, abs=1e-12)
    # the reference clips' motion by hand (float64 numpy on the decoded clips)
    ds = VideoDataset(load_config(trained["config"]).data.eval_metadata_path, num_frames=5, max_pixels=4096,
                      height=64, width=64)
    for i in range(len(ds)):
        clip = (ds[i]["video"].double().numpy() + 1) / 2
        assert result["reference"]["motion_per_clip"][ds[i]["sample_id"]] == pytest.approx(
            np.abs(np.diff(clip, axis=0)).mean(), rel=1e-9)
    table = open(os.path.join(out, "eval.md")).read()
    assert table in printed and "| metric | base | checkpoint-1 | checkpoint-1 - base |" in table
    assert "| reward_score |" in table and "| first_frame_psnr |" in table
    # the clips behind every interval, and why nothing is called beyond one with 2 held-out clips
    assert "(2 clips)" in table and "No difference is called beyond its interval" in table
    assert result["interval"]["min_clips_for_claim"] == 5 and result["warnings"] == []
    from PIL import Image

    sheets = sorted(os.listdir(os.path.join(out, "contact_sheets")))
    assert len(sheets) == 2
    with Image.open(os.path.join(out, "contact_sheets", sheets[0])) as im:
        assert im.size == (96 + 4 * 66, 3 * 66)  # label + 4 frames; reference, base, checkpoint-1


def test_evaluate_judge_option_errors_name_the_judge_key_before_the_model_loads(trained, capsys):
    code = evaluate_cli.main([trained["config"], "--set", "eval.judges=[{name: face_identity, det_sise: 3}]",
                              "--out", str(trained["root"] / "eval-wrong")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["rewardfl.evaluate: error: unknown key 'eval.judges[0].det_sise' (did you mean "
                                 "'det_size'?); see docs/configuration.md"], err


# --------------------------------------------------------------------------- refusals before any work (issue 28)


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: a refusal must come before the model loads (minutes on Wan2.2)."""
    from rewardfl.models.wan.model import Wan22TinyModel

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(Wan22TinyModel, "__init__", built)


def _one_line(capsys, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def _tree(path):
    return sorted(os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names)


def test_generate_and_evaluate_refuse_an_out_inside_a_checkpoint_final_or_best(trained, capsys, no_model):
    from rewardfl.checkpoints import verified_checkpoint

    out_dir = os.path.dirname(trained["final"])
    before = {p: _tree(p) for p in (trained["checkpoint"], trained["final"])}
    for target in (trained["checkpoint"], os.path.join(trained["checkpoint"], "videos"), trained["final"],
                   os.path.join(out_dir, "checkpoints"), os.path.join(out_dir, "best", "x")):
        code = generate_cli.main([trained["config"], "--checkpoint", trained["checkpoint"], "--out", target])
        line = _one_line(capsys, "rewardfl.generate")
        assert code == 2 and f"--out: {target} is inside " in line and "choose a directory outside it" in line, line
        code = evaluate_cli.main([trained["config"], "--checkpoint", trained["checkpoint"], "--out", target])
        line = _one_line(capsys, "rewardfl.evaluate")
        assert code == 2 and f"--out: {target} is inside " in line, line
    assert {p: _tree(p) for p in before} == before  # nothing written into them
    assert not os.path.exists(os.path.join(out_dir, "best"))
    assert verified_checkpoint(trained["checkpoint"]) == trained["checkpoint"]  # a resume still takes it


def test_an_out_that_is_a_file_is_refused_before_the_model_loads(trained, capsys, no_model):
    existing = trained["root"] / "notes.txt"
    existing.write_text("mine")
    for cli, prog in ((generate_cli, "rewardfl.generate"), (evaluate_cli, "rewardfl.evaluate")):
        code = cli.main([trained["config"], "--checkpoint", trained["checkpoint"], "--out", str(existing)])
        assert code == 2 and _one_line(capsys, prog).endswith(
            f"--out: {existing} is an existing file; give a directory (it is created if missing)")
    assert existing.read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_garbage_export_is_one_line_before_the_model_loads(trained, capsys, no_model, damage):
    good = open(os.path.join(trained["final"], "trainable_low_noise.safetensors"), "rb").read()
    bad = trained["root"] / f"{damage}.safetensors"
    bad.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"not a safetensors file" * 8)
    for cli, prog, extra in ((generate_cli, "rewardfl.generate", ["--out", str(trained["root"] / "gen-bad")]),
                             (evaluate_cli, "rewardfl.evaluate", ["--out", str(trained["root"] / "eval-bad")])):
        code = cli.main([trained["config"], "--checkpoint", str(bad), *extra])
        line = _one_line(capsys, prog)
        assert code == 2 and f"--checkpoint {bad}: {bad} is not a readable safetensors file" in line, line


def test_evaluate_checks_every_checkpoint_fits_before_generating_the_base(trained, capsys, monkeypatch):
    from safetensors import safe_open

    from rewardfl.evaluation.evaluation import Evaluation
    from rewardfl.fileio import write_safetensors

    exported = os.path.join(trained["final"], "trainable_low_noise.safetensors")
    with safe_open(exported, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for key, value in list(tensors.items()):  # one more rank than the model's: every A and B of the file
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.zeros(value.shape[0] + 1, value.shape[1])
        elif key.endswith("lora_B.weight"):
            tensors[key] = torch.zeros(value.shape[0], value.shape[1] + 1)
    wrong = str(trained["root"] / "wrong_rank.safetensors")
    write_safetensors(wrong, tensors, metadata=meta)

    def generated(*args, **kwargs):
        raise AssertionError("the base was generated before every checkpoint was checked")

    monkeypatch.setattr(Evaluation, "generate", generated)
    code = evaluate_cli.main([trained["config"], "--checkpoint", trained["checkpoint"], "--checkpoint", wrong,
                              "--out", str(trained["root"] / "eval-wrong-rank")])
    line = _one_line(capsys, "rewardfl.evaluate")
    assert code == 2 and f"--checkpoint {wrong}: does not match the model" in line, line


def test_generate_refuses_a_seed_given_twice(trained, capsys, no_model):
    code = generate_cli.main([trained["config"], "--checkpoint", "base", "--seeds", "0,0,1,0",
                              "--out", str(trained["root"] / "gen-seeds")])
    assert code == 2 and _one_line(capsys, "rewardfl.generate").endswith(
        "--seeds: 0 given more than once in '0,0,1,0'; list each seed once")


GENERATE_ON_A_FULL_DISK = """
import json, os, sys
sys.path.insert(0, sys.argv[5])
import imageio_ffmpeg
from full_disk import fill_disk
from rewardfl import generate
config, checkpoint, disk, leave = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
filler = fill_disk(disk, leave)
code = generate.main([config, "--checkpoint", checkpoint, "--seeds", "0,1", "--out", disk + "/gen"])
os.unlink(filler)  # the files as the failed command left them, read back while the tmpfs exists
left = {}
for name in sorted(os.listdir(disk + "/gen")) if os.path.isdir(disk + "/gen") else []:
    try:
        left[name] = imageio_ffmpeg.count_frames_and_secs(disk + "/gen/" + name)[0] if name.endswith(".mp4") else 0
    except RuntimeError:
        left[name] = -1
print("LEFT " + json.dumps(left))
sys.exit(code)
"""


@pytest.mark.parametrize("leave", [0, 24 * 1024])
def test_generate_onto_a_full_disk_leaves_no_truncated_video_and_names_the_file(trained, tmp_path, leave):
    """ffmpeg meets a real ENOSPC (a full tmpfs): before, imageio did not raise and truncated or empty
    mp4s were renamed to their final names, and index.json's error said "(path unknown)"."""
    from full_disk import on_a_full_tmpfs

    disk = tmp_path / "disk"
    proc = on_a_full_tmpfs(tmp_path, ["-c", GENERATE_ON_A_FULL_DISK, trained["config"], trained["checkpoint"],
                                      str(disk), str(leave), os.path.dirname(os.path.abspath(__file__))])
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("rewardfl.generate")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    m = re.fullmatch(rf"rewardfl\.generate: error: ({re.escape(str(disk))}/gen/\S+): no space left on device "
                     r"\((\d+(\.\d)? (B|KiB|MiB|GiB)) free there\); free some space or write elsewhere", err[0])
    assert m, err[0]
    assert m.group(1).endswith((".mp4", "index.json"))  # the file, on the full disk, not "(path unknown)"
    left = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("LEFT "))[5:])
    assert "index.json" not in left and not [n for n in left if n.startswith(".")], left  # no temporary file left
    assert all(frames == 5 for frames in left.values()), left  # every video under its name is whole


def test_an_out_under_a_folder_merely_named_checkpoints_is_allowed(tmp_path):
    """Only a run's own checkpoints/, final/ and best/ are refused, not any folder with such a name."""
    from rewardfl.training.outputs import check_command_output

    mine = tmp_path / "checkpoints" / "run1" / "videos"
    (tmp_path / "final").mkdir()
    assert check_command_output(str(mine)) == str(mine)
    assert check_command_output(str(tmp_path / "final" / "gen")) == str(tmp_path / "final" / "gen")
    (tmp_path / "metrics.jsonl").write_text("")  # now tmp_path is a run's output_dir
    with pytest.raises(ValueError, match="is inside a training run's final/"):
        check_command_output(str(tmp_path / "final" / "gen"))
