"""Train: ``python -m rewardfl.run cfg.yaml [--set key=value ...] [--check]``.

``--check`` validates the config (types, ranges, paths), resolves every plugin
and validates its options, prints a summary and exits without training. A user
error prints one line and exits with code 2. Under DeepSpeed or torchrun the
same command runs one process per rank (see README, "Scaling out").
"""

from __future__ import annotations

import argparse
import sys

from .cli import user_error_exit
from .config import load_config
from .registry import resolve_plugins


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for sections: sampler.shift=3); repeatable")
    parser.add_argument("--check", action="store_true", help="validate config and plugins, then exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


@user_error_exit("rewardfl.run")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    plugins = resolve_plugins(cfg)
    if args.check:
        # the sampler is light: build it and plan against the model's declared experts, so that
        # gradient-window errors surface here rather than after the model has loaded
        sampler = plugins["sampler"](cfg, cfg.sampler.options)
        experts = tuple(getattr(plugins["model"], "experts", ()) or ())
        if experts:
            trainable = [e.strip() for e in cfg.trainable_models.split(",") if e.strip() in experts]
            plan = sampler.plan(experts, trainable)
            grad = [f"{p.index}:{p.expert}" for p in plan if p.grad]
            print(f"plan     {len(plan)} steps, gradient at {', '.join(grad)}")
        names = {"model": cfg.model_name, "sampler": cfg.sampler.name, "reward": cfg.reward.name}
        for kind, cls in plugins.items():
            print(f"{kind:8s} {names[kind]:20s} {cls.__module__}.{cls.__name__}")
        print(f"config ok: {args.config}")
        return 0
    from .train import train  # imported late: --check must stay light

    train(cfg, plugins)
    return 0


if __name__ == "__main__":
    sys.exit(main())
