"""The reward feedback learning loop.

One optimizer step (``train_step``) reads top to bottom:

1. for each micro-batch: condition on prompt + first frame, sample with the
   sampler's plan (no gradient before the window, gradient inside it, the last
   gradient step jumps to sigma 0), decode with gradient, score with the reward;
   ``loss = reward.loss(scores) + kl_weight * regulariser``; backward, scaled by
   1 / gradient_accumulation_steps;
2. clip to ``max_grad_norm``; a non-finite loss or gradient skips the update
   (counted) instead of corrupting the weights, an update that makes a weight
   non-finite is rolled back, and a step with no sample to learn from (no face
   anywhere, on every process) does not call the optimizer at all;
3. AdamW step, LR schedule step; metrics (one row per ``logging_steps``), sample
   videos, checkpoints.

``run`` owns ``output_dir`` for its length (a lock; see ``rewardfl.outputs``). A
signal stops after the step with a checkpoint and no export (exit 143); a run
in which no step updated the weights exits 3 (see :func:`train`).

Batch sizes: ``per_device_train_batch_size`` videos are sampled together in one
micro-batch on each process; ``gradient_accumulation_steps`` micro-batches
make one optimizer step; ``train_batch_size`` (optional) is the global batch
per optimizer step = per_device * world size * accumulation, checked (or used
to derive the accumulation when that is left at 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np
import torch

from .checkpoint import (CheckpointError, begin_checkpoint, commit_checkpoint, latest_checkpoint, load_checkpoint,
                         load_rng, save_failed, save_rng, verified_checkpoint, write_checkpoint_files)
from .cli import EXIT_NOTHING_TRAINED, EXIT_STOPPED_BY_SIGNAL as EXIT_STOPPED
from .config import ConfigError, TrainConfig, dump_config
from .data import VideoDataset, collate
from .distributed import DistInfo, all_reduce_mean, build_engine, init_distributed
from .interfaces import Reward, Sampler, SampleContext, StepPlan, VideoModel
from .outputs import MetricsLog, MetricsWindow, OutputDir, VideoWriter, check_output_dir, plot_reward_curve
from .registry import resolve_config
from .training.policy import plan_steps

log = logging.getLogger("rewardfl")

__all__ = ["train", "Trainer", "rollout", "sample_latents", "lr_lambda", "EXIT_STOPPED", "EXIT_NOTHING_TRAINED"]


# --------------------------------------------------------------------------- the step


def rollout(model: VideoModel, sampler: Sampler, plan: list[StepPlan], batch: dict, *, num_frames: int,
            step: int, seeds: list[int], kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_frames``-frame videos under the plan's gradient window and decode them.

    ``batch["first_frame"]`` ``(B, 3, H, W)`` in [-1, 1] conditions generation.
    Returns ``(videos (B, 3, F, H, W) in [-1, 1], kl)``, ``kl`` the regulariser
    averaged over gradient steps (0-dim fp32; 0 when ``kl_weight`` is 0).
    """
    latents, kl = sample_latents(model, sampler, plan, batch, num_frames=num_frames, step=step, seeds=seeds,
                                 kl_weight=kl_weight)
    return model.decode(latents), kl


def sample_latents(model: VideoModel, sampler: Sampler, plan: list[StepPlan], batch: dict, *, num_frames: int,
                   step: int, seeds: list[int], kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling half of :func:`rollout`: ``(latents (B, C, T, h, w), kl)``."""
    first = batch["first_frame"].to(model.device, model.dtype)
    height, width = first.shape[-2:]
    cond = model.encode(batch["prompt"], first, num_frames)
    # classifier-free guidance: the same image conditioning with the negative prompt's text
    uncond = (model.encode([sampler.negative_prompt] * len(batch["prompt"]), first, num_frames)
              if sampler.uses_guidance else None)
    inject = model.injection(cond)  # TI2V-style first-frame latent injection, or None
    shape = model.latent_shape(num_frames, height, width)
    x = sampler.initial_noise(shape, sample_seeds=seeds, step=step, device=model.device, dtype=model.dtype)
    if inject is not None:  # frame 0 starts clean too, as after every update
        mask, latent = inject
        x = x * (1 - mask) + latent * mask
    trainable = set(model.trainable_experts())
    kl_terms = []
    for p in plan:
        t = torch.full((x.shape[0],), p.timestep, device=model.device, dtype=torch.float32)
        with torch.set_grad_enabled(p.grad):
            v = model.denoise(p.expert, x, t, cond)
            v_uncond = model.denoise(p.expert, x, t, uncond) if uncond is not None else None
            # the regulariser only where the trainable part runs (a frozen expert's kl is 0 and would
            # only dilute the mean); it compares the conditional velocities
            if p.grad and kl_weight > 0 and p.expert in trainable:
                with torch.no_grad():
                    v_ref = model.denoise(p.expert, x, t, cond, base=True)
                kl_terms.append(sampler.regularizer(v, v_ref, p))
            x = sampler.step(x, v, p, v_uncond=v_uncond, inject_mask=inject[0] if inject else None,
                             inject_latent=inject[1] if inject else None)
        if p.last:
            break
    kl = torch.stack(kl_terms).mean() if kl_terms else torch.zeros((), device=model.device)
    return x, kl


def lr_lambda(kind: str, warmup: int, total: int):
    """LR multiplier per optimizer step: linear warm-up to 1, then constant, linear or cosine decay to 0."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# --------------------------------------------------------------------------- the trainer


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


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits.

    With several processes the flag is agreed on (any process signalled stops all), so that
    every process takes part in the final checkpoint's collectives.
    """

    def __init__(self, dist: Optional[DistInfo] = None):
        self.signal: Optional[int] = None
        self.dist = dist or DistInfo()
        self._old = {}

    def requested(self) -> bool:
        flag = 1.0 if self.signal is not None else 0.0
        if self.dist.world_size > 1:
            flag = all_reduce_mean([flag], self.dist)[0]
        return flag > 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: finishing the step, saving a checkpoint, then exiting",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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
    """Builds plugins, data and the optimizer engine from a config; ``run()`` trains to the end."""

    def __init__(self, cfg: TrainConfig, plugins: dict[str, type], *, dist: Optional[DistInfo] = None,
                 device: Optional[torch.device] = None):
        self.cfg = cfg = resolve_config(cfg, plugins)  # plugin options as validated Options objects
        self.dist = dist or DistInfo()
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        self.device = device or resolve_device(cfg, self.dist)
        self.output_dir = cfg.resolve_path(cfg.output_dir)
        self.ckpt_dir = os.path.join(self.output_dir, "checkpoints")
        check_output_dir(cfg)  # before anything slow loads
        accum = cfg.gradient_accumulation_steps
        per_step = cfg.per_device_train_batch_size * self.world_size
        if cfg.train_batch_size is not None:
            if accum == 1 and cfg.train_batch_size % per_step == 0:
                accum = cfg.train_batch_size // per_step
            elif cfg.train_batch_size != per_step * accum:
                raise ConfigError(
                    f"train_batch_size: {cfg.train_batch_size} != per_device_train_batch_size "
                    f"({cfg.per_device_train_batch_size}) x processes ({self.world_size}) x "
                    f"gradient_accumulation_steps ({accum}); fix one of them or leave train_batch_size unset")
        self.accum = accum
        seed_everything(cfg.seed)

        self.dataset = VideoDataset.from_config(cfg)
        # videos of one micro-batch over all processes; an epoch is the whole micro-batches it holds
        self.global_micro = cfg.per_device_train_batch_size * self.world_size
        self.micro_per_epoch = len(self.dataset) // self.global_micro
        if self.micro_per_epoch == 0:
            raise ConfigError(
                f"per_device_train_batch_size: {cfg.per_device_train_batch_size} x {self.world_size} process(es) "
                f"exceeds the {len(self.dataset)} videos of data.metadata_path")
        self.model: VideoModel = plugins["model"](cfg, cfg.model, device=self.device)
        self.sampler: Sampler = plugins["sampler"](cfg, cfg.sampler.options, device=self.device)
        self.reward: Reward = plugins["reward"](cfg, cfg.reward.options, device=self.device)
        self.plan = plan_steps(cfg, self.sampler, self.model.experts, self.model.trainable_experts(),
                               plugins["model"].expert_boundary(cfg.model))
        self.params = [p for _, p in self.model.trainable_parameters()]
        if not self.params:
            raise ConfigError("trainable_models: the model has no trainable parameters with this config")
        self.total_steps = cfg.max_steps or cfg.num_train_epochs * max(1, self.micro_per_epoch // self.accum)
        self.engine = build_engine(cfg, self.model, self.params,
                                   lr_lambda(cfg.lr_scheduler_type, cfg.warmup_steps, self.total_steps),
                                   self.dist, self.accum)
        self._lr = self.engine.lr  # the lr the next update uses (logged with its step)
        self.state = TrainState()
        self.stopped_by_signal = False
        self._loader = None  # the current epoch's batch iterator (built at the first batch, after resume)

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

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> str:
        """Checkpoint (collective under DeepSpeed): every process writes its part into one temporary
        directory, rank 0 adds weights, state and the manifest of checksums and renames it into place.

        A failed write (a full disk) is a one-line CheckpointError naming the file and the free
        space; the temporary directory is removed and the previous checkpoints stay as they were.
        With several processes, the process that failed exits and the launcher stops the others.
        """
        step = self.state.step
        tmp = os.path.join(self.ckpt_dir, f".checkpoint-{step}.tmp")
        path = os.path.join(self.ckpt_dir, f"checkpoint-{step}")
        try:
            if self.is_main:
                tmp = begin_checkpoint(self.ckpt_dir, step)
            barrier(self.dist)
            self.engine.save(tmp)
            save_rng(tmp, self.rank)
            with self.engine.gathered():
                weights = self.model.trainable_state_dict() if self.is_main else None
                if self.is_main:
                    weights = {k: v.detach().to("cpu").clone() for k, v in weights.items()}
            barrier(self.dist)
            if self.is_main:
                write_checkpoint_files(tmp, step, weights=weights, state=dataclasses.asdict(self.state))
                path = commit_checkpoint(self.ckpt_dir, step, tmp, keep=self.cfg.save_total_limit)
                log.info("saved checkpoint %s", path)
        except OSError as e:
            raise save_failed(tmp, e) from e
        barrier(self.dist)
        return path

    def maybe_resume(self) -> Optional[str]:
        """Load the checkpoint ``resume_from_checkpoint`` names (``true``: the newest that verifies).

        Rank 0 checks the manifest (every file read once, not once per process) and all processes
        load what it chose; any failure to load is a one-line CheckpointError naming the path.
        """
        r = self.cfg.resume_from_checkpoint
        if r is False:
            return None
        choice = [None, None]  # (path, error message) as rank 0 found them
        if self.is_main:
            try:
                choice[0] = latest_checkpoint(self.ckpt_dir) if r is True else verified_checkpoint(
                    self.cfg.resolve_path(r))
            except CheckpointError as e:
                choice[1] = str(e)
        if self.dist.active and self.world_size > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        path, error = choice
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            log.info("resume_from_checkpoint: no checkpoint in %s yet; starting fresh", self.ckpt_dir)
            return None
        try:
            weights, state = load_checkpoint(path)
            with self.engine.gathered():
                self.model.load_trainable_state_dict(weights)
            self.engine.load(path)
            load_rng(path, self.rank)
        except CheckpointError:
            raise
        except Exception as e:  # a state that does not fit this model or optimizer (or an unverified file)
            text = " ".join(str(e).split())[:300]  # load_state_dict lists every key: the start says enough
            raise CheckpointError(f"resume_from_checkpoint: could not load {path} ({type(e).__name__}: {text}); "
                                  "it does not match this config's model and trainable_models, or it is damaged: "
                                  "resume from another checkpoint") from e
        self.state = TrainState(**{f.name: state[f.name] for f in dataclasses.fields(TrainState) if f.name in state})
        log.info("resumed from %s at step %d", path, self.state.step)
        return path

    # ---------------------------------------------------------------- one optimizer step

    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        self.engine.zero_grad()
        sums = {"loss": 0.0, "reward_loss": 0.0, "kl_loss": 0.0, "score_sum": 0.0, "score_count": 0.0,
                "skipped_samples": 0.0}
        extra: dict[str, float] = {}
        for micro in range(self.accum):
            batch = self._next_batch()
            contexts = [SampleContext(sid, v, p, pr) for sid, v, p, pr in
                        zip(batch["sample_id"], batch["video"], batch["path"], batch["prompt"])]
            keep = self.reward.prepare(contexts).cpu()
            if not bool(keep.all()):  # a reference the reward cannot use: those samples are skipped, counted
                self.state.skipped_no_reference += int((~keep).sum())
                sums["skipped_samples"] += float((~keep).sum())
                sel = keep.nonzero().flatten().tolist() or [0]  # all skipped: run one, weighted 0
                batch = {k: (v[sel] if torch.is_tensor(v) else [v[i] for i in sel]) for k, v in batch.items()}
                contexts = [contexts[i] for i in sel]
            seeds = [cfg.seed * 7919 + i for i in batch["index"]]
            videos, kl = rollout(self.model, self.sampler, self.plan, batch, num_frames=cfg.data.num_frames,
                                 step=self.state.step, seeds=seeds, kl_weight=cfg.kl_weight)
            out = self.reward(videos, contexts)
            if not bool(keep.any()):
                out.valid = torch.zeros_like(out.valid)
            reward_loss = self.reward.loss(out)
            valid = out.valid.to(out.scores.device)
            # every process runs the same collectives, so a micro-batch with nothing to learn from
            # still goes through backward (with zero weight) instead of being skipped
            weight = 1.0 if bool(valid.any()) else 0.0
            loss = weight * (reward_loss + cfg.kl_weight * kl)
            sums["score_sum"] += float(out.scores.detach()[valid].float().sum())
            sums["score_count"] += float(valid.sum())
            if micro == self.accum - 1 and all_reduce_mean([sums["score_count"]], self.dist)[0] == 0:
                self.engine.skip_update()  # no sample anywhere in this step: momentum must not move weights
            self.engine.backward(loss, self.accum)
            sums["loss"] += loss.item() / self.accum
            sums["reward_loss"] += weight * reward_loss.item() / self.accum
            sums["kl_loss"] += weight * kl.item() / self.accum
            sums["skipped_samples"] += float((~out.valid).sum()) if bool(keep.any()) else 0.0
            for k, v in out.metrics.items():
                extra[k] = extra.get(k, 0.0) + float(v) / self.accum
            self._last_videos = (videos.detach(), batch["video"].detach())
        grad_norm, status = self.engine.step()
        if status == "empty":
            self.state.skipped_empty += 1
            log.warning("step %d: no sample with anything to score: no update", self.state.step + 1)
        elif status != "updated":  # never let NaN/Inf reach the weights
            self.state.skipped_nonfinite += 1
            log.warning("step %d: non-finite %s (loss=%s, grad_norm=%s): update skipped, weights kept",
                        self.state.step + 1, status, sums["loss"], grad_norm)
        else:
            self.state.updates += 1
        lr = self._lr
        self._lr = self.engine.lr  # the lr of the next update (the schedule has stepped)
        self.state.step += 1
        # global values: means over processes (sums for the counts)
        keys = list(sums)
        reduced = dict(zip(keys, all_reduce_mean([sums[k] for k in keys], self.dist)))
        ws = self.world_size
        count = reduced["score_count"] * ws
        return {
            "step": self.state.step,
            "loss": reduced["loss"],
            "reward_loss": reduced["reward_loss"],
            "kl_loss": reduced["kl_loss"],
            "reward_score": reduced["score_sum"] * ws / count if count else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": time.perf_counter() - t0,
            "updated": status == "updated",
            "skipped_samples": int(round(reduced["skipped_samples"] * ws)),
            "skipped_nonfinite": self.state.skipped_nonfinite,
            "skipped_no_reference": self.state.skipped_no_reference,
            **{f"reward/{k}": v for k, v in extra.items()},
        }

    def _export_final(self) -> None:
        """The trainable weights in the model family's own format (e.g. diffsynth LoRA files)."""
        with self.engine.gathered():
            if self.is_main:
                try:
                    files = self.model.save_trainable(os.path.join(self.output_dir, "final", "trainable.safetensors"))
                    log.info("exported %s", ", ".join(files))
                except NotImplementedError:
                    pass
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
                dump_config(self.cfg, os.path.join(self.output_dir, "config.yaml"))
            except (ConfigError, OSError) as e:
                out.release()
                error = e
        if all_reduce_mean([0.0 if error else 1.0], self.dist)[0] < 1.0:
            raise error or ConfigError(f"output_dir: {self.output_dir} could not be claimed by rank 0")
        return out

    def run(self) -> list[dict]:
        """Train to ``total_steps`` (or a signal). Sets ``stopped_by_signal``; returns rank 0's metrics."""
        cfg = self.cfg
        out = self._claim_output_dir()
        try:
            records = self._run()
        finally:
            out.release()
        return records

    def _run(self) -> list[dict]:
        cfg = self.cfg
        self.maybe_resume()
        self._lr = self.engine.lr
        metrics = MetricsLog(self.output_dir, self.is_main, resume_step=self.state.step)
        window = MetricsWindow(cfg.logging_steps)
        videos = VideoWriter()
        self.model.train()
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.is_main or None,
                   dynamic_ncols=True, desc="reward-fl")

        def flush_metrics():  # before every checkpoint, so a resume finds the rows of its steps
            row = window.flush()
            if row is not None:
                metrics.write(row)

        try:
            with _Stop(self.dist) as stop:
                while self.state.step < self.total_steps:
                    record = self.train_step()
                    row = window.add(record)
                    if row is not None:
                        metrics.write(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward_score']:.3f}",
                                    s=f"{record['step_time_s']:.1f}")
                    step = self.state.step
                    if self.is_main and cfg.sample_video_steps and step % cfg.sample_video_steps == 0:
                        gen, ref = self._last_videos
                        videos.submit(os.path.join(self.output_dir, "samples", f"step-{step:06d}.mp4"), gen[0],
                                      ref[0] if cfg.sample_side_by_side else None)
                    if stop.requested():
                        flush_metrics()
                        self.save()
                        self.stopped_by_signal = True
                        log.warning("stopped by signal at step %d (exit code %d, no final export); resume with "
                                    "resume_from_checkpoint: true", step, EXIT_STOPPED)
                        break
                    if step % cfg.save_steps == 0 or step == self.total_steps:
                        flush_metrics()
                        self.save()
                flush_metrics()
            if not self.stopped_by_signal:
                self._export_final()
        finally:
            bar.close()
            videos.close()
            metrics.close()
        records = metrics.read() if self.is_main else []
        if self.is_main and records:
            plot_reward_curve(records, os.path.join(self.output_dir, "reward_curve.png"))
        return records


def barrier(dist: DistInfo) -> None:
    if dist.active and dist.world_size > 1:
        torch.distributed.barrier()


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
    s = trainer.state
    if s.updates == 0:
        if dist.is_main:
            print(f"rewardfl.run: error: no step updated the weights ({s.step} steps: {s.skipped_empty} with "
                  f"nothing to score, {s.skipped_nonfinite} non-finite; {s.skipped_no_reference} samples without a "
                  "usable reference); check the data and the reward's metrics in metrics.jsonl", file=sys.stderr)
        return EXIT_NOTHING_TRAINED
    return 0
