"""What rewardfl imports from other distributions, and what to say when such an import fails.

The versions the test suite passed with are pinned in the checkout's ``constraints.txt``; the
README's install command uses it (``pip install -c constraints.txt ...``), while ``pyproject.toml`` keeps
ranges (rewardfl is a library too). ``python -m rewardfl.deps`` is the command around it::

    python -m rewardfl.deps check             # versions installed vs constraints.txt, and shadowing
    python -m rewardfl.deps freeze > constraints.txt   # pin this environment (after the tests pass)

:func:`explain_import_error` turns the common failures into one line that names the package, its
version and the install command (every ``python -m rewardfl.*`` command prints it, exit 2):

* a package shadowed by a folder or file that Python found first (the current directory comes
  first on ``sys.path`` under ``python -m``): the folder is named;
* a missing package, naming the extra that brings it (``deepspeed``, ``diffusers``, ``wandb``);
* an installed package whose API moved (``cannot import name ...``): its version beside the one
  ``constraints.txt`` pins.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import importlib.util
import os
import platform
import re
import sys
import traceback
from pathlib import Path
from typing import Iterator, Optional

#: the README's install command (after torch): what every dependency message tells the user to run
INSTALL_COMMAND = 'pip install -c constraints.txt --no-build-isolation -e ".[dev]"'

#: the checkout's pins: beside the package in a source checkout or an editable install
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``Foo_Bar`` -> ``foo-bar``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``{canonical name: version}`` of a pip constraints file's ``name==version`` lines ({} if absent)."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def requirements() -> dict[str, Optional[str]]:
    """rewardfl's declared requirements from its installed metadata: ``{canonical name: extra}``,
    the extra None for what every install needs, else the first extra that brings it (``dev``, the
    test extra, only where no feature extra does)."""
    try:
        declared = md.requires("rewardfl") or []
    except md.PackageNotFoundError:
        return {}
    base, extras = set(), {}
    for req in declared:
        name = canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if m is None:
            base.add(name)
        elif extras.get(name, "dev") == "dev":
            extras[name] = m.group(1)
    return {**{n: e for n, e in extras.items() if n not in base}, **{n: None for n in base}}


def _distributions_of(module: str) -> list[str]:
    return md.packages_distributions().get(module.split(".")[0], [])


def _install_root(dist_name: str, top: str) -> Optional[Path]:
    """Where the installed distribution keeps its top-level module ``top`` (a folder or a file)."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        first = Path(str(f)).parts[0] if Path(str(f)).parts else ""
        is_extension = first.startswith(f"{top}.") and first.endswith((".so", ".pyd"))
        if first in (top, f"{top}.py") or is_extension:
            return Path(dist.locate_file(first))
    return None


def shadowing_path(module: str, loaded_from: Optional[str]) -> Optional[Path]:
    """The folder or file that Python imported as ``module`` instead of the installed distribution
    that provides it, or None (not installed, or loaded from the installed place)."""
    top = module.split(".")[0]
    if not loaded_from:
        return None
    where = Path(loaded_from).resolve()
    roots = [r.resolve() for r in (_install_root(d, top) for d in _distributions_of(top)) if r is not None]
    if not roots:  # not installed, or installed in a way whose files we cannot see (editable): no claim
        return None
    if any(where == root or root in where.parents for root in roots):
        return None
    # name the top-level folder (or file) that stood in for the package
    for parent in [where] + list(where.parents):
        if parent.name in (top, f"{top}.py"):
            return parent
    return where


def _importer(err: BaseException) -> Optional[str]:
    """The distribution whose code ran the failing import (the innermost frame outside importlib)."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if "importlib" in frame.filename or frame.filename.startswith("<"):
            continue
        path = Path(frame.filename)
        for parent in path.parents:
            if parent.name in ("site-packages", "dist-packages"):
                top = path.relative_to(parent).parts[0].removesuffix(".py")
                names = md.packages_distributions().get(top, [])
                return names[0] if names else top
        return None
    return None


def _import_errors(exc: BaseException) -> Iterator[ImportError]:
    """The ImportErrors in an exception's chain (libraries such as transformers wrap them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError):
            yield exc
        exc = exc.__cause__ or exc.__context__


def _findable(module: str) -> bool:
    """Whether Python can find ``module`` (False for a None entry in sys.modules: an import blocked)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(dist_name: str) -> str:
    try:
        return md.version(dist_name)
    except md.PackageNotFoundError:
        return "not installed"


def explain_import_error(exc: BaseException) -> Optional[str]:
    """One line for a failed import of another distribution in ``exc``'s chain, or None.

    None when the chain holds no ImportError, or the failing module is rewardfl's own (a bug,
    whose traceback helps more)."""
    for err in _import_errors(exc):
        name = err.name or ""
        top = name.split(".")[0]
        if not top or top == "rewardfl":
            continue
        needed_by = _importer(err)
        by = f", needed by {needed_by}" if needed_by and canonical(needed_by) != canonical(top) else ""
        loaded = err.path or getattr(sys.modules.get(top), "__file__", None)
        shadow = shadowing_path(top, loaded)
        dists = _distributions_of(top)
        if shadow is not None:
            dist = dists[0]
            return (f"the package '{top}' ({dist} {_version(dist)}{by}) is shadowed by {shadow}: Python imported "
                    f"that {'folder' if shadow.is_dir() else 'file'} instead, because it lies in the current directory "
                    f"or on PYTHONPATH; run the command from another directory, or rename it")
        if isinstance(err, ModuleNotFoundError) and err.name == top and not _findable(top):
            wanted = requirements()
            extra = wanted.get(canonical(top))
            if extra:
                return (f"the package '{top}'{by} is not installed; it comes with rewardfl's '{extra}' extra: "
                        f'pip install -c constraints.txt --no-build-isolation -e ".[{extra}]"')
            if canonical(top) in wanted:
                return f"the package '{top}'{by} is not installed; install rewardfl's requirements: {INSTALL_COMMAND}"
            return f"the package '{top}'{by} is not installed: {' '.join(str(err).split())}"
        if dists:
            dist = dists[0]
            pinned = read_constraints().get(canonical(dist))
            tested = (f"; rewardfl was tested with {dist} {pinned} (constraints.txt)" if pinned and
                      pinned != _version(dist) else "")
            return (f"importing '{name}' failed with {dist} {_version(dist)} installed{by}: "
                    f"{' '.join(str(err).split())}{tested}; reinstall with: {INSTALL_COMMAND}")
    return None


def checkout_shadows(root: Path, names_installed: Optional[dict[str, list[str]]] = None) -> dict[str, list[str]]:
    """Top-level names in ``root`` that Python would import from ``root`` (a package with
    ``__init__.py``, or a module file) while an installed distribution other than rewardfl provides
    the same name: ``{name: [distributions]}``. A folder without ``__init__.py`` is only a namespace
    portion, which an installed regular package always beats, so it is not listed."""
    installed = md.packages_distributions() if names_installed is None else names_installed
    found = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and (entry / "__init__.py").is_file() and entry.name.isidentifier():
            name = entry.name
        elif entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            name = entry.stem
        else:
            continue
        others = [d for d in installed.get(name, []) if canonical(d) != "rewardfl"]
        if others:
            found[name] = others
    return found


def freeze() -> str:
    """This environment as pip constraints (every distribution but rewardfl and pip), sorted."""
    lines = []
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if not name or canonical(name) in ("rewardfl", "pip"):
            continue
        lines.append(f"{canonical(name)}=={dist.version}")
    header = (f"# The versions rewardfl's test suite passed with (Python {platform.python_version()}, "
              f"{platform.machine()}, {datetime.date.today().isoformat()}).\n"
              "# Made by: python -m rewardfl.deps freeze > constraints.txt  (in a venv where .ci/run passed)\n"
              f"# Used by the README's install: {INSTALL_COMMAND}\n")
    return header + "\n".join(sorted(set(lines))) + "\n"


def check(root: Optional[Path] = None) -> list[str]:
    """Problems with the installed dependencies: versions that differ from constraints.txt are
    reported as notes (printed), shadowed names and requirements that do not import as problems."""
    problems = []
    pins = read_constraints()
    for name in sorted(requirements()):
        installed = _version(name)
        pinned = pins.get(name)
        mark = "" if pinned in (None, installed) else f"  (constraints.txt: {pinned})"
        print(f"{name:24s} {installed}{mark}")
    for name, dists in checkout_shadows(root or Path.cwd()).items():
        problems.append(f"{(root or Path.cwd()) / name} shadows the installed package '{name}' "
                        f"({', '.join(dists)}) when Python runs from {root or Path.cwd()}; rename it")
    for name, extra in sorted(requirements().items()):
        if extra is not None or _version(name) == "not installed":
            continue
        for top, dists in md.packages_distributions().items():
            if name in (canonical(d) for d in dists) and top.isidentifier() and not top.startswith("_"):
                try:
                    spec = importlib.util.find_spec(top)
                except (ImportError, ValueError):
                    spec = None
                origin = spec.origin if spec is not None and spec.origin else None
                if origin is None and spec is not None and spec.submodule_search_locations:
                    origin = next(iter(spec.submodule_search_locations), None)
                shadow = shadowing_path(top, origin)
                if shadow is not None:
                    problems.append(f"{shadow} shadows the installed package '{top}' ({name} {_version(name)}); "
                                    "run from another directory or rename it")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.deps", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="installed versions vs constraints.txt; names shadowed from the current directory")
    sub.add_parser("freeze", help="print this environment as constraints (pipe it into constraints.txt)")
    args = parser.parse_args(argv)
    if args.command == "freeze":
        sys.stdout.write(freeze())
        return 0
    problems = check()
    for p in problems:
        print(f"rewardfl.deps: error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
