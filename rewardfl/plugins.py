"""List installed rewardfl plugins: ``python -m rewardfl.plugins [--kind K] [--load]``.

Without ``--load`` nothing is imported (metadata only). ``--load`` imports each
plugin and reports failures with the providing distribution, without stopping.
"""

from __future__ import annotations

import argparse
import sys

from .cli import user_error_exit
from .registry import KINDS, PluginError, list_plugins, load_plugin


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


@user_error_exit("rewardfl.plugins")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.plugins", description=__doc__)
    parser.add_argument("--kind", choices=sorted(KINDS), help="only this kind")
    parser.add_argument("--load", action="store_true", help="import every plugin and report failures")
    args = parser.parse_args(argv)
    infos = list_plugins(args.kind)
    rows, failed = [], 0
    for p in infos:
        row = [p.kind, p.name, p.distribution, p.version, p.module]
        if args.load:
            try:
                load_plugin(p.kind, p.name)
                row.append("ok")
            except PluginError as e:
                failed += 1
                row.append("FAILED")
                print(f"rewardfl.plugins: error: {' '.join(str(e).split())}", file=sys.stderr)
        rows.append(row)
    header = ["kind", "name", "distribution", "version", "module"] + (["status"] if args.load else [])
    print(format_table(rows, header) if rows else "no plugins installed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
