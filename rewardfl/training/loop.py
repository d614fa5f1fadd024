"""The training loop: one optimizer step after another until ``max_steps`` (or a signal).

One optimizer step (:meth:`Trainer.train_step`) reads top to bottom:

1. for each of ``gradient_accumulation_steps`` micro-batches: the reward prepares its
   references (samples it can never score are skipped and counted), the algorithm
   (``algorithm.py``: sample under the policy's gradient window, decode, score) gives a
   loss, and the engine backpropagates it. A step the algorithm replays
   (``Algorithm.replays``: several updates per sampled batch) draws nothing: it hands the
   algorithm the previous step's micro-batches again, and the data position stays;
2. the engine clips and updates: a non-finite loss or gradient skips the update, an
   update that makes a weight non-finite is rolled back, and a step with no sample
   to learn from anywhere (on every process) does not call the optimizer at all;
3. metrics (one row per ``logging_steps``), sample videos, checkpoints.

Batch sizes: ``per_device_train_batch_size`` videos per micro-batch on each process;
``train_batch_size`` (optional) = per_device * world size * accumulation, checked (or
used to derive the accumulation when that is left at 1). ``run`` owns ``output_dir``
for its length (a lock, see ``outputs.py``). A signal stops after the step with a
checkpoint and no export (exit 143); a run in which no step updated the weights
exits 3 (see :func:`train`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Optional

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from rewardfl.checkpoints import ALGORITHM_FILE, EMA_FILE, CheckpointManager
from rewardfl.config import ConfigError, TrainConfig, dump_config, to_dict
from rewardfl.data import VideoDataset
from rewardfl.evaluation.evaluation import check_evaluation
from rewardfl.evaluation.split import training_dataset
from rewardfl.interfaces import SampleContext
from rewardfl.registry import resolve_config
from rewardfl.runtime import (DistInfo, StopSignal, all_reduce_mean, all_reduce_sum_, init_distributed, resolve_device,
                              seed_everything)
from rewardfl.sampling.policy import expert_boundary_of, plan_steps

from .engines import build_engine, lr_lambda
from .batches import MicroBatches
from .ema import EMA
from .evaluator import TrainingEvaluator, evaluate_at_end, sheet_image
from .exports import export_final, save_best
from .gradient_check import ZeroGradientCheck
from .outputs import MetricsLog, MetricsWindow, VideoWriter, check_output_dir, claim_output_dir, plot_reward_curve
from .trackers import build_trackers, check_report_to

log = logging.getLogger("rewardfl")

__all__ = ["train", "Trainer", "TrainState", "TrainResult"]


@dataclasses.dataclass
class TrainState:
    """What a checkpoint needs to continue exactly: step and data position, counters."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches consumed in this epoch
    skipped_nonfinite: int = 0  # updates refused: non-finite loss, gradient or weights
    skipped_no_reference: int = 0  # samples whose reference the reward could not use
    skipped_empty: int = 0  # optimizer steps with no sample to learn from (no update)
    updates: int = 0  # optimizer steps that changed the weights
    # the data position before the last step that drew micro-batches: a run resumed between an
    # algorithm's replays (Algorithm.replays) draws that step's micro-batches again from here
    drawn_epoch: int = 0
    drawn_position: int = 0


class Trainer:
    """Builds plugins, data, the algorithm and the optimizer engine from a config; ``run()`` trains."""

    def __init__(self, cfg: TrainConfig, plugins: dict[str, type], *, dist: Optional[DistInfo] = None,
                 device: Optional[torch.device] = None):
        self.cfg = cfg = resolve_config(cfg, plugins)  # plugin options as validated Options objects
        self.plugins = plugins
        self.dist = dist or DistInfo()
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        self.device = device or resolve_device(cfg, self.dist)
        self.output_dir = cfg.resolve_path(cfg.output_dir)
        self.ckpt_dir = os.path.join(self.output_dir, "checkpoints")
        # everything that can be checked without the model, before it loads (minutes for Wan2.2)
        check_output_dir(cfg)
        check_report_to(cfg.report_to)
        check_evaluation(cfg)
        self.accum = self._accumulation()
        seed_everything(cfg.seed)

        # the clips training draws from: data.metadata_path without the held-out ones (data.eval_fraction)
        self.dataset = training_dataset(cfg, VideoDataset.from_config(cfg))
        self.batches = MicroBatches(self.dataset, batch_size=cfg.per_device_train_batch_size, seed=cfg.seed,
                                    rank=self.rank, world_size=self.world_size, num_workers=cfg.data.num_workers)
        if self.batches.per_epoch == 0:
            raise ConfigError(
                f"per_device_train_batch_size: {cfg.per_device_train_batch_size} x {self.world_size} process(es) "
                f"exceeds the {len(self.dataset)} training videos of data.metadata_path")
        plugins["algorithm"].check(cfg, cfg.algorithm.options, plugins["reward"])  # before the model loads
        self.model = plugins["model"](cfg, cfg.model, device=self.device)
        self.sampler = plugins["sampler"](cfg, cfg.sampler.options, device=self.device)
        self.reward = plugins["reward"](cfg, cfg.reward.options, device=self.device)
        self.reward.reduce_sum = lambda t: all_reduce_sum_(t.to(self.device), self.dist).cpu()  # Reward.reduce_sum
        self.boundary = expert_boundary_of(plugins["model"], cfg)
        self.plan = plan_steps(cfg, self.sampler, self.model.experts, self.model.trainable_experts(), self.boundary)
        self.algorithm = plugins["algorithm"](cfg, cfg.algorithm.options, model=self.model, sampler=self.sampler,
                                              reward=self.reward, plan=self.plan)
        self.params = [p for _, p in self.model.trainable_parameters()]
        # a trainable tensor the first updates' gradient never reaches is named in a warning
        self.gradient_check = ZeroGradientCheck(set(self.model.experts) - {s.expert for s in self.plan if s.grad})
        if not self.params:
            raise ConfigError("trainable_models: the model has no trainable parameters with this config")
        self.total_steps = cfg.max_steps or self._steps_drawing(cfg.num_train_epochs *
                                                                max(1, self.batches.per_epoch // self.accum))
        self.engine = build_engine(cfg, self.model, self.params,
                                   lr_lambda(cfg.lr_scheduler_type, cfg.warmup_steps, self.total_steps),
                                   self.dist, self.accum)
        self.checkpoints = CheckpointManager(self.ckpt_dir, self.dist, keep=cfg.save_total_limit)
        self._lr = self.engine.lr  # the lr the next update uses (logged with its step)
        self.state = TrainState()
        self._drawn = None  # the last step's micro-batches while the next step replays them
        self._last_videos = None  # the last generated videos and their clips (sample videos)
        self.stopped_by_signal = self.stopped_by_guard = False
        # evaluation on held-out clips during training (eval_steps) and of base vs final (eval.at_end)
        self.evaluator = TrainingEvaluator(self) if cfg.eval_steps else None
        with self.engine.gathered():  # whole tensors under ZeRO-3 too
            self.base_weights = ({k: v.detach().to("cpu", copy=True)
                                   for k, v in self.model.trainable_state_dict().items()} if cfg.eval.at_end else None)
            # the moving average of the trainable weights (ema_decay), from the weights as built
            self.ema = (EMA(self.model.trainable_state_dict(), cfg.ema_decay,
                            "cpu" if cfg.ema_device == "cpu" else None) if cfg.ema_decay > 0 else None)

    def _accumulation(self) -> int:
        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        per_step = cfg.per_device_train_batch_size * self.world_size
        if cfg.train_batch_size is not None:
            if accum == 1 and cfg.train_batch_size % per_step == 0:
                return cfg.train_batch_size // per_step
            if cfg.train_batch_size != per_step * accum:
                raise ConfigError(
                    f"train_batch_size: {cfg.train_batch_size} != per_device_train_batch_size "
                    f"({cfg.per_device_train_batch_size}) x processes ({self.world_size}) x "
                    f"gradient_accumulation_steps ({accum}); fix one of them or leave train_batch_size unset")
        return accum

    def _steps_drawing(self, draws: int) -> int:
        """The optimizer steps in which the run draws ``draws`` times (``num_train_epochs`` counts passes
        over the clips): each draw, then the steps the algorithm replays its micro-batches in."""
        steps = 0
        for _ in range(draws):
            steps += 1
            while self.algorithm.replays(steps):
                steps += 1
        return steps

    # ---------------------------------------------------------------- one optimizer step

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self.engine.zero_grad()
        sums = dict.fromkeys(("loss", "reward_loss", "kl_loss", "score_sum", "score_count", "skipped_samples"), 0.0)
        extra: dict[str, float] = {}
        drawn = self._replayed() if self.algorithm.replays(self.state.step) else None
        if drawn is None:  # a step that samples: where its micro-batches begin (for a resume mid-cycle)
            self.state.drawn_epoch, self.state.drawn_position = self.state.epoch, self.state.position
        kept = [] if self.algorithm.replays(self.state.step + 1) else None
        for micro in range(self.accum):
            if drawn is None:
                batch, contexts, keep = self._prepared(self.batches.next(self.state))
                self.state.skipped_no_reference += int((~keep).sum())
            else:
                batch, contexts, keep = drawn[micro]
            if kept is not None:
                kept.append((batch, contexts, keep))
            if not bool(keep.all()):  # a reference the reward cannot use: those samples are skipped, counted
                sums["skipped_samples"] += float((~keep).sum())
            out = self.algorithm.micro_batch(batch, contexts, self.state.step)
            if not bool(keep.any()):
                out.valid = torch.zeros_like(out.valid)
                out.loss, out.reward_loss, out.kl_loss = out.loss * 0.0, 0.0, 0.0
            else:
                sums["skipped_samples"] += float((~out.valid).sum())
            sums["score_sum"] += float(out.scores[out.valid].float().sum())
            sums["score_count"] += float(out.valid.sum())
            if micro == self.accum - 1 and all_reduce_mean([sums["score_count"]], self.dist)[0] == 0:
                self.engine.skip_update()  # no sample anywhere in this step: momentum must not move weights
            self.engine.backward(out.loss, self.accum)
            sums["loss"] += out.loss.item() / self.accum
            sums["reward_loss"] += out.reward_loss / self.accum
            sums["kl_loss"] += out.kl_loss / self.accum
            for k, v in out.metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / self.accum
            if out.videos is not None:
                self._last_videos = (out.videos, batch["video"].detach())
        self._drawn = kept
        if sums["score_count"]:
            self.gradient_check.before_update(self.model.trainable_parameters())
        grad_norm, status = self.engine.step()
        self.gradient_check.after_update(status)
        self._count(status, sums["loss"], grad_norm)
        if self.ema is not None and status == "updated":
            with self.engine.gathered():
                self.ema.update(self.model.trainable_state_dict())
        lr, self._lr = self._lr, self.engine.lr  # logged: the lr this update used
        self.state.step += 1
        reduced = dict(zip(sums, all_reduce_mean(list(sums.values()), self.dist)))  # means over processes
        count = reduced["score_count"] * self.world_size
        return {
            "step": self.state.step,
            "loss": reduced["loss"],
            "reward_loss": reduced["reward_loss"],
            "kl_loss": reduced["kl_loss"],
            "reward_score": reduced["score_sum"] * self.world_size / count if count else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": time.perf_counter() - t0,
            "updated": status == "updated",
            "skipped_samples": int(round(reduced["skipped_samples"] * self.world_size)),
            "skipped_nonfinite": self.state.skipped_nonfinite,
            "skipped_no_reference": self.state.skipped_no_reference,
            **{f"reward/{k}": v for k, v in extra.items()},
        }

    def _prepared(self, batch: dict) -> tuple[dict, list[SampleContext], torch.Tensor]:
        """A drawn micro-batch, its contexts and the reward's keep mask (``reward.prepare``); the samples
        it can never score are taken out (all of them: one is kept, to run weighted 0)."""
        contexts = [SampleContext.of_clip(*c) for c in zip(batch["sample_id"], batch["video"], batch["path"],
                                                           batch["prompt"])]
        keep = self.reward.prepare(contexts).cpu()
        if not bool(keep.all()):
            sel = keep.nonzero().flatten().tolist() or [0]
            batch = {k: (v[sel] if torch.is_tensor(v) else [v[i] for i in sel]) for k, v in batch.items()}
            contexts = [contexts[i] for i in sel]
        return batch, contexts, keep

    def _replayed(self) -> list:
        """The micro-batches of the step before, for a step the algorithm replays: kept in memory, or
        drawn again from where that step began after a resume (the run's own position untouched)."""
        if self._drawn is None:
            if self.state.step == 0:
                raise RuntimeError(f"algorithm {self.cfg.algorithm.name}: replays(0) is true, but step 0 has no "
                                   "step before it to train on again")
            s = self.state
            self._drawn = [self._prepared(b) for b in self.batches.replay(s.drawn_epoch, s.drawn_position, self.accum)]
        return self._drawn

    def _count(self, status: str, loss: float, grad_norm: float) -> None:
        if status == "empty":
            self.state.skipped_empty += 1
            log.warning("step %d: no sample with anything to score: no update", self.state.step + 1)
        elif status != "updated":  # never let NaN/Inf reach the weights
            self.state.skipped_nonfinite += 1
            log.warning("step %d: non-finite %s (loss=%s, grad_norm=%s): update skipped, weights kept",
                        self.state.step + 1, status, loss, grad_norm)
        else:
            self.state.updates += 1

    # ---------------------------------------------------------------- checkpoints and export

    def save(self) -> str:
        algorithm = self.algorithm.state_dict()  # e.g. GRPO's sampled groups between inner updates
        return self.checkpoints.save(self.state.step, engine=self.engine, model=self.model,
                                     state={**dataclasses.asdict(self.state), "reward": self.reward.state_dict()},
                                     extra_weights={EMA_FILE: self.ema.state_dict()} if self.ema else None,
                                     process_weights={ALGORITHM_FILE.format(rank=self.rank): algorithm}
                                     if algorithm else None)

    def maybe_resume(self) -> Optional[str]:
        r = self.cfg.resume_from_checkpoint
        found = self.checkpoints.resume(self.cfg.resolve_path(r) if isinstance(r, str) else r, engine=self.engine,
                                        model=self.model)
        if found is None:
            return None
        path, state = found
        self.state = TrainState(**{f.name: state[f.name] for f in dataclasses.fields(TrainState) if f.name in state})
        self.reward.load_state_dict(state.get("reward", {}))
        algorithm = os.path.join(path, ALGORITHM_FILE.format(rank=self.rank))
        self.algorithm.load_state_dict(load_file(algorithm) if os.path.isfile(algorithm) else {})
        self._drawn = None  # a step that replays draws the micro-batches again (_replayed)
        if self.ema is None and os.path.isfile(os.path.join(path, EMA_FILE)):
            log.warning("ema_decay: 0, but %s holds an EMA (%s): this run drops it; its final/ will have no ema/ "
                        "(resume with the checkpoint's ema_decay to keep averaging)", path, EMA_FILE)
        if self.ema is not None:
            ema_path = os.path.join(path, EMA_FILE)
            if not os.path.isfile(ema_path):
                raise ConfigError(f"ema_decay: {path} holds no {EMA_FILE} (trained without an EMA); resume it with "
                                  "ema_decay: 0, or start a fresh run")
            self.ema.load_state_dict(load_file(ema_path), self.state.updates)  # every update moved the EMA
        return path

    # ---------------------------------------------------------------- evaluation

    def _evaluate(self, log_row) -> bool:
        """One evaluation of the current weights on the held-out clips (every process runs it, so that
        collectives inside the model stay matched; rank 0 writes). Returns whether the guard fired."""
        step = self.state.step
        metrics, warnings, sheets = self.evaluator.run(step)
        for line in warnings:
            log.warning("%s", line)
        log_row({"step": step, **metrics})
        for path in self.evaluator.write_sheets(step, sheets):  # reference | base | this step, per clip
            self.trackers.log_image(f"eval/{os.path.splitext(os.path.basename(path))[0]}", step, sheet_image(path))
        # rank 0's numbers decide for every rank (another GPU's last bits must not split the run)
        improved, fired = self._rank0_flags(self.evaluator.improved(metrics, step), bool(warnings))
        if improved:
            save_best(self, step, self.evaluator.best)
        return fired

    def _rank0_flags(self, *flags: bool) -> list[bool]:
        values = all_reduce_mean([float(f) if self.is_main else 0.0 for f in flags], self.dist)
        return [v * self.world_size > 0.5 for v in values]

    # ---------------------------------------------------------------- the loop

    def run(self) -> list[dict]:
        """Train to ``total_steps`` (or a signal). Sets ``stopped_by_signal``; returns rank 0's metrics."""
        out = claim_output_dir(self.cfg, self.dist)
        try:
            return self._run()
        finally:
            out.release()

    def _run(self) -> list[dict]:
        cfg = self.cfg
        resumed = self.maybe_resume()
        if self.is_main:  # after the resume was accepted: a refused one leaves the run's config.yaml as it was
            dump_config(cfg, os.path.join(self.output_dir, "config.yaml"))
        self._lr = self.engine.lr
        self.trackers = build_trackers(cfg.report_to, self.output_dir, to_dict(cfg), self.is_main,
                                       run_name=os.path.basename(os.path.normpath(self.output_dir)),
                                       resume_step=self.state.step)
        metrics = MetricsLog(self.output_dir, self.is_main, resume_step=self.state.step if resumed else None,
                             trackers=self.trackers)
        window, self._videos = MetricsWindow(cfg.logging_steps), VideoWriter()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.is_main or None,
                   dynamic_ncols=True, desc="reward-fl")

        def log_row(row):
            if row is not None:
                metrics.write(row)

        self.model.train()
        if self.evaluator is not None and self.state.step > 0:  # a resumed run: its evaluations so far
            self.evaluator.load(self.state.step)
        try:
            with StopSignal(self.dist) as stop:
                if self.evaluator is not None and self.evaluator.due(self.state.step):
                    self._evaluate(log_row)  # step 0: the base every later evaluation is paired with
                while self.state.step < self.total_steps:
                    record = self.train_step()
                    log_row(window.add(record))
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward_score']:.3f}",
                                    s=f"{record['step_time_s']:.1f}")
                    step = self.state.step
                    self._sample_video(step)
                    if self.evaluator is not None and self.evaluator.due(step):
                        log_row(window.flush())  # the training rows of the steps before, then the evaluation's
                        self.stopped_by_guard = self._evaluate(log_row) and cfg.stop_on_hacking
                    self.stopped_by_signal = stop.requested() and not self.stopped_by_guard
                    stopping = self.stopped_by_signal or self.stopped_by_guard
                    if stopping or step % cfg.save_steps == 0 or step == self.total_steps:
                        log_row(window.flush())  # metrics first, so a resume finds the rows of its steps
                        self.save()
                    if stopping:
                        log.warning("stopped by %s at step %d (no final export); the checkpoint is saved, resume with "
                                    "resume_from_checkpoint: true", "the reward-hacking guard (stop_on_hacking)"
                                    if self.stopped_by_guard else "signal", step)
                        break
                log_row(window.flush())
            if not (self.stopped_by_signal or self.stopped_by_guard):
                export_final(self)
                if cfg.eval.at_end:
                    evaluate_at_end(self)
        finally:
            bar.close()
            self._videos.close()
            metrics.close()
            self.trackers.close()
        if self.is_main and self.evaluator is not None:  # a blind safeguard, said again where the run ends
            for line in self.evaluator.summary():
                log.warning("%s", line)
        records = metrics.read() if self.is_main else []
        if self.is_main and records:
            plot_reward_curve(records, os.path.join(self.output_dir, "reward_curve.png"))
        return records

    def _sample_video(self, step: int) -> None:
        """Every ``sample_video_steps``: the last generated first video (beside its clip) in OUTPUT_DIR/samples
        (a step the algorithm replays generates none: its cycle's; none yet after a resume mid-cycle)."""
        every = self.cfg.sample_video_steps
        if self.is_main and every and step % every == 0 and self._last_videos is not None:
            gen, ref = self._last_videos
            self._videos.submit(os.path.join(self.output_dir, "samples", f"step-{step:06d}.mp4"), gen[0],
                                ref[0] if self.cfg.sample_side_by_side else None)
            self.trackers.log_video("samples/video", step, gen[0])

    @property
    def status(self) -> str:
        """How the run ended: ``completed``, ``stopped_by_signal`` (a checkpoint saved, nothing exported),
        ``stopped_by_guard`` (the same, by ``stop_on_hacking``) or ``nothing_trained`` (no step updated the
        weights: every sample skipped or every update non-finite)."""
        if self.stopped_by_signal:
            return "stopped_by_signal"
        if self.stopped_by_guard:
            return "stopped_by_guard"
        return "nothing_trained" if self.state.updates == 0 else "completed"


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: ``Trainer.status``, the counters, and whether this is rank 0."""

    status: str
    state: TrainState
    is_main: bool = True


def train(cfg: TrainConfig, plugins: dict[str, type]) -> TrainResult:
    """Train as configured (one process, or one per rank under torchrun/deepspeed)."""
    dist = init_distributed(cfg)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{dist.rank} %(name)s: %(message)s")
    try:
        trainer = Trainer(cfg, plugins, dist=dist)
        trainer.run()
    finally:
        if dist.active:
            torch.distributed.destroy_process_group()
    return TrainResult(trainer.status, trainer.state, dist.is_main)
