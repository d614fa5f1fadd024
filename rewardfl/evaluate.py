"""Evaluate checkpoints on held-out clips: ``python -m rewardfl.evaluate cfg.yaml --checkpoint A [--checkpoint B]``.

The command: argparse, the checks of the command line, and the call of the library's evaluation
(:mod:`rewardfl.evaluation.evaluation`, which says what each video is scored on, how the intervals are
computed and what the hacking guard reads). Writes ``eval.json``, ``eval.md`` (the table, printed too)
and ``contact_sheets/*.png`` to ``--out`` (default ``OUTPUT_DIR/eval``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli import user_error_exit
from .evaluation.evaluation import evaluate
from .registry import load_resolved
from .training.outputs import check_command_output

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rewardfl.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config file (the training config)")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="a checkpoint directory, OUTPUT_DIR/final or an exported file; repeatable (base is always "
                        "included)")
    p.add_argument("--out", help="output directory (default OUTPUT_DIR/eval)")
    p.add_argument("--weights", choices=("trained", "ema"), default="trained",
                   help="each checkpoint's trained weights, or their moving average (runs trained with ema_decay)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per clip: 0..K-1 (default eval.seeds)")
    p.add_argument("--metadata", help="metadata.csv of the clips (default: the config's held-out clips)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="videos sampled together (default per_device_train_batch_size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; repeatable")
    return p


@user_error_exit("rewardfl.evaluate")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds: the number of seeds per clip must be >= 1, got {args.seeds}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    cfg, plugins = load_resolved(args.config, args.overrides)
    if "base" in args.checkpoint:
        raise ValueError("--checkpoint base: the base model is always evaluated; name trained checkpoints only")
    out = args.out or os.path.join(cfg.resolve_path(cfg.output_dir), "eval")
    check_command_output(out)  # before the model loads, not after every video is scored
    result = evaluate(cfg, plugins, args.checkpoint, out, seeds=list(range(args.seeds or cfg.eval.seeds)),
                      metadata=args.metadata, batch_size=args.batch_size or cfg.per_device_train_batch_size,
                      weights=args.weights)
    print(result["table"], end="")
    print(f"wrote eval.json, eval.md and {len(result['clips'])} contact sheets to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
