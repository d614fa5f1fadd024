"""The install: no name of the checkout shadows an installed package, the pins are the ones the
README installs, and a failed import of a dependency is one line that names the package.

Each shadowing test runs Python the way a user does, from a working directory first on
``sys.path`` (``python -m`` and ``python -c`` both put it there), in a real subprocess.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rewardfl import deps
from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _hf_kernels_version() -> str:
    """Hugging Face's ``kernels`` (a transformers dependency, and in rewardfl's dev extra so that
    these tests can never pass for want of it)."""
    return md.version("kernels")


def test_import_kernels_from_the_checkout_root_is_the_installed_distribution():
    version = _hf_kernels_version()
    proc = _python("import kernels; print(kernels.__file__)", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    loaded = Path(proc.stdout.strip()).resolve()
    installed = Path(md.distribution("kernels").locate_file("kernels")).resolve()
    assert installed in loaded.parents, f"kernels {version} was imported from {loaded}, not from {installed}"
    assert loaded.parent != ROOT / "kernels"


def test_peft_and_transformers_import_from_the_checkout_root():
    # the chain that broke the quick start: peft -> transformers.modeling_utils -> kernels
    proc = _python("import peft, transformers.modeling_utils, kernels; print(kernels.CUDAProperties)", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_run_check_of_the_demo_config_passes_from_the_checkout_root():
    if not (ROOT / "data" / "demo" / "wan_tiny" / "model_paths.json").is_file():
        pytest.skip("the demo is not prepared here (python -m rewardfl.demo; CI runs it before the tests)")
    proc = subprocess.run([sys.executable, "-m", "rewardfl.run", "examples/demo.yaml", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "config ok" in proc.stdout


def test_no_top_level_name_of_the_checkout_is_an_installed_package():
    importable = sorted(e.name for e in ROOT.iterdir()
                        if (e.is_dir() and (e / "__init__.py").is_file()) or e.suffix == ".py")
    assert "rewardfl" in importable and "kernels" not in importable, importable
    assert deps.checkout_shadows(ROOT) == {}


def test_the_shadow_check_finds_a_regular_package_named_like_an_installed_one(tmp_path):
    # today's layout before the fix: kernels/ with an __init__.py
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "benchmarks").mkdir()  # a plain folder: a namespace portion, never listed
    (tmp_path / "yaml.py").write_text("")  # a module file shadows too (PyYAML's yaml)
    found = deps.checkout_shadows(tmp_path)
    assert found == {"kernels": ["kernels"], "yaml": ["PyYAML"]}


def test_a_shadowing_folder_is_named_in_one_line(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    code = ("from rewardfl.deps import explain_import_error\n"
            "try:\n    import peft\nexcept Exception as e:\n    print(explain_import_error(e))\n"
            "else:\n    print('no error')\n")
    proc = _python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"the package 'kernels' (kernels {_hf_kernels_version()}, needed by transformers) "
                           f"is shadowed by {tmp_path / 'kernels'}"), line
    assert "\n" not in line


def test_run_stops_with_one_line_when_a_folder_shadows_a_dependency(make_config, tmp_path):  # noqa: F811
    cfg = make_config(max_steps=1)
    work = tmp_path / "work"
    (work / "kernels").mkdir(parents=True)
    (work / "kernels" / "__init__.py").write_text("")
    proc = subprocess.run([sys.executable, "-m", "rewardfl.run", str(cfg)], cwd=work, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("rewardfl.run: error:") and f"is shadowed by {work / 'kernels'}" in lines[-1]


def test_a_missing_extra_names_the_extra_and_the_install_command():
    # Python's own way of making an import fail: a None entry in sys.modules
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "from rewardfl.deps import explain_import_error\n"
            "try:\n    import deepspeed\nexcept ImportError as e:\n    print(explain_import_error(e))\n")
    proc = _python(code, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("the package 'deepspeed' is not installed; it comes with rewardfl's 'deepspeed' "
                                   "extra: pip install -c constraints.txt --no-build-isolation -e \".[deepspeed]\"")


def test_an_api_that_moved_names_the_package_and_its_version():
    code = ("from rewardfl.deps import explain_import_error\n"
            "try:\n    from safetensors import no_such_function\nexcept ImportError as e:\n"
            "    print(explain_import_error(e))\n")
    proc = _python(code, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"importing 'safetensors' failed with safetensors {md.version('safetensors')} installed: "
                           "cannot import name 'no_such_function' from 'safetensors'"), line
    assert line.endswith(f"reinstall with: {deps.INSTALL_COMMAND}")


def test_an_import_error_of_rewardfl_itself_is_not_explained_away():
    try:
        from rewardfl import no_such_module  # noqa: F401
    except ImportError as e:
        assert deps.explain_import_error(e) is None


def test_constraints_pin_exactly_what_is_installed():
    """constraints.txt holds the versions the suite passed with; this environment is installed
    from it (README), unless CI runs with REWARDFL_CI_DEPS=latest on purpose."""
    pins = deps.read_constraints()
    assert pins, "constraints.txt is missing or has no name==version line"
    for name in ("torch", "torchvision", "transformers", "peft", "diffsynth", "kernels", "onnxruntime-gpu"):
        assert name in pins, f"constraints.txt does not pin {name}"
    if os.environ.get("REWARDFL_CI_DEPS") == "latest":
        pytest.skip("installed with the newest releases on purpose (REWARDFL_CI_DEPS=latest)")
    wanted = deps.requirements()
    differ = [f"{n} {md.version(n)} (constraints.txt: {pins[n]})" for n in sorted(wanted)
              if n in pins and _installed(n) and md.version(n) != pins[n]]
    assert not differ, "installed versions differ from constraints.txt: " + ", ".join(differ)


def _installed(name: str) -> bool:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


def test_freeze_writes_pins_pip_reads():
    text = deps.freeze()
    pins = {m.group(1): m.group(2) for m in re.finditer(r"^([a-z0-9-]+)==(\S+)$", text, re.M)}
    assert pins["torch"] == md.version("torch")
    assert "rewardfl" not in pins and "pip" not in pins
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(body) == len(pins)  # every line is name==version (pip -c accepts nothing else here)


def test_a_wheel_holds_the_kernels_as_modules_of_rewardfl_kernels(tmp_path):
    """setup.py's build_py (what a wheel is built from) copies the top-level kernels/ folder's
    modules into rewardfl/kernels/; the package then imports from there, not from the checkout."""
    lib = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "REWARDFL_CUDA": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = sorted(p.name for p in (lib / "rewardfl" / "kernels").glob("*.py"))
    assert shipped == sorted(["__init__.py"] + [p.name for p in (ROOT / "kernels").glob("*.py")])
    assert not (lib / "kernels").exists()
    code = "import rewardfl.kernels as k; print(k.__path__); print(k.flow_step.__module__, k.flow_step.__code__.co_filename)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(lib)})
    assert run.returncode == 0, run.stderr[-2000:]
    path_line, where = run.stdout.strip().splitlines()
    assert path_line == repr([str(lib / "rewardfl" / "kernels")])
    assert where == f"rewardfl.kernels.flow_step {lib / 'rewardfl' / 'kernels' / 'flow_step.py'}"
