"""Checkpoints a user is handed, or that a crash or a full disk left behind.

* Security: a crafted pickle in any file a resume reads (plain and DeepSpeed) is refused with
  one line, and the code in it never runs.
* Integrity: a damaged newest checkpoint is skipped (one warning) for the newest that verifies;
  an explicit path that does not verify, or an older unverifiable checkpoint that fails to load,
  is one line.
* A failed write while saving (a full disk) is one line with the path and the free space; the
  temporary directory goes, the previous checkpoint stays.

The real demo-scale Trainer on the tiny Wan twin; its updates come from real AdamW steps on
given gradients (the reward's rollout is not what these tests are about, and costs 20 s a step).
The DeepSpeed cases run this file as a script in a child process (one process, gloo).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from full_disk import fill_disk, on_a_full_tmpfs
from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import run
from rewardfl import checkpoints as checkpoint
from rewardfl.checkpoints import (CheckpointError, latest_checkpoint, load_rng, save_rng, verified_checkpoint,
                                 write_manifest)
from rewardfl.config import load_config
from rewardfl.registry import resolve_plugins
from rewardfl.training import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN_FILES = ["manifest.json", "optimizer.pt", "rng-0.safetensors", "scheduler.pt", "state.json",
               "trainable.safetensors"]


class WritesMarker:
    """A pickle payload: unpickling it creates the file ``path`` (a real attack would run a shell)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(ckpt: str, name: str, marker: str) -> str:
    """Replace ``ckpt/name`` by a crafted pickle and re-write the manifest to match, as an attacker
    can: the checksums guard against damage, not against whoever hands over the directory."""
    path = os.path.join(ckpt, name)
    torch.save({"state": WritesMarker(marker)}, path)
    write_manifest(ckpt)
    return path


def assert_payload_is_live(path: str, marker: str) -> None:
    """The planted file does run code when unpickled the unsafe way: the test above could fail."""
    assert not os.path.exists(marker)
    copy = shutil.copy(path, os.path.join(os.path.dirname(marker), "payload.pt"))  # torch.load reads *.safetensors itself
    torch.load(copy, weights_only=False)
    assert os.path.exists(marker)
    os.remove(marker)


def update(trainer: Trainer, seed: int) -> None:
    """One real optimizer step of the trainer's engine on deterministic gradients."""
    g = torch.Generator().manual_seed(seed)
    for p in trainer.params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    trainer.engine.step()


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in trainer.model.trainable_state_dict().items()}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory):
    """An output_dir with checkpoints 1 and 2 of a real Trainer, filled once per module by ``saved``."""
    return {"dir": str(tmp_path_factory.mktemp("pristine") / "out")}


@pytest.fixture
def saved(pristine_run, make_config, tmp_path):
    """A copy of the pristine run for this test: ``(output_dir, weights after step 1, weights after step 2)``."""
    if "weights" not in pristine_run:
        cfg = load_config(make_config(output_dir=pristine_run["dir"]))
        trainer = Trainer(cfg, resolve_plugins(cfg))
        weights = []
        for step in (1, 2):
            update(trainer, seed=step)
            trainer.state.step = trainer.state.position = step
            trainer.save()
            weights.append(trainable(trainer))
        pristine_run["weights"] = weights
    out = str(tmp_path / "run")
    shutil.copytree(pristine_run["dir"], out)
    return out, *pristine_run["weights"]


def resuming_trainer(make_config, output_dir: str, resume) -> Trainer:
    cfg = load_config(make_config(output_dir=output_dir))
    cfg = dataclasses.replace(cfg, resume_from_checkpoint=resume)
    return Trainer(cfg, resolve_plugins(cfg))


# --------------------------------------------------------------------------- the format


def test_checkpoint_holds_no_pickle_of_rng_and_a_manifest_of_every_file(saved):
    out, _, _ = saved
    ckpt = os.path.join(out, "checkpoints", "checkpoint-2")
    assert sorted(os.listdir(ckpt)) == PLAIN_FILES
    with open(os.path.join(ckpt, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)["files"]
    assert sorted(manifest) == [n for n in PLAIN_FILES if n != "manifest.json"]
    for name, entry in manifest.items():  # hashlib over the bytes on disk, independently of the writer
        assert entry == {"bytes": os.path.getsize(os.path.join(ckpt, name)),
                         "sha256": sha256(os.path.join(ckpt, name))}


def test_rng_states_round_trip_through_safetensors(tmp_path):
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    random.gauss(0, 1), np.random.standard_normal()  # the cached second gaussians are state too
    save_rng(str(tmp_path), rank=0)
    want = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_rng(str(tmp_path), rank=0)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert got == want
    with open(tmp_path / "rng-0.safetensors", "rb") as f:  # a JSON header and raw bytes, no pickle opcodes
        header_len = int.from_bytes(f.read(8), "little")
        json.loads(f.read(header_len))


# --------------------------------------------------------------------------- security


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng-0.safetensors", "rng-0.pt",
                                  "trainable.safetensors", "state.json"])
def test_crafted_pickle_in_a_checkpoint_is_refused_in_one_line_and_never_runs(saved, make_config, tmp_path,
                                                                               capsys, name):
    out, _, _ = saved
    ckpt = os.path.join(out, "checkpoints", "checkpoint-2")
    marker = str(tmp_path / "marker")
    if name == "rng-0.pt":  # an older rewardfl's RNG file: read only when no safetensors one is there
        os.remove(os.path.join(ckpt, "rng-0.safetensors"))
    path = plant(ckpt, name, marker)
    cfg = make_config(output_dir=out, resume_from_checkpoint=ckpt)
    assert run.main([cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rewardfl.run: error: "), err
    assert path in err[0]
    assert not os.path.exists(marker)
    assert_payload_is_live(path, marker)


# --------------------------------------------------------------------------- damaged checkpoints


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def garbage(path):
    with open(path, "wb") as f:
        f.write(os.urandom(os.path.getsize(path)))


def bad_json(path):
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"step": 2, "epo')


DAMAGE = {"trainable.safetensors": truncate, "rng-0.safetensors": garbage, "optimizer.pt": garbage,
          "state.json": bad_json, "scheduler.pt": os.remove}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_for_the_newest_that_verifies(saved, make_config, caplog, name):
    out, step1, _ = saved
    ckpts = os.path.join(out, "checkpoints")
    DAMAGE[name](os.path.join(ckpts, "checkpoint-2", name))
    trainer = resuming_trainer(make_config, out, True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewardfl"):
        path = trainer.maybe_resume()
    assert path == os.path.join(ckpts, "checkpoint-1")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "skipped checkpoint-2" in warnings[0] and name in warnings[0]
    assert trainer.state.step == 1 and trainer.state.position == 1
    for k, v in trainable(trainer).items():
        assert torch.equal(v, step1[k]), k
    assert len(trainer.engine.optimizer.state) == len(trainer.params)  # AdamW moments came back too

    # named explicitly, the same checkpoint is an error, not a silent substitute
    with pytest.raises(CheckpointError) as e:
        verified_checkpoint(os.path.join(ckpts, "checkpoint-2"))
    assert "\n" not in str(e.value) and "checkpoint-2" in str(e.value) and name in str(e.value)


def test_no_checkpoint_that_verifies_is_one_line(saved):
    out, _, _ = saved
    ckpts = os.path.join(out, "checkpoints")
    for step in (1, 2):
        truncate(os.path.join(ckpts, f"checkpoint-{step}", "trainable.safetensors"))
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies") as e:
        latest_checkpoint(ckpts)
    assert "\n" not in str(e.value)


def test_checkpoint_without_manifest_loads_unverified_and_fails_in_one_line(saved, make_config, tmp_path, capsys):
    out, _, step2 = saved
    ckpt = os.path.join(out, "checkpoints", "checkpoint-2")
    # as an older rewardfl wrote it: no manifest, the RNG states pickled
    os.remove(os.path.join(ckpt, "manifest.json"))
    os.remove(os.path.join(ckpt, "rng-0.safetensors"))
    torch.manual_seed(5)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               os.path.join(ckpt, "rng-0.pt"))
    want = torch.rand(4)
    trainer = resuming_trainer(make_config, out, True)
    torch.manual_seed(6)
    assert trainer.maybe_resume() == ckpt
    assert torch.equal(torch.rand(4), want)
    assert all(torch.equal(v, step2[k]) for k, v in trainable(trainer).items())

    truncate(os.path.join(ckpt, "trainable.safetensors"))
    assert run.main([make_config(output_dir=out, resume_from_checkpoint=True)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and os.path.join(ckpt, "trainable.safetensors") in err[0], err


# --------------------------------------------------------------------------- a full disk


def enospc_after_half(real_write, target: str):
    """A writer that puts half of ``target``'s bytes on disk and then fails as a full disk does."""

    def write(obj, path, *args, **kwargs):
        real_write(obj, path, *args, **kwargs)
        if os.path.basename(str(path)) == target:
            truncate(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return write


@pytest.mark.parametrize("leave", ["none", "half"])
def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(saved, make_config, tmp_path, leave):
    """A real full disk (a tmpfs) during a save: torch's writer raises RuntimeError, safetensors its own
    error; one line naming the file and the free space, exit 2, no partial .checkpoint-N.tmp left."""
    out, _, _ = saved
    size = sum(os.path.getsize(os.path.join(out, "checkpoints", "checkpoint-2", n)) for n in PLAIN_FILES)
    report = tmp_path / "report.json"
    proc = on_a_full_tmpfs(tmp_path, [os.path.abspath(__file__), "full-disk", make_config(output_dir="UNUSED"), out,
                                      str(tmp_path / "disk"), str(0 if leave == "none" else size // 2), str(report)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(report.read_text())
    ckpts = os.path.join(str(tmp_path / "disk"), "run", "checkpoints")
    assert got["exit"] == 2
    assert len(got["stderr"]) == 1, got["stderr"]
    line = got["stderr"][0]
    assert line.startswith("rewardfl.run: error: checkpoint: could not write "), line
    assert re.search(rf"could not write {re.escape(ckpts)}/\.checkpoint-3\.tmp/\S+: No space left on device", line), line
    assert re.search(rf"\(\d+(\.\d)? (B|KiB|MiB|GiB) free in {re.escape(ckpts)}\)", line), line
    assert got["left"] == ["checkpoint-1", "checkpoint-2"]  # the partial temporary directory is gone
    assert got["intact"] is True and got["latest"] == "checkpoint-2"
    assert got["after_freeing"] == "checkpoint-3"  # space freed: the next save goes through


def full_disk_worker(cfg_path: str, pristine: str, disk: str, leave: int, report_path: str) -> None:
    """Child of the test above, inside its mount namespace: resume a copy of ``pristine`` on the tmpfs
    ``disk``, fill the disk to ``leave`` free bytes, save through the command line's error handling."""
    import contextlib
    import io

    from rewardfl.cli import user_error_exit

    out = shutil.copytree(pristine, os.path.join(disk, "run"))
    ckpts = os.path.join(out, "checkpoints")
    before = {n: sha256(os.path.join(ckpts, "checkpoint-2", n)) for n in PLAIN_FILES}
    cfg = dataclasses.replace(load_config(cfg_path), output_dir=out, resume_from_checkpoint=True)
    trainer = Trainer(cfg, resolve_plugins(cfg))
    trainer.maybe_resume()
    update(trainer, seed=3)
    trainer.state.step = 3
    filler = fill_disk(disk, leave)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = user_error_exit("rewardfl.run")(lambda argv: trainer.save() and 0)(None)
    report = {"exit": code, "stderr": stderr.getvalue().strip().splitlines(), "left": sorted(os.listdir(ckpts)),
              "intact": {n: sha256(os.path.join(ckpts, "checkpoint-2", n)) for n in PLAIN_FILES} == before,
              "latest": os.path.basename(latest_checkpoint(ckpts))}
    os.unlink(filler)
    report["after_freeing"] = os.path.basename(trainer.save())
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f)


# --------------------------------------------------------------------------- DeepSpeed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_checkpoints_load_weights_only_and_refuse_crafted_pickles(make_config, tmp_path):
    pytest.importorskip("deepspeed")
    cfg = make_config(deepspeed={"zero_optimization": {"stage": 2}}, output_dir=str(tmp_path / "out"))
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), cfg, str(report)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(report.read_text())
    assert "deepspeed/mp_rank_00_model_states.pt" in got["manifest"]
    assert "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt" in got["manifest"]
    assert got["resumed"] == {"weights_equal": True, "weights_moved": True, "global_steps": 1}
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        case = got["crafted"][name]
        assert case["error"] is not None and "\n" not in case["error"], case
        assert name in case["error"] and "refused to load" in case["error"]
        assert case["marker"] is False
    assert got["unsafe_load_runs_payload"] is True
    full = got["full_disk"]
    assert "\n" not in full["error"] and "free in" in full["error"] and full["left"] == ["checkpoint-1"]


def deepspeed_worker(cfg_path: str, report_path: str) -> None:
    """One DeepSpeed process (ZeRO-2): save, resume, crafted files, a full disk; results as JSON."""
    from rewardfl.runtime import init_distributed

    cfg = load_config(cfg_path)
    dist = init_distributed(cfg)
    plugins = resolve_plugins(cfg)
    trainer = Trainer(cfg, plugins, dist=dist)
    trainer.engine.backward(sum((p.float() ** 2).sum() for p in trainer.params), 1)  # one real ZeRO update
    trainer.state.step = 1
    ckpt = trainer.save()
    with open(os.path.join(ckpt, "manifest.json"), encoding="utf-8") as f:
        report = {"manifest": sorted(json.load(f)["files"])}

    resumed = Trainer(dataclasses.replace(cfg, resume_from_checkpoint=ckpt), plugins, dist=dist)
    fresh = trainable(resumed)
    resumed.maybe_resume()
    report["resumed"] = {"weights_equal": all(torch.equal(v, trainable(trainer)[k])
                                              for k, v in trainable(resumed).items()),
                         "weights_moved": any(not torch.equal(v, fresh[k]) for k, v in trainable(resumed).items()),
                         "global_steps": resumed.engine.engine.global_steps}

    report["crafted"] = {}
    work = os.path.dirname(report_path)
    for i, name in enumerate(["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]):
        copy = shutil.copytree(ckpt, os.path.join(work, f"crafted-{i}"))
        marker = os.path.join(work, f"marker-{i}")
        path = plant(copy, os.path.join("deepspeed", name), marker)
        victim = Trainer(dataclasses.replace(cfg, resume_from_checkpoint=copy), plugins, dist=dist)
        try:
            victim.maybe_resume()
            error = None
        except CheckpointError as e:
            error = str(e)
        report["crafted"][name] = {"error": error, "marker": os.path.exists(marker)}
    torch.load(path, weights_only=False)
    report["unsafe_load_runs_payload"] = os.path.exists(marker)

    trainer.state.step = 2
    torch.save = enospc_after_half(torch.save, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    try:
        trainer.save()
        error = None
    except CheckpointError as e:
        error = str(e)
    report["full_disk"] = {"error": error, "left": sorted(os.listdir(trainer.ckpt_dir))}
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "full-disk":
        full_disk_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        deepspeed_worker(sys.argv[1], sys.argv[2])
