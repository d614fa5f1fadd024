"""The import contracts of pyproject.toml ([tool.importlinter]) hold: the core imports no plugin and
no demo code, plugins do not import each other, nothing in the library imports the demo."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the dev extra (pip install -e '.[dev]')"
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "Contracts: 3 kept" in proc.stdout, proc.stdout[-2000:]


def test_a_forbidden_import_would_be_caught(tmp_path):
    """The contract is not vacuous: the same configuration over a copy of the package with one core
    module importing a plugin fails."""
    pkg = tmp_path / "rewardfl"
    shutil.copytree(os.path.join(ROOT, "rewardfl"), pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(pkg / "config.py", "a", encoding="utf-8") as f:
        f.write("\nfrom rewardfl.rewards.face_identity import scoring  # noqa: E402,F401\n")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([exe, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "The core imports no plugin and no demo code BROKEN" in proc.stdout, proc.stdout[-2000:]
