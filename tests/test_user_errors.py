"""User errors on the command-line tools: one line ``rewardfl.<tool>: error: ...``, exit code 2.

Each case is one a black-box probe of the tools hit (a traceback, a destroyed input, NaN weights
written, a message that named nothing). The tools run through their real ``main(argv)`` on real
files; one case runs in a real process to see the exit code ``python -m`` gives.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from wan_fixtures import build_tiny, perturb_lora, tiny_dir  # noqa: F401

torch.set_num_threads(min(2, torch.get_num_threads()))


def _one_line(capsys, prog: str) -> str:
    """The message of a ``prog: error: ...`` line, asserting it is all of stderr (no traceback)."""
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err[len(f"{prog}: error: "):].strip()


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def lora_file(tiny_dir, tmp_path_factory):  # noqa: F811
    model = build_tiny(tiny_dir, lora_rank=4)
    perturb_lora(model, seed=5)
    (path,) = model.save_trainable(str(tmp_path_factory.mktemp("lora") / "lora.safetensors"))
    return path


@pytest.fixture
def model_copy(tiny_dir, tmp_path):  # noqa: F811
    """A private copy of the tiny model: a test that overwrote an input must not break the others."""
    folder = str(tmp_path / "wan_tiny")
    shutil.copytree(tiny_dir, folder)
    return folder


@pytest.mark.parametrize("target", ["model_paths.json", "lora", "listed_dit", "symlink_to_listed_vae", "config"])
def test_export_refuses_an_output_that_is_an_input(model_copy, lora_file, tmp_path, capsys, target):
    from rewardfl.models.wan.export import main

    paths_json = os.path.join(model_copy, "model_paths.json")
    lora = str(tmp_path / "lora.safetensors")
    shutil.copyfile(lora_file, lora)
    src = ["--model-paths", paths_json]
    if target == "config":
        cfg = tmp_path / "train.yaml"
        cfg.write_text(f"model_paths: {paths_json}\n")
        src, out, victim = ["--config", str(cfg)], str(cfg), str(cfg)
    elif target == "model_paths.json":
        out = victim = paths_json
    elif target == "lora":
        out = victim = lora
    elif target == "listed_dit":  # the expert being merged, spelled with a detour through ".."
        victim = os.path.join(model_copy, "dit_low_noise.safetensors")
        out = os.path.join(model_copy, "..", "wan_tiny", "dit_low_noise.safetensors")
    else:  # another file the JSON lists, reached through a symlink
        victim = os.path.join(model_copy, "vae.safetensors")
        out = str(tmp_path / "link.safetensors")
        os.symlink(victim, out)
    before = _sha(victim)
    assert main(["--merge", *src, "--lora", lora, "--out", out]) == 2
    message = _one_line(capsys, "rewardfl.models.wan.export")
    assert message.startswith(f"--out: {out} is ") and "replace an input" in message, message
    assert _sha(victim) == before
    assert not os.path.exists(out + ".tmp")


KILLED_WHILE_WRITING = """
import os, sys, time
import rewardfl.fileio as fileio

def fsync(fd):  # the merged expert is all in its temporary file: say so, and wait to be killed
    print("WRITTEN", flush=True)
    time.sleep(600)

fileio.os.fsync = fsync
from rewardfl.models.wan.export import main
main(sys.argv[1:])
"""


def test_a_merge_killed_before_its_rename_leaves_nothing_the_next_one_does_not_clean(model_copy, lora_file, tmp_path,
                                                                                     capsys):
    """kill -9 once the merged expert is written but not yet renamed (a 28 GB hidden file for a 14B
    expert): the next merge to that --out removes it; an existing --out is replaced only with --force."""
    from rewardfl.models.wan.export import main

    out = str(tmp_path / "merged.safetensors")
    paths_json = os.path.join(model_copy, "model_paths.json")
    child = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_WRITING, "--merge", "--model-paths", paths_json,
                              "--lora", lora_file, "--out", out], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in child.stdout:  # other libraries may log to stdout first
        lines.append(line)
        if line.strip() == "WRITTEN":
            break
    assert lines and lines[-1].strip() == "WRITTEN", lines
    child.kill()
    child.wait()
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".merged.safetensors.")]
    assert leftovers == [f".merged.safetensors.{child.pid}.tmp"] and not os.path.exists(out)
    assert main(["--merge", "--model-paths", paths_json, "--lora", lora_file, "--out", out]) == 0
    assert [n for n in os.listdir(tmp_path) if n.startswith(".merged")] == []  # the killed one's file is gone
    merged = _sha(out)
    # an existing --out (here the previous merge; in the probe, an unrelated file) is not silently replaced
    assert main(["--merge", "--model-paths", paths_json, "--lora", lora_file, "--out", out, "--alpha", "0.5"]) == 2
    assert _one_line(capsys, "rewardfl.models.wan.export") == (f"--out: {out} exists; give --force to replace it, "
                                                               "or choose another path")
    assert _sha(out) == merged
    assert main(["--merge", "--model-paths", paths_json, "--lora", lora_file, "--out", out, "--alpha", "0.5",
                 "--force"]) == 0
    assert _sha(out) != merged
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"mine")
    assert main(["--to", "diffusers", "--lora", lora_file, "--out", str(notes)]) == 2
    assert "exists; give --force" in _one_line(capsys, "rewardfl.models.wan.export") and notes.read_bytes() == b"mine"


def test_export_refuses_a_directory_as_output(model_copy, lora_file, tmp_path, capsys):
    from rewardfl.models.wan.export import main

    out = tmp_path / "exports"
    out.mkdir()
    assert main(["--merge", "--model-paths", os.path.join(model_copy, "model_paths.json"), "--lora", lora_file,
                 "--out", str(out)]) == 2
    message = _one_line(capsys, "rewardfl.models.wan.export")
    assert message.startswith(f"--out: {out} is a directory; give a file path")
    assert os.listdir(out) == [] and not os.path.exists(f"{out}.tmp")


@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
def test_export_rejects_a_non_finite_alpha(model_copy, lora_file, tmp_path, capsys, alpha):
    from rewardfl.models.wan.export import main

    out = tmp_path / "merged.safetensors"
    with pytest.raises(SystemExit) as e:  # argparse's own error: usage line, then the error, exit 2
        main(["--merge", "--model-paths", os.path.join(model_copy, "model_paths.json"), "--lora", lora_file,
              "--out", str(out), f"--alpha={alpha}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == ("python -m rewardfl.models.wan.export: error: argument --alpha: must be a finite "
                                    f"number, got '{alpha}'")
    assert not out.exists()
    from rewardfl.models.wan.export import merge_expert  # the API too: NaN weights are never written

    with pytest.raises(ValueError, match="--alpha: must be a finite number, got nan"):
        merge_expert(os.path.join(model_copy, "model_paths.json"), lora_file, str(out), alpha=float("nan"))


def test_export_to_a_forbidden_place_is_one_line(model_copy, lora_file, capsys):
    """sysfs refuses to create files with EACCES, root or not: a real forbidden output folder."""
    from rewardfl.models.wan.export import main

    try:
        open("/sys/rewardfl_probe", "wb").close()
        os.remove("/sys/rewardfl_probe")
        pytest.skip("this /sys accepts new files")
    except OSError as e:
        if e.errno != errno.EACCES:
            pytest.skip(f"/sys refuses new files with {errno.errorcode.get(e.errno)}, not EACCES")
    out = "/sys/rewardfl_merged.safetensors"
    assert main(["--merge", "--model-paths", os.path.join(model_copy, "model_paths.json"), "--lora", lora_file,
                 "--out", out]) == 2
    assert _one_line(capsys, "rewardfl.models.wan.export") == (f"{out}: permission denied; choose a path you may "
                                                              "write to or fix its permissions")


def test_export_error_in_a_real_process_exits_2(model_copy, lora_file):
    paths_json = os.path.join(model_copy, "model_paths.json")
    proc = subprocess.run([sys.executable, "-m", "rewardfl.models.wan.export", "--merge", "--model-paths", paths_json,
                           "--lora", lora_file, "--out", paths_json], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"rewardfl.models.wan.export: error: --out: {paths_json} is the --model-paths file")


# --------------------------------------------------------------------------- the training config (rewardfl.run)


def _run_main(tmp_path, text: str, *overrides: str) -> int:
    """``python -m rewardfl.run cfg.yaml --check --set ...`` in process."""
    from rewardfl.run import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text, encoding="utf-8")
    return main([str(cfg), "--check", *[a for o in overrides for a in ("--set", o)]])


def test_non_utf8_config_names_file_and_line(tmp_path, capsys):
    from rewardfl.run import main

    cfg = tmp_path / "cfg.yaml"
    # a comment typed in a Latin-1 editor: "é" is the single byte 0xe9
    cfg.write_bytes("learning_rate: 1.0e-5\n# réglages du papier\nseed: 3\n".encode("latin-1"))
    assert main([str(cfg), "--check"]) == 2
    assert _one_line(capsys, "rewardfl.run") == f"{cfg}:2: not UTF-8 text (byte 0xe9); save the config as UTF-8"


@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_seed_outside_numpy_and_torch_range_is_a_config_error(tmp_path, capsys, seed):
    assert _run_main(tmp_path, f"seed: {seed}\n") == 2
    assert _one_line(capsys, "rewardfl.run") == (f"seed: must be an integer in [0, 2**63) (numpy/torch generators), "
                                                 f"got {seed}")


@pytest.mark.parametrize("override, message", [
    # a typed key: --set gives the string 'inf' (YAML reads `inf` as text), and no range check catches inf
    ("max_grad_norm=inf", "max_grad_norm: must be a finite number, got 'inf'"),
    ("adam_epsilon=.nan", "adam_epsilon: must be a finite number, got nan"),  # YAML's own float NaN
    # a plugin option, checked when the plugin's options are built (still before any model loads)
    ("sampler.shift=nan", "sampler.shift: must be a finite number, got 'nan'"),
    ("reward.loss_scale=.inf", "reward.loss_scale: must be a finite number, got inf"),
])
def test_non_finite_numbers_in_run_set_are_rejected(tmp_path, capsys, override, message):
    assert _run_main(tmp_path, "seed: 1\nsampler: flow_match_euler\nreward: face_identity\n", override) == 2
    assert _one_line(capsys, "rewardfl.run") == message


# --------------------------------------------------------------------------- the other tools, and the decorator


def test_every_tool_main_goes_through_user_error_exit():
    import importlib

    for module in ("rewardfl.run", "rewardfl.rewards.face_identity.score", "rewardfl.models.wan.export",
                   "rewardfl.demo.assets", "rewardfl.demo", "rewardfl.plugins"):
        main = importlib.import_module(module).main
        # functools.wraps in user_error_exit leaves the undecorated main here
        assert hasattr(main, "__wrapped__"), f"{module}.main is not wrapped by cli.user_error_exit"


def test_assets_cache_dir_that_is_a_file(tmp_path, capsys):
    from rewardfl.demo.assets import main

    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("x")
    assert main(["fetch", "--cache-dir", str(not_a_folder)]) == 2
    assert _one_line(capsys, "rewardfl.demo.assets") == (f"--cache-dir: {not_a_folder} is a file; give a folder "
                                                         "(created if missing)")


def test_demo_root_that_is_a_file(tmp_path, capsys):
    from rewardfl.demo import main

    not_a_folder = tmp_path / "demo"
    not_a_folder.write_text("x")
    assert main(["--root", str(not_a_folder), "--dataset", str(tmp_path / "data")]) == 2
    assert _one_line(capsys, "rewardfl.demo") == f"--root: {not_a_folder} is a file; give a folder (created if missing)"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_errors_are_one_line_naming_the_path(tmp_path, capsys, code):
    """A full disk cannot be made in a test; the error value is the one the kernel's would be."""
    from rewardfl.cli import user_error_exit

    path = str(tmp_path / "out" / "model.safetensors")

    @user_error_exit("rewardfl.probe")
    def main(argv):
        raise OSError(code, os.strerror(code), path)

    assert main([]) == 2
    message = _one_line(capsys, "rewardfl.probe")
    assert message.startswith(f"{path}: ")
    if code == errno.ENOSPC:
        # free space of the file system the path would be on (its folder does not exist yet)
        st = os.statvfs(str(tmp_path))
        free_gib = st.f_bavail * st.f_frsize / 2**30
        shown = message.split("(")[1].split(" free there")[0]
        number, unit = shown.split()
        scale = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1}[unit]
        assert float(number) * scale == pytest.approx(free_gib, rel=0.05, abs=0.1)
        assert message.startswith(f"{path}: no space left on device (")
    elif code == errno.EROFS:
        assert message == f"{path}: read-only file system; write somewhere writable"


def test_other_os_errors_still_raise():
    """An OSError that is not about where the user writes is a bug or an outage: keep its traceback."""
    from rewardfl.cli import user_error_exit

    @user_error_exit("rewardfl.probe")
    def main(argv):
        raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))

    with pytest.raises(ConnectionResetError):
        main([])
