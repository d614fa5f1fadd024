"""What the native code's two front doors may import: the contracts that lint-imports cannot see.

The Triton kernels are the files of the checkout's top-level ``kernels/`` folder, read into
``rewardfl.kernels`` through its ``__path__`` (a wheel copies them in). lint-imports analyses only
the files under ``rewardfl/``, so it never sees theirs: a kernel that imported, say, the training
loop would pass every ``[tool.importlinter]`` contract. This test parses them itself: they import
torch, triton, the standard library and each other, nothing else.

``rewardfl.ops`` (the C++/CUDA op's front door) is a foundation that plugins and the planner use:
it imports torch, the standard library, the compiled extension and other foundations, never a
layer above them (registry, library, training, commands, tools) nor a plugin. lint-imports sees
this package; the test states its rule where the op lives and also checks third-party imports,
which the import contracts leave out.
"""

import ast
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
OPS = ROOT / "rewardfl" / "ops"

#: the foundations layer (see the layers contract in pyproject.toml)
FOUNDATIONS = {
    "rewardfl._C", "rewardfl.config", "rewardfl.interfaces", "rewardfl.fileio", "rewardfl.runtime",
    "rewardfl.ops", "rewardfl.kernels", "rewardfl.cli", "rewardfl.deps", "rewardfl.archives",
}


def imported_modules(path: Path, package: str):
    """``(line, absolute module)`` of every import in ``path``, a module of ``package``; relative
    imports resolved, ``from pkg import name`` read as ``pkg.name`` (``name`` may be a submodule)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = parent + ("." + base if base else "")
            found += [(node.lineno, base + "." + alias.name) for alias in node.names]
    return found


def _third_party_or_stdlib(module: str, allowed) -> bool:
    top = module.split(".")[0]
    return top in allowed or top in sys.stdlib_module_names


def kernel_violations(folder: Path):
    """Imports of the kernels in ``folder`` other than torch, triton, the stdlib and each other."""
    own = {p.stem for p in folder.glob("*.py")}
    bad = []
    for path in sorted(folder.glob("*.py")):
        for line, module in imported_modules(path, "rewardfl.kernels"):
            parts = module.split(".")
            if parts[:2] == ["rewardfl", "kernels"]:
                if len(parts) > 2 and parts[2] not in own:
                    bad.append("%s:%d %s" % (path.name, line, module))
            elif not _third_party_or_stdlib(module, {"torch", "triton"}):
                bad.append("%s:%d %s" % (path.name, line, module))
    return bad


def ops_violations(folder: Path):
    """Imports of ``rewardfl.ops`` (at ``folder``) other than torch, the stdlib and the foundations."""
    bad = []
    for path in sorted(folder.rglob("*.py")):
        package = "rewardfl.ops" + "".join("." + p for p in path.relative_to(folder).parent.parts)
        for line, module in imported_modules(path, package):
            if module.split(".")[0] == "rewardfl":
                ok = any(module == f or module.startswith(f + ".") for f in FOUNDATIONS)
            else:
                ok = _third_party_or_stdlib(module, {"torch"})
            if not ok:
                bad.append("%s:%d %s" % (path.relative_to(folder), line, module))
    return bad


def test_triton_kernels_import_only_torch_triton_stdlib_and_each_other():
    assert sorted(KERNELS.glob("*.py")), "no kernels found in %s" % KERNELS
    assert kernel_violations(KERNELS) == []


def test_the_kernels_check_catches_a_bad_import(tmp_path):
    folder = tmp_path / "kernels"
    shutil.copytree(KERNELS, folder)
    with open(folder / "flow_step.py", "a", encoding="utf-8") as f:
        f.write("\nfrom rewardfl.training import loop\nimport numpy\nfrom .missing import x\n")
    assert [v.split(" ")[1] for v in kernel_violations(folder)] == [
        "rewardfl.training.loop", "numpy", "rewardfl.kernels.missing.x"
    ]


def test_native_ops_import_nothing_above_the_foundations():
    assert (OPS / "align.py").is_file()
    assert ops_violations(OPS) == []


def test_the_ops_check_catches_a_bad_import(tmp_path):
    folder = tmp_path / "ops"
    shutil.copytree(OPS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(folder / "align.py", "a", encoding="utf-8") as f:
        f.write("\nfrom rewardfl.registry import create\nfrom ..rewards import face_identity\nimport cv2\n")
    assert [v.split(" ")[1] for v in ops_violations(folder)] == [
        "rewardfl.registry.create", "rewardfl.rewards.face_identity", "cv2"
    ]
