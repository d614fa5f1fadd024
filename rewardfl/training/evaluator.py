"""Evaluation during training (``eval_steps``), the reward-hacking guard and ``save_best_by``.

Every ``eval_steps`` optimizer steps (and once before the first, as the base the others are paired
with) the held-out clips' first ``eval.train_clips`` are generated with the current weights from the
same starting noise (``eval.train_seeds`` seeds; the generator's full-step sampler
(:mod:`rewardfl.sampling.generator`), no gradient) and scored as ``rewardfl.evaluate`` scores them: the training reward, each judge of
``eval.judges`` (with identity specificity), motion, first-frame PSNR. The means are logged as
``eval/<metric>`` and the paired difference to the step-0 videos as ``eval/<metric>/diff_to_base``.

The guard (:func:`rewardfl.evaluation.metrics.hacking_warnings`, the same test ``rewardfl.evaluate``
applies to each checkpoint): the latest evaluation against the first of the last
``eval.hacking_window`` evaluations, video by video on the same (clip, seed) jobs; when the training
reward rose beyond its clip-level 95% interval while a judge's higher-is-better metric
(``Reward.higher_is_better``, and specificity) fell beyond its, one warning names both, and with
``stop_on_hacking`` the run stops after a checkpoint. Its false-alarm rate over a run and its power
are measured by simulation in ``tests/test_evaluation_statistics.py``. ``save_best_by: eval/<metric>``
keeps the weights of the best evaluation by that metric in ``OUTPUT_DIR/best`` (``best.json`` says which step);
the base (step 0) is a candidate too, and the end of the run says when no evaluation beat it.

The series lives in ``OUTPUT_DIR/eval_history.json`` with every evaluation's per-video rows (rank 0
writes it; a resumed run reads it, so the base and the guard's window, video by video, survive a restart).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

import numpy as np
import torch

from rewardfl.config import ConfigError
from rewardfl.evaluation.evaluation import Evaluation, build_judges, evaluate
from rewardfl.evaluation.metrics import MIN_CLIPS_FOR_CLAIM, hacking_warnings, paired_change, paired_interval
from rewardfl.evaluation.report import contact_sheet
from rewardfl.evaluation.split import eval_dataset
from rewardfl.fileio import write_json
from rewardfl.runtime import barrier
from rewardfl.sampling.generator import Generator

log = logging.getLogger("rewardfl")

__all__ = ["TrainingEvaluator", "HISTORY", "evaluate_at_end", "sheet_image"]

HISTORY = "eval_history.json"


class TrainingEvaluator:
    """Built by the trainer when ``eval_steps`` is set; :meth:`run` evaluates the current weights."""

    def __init__(self, trainer):
        cfg = self.cfg = trainer.cfg
        self.output_dir, self.is_main = trainer.output_dir, trainer.is_main
        dataset = eval_dataset(cfg)
        n = len(dataset) if cfg.eval.train_clips == 0 else min(cfg.eval.train_clips, len(dataset))
        if n < MIN_CLIPS_FOR_CLAIM:  # the guard calls nothing on fewer clips (see paired_interval)
            if cfg.stop_on_hacking:
                raise ConfigError(f"stop_on_hacking: the hacking guard needs at least {MIN_CLIPS_FOR_CLAIM} held-out "
                                  f"clips per evaluation, this run evaluates {n} (eval.train_clips, and the held-out "
                                  "set's size); raise eval.train_clips or hold out more clips")
            log.warning("eval_steps: %d held-out clips per evaluation, fewer than %d: the hacking guard cannot "
                        "fire (raise eval.train_clips or hold out more clips)", n, MIN_CLIPS_FOR_CLAIM)
        items = [dataset[i] for i in range(n)]
        self.evaluation = Evaluation(items, trainer.reward, build_judges(cfg, trainer.device),
                                     list(range(cfg.eval.train_seeds)))
        self.generator = Generator(cfg, trainer.model, trainer.sampler, trainer.boundary, base_weights=None)
        self.batch_size = cfg.per_device_train_batch_size
        self.path = os.path.join(self.output_dir, HISTORY)
        self.history: list[dict] = []  # [{"step", "metrics": {eval/...}, "rows": [...]}]
        self.best: Optional[dict] = None
        self.labels = [label for label, _ in self.evaluation.judges]
        self.inert: dict[str, str] = {}  # judge label -> why the guard (and save_best_by) cannot use it

    # ------------------------------------------------------------------ resume

    def load(self, step: int) -> None:
        """The evaluations of a resumed run up to ``step`` (later ones belong to steps being redone)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            saved = json.load(f)
        self.history = [h for h in saved.get("history", []) if h["step"] <= step]
        if self.history:  # the base is paired by (clip, seed): the same evaluation set, or an error
            have = [(r["clip"], r["seed"]) for r in self.history[0]["rows"]]
            want = [(self.evaluation.items[c]["sample_id"], s) for c, s in self.evaluation.jobs]
            if have != want:
                raise ConfigError(f"eval.train_clips/eval.train_seeds: {self.path} was evaluated on other clips or "
                                  f"seeds ({len(have)} videos) than this config's ({len(want)}); resume with the same "
                                  "eval settings and held-out clips, or start a fresh run")
        # the best so far among the evaluations kept (one dropped with the steps being redone does not count)
        key, sign = self.cfg.save_best_by, (1.0 if self.cfg.save_best_mode == "max" else -1.0)
        scored = [(h["metrics"].get(key), h["step"]) for h in self.history if key]  # the base (step 0) too
        scored = [(v, s) for v, s in scored if v is not None and math.isfinite(v)]
        if scored:
            value, at = max(scored, key=lambda vs: (sign * vs[0], -vs[1]))
            self.best = {"step": at, "metric": key, "value": value, "mode": self.cfg.save_best_mode}
        else:
            self.best = None

    def _write(self) -> None:
        if self.is_main:
            write_json(self.path, {"history": self.history, "best": self.best}, indent=1)

    # ------------------------------------------------------------------ one evaluation

    def due(self, step: int) -> bool:
        every = self.cfg.eval_steps
        return bool(every) and (step % every == 0) and not any(h["step"] == step for h in self.history)

    def run(self, step: int) -> tuple[dict, list[str], list[tuple[str, list]]]:
        """Evaluate the current weights at ``step``: ``(eval/* metrics, guard warnings, contact-sheet rows
        per clip)``. The first evaluation of a run (step 0) is the base the others are paired with."""
        ev = self.evaluation
        model = self.generator.model
        model.eval()  # sampling as generate does; training mode comes back below
        videos = ev.generate(self.generator, self.batch_size)
        rows = ev.score(f"step-{step}", videos)
        keys = sorted({k for r in rows for k in r if k not in ("checkpoint", "clip", "seed", "details")})
        clips = [r["clip"] for r in rows]
        # means over clips (seeds averaged within each first), as rewardfl.evaluate reports them
        metrics = {f"eval/{k}": paired_interval([r.get(k) for r in rows], clips)["mean"] for k in keys}
        if self.history:  # the paired difference to the base (step 0), video by video
            for k in keys:
                metrics[f"eval/{k}/diff_to_base"] = paired_change(rows, self.history[0]["rows"], k)["mean"]
        slim = [{k: v for k, v in r.items() if k != "details"} for r in rows]
        self.history.append({"step": step, "metrics": metrics, "rows": slim})
        self._note_inert(metrics, step)
        warnings = self.guard()
        model.train()
        self._write()
        if len(self.history) == 1:
            self._base_videos = videos  # a resumed run has the base's numbers, not its videos
        shown = ([("base", self._base_videos)] if self._base_videos is not None and len(self.history) > 1 else [])
        sheets = [(ev.items[c]["sample_id"], ev.sheet(c, shown + [(f"step {step}", videos)]))
                  for c in range(len(ev.items))]
        return metrics, warnings, sheets

    _base_videos: Optional[list] = None

    def _note_inert(self, metrics: dict, step: int) -> None:
        """A judge with no finite value at an evaluation (a face judge that finds no face) is one the guard
        skips and ``save_best_by`` cannot rank by: said once per judge, loudly (see :meth:`summary`)."""
        for label in self.labels:
            keys = [k for k in metrics if k in (f"eval/judge/{label}/score", f"eval/judge/{label}/specificity")]
            if label in self.inert or any(metrics[k] is not None for k in keys):
                continue
            best = self.cfg.save_best_by or ""
            line = (f"eval.judges: judge {label} gave no finite value at step {step} (every video unscored, e.g. "
                    "no face found): the reward-hacking guard cannot watch it"
                    + (" (stop_on_hacking stops only when it scored 5 or more clips at the guard's window start "
                       "and lost its view of them)" if self.cfg.stop_on_hacking else "")
                    + (f", and save_best_by: {best} cannot save best/" if best.startswith(f"eval/judge/{label}/")
                       else "")
                    + "; check the judge's options (detector, det_size, landmark_fallback) on these clips")
            self.inert[label] = line
            if self.is_main:
                log.warning("%s", line)

    def summary(self) -> list[str]:
        """One line per safeguard that could not work in this run (for the end of the run)."""
        lines = [f"this run's safeguards were partly blind: {line}" for line in self.inert.values()]
        if self.best is not None and self.best["step"] == 0:
            lines.append(f"save_best_by: no evaluation beat the base ({self.best['metric']} = {self.best['value']:.4f} "
                         "at step 0): OUTPUT_DIR/best holds the base weights")
        return lines

    def guard(self) -> list[str]:
        """The hacking guard: the latest evaluation against the window's first, video by video (see the
        module docstring)."""
        if len(self.history) < 2:
            return []
        start = self.history[max(0, len(self.history) - self.cfg.eval.hacking_window)]
        latest = self.history[-1]
        lines = hacking_warnings(latest["rows"], start["rows"], self.evaluation.guarded_keys,
                                 min_effect=self.cfg.eval.hacking_min_effect)
        return [f"step {latest['step']} vs step {start['step']}: {line}" for line in lines]

    # ------------------------------------------------------------------ the best weights

    def improved(self, metrics: dict, step: int) -> bool:
        """Whether ``save_best_by`` is better at ``step`` than at the best so far (records it when so)."""
        key = self.cfg.save_best_by
        if key is None:
            return False
        if key not in metrics:  # checked at the base evaluation, before any training step
            raise ConfigError(f"save_best_by: {key} is not among the evaluation's metrics "
                              f"({', '.join(sorted(k for k in metrics if not k.endswith('/diff_to_base')))}); "
                              "pick one of them")
        value = metrics[key]  # the base (step 0) is a candidate too: best/ is never worse than no training
        if value is None or not math.isfinite(value):
            return False
        better = (self.best is None or (value > self.best["value"] if self.cfg.save_best_mode == "max"
                                        else value < self.best["value"]))
        if better:
            self.best = {"step": step, "metric": key, "value": value, "mode": self.cfg.save_best_mode}
            self._write()
        return better

    def write_sheets(self, step: int, sheets) -> list[str]:
        """PNG contact sheets (reference | base | this step) under ``OUTPUT_DIR/eval_steps/step-N``."""
        paths = []
        if self.is_main:
            for i, (name, rows) in enumerate(sheets):
                stem = os.path.splitext(os.path.basename(name))[0]
                path = os.path.join(self.output_dir, "eval_steps", f"step-{step:06d}", f"{i:03d}_{stem}.png")
                contact_sheet(path, rows, frames=self.cfg.eval.contact_sheet_frames)
                paths.append(path)
        return paths


def sheet_image(path: str) -> torch.Tensor:
    """A written contact sheet as ``(3, H, W)`` in [-1, 1] (for trackers)."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0


def evaluate_at_end(trainer) -> None:
    """``eval.at_end``: base vs the final weights on the held-out clips, ``eval.seeds`` per clip, in
    OUTPUT_DIR/eval; the table printed. Every process runs it (collectives inside the model stay
    matched); rank 0 writes and prints."""
    cfg, out = trainer.cfg, trainer.output_dir
    gen = Generator(cfg, trainer.model, trainer.sampler, trainer.boundary, base_weights=trainer.base_weights,
                    whole=lambda: trainer.engine.gathered(modify=True))  # ZeRO-3: partitioned
    try:
        result = evaluate(cfg, trainer.plugins, [os.path.join(out, "final")], os.path.join(out, "eval"),
                          seeds=list(range(cfg.eval.seeds)), batch_size=cfg.per_device_train_batch_size,
                          generator=gen, reward=trainer.reward, write=trainer.is_main)
        if trainer.is_main:
            print(result["table"], end="", flush=True)
            print(f"evaluation of base vs final on {len(result['clips'])} held-out clip(s) x "
                  f"{len(result['seeds'])} seed(s): {os.path.join(out, 'eval')}", flush=True)
    finally:
        barrier(trainer.dist)
