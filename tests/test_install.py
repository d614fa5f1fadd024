"""The install: no name of the checkout shadows an installed package, the pins are the ones the
README installs, a failed import of a dependency is one line that names the package, and the
metadata (version, dependencies, entry points) is written once, in pyproject.toml.

Each shadowing test runs Python the way a user does, from a working directory first on
``sys.path`` (``python -m`` and ``python -c`` both put it there), in a real subprocess.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import rewardfl
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


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_the_version_and_the_metadata_are_written_once_in_pyproject():
    """pyproject.toml's [project] table is the one place; setup.py only builds the extension (and the
    wheel's kernels); rewardfl.__version__ is read back from the installed metadata."""
    project = _project()
    assert project["name"] == "rewardfl"
    assert rewardfl.__version__ == md.version("rewardfl") == project["version"]
    calls = [n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1 and sorted(k.arg for k in calls[0].keywords) == ["cmdclass", "ext_modules"]
    init = (ROOT / "rewardfl" / "__init__.py").read_text(encoding="utf-8")
    assert not re.search(r"^__version__\s*=\s*[\"']", init, re.M), "a version literal in rewardfl/__init__.py"


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_every_entry_point_of_pyproject_names_an_object_and_is_installed():
    """Each ``module:object`` of [project.scripts] and [project.entry-points] exists in the checkout,
    and the installed metadata declares it (an install older than pyproject.toml fails here)."""
    project = _project()
    groups = {"console_scripts": project["scripts"], **project["entry-points"]}
    assert set(groups) == {"console_scripts", "rewardfl.samplers", "rewardfl.rewards", "rewardfl.algorithms",
                           "rewardfl.models"}
    for group, points in groups.items():
        installed = {ep.name: ep.value for ep in md.entry_points(group=group)}
        for name, target in points.items():
            module, attr = target.split(":")
            base = ROOT.joinpath(*module.split("."))
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            assert attr in _top_level_names(path), f"{group} {name} = {target}: no {attr} in {path}"
            assert installed.get(name) == target, \
                f"{group} {name}: installed {installed.get(name)!r}, pyproject.toml {target!r}"
