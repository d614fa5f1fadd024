"""Does a step along a measured gradient raise the reward it should? ``benchmarks/gradient_signal.py``'s
companion: ``python benchmarks/step_check.py GRADIENTS.pt [CONFIG] [--groups 4] [--lr 3e-3] [--set ...]``,
GRADIENTS.pt written by ``gradient_signal.py --save`` with the same CONFIG and ``--set``.

Two directions, each the mean over the saved clips: ``grpo`` (the mean of each clip's GRPO groups) and
``rb`` (reward backprop's). The trainable weights are moved by ``-lr * sign(d)`` (descent: Adam's first
update is about this) and by ``+lr * sign(d)`` (ascent), and at each point two objectives are measured
on the saved clips, without gradient and with the same noise at every point:

* ``rollout``: the reward of the deterministic rollout (the video the evaluation scores);
* ``samples``: the mean reward of ``--groups`` GRPO groups of the clip (the videos GRPO learns from).

Printed: each objective's descent-minus-ascent difference per clip. A direction that is a descent
direction of an objective's loss raises that objective (a positive difference). CPU: about 2 minutes per
point and 4 clips with 2 threads (4 points).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gradient_signal import build  # noqa: E402  (this script's folder is on sys.path)
from rewardfl.data import collate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gradients", help="gradient_signal.py --save's file")
    ap.add_argument("config", nargs="?", default="examples/demo_grpo.yaml")
    ap.add_argument("--groups", type=int, default=4, help="GRPO groups per clip for the samples' reward")
    ap.add_argument("--lr", type=float, default=3e-3, help="the step: lr * sign(direction) per weight")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="write the objectives at each point here as JSON")
    args = ap.parse_args(argv)
    trainer, rb = build(args.config, args.set, "output/step_check")
    saved = torch.load(args.gradients)
    clips = list(saved)
    directions = {
        "grpo": torch.stack([torch.stack(saved[c]["grpo"]).double().mean(0) for c in clips]).mean(0),
        "rb": torch.stack([torch.stack(saved[c]["rb"]).double().mean(0) for c in clips]).mean(0),
    }
    theta0 = torch.cat([p.detach().flatten().double() for p in trainer.params])
    if theta0.numel() != directions["rb"].numel():
        ap.error(f"{args.gradients}: {directions['rb'].numel()} weights, this config trains {theta0.numel()}; "
                 "give the config and --set it was measured with")
    batches = {c: trainer._prepared(collate([trainer.dataset[c]])) for c in clips}

    def set_weights(v: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in trainer.params:
                p.copy_(v[offset:offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()

    @torch.no_grad()
    def objectives() -> dict:
        rollout, samples = [], []
        for c in clips:
            batch, contexts, _ = batches[c]
            rollout.append(float(rb.micro_batch(batch, contexts, 0).scores.mean()))
            means = []
            for step in range(args.groups):
                groups, _, _ = trainer.algorithm._sampled(batch, contexts, step)
                means.append(float(groups.scores[groups.valid].mean()))
            samples.append(sum(means) / len(means))
        return {"rollout": rollout, "samples": samples}

    points = {}
    for name, d in directions.items():
        for sign, label in ((-1, "descent"), (1, "ascent")):
            set_weights(theta0 + sign * args.lr * torch.sign(d))
            points[f"{name} {label}"] = objectives()
            print(json.dumps({"point": f"{name} {label}", **points[f"{name} {label}"]}), flush=True)
    set_weights(theta0)
    for name in directions:
        lo, hi = points[f"{name} descent"], points[f"{name} ascent"]
        diff = {k: [a - b for a, b in zip(lo[k], hi[k])] for k in lo}
        print(json.dumps({"direction": name, "clips": clips, "descent_minus_ascent": diff,
                          "mean": {k: sum(v) / len(v) for k, v in diff.items()}}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gradients": args.gradients, "config": args.config, "overrides": args.set, "lr": args.lr,
                       "groups": args.groups, "clips": clips, "points": points}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
