"""How much of a GRPO update is signal: the policy gradient against reward backprop's, on the same clips.

``python benchmarks/gradient_signal.py [CONFIG] [--clips 0,1,2,3] [--groups 16] [--set KEY=VALUE ...]``
after ``python -m rewardfl.demo`` (CONFIG: a ``grpo`` config, default ``examples/demo_grpo.yaml``).

No weights move. On the model as built (the run's first update), for each clip:

* **reward backprop**: the gradient of the trainable weights under ``algorithm: reward_backprop`` (the
  same model, sampler, window and reward, used with its gradients), twice (two draws of the reward's
  augmented views: ``g_rb`` is their mean, ``rb_self`` their cosine);
* **GRPO**: the gradient of one update's loss (one group of ``group_size`` videos, sampled with
  other noise for each of ``--groups`` groups), ``g_1 .. g_K``.

Printed per clip, and for the clips' mean: the cosine of the GRPO mean over the first half of the
groups with the mean over the second half (``split_half``), and from it the signal-to-noise ratio of
one group's gradient, ``rho = |E g|^2 / E|g - E g|^2``: with ``h = K / 2`` groups per half,
``E[cos] ~ h rho / (1 + h rho)``, so ``rho = c / (h (1 - c))``. An update that averages ``n`` groups
then points along its expectation with cosine ``sqrt(n rho / (1 + n rho))``; ``groups_for_0.5`` is the
``n`` for 0.5. ``cos_rb``: the cosine of the GRPO mean over all K groups with ``g_rb`` (whether the two
methods push the same way). Adam normalises each weight's step, so the direction is what matters.
``--groups 0``: reward backprop's gradients only (with ``--save``), e.g. under another window
(``--set mid_timestep=3``: the gradient through the last step alone) to split reward backprop's gradient by step.

A diagnostic (benchmarks/RESULTS.md, "The three algorithms on the demo at equal wall-clock"), CPU: about
10 s per group and 15 s per reward backprop gradient on the demo with 2 threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewardfl.data import collate  # noqa: E402
from rewardfl.registry import load_resolved  # noqa: E402
from rewardfl.training.algorithm import RewardBackprop  # noqa: E402
from rewardfl.training.loop import Trainer  # noqa: E402


def build(config: str, sets: list[str], output_dir: str) -> tuple[Trainer, RewardBackprop]:
    """The run's trainer for a ``grpo`` CONFIG (no evaluation, a scratch ``output_dir``) and reward backprop
    over the same model, sampler, plan and reward."""
    cfg, plugins = load_resolved(config, ["eval.at_end=false", f"output_dir={output_dir}",
                                          "overwrite_output_dir=true", *sets])
    if cfg.algorithm.name != "grpo":
        raise SystemExit(f"{config}: algorithm is {cfg.algorithm.name}; this compares a grpo config with reward "
                         "backprop")
    trainer = Trainer(cfg, plugins)
    return trainer, RewardBackprop(cfg, model=trainer.model, sampler=trainer.sampler, reward=trainer.reward,
                                   plan=trainer.plan)


def flat_gradient(params) -> torch.Tensor:
    """The trainable weights' gradients as one float64 vector (zeros where none reached); clears them."""
    parts = []
    for p in params:
        parts.append(torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None
                     else p.grad.detach().to(torch.float64).flatten().cpu())
        p.grad = None
    return torch.cat(parts)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def split_half(grads: list[torch.Tensor]) -> dict:
    """``split_half`` cosine, ``rho`` (one group's signal-to-noise) and ``groups_for_0.5`` (module doc)."""
    h = len(grads) // 2
    c = cosine(torch.stack(grads[:h]).mean(0), torch.stack(grads[h:2 * h]).mean(0))
    rho = c / (h * (1 - c)) if 0 < c < 1 else (0.0 if c <= 0 else math.inf)
    return {"split_half": c, "rho": rho, "groups_for_0.5": (1 / (3 * rho)) if rho > 0 else math.inf}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="examples/demo_grpo.yaml")
    ap.add_argument("--clips", default="0,1,2,3", help="training-set indices (comma-separated)")
    ap.add_argument("--groups", type=int, default=16, help="GRPO groups per clip (even, >= 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="write the per-clip numbers here as JSON")
    ap.add_argument("--save", help="write every gradient here (torch.save: {clip: {'rb': [...], 'grpo': [...]}})")
    args = ap.parse_args(argv)
    if args.groups == 1 or args.groups % 2:
        ap.error("--groups: an even number >= 2 (the split-half cosine compares two halves), or 0: reward "
                 "backprop's gradients only")
    trainer, rb = build(args.config, args.set, "output/gradient_signal")
    clips = [int(c) for c in args.clips.split(",")]
    rows, rb_all, grpo_all, rb_draws, saved = [], [], [], [], {}
    for i in clips:
        batch, contexts, keep = trainer._prepared(collate([trainer.dataset[i]]))
        if not bool(keep.all()):
            print(f"clip {i}: its reference cannot be scored; skipped", flush=True)
            continue
        t0 = time.perf_counter()
        g_rb = []
        for step in range(2):
            out = rb.micro_batch(batch, contexts, step)
            out.loss.backward()
            g_rb.append(flat_gradient(trainer.params))
        rb_time = (time.perf_counter() - t0) / 2
        t0 = time.perf_counter()
        grads, scores, spread = [], [], []
        for step in range(args.groups):
            out = trainer.algorithm.micro_batch(batch, contexts, step)
            out.loss.backward()
            grads.append(flat_gradient(trainer.params))
            s = out.scores[out.valid].double()
            scores.append(float(s.mean()) if s.numel() else float("nan"))
            spread.append(float(s.std(unbiased=False)) if s.numel() > 1 else float("nan"))
        grpo_time = (time.perf_counter() - t0) / max(1, args.groups)
        rb_mean = torch.stack(g_rb).mean(0)
        if not grads:  # --groups 0
            saved[i] = {"rb": [g.float() for g in g_rb], "grpo": []}
            print(json.dumps({"clip": i, "rb_self": cosine(*g_rb), "rb_norm": float(rb_mean.norm())}), flush=True)
            continue
        grpo_mean = torch.stack(grads).mean(0)
        rb_all.append(rb_mean)
        rb_draws.append(g_rb)
        grpo_all.append(grads)
        if args.save:
            saved[i] = {"rb": [g.float() for g in g_rb], "grpo": [g.float() for g in grads]}
        row = {"clip": i, "video": os.path.basename(str(contexts[0].sample_id)), "rb_self": cosine(*g_rb),
               "rb_norm": float(rb_mean.norm()), "group_norm": sum(float(g.norm()) for g in grads) / len(grads),
               "cos_rb": cosine(grpo_mean, rb_mean),
               "group_cos_rb": sum(cosine(g, rb_mean) for g in grads) / len(grads),
               "sample_score": sum(scores) / len(scores), "group_score_std": sum(spread) / len(spread),
               "s_rb": rb_time, "s_group": grpo_time, **split_half(grads)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 1:  # the clips' mean: the part of the update that training on every clip shares
        mean_groups = [torch.stack([g[k] for g in grpo_all]).mean(0) for k in range(args.groups)]
        rb_mean = torch.stack(rb_all).mean(0)
        grpo_means = [torch.stack(g).mean(0) for g in grpo_all]
        pooled = {"clip": "mean", "cos_rb": cosine(torch.stack(mean_groups).mean(0), rb_mean),
                  # each clip's GRPO mean against the other clips' reward backprop (what is not clip-specific)
                  "cos_rb_other_clips": sum(cosine(a, b) for k, a in enumerate(grpo_means)
                                            for m, b in enumerate(rb_all) if k != m) / (len(rows) * (len(rows) - 1)),
                  "rb_between_clips": _mean_pairwise(rb_all), "grpo_between_clips": _mean_pairwise(grpo_means),
                  # reward backprop's own reliability: the clips' first draws against their second draws
                  "rb_split_half": cosine(torch.stack([d[0] for d in rb_draws]).mean(0),
                                          torch.stack([d[1] for d in rb_draws]).mean(0)),
                  **split_half(mean_groups)}
        pooled["rho"] = pooled["rho"] / len(rows) if math.isfinite(pooled["rho"]) else pooled["rho"]
        pooled["groups_for_0.5"] = pooled["groups_for_0.5"] * len(rows)  # counted in single groups
        rows.append(pooled)
        print(json.dumps(pooled), flush=True)
    if args.save:
        torch.save(saved, args.save)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "overrides": args.set, "groups": args.groups, "rows": rows}, f, indent=1)
    return 0


def _mean_pairwise(vectors: list[torch.Tensor]) -> float:
    pairs = [(a, b) for k, a in enumerate(vectors) for b in vectors[k + 1:]]
    return sum(cosine(a, b) for a, b in pairs) / len(pairs)


if __name__ == "__main__":
    sys.exit(main())
