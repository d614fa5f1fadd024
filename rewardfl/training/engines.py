"""Optimizer engines: plain torch training (one or several processes), or DeepSpeed ZeRO.

An engine owns the optimizer, LR schedule, gradient clipping and the update:

* :class:`PlainEngine`: torch AdamW, clip to ``max_grad_norm``, a non-finite
  gradient skips the update. With several processes (torchrun without
  DeepSpeed) gradients are averaged with an all-reduce before clipping.
* :class:`DeepSpeedEngine`: ``deepspeed.initialize`` over the model's trainable
  modules, with the DeepSpeed config's batch, accumulation, clipping and
  optimizer keys filled from ours (a DeepSpeed config that disagrees is an
  error naming both keys). ZeRO stage 2 or 3, CPU offload, bf16 as configured.
  Checkpoints go through DeepSpeed's own save/load; the trainable weights are
  also exported as a plain safetensors file (gathered under ZeRO-3).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import re
import warnings
from typing import Optional

import torch

from rewardfl.checkpoints import CheckpointError, load_torch_file, save_torch_file
from rewardfl.config import ConfigError, TrainConfig
from rewardfl.runtime import DistInfo, all_reduce_sum_

__all__ = ["PlainEngine", "DeepSpeedEngine", "build_engine", "deepspeed_config", "read_deepspeed_section",
           "zero_settings", "zero_buffers", "zero_weight_dtype", "all_finite", "lr_lambda"]


#: trainable weights up to this size are copied before each update so that a non-finite one can be
#: rolled back (LoRA: megabytes); larger ones (full fine-tuning) are only checked
ROLLBACK_MAX_BYTES = 2 << 30

NON_FINITE_UPDATE = ("the update made trainable weights non-finite ({why}); stopping before any checkpoint holds "
                     "them: lower learning_rate or check adam_epsilon, then resume from the last checkpoint")


def all_finite(params) -> bool:
    """Every element of every tensor finite (one host sync); empty (ZeRO-3-partitioned) ones count as finite."""
    flags = [torch.isfinite(p.detach()).all() for p in params if p.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def _cloned(state):
    """A copy of an optimizer ``state_dict`` whose tensors are new (``Tensor.clone``, which fake
    tensors support, unlike ``copy.deepcopy``); everything else deep-copied."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _cloned(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cloned(v) for v in state)
    return copy.deepcopy(state)


# --------------------------------------------------------------------------- plain


class PlainEngine:
    """torch AdamW + LambdaLR + clipping; a non-finite gradient norm skips the update."""

    def __init__(self, cfg: TrainConfig, params: list[torch.nn.Parameter], lr_lambda, dist: DistInfo):
        self.params, self.dist, self.max_grad_norm = params, dist, cfg.max_grad_norm
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self._skip = False
        self._trainable_bytes = sum(p.numel() * p.element_size() for p in params)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)
        self._skip = False

    def skip_update(self) -> None:
        """This step has nothing to learn from: ``step`` will not call the optimizer (AdamW's momentum
        would move the weights even with zero gradients)."""
        self._skip = True

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss / accum).backward()

    def pre_update_copy(self) -> Optional[tuple[list[torch.Tensor], dict]]:
        """What :meth:`step` keeps during an update to roll a non-finite one back: copies of the
        trainable weights and of the optimizer state, made only while the trainable weights take at
        most ``ROLLBACK_MAX_BYTES`` (LoRA: megabytes); None above (a full fine-tune, 3x its weights
        with the copies, is only checked, and stops before any checkpoint holds NaN). The memory
        planner counts the update's peak with this too."""
        if self._trainable_bytes > ROLLBACK_MAX_BYTES:
            return None
        return [p.detach().clone() for p in self.params], _cloned(self.optimizer.state_dict())

    def step(self) -> tuple[float, str]:
        """Average gradients over processes, clip, update. Returns ``(grad_norm, status)``, status
        ``updated``, ``empty`` (skip_update was called), ``gradient`` (non-finite gradient norm: no
        update) or ``weights`` (the update made a weight non-finite: weights and optimizer state
        restored to before it)."""
        if self.dist.world_size > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                all_reduce_sum_(p.grad, self.dist).div_(self.dist.world_size)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        status = "empty" if self._skip else "updated" if math.isfinite(norm) else "gradient"
        if status == "updated":
            saved = self.pre_update_copy()
            self.optimizer.step()
            if not all_finite(self.params):
                if saved is None:
                    raise FloatingPointError(NON_FINITE_UPDATE.format(why="too large to keep a pre-update copy"))
                weights, optimizer_state = saved
                with torch.no_grad():
                    for p, w in zip(self.params, weights):
                        p.copy_(w)
                self.optimizer.load_state_dict(optimizer_state)
                status = "weights"
        self.optimizer.zero_grad(set_to_none=True)
        self._skip = False
        with warnings.catch_warnings():  # a skipped update still counts as a step of the schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        return norm, status

    def save(self, tmp_dir: str) -> None:
        save_torch_file(self.optimizer.state_dict(), os.path.join(tmp_dir, "optimizer.pt"))
        save_torch_file(self.scheduler.state_dict(), os.path.join(tmp_dir, "scheduler.pt"))

    def load(self, ckpt_dir: str) -> None:
        # both read before either is applied: a refused file leaves the engine as it was
        optimizer = load_torch_file(os.path.join(ckpt_dir, "optimizer.pt"))
        scheduler = load_torch_file(os.path.join(ckpt_dir, "scheduler.pt"))
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)

    def gathered(self, modify: bool = False):
        """Whole trainable weights (always, without DeepSpeed); ``modify``: changes made inside are kept."""
        return contextlib.nullcontext()


# --------------------------------------------------------------------------- DeepSpeed


def read_deepspeed_section(cfg: TrainConfig) -> dict:
    """The user's ``deepspeed`` section (inline, or the JSON file it names), a deep copy."""
    section = cfg.deepspeed
    if isinstance(section, str):
        path = cfg.resolve_path(section)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"deepspeed: DeepSpeed JSON not found: {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed: {path} is not valid JSON: {e}") from e
    return json.loads(json.dumps(section or {}))  # a deep copy


def zero_settings(ds: dict) -> dict:
    """What decides ZeRO's memory in a DeepSpeed config (:func:`deepspeed_config`'s result), with
    DeepSpeed 0.19's defaults: ``stage``, ``offload`` (of the optimizer, to the CPU), ``bf16``,
    ``reduce_bucket_size`` (elements), ``contiguous_gradients``, ``overlap_comm``."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    return {
        "stage": stage,
        "offload": (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None),
        "bf16": bool((ds.get("bf16") or {}).get("enabled")),
        "reduce_bucket_size": int(float(zero.get("reduce_bucket_size", 5e8))),
        "contiguous_gradients": bool(zero.get("contiguous_gradients", True)),
        "overlap_comm": bool(zero.get("overlap_comm", stage == 3)),
    }


def zero_buffers(settings: dict, psi: int, world_size: int) -> dict[str, tuple[int, torch.dtype, bool]]:
    """DeepSpeed ZeRO's per-rank buffers for ``psi`` trainable weights on ``world_size`` ranks, by
    :func:`zero_settings`: what -> (elements, dtype, in host memory). For the memory planner.

    From DeepSpeed 0.19's ``runtime/zero/stage_1_and_2.py``, with d the trainable weights' dtype
    (:func:`zero_weight_dtype`: bf16 with ``bf16``, else fp32): the fp32 master partition
    (Psi/N) and the two Adam moments (2 x Psi/N) live on the GPU, or on the CPU with
    ``offload_optimizer``; the gradient partition (Psi/N in d, ZeRO-2; fp32 on the CPU when
    offloaded); ZeRO-1 keeps whole gradients (Psi in d); with ``contiguous_gradients`` the reduce
    bucket of ``reduce_bucket_size`` elements in d (two with ``overlap_comm``). The trainable
    weights themselves become views of a flat buffer in d (Psi). ZeRO-3's partitioning of the
    frozen weights inside trained modules is not modelled (an over-estimate).
    """
    dtype, offload = zero_weight_dtype(settings), settings["offload"]
    part = -(-psi // world_size)
    out = {"fp32 master weights (partition)": (part, torch.float32, offload),
           "optimizer states (Adam, partition)": (2 * part, torch.float32, offload)}
    if settings["stage"] >= 2:
        out["gradients (partition)"] = (part, torch.float32 if offload else dtype, offload)
    else:
        out["gradients"] = (psi, dtype, False)
    if settings["contiguous_gradients"]:
        out["reduce bucket"] = ((2 if settings["overlap_comm"] else 1) * settings["reduce_bucket_size"], dtype, False)
    return out


def zero_weight_dtype(settings: dict) -> torch.dtype:
    """The trainable weights' dtype under ZeRO: DeepSpeed casts the trained modules to bf16 with ``bf16``."""
    return torch.bfloat16 if settings["bf16"] else torch.float32


def deepspeed_config(cfg: TrainConfig, *, accum: int, world_size: int) -> dict:
    """The DeepSpeed config: the user's section with batch/accumulation/clipping/optimizer from our keys.

    Our keys are the single source of truth: a DeepSpeed key that is set and
    disagrees raises ConfigError naming both.
    """
    ds = read_deepspeed_section(cfg)
    ours = {
        "train_micro_batch_size_per_gpu": (cfg.per_device_train_batch_size, "per_device_train_batch_size"),
        "gradient_accumulation_steps": (accum, "gradient_accumulation_steps"),
        "train_batch_size": (cfg.per_device_train_batch_size * accum * world_size, "train_batch_size"),
        "gradient_clipping": (cfg.max_grad_norm, "max_grad_norm"),
    }
    for key, (value, our_key) in ours.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(f"deepspeed.{key}: {ds[key]!r} disagrees with {our_key} ({value}); set it only "
                              f"through {our_key} (or 'auto')")
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"deepspeed.{key}: set by rewardfl from learning_rate, adam_*, weight_decay, "
                              "lr_scheduler_type and warmup_steps; remove it from the DeepSpeed config")
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    params = {"lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_epsilon,
              "weight_decay": cfg.weight_decay}
    if not offload:
        params["torch_adam"] = True  # torch's AdamW: no extension build; offload uses DeepSpeedCPUAdam
    ds["optimizer"] = {"type": "AdamW", "params": params}
    if cfg.mixed_precision == "bf16":
        ds.setdefault("bf16", {"enabled": True})
    elif cfg.mixed_precision == "fp16":
        ds.setdefault("fp16", {"enabled": True})
    ds.setdefault("steps_per_print", 10**9)  # rewardfl logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class _Trainable(torch.nn.Module):
    """The model's trainable modules under one root, for ``deepspeed.initialize``."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleDict({k.replace(".", "__"): m for k, m in modules.items()})

    def forward(self, *args, **kwargs):  # never called: the model plugin calls its modules itself
        raise RuntimeError("rewardfl drives the wrapped modules directly")


def deepspeed_state_classes() -> tuple:
    """The classes besides tensors and plain containers that DeepSpeed's checkpoint files hold (0.19:
    ZeRO optimizer states carry the stage, the loss scaler and bf16 fragment addresses); plain data
    (an int enum, dataclasses, attribute bags), so allowing them lets no code run on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 engine over the model's trainable modules."""

    def __init__(self, cfg: TrainConfig, model, params: list[torch.nn.Parameter], lr_lambda, dist: DistInfo,
                 accum: int):
        import deepspeed

        self.dist, self.params = dist, params
        self.config = deepspeed_config(cfg, accum=accum, world_size=dist.world_size)
        self.stage = self.config["zero_optimization"].get("stage", 0)
        holder = _Trainable(model.trainable_modules())
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=holder, model_parameters=params, config=self.config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
        self._skip = self._empty = False

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self):
        self._skip = False
        self._empty = False

    def skip_update(self) -> None:
        """This step has nothing to learn from: its update is cancelled (lr 0 at the boundary)."""
        self._empty = True

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        # DeepSpeed scales by 1 / gradient_accumulation_steps itself. A non-finite loss on any
        # process must not reach the (partitioned) gradients: all processes back-propagate a zero
        # loss instead, and the step's update is cancelled (lr 0) in step().
        finite = torch.tensor([1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0])
        if self.dist.active and torch.distributed.get_backend() == "nccl":
            finite = finite.cuda()
        if self.dist.active:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1.0:
            self._skip = True
            loss = sum((p * 0).sum() for p in self.params)
        self.engine.backward(loss)
        if (self._skip or self._empty) and self.engine.is_gradient_accumulation_boundary():
            for group in self.optimizer.param_groups:  # cancel this step's update; the schedule resets it
                group["lr"] = 0.0
        self.engine.step()  # DeepSpeed updates only at the accumulation boundary

    def step(self) -> tuple[float, str]:
        """What the update at the boundary did: ``(grad_norm, status)`` as :meth:`PlainEngine.step`.

        DeepSpeed keeps its master weights inside its optimizer, so a non-finite weight after an
        update cannot be rolled back here: every process then stops with an error, before any
        checkpoint could hold it."""
        # engine.step() already ran after the last backward (the boundary); report what happened
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if self._empty:
            status = "empty"
        elif self._skip or not math.isfinite(norm):
            status = "gradient"
        else:
            status = "updated"
            bad = torch.tensor([0.0 if all_finite(self.params) else 1.0])
            if self.dist.active and torch.distributed.get_backend() == "nccl":
                bad = bad.cuda()
            if self.dist.active:
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            if bad.item() > 0:
                raise FloatingPointError(NON_FINITE_UPDATE.format(why="DeepSpeed cannot roll the update back"))
        self._skip = self._empty = False
        return norm, status

    def save(self, tmp_dir: str) -> None:
        self.engine.save_checkpoint(tmp_dir, tag="deepspeed", exclude_frozen_parameters=True)

    def load(self, ckpt_dir: str) -> None:
        # DeepSpeed's checkpoint engines unpickle with weights_only=False, so a crafted checkpoint would
        # run code. Every file DeepSpeed reads here (model states, ZeRO optimizer states) goes through
        # checkpoint_engine.load: routed through torch's restricted unpickler, with the few DeepSpeed
        # classes its states hold allowed, nothing else can be built.
        self.engine.checkpoint_engine.load = functools.partial(load_torch_file, allow=deepspeed_state_classes())
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag="deepspeed", load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{ckpt_dir}: DeepSpeed found no checkpoint in deepspeed/ (a checkpoint saved "
                                  "without DeepSpeed?); resume it without a deepspeed section, or from another one")

    def gathered(self, modify: bool = False):
        """Context in which ZeRO-3-partitioned trainable weights are whole (for export); ``modify``: what is
        loaded into them inside is kept (rank 0's values, partitioned again on exit; every rank loads the
        same weights)."""
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(self.params, modifier_rank=0 if modify else None)
        return contextlib.nullcontext()


def build_engine(cfg: TrainConfig, model, params, lr_lambda, dist: DistInfo, accum: int):
    if cfg.deepspeed is not None:
        return DeepSpeedEngine(cfg, model, params, lr_lambda, dist, accum)
    return PlainEngine(cfg, params, lr_lambda, dist)


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
