"""Train: ``python -m rewardfl.run cfg.yaml [--set key=value ...] [--check]``.

``--check`` validates without loading any model: the config (types, ranges,
paths), every plugin and its options, the gradient plan, the metadata CSV (its
columns and that every listed video exists), where each of the model's files is
(a path, a cache, or what ``allow_download`` would fetch), the reward's model files, the
judges of ``eval.judges`` and the held-out clips, the trackers (wandb's credentials or offline
mode), and that ``output_dir`` is writable and not another run's. It prints a summary and exits.
A user error prints one line and exits with code 2; a run stopped by a signal
exits 143 after saving a checkpoint, one stopped by the reward-hacking guard 4; a run in which no
step updated the weights exits 3. Under DeepSpeed or torchrun the same command runs one process per rank
(see docs/scaling-out.md).
"""

from __future__ import annotations

import argparse
import sys

from .cli import EXIT_NOTHING_TRAINED, EXIT_STOPPED_BY_GUARD, EXIT_STOPPED_BY_SIGNAL, user_error_exit
from .config import training_timestep_range
from .data import VideoDataset
from .evaluation.evaluation import check_evaluation, check_judges, judge_specs
from .registry import load_resolved
from .sampling.policy import expert_boundary_of, plan_steps
from .training import train
from .training.outputs import check_output_dir
from .training.trackers import check_report_to

#: how a training run ended (``Trainer.status``) -> the exit code (``rewardfl.cli``)
EXIT_CODES = {"completed": 0, "stopped_by_signal": EXIT_STOPPED_BY_SIGNAL, "stopped_by_guard": EXIT_STOPPED_BY_GUARD,
              "nothing_trained": EXIT_NOTHING_TRAINED}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for sections: sampler.shift=3); repeatable")
    parser.add_argument("--check", action="store_true", help="validate config, plugins, data and files, then exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def check(cfg, plugins, config_path: str) -> None:
    """What ``--check`` verifies and prints (nothing heavy loads)."""
    # the sampler is light: build it and plan against the model's declared experts, so that
    # gradient-window errors surface here rather than after the model has loaded
    sampler = plugins["sampler"](cfg, cfg.sampler.options)
    model = plugins["model"]
    experts, trainable = model.planned_experts(cfg, cfg.model)  # as the weight files will build it
    if experts:
        plan = plan_steps(cfg, sampler, experts, trainable, expert_boundary_of(model, cfg))
        grad = [f"{p.index}:{p.expert}" for p in plan if p.grad]
        print(f"plan     {len(plan)} steps, gradient at {', '.join(grad)}")
    lo, hi = training_timestep_range(cfg.min_timestep_boundary, cfg.max_timestep_boundary)
    print(f"note     min_timestep_boundary/max_timestep_boundary [{cfg.min_timestep_boundary:g}, "
          f"{cfg.max_timestep_boundary:g}] are DiffSynth-Studio training-schedule keys (timesteps "
          f"{lo:.0f}..{hi:.0f} of its 1000-step shift-5 schedule); they do not change reward-FL sampling, "
          "whose gradient window is mid_timestep..final_timestep")
    names = {"model": cfg.model_name, "sampler": cfg.sampler.name, "reward": cfg.reward.name,
             "algorithm": cfg.algorithm.name}
    for kind, cls in plugins.items():
        print(f"{kind:8s} {names[kind]:20s} {cls.__module__}.{cls.__name__}")
    for line in model.check(cfg, cfg.model):
        print(f"model    {line}")
    for line in plugins["reward"].check(cfg, cfg.reward.options):
        print(f"reward   {line}")
    for line in plugins["algorithm"].check(cfg, cfg.algorithm.options, plugins["reward"]):
        print(f"algorithm {line}")
    for label, cls, _ in judge_specs(cfg):  # names and options, as rewardfl.evaluate builds them
        print(f"judge    {label:20s} {cls.__module__}.{cls.__name__}")
    for line in check_judges(cfg):  # every judge's files: rewardfl.evaluate reads them even where training does not
        print(f"judge    {line}")
    d = cfg.data
    if d.metadata_path is not None:
        dataset = VideoDataset(cfg.resolve_path(d.metadata_path), num_frames=d.num_frames, max_pixels=d.max_pixels,
                               height=d.height, width=d.width)
        print(f"data     {len(dataset)} videos listed in {dataset.metadata_path}, all present")
    for line in check_evaluation(cfg):
        print(f"eval     {line}")
    check_report_to(cfg.report_to)
    if cfg.report_to:
        print(f"trackers {', '.join(cfg.report_to)}")
    check_output_dir(cfg)
    print(f"output   {cfg.resolve_path(cfg.output_dir)} writable"
          + (", resuming" if cfg.resume_from_checkpoint is not False else ""))
    print(f"config ok: {config_path}")


@user_error_exit("rewardfl.run")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg, plugins = load_resolved(args.config, args.overrides)
    if args.check:
        check(cfg, plugins, args.config)
        return 0
    result = train(cfg, plugins)
    s = result.state
    if result.status == "nothing_trained" and result.is_main:
        print(f"rewardfl.run: error: no step updated the weights ({s.step} steps: {s.skipped_empty} with "
              f"nothing to score, {s.skipped_nonfinite} non-finite; {s.skipped_no_reference} samples without a "
              "usable reference); check the data and the reward's metrics in metrics.jsonl", file=sys.stderr)
    return EXIT_CODES[result.status]


if __name__ == "__main__":
    sys.exit(main())
