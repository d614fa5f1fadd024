"""The architecture holds (docs/architecture.md): the import contracts of pyproject.toml
([tool.importlinter]: one-way layers, the core imports no plugin, plugins import only what lies below
the library and never each other), and no import hides inside a function to dodge a cycle."""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the only packages a function may import lazily: heavy or optional third-party dependencies (what a
#: command that does not need them must not pay for, or what a user may not have installed), and the
#: compiled extension (absent from a build without a compiler)
LAZY_ALLOWED = {
    "deepspeed", "diffsynth", "diffusers", "onnxruntime", "onnx", "onnx2torch", "transformers", "peft", "tokenizers",
    "open_clip", "cv2", "dlib", "wandb", "tensorboard", "matplotlib", "modelscope", "modelscope_hub",
    "huggingface_hub", "imageio", "imageio_ffmpeg", "scipy", "tqdm", "PIL", "torchvision", "triton",
    "torch.utils.tensorboard", "torch._subclasses", "torch.utils._python_dispatch", "rewardfl._C",
}


def _lint(cwd, env=None):
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the dev extra (pip install -e '.[dev]')"
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, env=env)


def test_import_contracts_are_kept():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "Layers: tools > commands" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("module, planted, broken", [
    ("config.py", "from rewardfl.rewards.face_identity import scoring", "The core imports no plugin BROKEN"),
    ("sampling/generator.py", "from rewardfl.training import loop", "Layers: tools > commands"),
    ("samplers/flow_match_euler.py", "from rewardfl.sampling import rollout", "Plugins import only the registry"),
])
def test_a_forbidden_import_would_be_caught(tmp_path, module, planted, broken):
    """The contracts are not vacuous: the same configuration over a copy of the package with one import
    against them fails, naming the contract."""
    pkg = tmp_path / "rewardfl"
    shutil.copytree(os.path.join(ROOT, "rewardfl"), pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(pkg / module, "a", encoding="utf-8") as f:
        f.write(f"\n{planted}  # noqa: E402,F401\n")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    proc = _lint(tmp_path, {**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0
    assert broken in proc.stdout.replace("\n", " ") and "BROKEN" in proc.stdout, proc.stdout[-2000:]


def function_local_imports(root: pathlib.Path) -> list[tuple[str, int, str]]:
    """``(file, line, module)`` of every import statement inside a function of the package."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(str(path.relative_to(root.parent)), node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    module = node.module or ""
                    if node.level:  # relative: resolve against the file's package
                        package = path.relative_to(root.parent).with_suffix("").parts[:-1]
                        package = package[:len(package) - node.level + 1]
                        module = ".".join(package + ((module,) if module else ()))
                    found += [(str(path.relative_to(root.parent)), node.lineno,
                               module if node.module else f"{module}.{a.name}") for a in node.names]
    return sorted(set(found))


def _allowed(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in LAZY_ALLOWED)


def test_no_import_hides_inside_a_function():
    """Function-local imports are only the real lazy ones (``LAZY_ALLOWED``): an import of the package's own
    modules or of the standard library inside a function is a cycle dodged or a dependency hidden."""
    found = function_local_imports(pathlib.Path(ROOT) / "rewardfl")
    hidden = [f"{file}:{line} {module}" for file, line, module in found if not _allowed(module)]
    assert not hidden, f"{len(hidden)} imports inside functions that belong at the module top:\n" + "\n".join(hidden)
    # the lazy ones that remain, for the record (each a heavy or optional dependency)
    assert all(_allowed(m) for _, _, m in found)


def test_the_count_sees_a_hidden_import(tmp_path):
    """The counter is not vacuous: a package-internal import planted in a function is reported."""
    pkg = tmp_path / "rewardfl"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    import json\n    import cv2\n    return g\n")
    found = function_local_imports(pkg)
    assert sorted((m, _allowed(m)) for _, _, m in found) == [("cv2", True), ("json", False), ("rewardfl.b", False)]
