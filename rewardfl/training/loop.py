"""The training loop: one optimizer step after another until ``max_steps`` (or a signal).

One optimizer step (:meth:`Trainer.train_step`) reads top to bottom:

1. for each of ``gradient_accumulation_steps`` micro-batches: the reward prepares its
   references (samples it can never score are skipped and counted), the algorithm
   (``algorithm.py``: sample under the policy's gradient window, decode, score) gives a
   loss, and the engine backpropagates it;
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
import random
import shutil
import sys
import time
from typing import Optional

import numpy as np
import torch

from rewardfl.cli import EXIT_NOTHING_TRAINED, EXIT_STOPPED_BY_GUARD, EXIT_STOPPED_BY_SIGNAL as EXIT_STOPPED
from rewardfl.config import ConfigError, TrainConfig, dump_config, to_dict
from rewardfl.data import VideoDataset, collate
from rewardfl.evaluation.split import training_dataset
from rewardfl.fileio import recover_directory, replace_directory, write_json
from rewardfl.interfaces import SampleContext
from rewardfl.registry import resolve_config

from .checkpoints import CheckpointManager
from .distributed import DistInfo, StopSignal, all_reduce_mean, all_reduce_sum_, barrier, init_distributed
from .engines import build_engine, lr_lambda
from .ema import EMA, EMA_FILE
from .evaluator import TrainingEvaluator, sheet_image
from .gradient_check import ZeroGradientCheck
from .trackers import build_trackers, check_report_to
from .outputs import MetricsLog, MetricsWindow, OutputDir, VideoWriter, check_output_dir, plot_reward_curve
from .policy import expert_boundary_of, plan_steps

log = logging.getLogger("rewardfl")

__all__ = ["train", "Trainer", "TrainState", "EXIT_STOPPED", "EXIT_NOTHING_TRAINED"]


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


def resolve_device(cfg: TrainConfig, dist: Optional[DistInfo] = None) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist else torch.cuda.current_device())
        return torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} requested but CUDA is not available (use device: cpu or auto)")
    return torch.device(cfg.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        from rewardfl.evaluate import check_evaluation

        check_evaluation(cfg)
        self.accum = self._accumulation()
        seed_everything(cfg.seed)

        # the clips training draws from: data.metadata_path without the held-out ones (data.eval_fraction)
        self.dataset = training_dataset(cfg, VideoDataset.from_config(cfg))
        # videos of one micro-batch over all processes; an epoch is the whole micro-batches it holds
        self.global_micro = cfg.per_device_train_batch_size * self.world_size
        self.micro_per_epoch = len(self.dataset) // self.global_micro
        if self.micro_per_epoch == 0:
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
        self.total_steps = cfg.max_steps or cfg.num_train_epochs * max(1, self.micro_per_epoch // self.accum)
        self.engine = build_engine(cfg, self.model, self.params,
                                   lr_lambda(cfg.lr_scheduler_type, cfg.warmup_steps, self.total_steps),
                                   self.dist, self.accum)
        self.checkpoints = CheckpointManager(self.ckpt_dir, self.dist, keep=cfg.save_total_limit)
        self._lr = self.engine.lr  # the lr the next update uses (logged with its step)
        self.state = TrainState()
        self.stopped_by_signal = False
        self.stopped_by_guard = False
        # evaluation on held-out clips during training (eval_steps) and of base vs final (eval.at_end)
        self.evaluator = TrainingEvaluator(self) if cfg.eval_steps else None
        with self.engine.gathered():  # whole tensors under ZeRO-3 too
            self._base_weights = ({k: v.detach().to("cpu", copy=True)
                                   for k, v in self.model.trainable_state_dict().items()} if cfg.eval.at_end else None)
            # the moving average of the trainable weights (ema_decay), from the weights as built
            self.ema = (EMA(self.model.trainable_state_dict(), cfg.ema_decay,
                            "cpu" if cfg.ema_device == "cpu" else None) if cfg.ema_decay > 0 else None)
        self._loader = None  # the current epoch's batch iterator (built at the first batch, after resume)

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

    # ---------------------------------------------------------------- data

    def _epoch_order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``: one permutation seeded by (seed, epoch), the same on every process."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _next_batch(self) -> dict:
        """This process's share of the next micro-batch: each global micro-batch is split by rank, so a
        run on N processes sees the same samples per step as one process with N times the batch.

        Clips are decoded by a DataLoader (``data.num_workers`` processes decode ahead of the
        training thread); ``state.position`` counts the micro-batches *consumed*, so a checkpoint
        resumes at the first one not trained on whatever the workers had prefetched."""
        if self.state.position >= self.micro_per_epoch:
            self.state.epoch += 1
            self.state.position = 0
            self._loader = None
        if self._loader is None:
            self._loader = iter(self._epoch_loader(self.state.epoch, self.state.position))
        batch = next(self._loader)
        self.state.position += 1
        return batch

    def _epoch_loader(self, epoch: int, start: int):
        """The micro-batches of ``epoch`` from position ``start`` on, this rank's indices only."""
        bs, order = self.cfg.per_device_train_batch_size, self._epoch_order(epoch)
        batches = [order[i * self.global_micro + self.rank * bs:i * self.global_micro + (self.rank + 1) * bs]
                   for i in range(start, self.micro_per_epoch)]
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                                           num_workers=workers, prefetch_factor=2 if workers else None)

    # ---------------------------------------------------------------- one optimizer step

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        self.engine.zero_grad()
        sums = dict.fromkeys(("loss", "reward_loss", "kl_loss", "score_sum", "score_count", "skipped_samples"), 0.0)
        extra: dict[str, float] = {}
        for micro in range(self.accum):
            batch = self._next_batch()
            contexts = [SampleContext(*c) for c in zip(batch["sample_id"], batch["video"], batch["path"],
                                                         batch["prompt"])]
            keep = self.reward.prepare(contexts).cpu()
            if not bool(keep.all()):  # a reference the reward cannot use: those samples are skipped, counted
                self.state.skipped_no_reference += int((~keep).sum())
                sums["skipped_samples"] += float((~keep).sum())
                sel = keep.nonzero().flatten().tolist() or [0]  # all skipped: run one, weighted 0
                batch = {k: (v[sel] if torch.is_tensor(v) else [v[i] for i in sel]) for k, v in batch.items()}
                contexts = [contexts[i] for i in sel]
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
            self._last_videos = (out.videos, batch["video"].detach())
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
        return self.checkpoints.save(self.state.step, engine=self.engine, model=self.model,
                                     state={**dataclasses.asdict(self.state), "reward": self.reward.state_dict()},
                                     extra_weights={EMA_FILE: self.ema.state_dict()} if self.ema else None)

    def maybe_resume(self) -> Optional[str]:
        r = self.cfg.resume_from_checkpoint
        found = self.checkpoints.resume(self.cfg.resolve_path(r) if isinstance(r, str) else r, engine=self.engine,
                                        model=self.model)
        if found is None:
            return None
        path, state = found
        self.state = TrainState(**{f.name: state[f.name] for f in dataclasses.fields(TrainState) if f.name in state})
        self.reward.load_state_dict(state.get("reward", {}))
        if self.ema is None and os.path.isfile(os.path.join(path, EMA_FILE)):
            log.warning("ema_decay: 0, but %s holds an EMA (%s): this run drops it; its final/ will have no ema/ "
                        "(resume with the checkpoint's ema_decay to keep averaging)", path, EMA_FILE)
        if self.ema is not None:
            ema_path = os.path.join(path, EMA_FILE)
            if not os.path.isfile(ema_path):
                raise ConfigError(f"ema_decay: {path} holds no {EMA_FILE} (trained without an EMA); resume it with "
                                  "ema_decay: 0, or start a fresh run")
            from safetensors.torch import load_file

            self.ema.load_state_dict(load_file(ema_path), self.state.updates)  # every update moved the EMA
        return path

    def _export_final(self) -> None:
        """The trainable weights in the model family's own format (e.g. diffsynth LoRA files) in
        ``OUTPUT_DIR/final``, replaced whole: a previous run's files (an ``ema/`` of a run with
        ``ema_decay``) never stay beside this run's."""
        final = os.path.join(self.output_dir, "final")
        with self.engine.gathered():
            if self.is_main:
                tmp = final + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    files = self.model.save_trainable(os.path.join(tmp, "trainable.safetensors"))
                    if self.ema is not None:  # the same export of the averaged weights, in final/ema
                        trained = {k: v.detach().to("cpu", copy=True) for k, v in self.model.trainable_state_dict().items()}
                        try:
                            self.model.load_trainable_state_dict(self.ema.state_dict())
                            files += self.model.save_trainable(os.path.join(tmp, "ema", "trainable.safetensors"))
                        finally:
                            self.model.load_trainable_state_dict(trained)
                except NotImplementedError:
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    replace_directory(tmp, final)
                    log.info("exported %s", ", ".join(final + f[len(tmp):] for f in files))
        barrier(self.dist)

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
            self._save_best(step)
        return fired

    def _rank0_flags(self, *flags: bool) -> list[bool]:
        values = all_reduce_mean([float(f) if self.is_main else 0.0 for f in flags], self.dist)
        return [v * self.world_size > 0.5 for v in values]

    def _save_best(self, step: int) -> None:
        """The weights of the best evaluation so far (``save_best_by``) in OUTPUT_DIR/best, replaced whole."""
        best = os.path.join(self.output_dir, "best")
        with self.engine.gathered():
            if self.is_main:
                tmp = best + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    self.model.save_trainable(os.path.join(tmp, "trainable.safetensors"))
                    write_json(os.path.join(tmp, "best.json"), self.evaluator.best, indent=1)
                except NotImplementedError:
                    log.warning("save_best_by: %s cannot export its weights; OUTPUT_DIR/best not written",
                                type(self.model).__name__)
                else:  # exchanged whole (or the previous one moved aside first, put back by the next start)
                    replace_directory(tmp, best)
                    log.info("step %d: best %s = %.4f so far: weights in %s", step, self.cfg.save_best_by,
                             self.evaluator.best["value"], best)
        barrier(self.dist)

    def _evaluate_final(self) -> None:
        """``eval.at_end``: base vs the final weights on the held-out clips; the table printed."""
        from rewardfl.evaluate import evaluate
        from rewardfl.generate import Generator

        # every process runs it (collectives inside the model stay matched); rank 0 writes and prints
        gen = Generator.from_model(self.cfg, self.model, self.sampler, self.boundary, base_weights=self._base_weights,
                                   whole=lambda: self.engine.gathered(modify=True))  # ZeRO-3: partitioned
        final = os.path.join(self.output_dir, "final")
        try:
            result = evaluate(self.cfg, self.plugins, [final], os.path.join(self.output_dir, "eval"),
                              seeds=list(range(self.cfg.eval.seeds)), batch_size=self.cfg.per_device_train_batch_size,
                              generator=gen, reward=self.reward, write=self.is_main)
            if self.is_main:
                print(result["table"], end="", flush=True)
                print(f"evaluation of base vs final on {len(result['clips'])} held-out clip(s) x "
                      f"{len(result['seeds'])} seed(s): {os.path.join(self.output_dir, 'eval')}", flush=True)
        finally:
            barrier(self.dist)

    # ---------------------------------------------------------------- the loop

    def _claim_output_dir(self) -> OutputDir:
        """Rank 0 locks ``output_dir`` (and clears it under ``overwrite_output_dir``); every rank learns
        whether that worked, so that none waits in a collective for a rank that stopped."""
        out, error = OutputDir(self.output_dir), None
        if self.is_main:
            try:
                out.acquire()
                if self.cfg.overwrite_output_dir and self.cfg.resume_from_checkpoint is False:
                    out.clear_previous_run(self.ckpt_dir, os.path.join(self.output_dir, "metrics.jsonl"))
                for name in ("final", "best"):  # what a kill while replacing one of them left
                    recover_directory(os.path.join(self.output_dir, name))
            except (ConfigError, OSError) as e:
                out.release()
                error = e
        if all_reduce_mean([0.0 if error else 1.0], self.dist)[0] < 1.0:
            raise error or ConfigError(f"output_dir: {self.output_dir} could not be claimed by rank 0")
        return out

    def run(self) -> list[dict]:
        """Train to ``total_steps`` (or a signal). Sets ``stopped_by_signal``; returns rank 0's metrics."""
        out = self._claim_output_dir()
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
        trackers = build_trackers(cfg.report_to, self.output_dir, to_dict(cfg), self.is_main,
                                  run_name=os.path.basename(os.path.normpath(self.output_dir)),
                                  resume_step=self.state.step)
        metrics = MetricsLog(self.output_dir, self.is_main, resume_step=self.state.step if resumed else None,
                             trackers=trackers)
        self.trackers = trackers
        window, videos = MetricsWindow(cfg.logging_steps), VideoWriter()
        self.model.train()
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.is_main or None,
                   dynamic_ncols=True, desc="reward-fl")

        def log_row(row):
            if row is not None:
                metrics.write(row)

        def checkpoint():  # metrics first, so a resume finds the rows of its steps
            log_row(window.flush())
            self.save()

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
                    if self.is_main and cfg.sample_video_steps and step % cfg.sample_video_steps == 0:
                        gen, ref = self._last_videos
                        videos.submit(os.path.join(self.output_dir, "samples", f"step-{step:06d}.mp4"), gen[0],
                                      ref[0] if cfg.sample_side_by_side else None)
                        trackers.log_video("samples/video", step, gen[0])
                    if self.evaluator is not None and self.evaluator.due(step):
                        log_row(window.flush())  # the training rows of the steps before, then the evaluation's
                        self.stopped_by_guard = self._evaluate(log_row) and cfg.stop_on_hacking
                    if stop.requested() or self.stopped_by_guard:
                        checkpoint()
                        if self.stopped_by_guard:
                            log.warning("stopped by the reward-hacking guard at step %d (stop_on_hacking; exit code "
                                        "%d, no final export); the checkpoint is saved", step, EXIT_STOPPED_BY_GUARD)
                        else:
                            self.stopped_by_signal = True
                            log.warning("stopped by signal at step %d (exit code %d, no final export); resume with "
                                        "resume_from_checkpoint: true", step, EXIT_STOPPED)
                        break
                    if step % cfg.save_steps == 0 or step == self.total_steps:
                        checkpoint()
                log_row(window.flush())
            if not (self.stopped_by_signal or self.stopped_by_guard):
                self._export_final()
                if cfg.eval.at_end:
                    self._evaluate_final()
        finally:
            bar.close()
            videos.close()
            metrics.close()
            trackers.close()
        if self.is_main and self.evaluator is not None:  # a blind safeguard, said again where the run ends
            for line in self.evaluator.summary():
                log.warning("%s", line)
        records = metrics.read() if self.is_main else []
        if self.is_main and records:
            plot_reward_curve(records, os.path.join(self.output_dir, "reward_curve.png"))
        return records


def train(cfg: TrainConfig, plugins: dict[str, type]) -> int:
    """Train as configured (one process, or one per rank under torchrun/deepspeed).

    Returns the exit code: 0 done, :data:`EXIT_STOPPED` (143) stopped by a signal after saving
    a checkpoint (nothing exported), :data:`EXIT_NOTHING_TRAINED` (3) when no step updated the
    weights (every sample skipped or every update non-finite).
    """
    dist = init_distributed(cfg)
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{dist.rank} %(name)s: %(message)s")
    try:
        trainer = Trainer(cfg, plugins, dist=dist)
        trainer.run()
    finally:
        if dist.active:
            torch.distributed.destroy_process_group()
    if trainer.stopped_by_signal:
        return EXIT_STOPPED
    if trainer.stopped_by_guard:
        return EXIT_STOPPED_BY_GUARD
    s = trainer.state
    if s.updates == 0:
        if dist.is_main:
            print(f"rewardfl.run: error: no step updated the weights ({s.step} steps: {s.skipped_empty} with "
                  f"nothing to score, {s.skipped_nonfinite} non-finite; {s.skipped_no_reference} samples without a "
                  "usable reference); check the data and the reward's metrics in metrics.jsonl", file=sys.stderr)
        return EXIT_NOTHING_TRAINED
    return 0
