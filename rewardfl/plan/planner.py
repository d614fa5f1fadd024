"""Will it fit? The peak GPU memory per rank of one training step, predicted without a GPU.

    python -m rewardfl.plan cfg.yaml [--gpu-memory 80GiB] [--world-size N] [--set k=v] [--preset NAME] [--json]

The planner runs one training step of the configured model through the real code (the ``wan2_2``
plugin's setup and forward passes, ``training.algorithm.rollout`` with the core's step plan, the
sampler, the differentiable decode, the face reward's align/embed/score, backward, the optimizer
update) on *fake tensors*: tensors with shapes, dtypes and devices but no storage
(``torch._subclasses.FakeTensorMode``). Nothing is allocated and no weight file is read, so the
2 x 14B model at 81x480x832 plans on a 2-core CPU in minutes (``--fast``: under two).

How the memory is counted (:class:`MemoryTracker`): a ``TorchDispatchMode`` sees every op's
outputs and keeps, per storage, its bytes, its device and what it holds (a model's weights, the
optimizer's states, the activations of step 5, ...); a weakref finalizer on the storage takes the
bytes off when the last tensor using it dies (autograd's saved tensors included). The peak per
device, and what was live at it, is the prediction. The accelerator is played by the *meta*
device (fake CUDA tensors cannot run backward on a machine without a GPU); :func:`fake_device`
lists where the real code's device-dependent choices are answered for the target (attention
kernel, ``tensor.data`` moves; ``plugins``: the compiled face-align op; the model decides its offloads
and dtype itself for the ``interfaces.DeviceTarget`` it is given).

Counted by formula instead of run: DeepSpeed's ZeRO buffers (master weights, Adam states and
gradient partitions per rank, the reduce bucket: the engine's own rule, ``engines.zero_buffers``,
after DeepSpeed 0.19's ``stage_1_and_2.py``). Not counted: the face detector (no gradient; it runs in onnxruntime, whose
arena is outside torch's allocator), the CUDA context and the caching allocator's fragmentation.

What the planner knows of the plugins (building the Wan model from a spec, the face reward's
parts) lives in ``rewardfl.plan.plugins``; this module is the generic half.

``--fast`` builds the DiT with 1 and then 2 blocks and extrapolates every phase's peak linearly to
the real block count (for a stack of identical blocks it agrees with the full run: the A14B step
gave the same 133.56 GiB both ways). Levers (what would make it fit) are re-planned that way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import math
import re
import sys
import time
import weakref
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from rewardfl.cli import user_error_exit
from rewardfl.config import ConfigError, TrainConfig, load_config
from rewardfl.interfaces import Algorithm, MicroBatch, Reward
from rewardfl.registry import load_plugin, resolve_config, resolve_plugins
from rewardfl.runtime import DistInfo
from rewardfl.sampling.policy import expert_boundary_of, plan_steps
from rewardfl.sampling.rollout import rollout
from rewardfl.training.engines import (PlainEngine, deepspeed_config, read_deepspeed_section, zero_buffers,
                                       zero_settings, zero_weight_dtype)

from .plugins import FacePlan, build_skeleton, dtype_name, resolve_spec

__all__ = ["MemoryTracker", "fake_device", "Plan", "plan_memory", "run_step", "parse_size", "dtype_name", "main"]

GiB = 2**30
ACCELERATOR = torch.device("meta")  # the planner's stand-in for the GPU (see fake_device)


# --------------------------------------------------------------------------- the tracker


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes per device, by storage, as the ops that run create and free them.

    Every tensor an op returns is looked up by its storage; a new storage is recorded with its
    bytes, device and *category* (``self.category`` at that moment, e.g. ``"activations: step 5
    (dit2, grad)"``, or a category set later with :meth:`retag`), and a weakref finalizer on it
    removes it when it is freed. Works the same on real tensors (a measured trace) and fake ones
    (a prediction). Tensors made without an op (``torch.from_numpy``, those made before the mode
    was entered) are not seen unless :meth:`track`-ed.

    ``phases[name]`` holds, per device, the highest live byte count while phase ``name`` ran and
    the live bytes per (device, category) at that moment (:meth:`phase`). After :meth:`mark`,
    ``new_peak`` is the highest byte count, all devices together, of storages made since.
    """

    def __init__(self, fake_mode=None):
        super().__init__()
        self._fake = fake_mode
        self._records: dict[int, list] = {}  # storage key -> [device, nbytes, category]
        self.live: collections.Counter = collections.Counter()  # (device, category) -> bytes
        self.device_live: collections.Counter = collections.Counter()  # device -> bytes
        self.peak: collections.Counter = collections.Counter()  # device -> bytes
        self.category = "setup"
        self.phase_name = "setup"
        self.phases: dict[str, dict[str, tuple[int, dict]]] = {}
        self.ops = 0
        self._epoch = 0  # storages made after the latest mark() count in new_live / new_peak
        self.new_live = self.new_peak = 0

    # ---------------------------------------------------------------- accounting

    @staticmethod
    def _device(t: torch.Tensor) -> str:
        return t.device.type

    def track(self, t: torch.Tensor, category: Optional[str] = None) -> None:
        """Record ``t``'s storage (once), under ``category`` or the current one."""
        st = t.untyped_storage()
        key = st._cdata
        if key in self._records:
            return
        device, nbytes = self._device(t), st.nbytes()
        self._records[key] = [device, nbytes, category or self.category, self._epoch]
        self._add(device, category or self.category, nbytes)
        if self._epoch:
            self.new_live += nbytes
            self.new_peak = max(self.new_peak, self.new_live)
        weakref.finalize(st, self._free, key)

    def retag(self, t: Optional[torch.Tensor], category: str) -> None:
        """Count ``t``'s storage under ``category`` from now on (tracked first if it is not)."""
        if t is None:
            return
        rec = self._records.get(t.untyped_storage()._cdata)
        if rec is None:
            self.track(t, category)
            return
        device, nbytes, old, _ = rec
        self.live[(device, old)] -= nbytes
        self.live[(device, category)] += nbytes
        rec[2] = category

    def category_of(self, t: torch.Tensor) -> Optional[str]:
        rec = self._records.get(t.untyped_storage()._cdata)
        return rec[2] if rec else None

    def _add(self, device: str, category: str, nbytes: int) -> None:
        self.live[(device, category)] += nbytes
        self.device_live[device] += nbytes
        now = self.device_live[device]
        if now > self.peak[device]:
            self.peak[device] = now
        seen = self.phases.setdefault(self.phase_name, {})
        if now > seen.get(device, (-1, None))[0]:
            seen[device] = (now, {k: v for k, v in self.live.items() if v})

    def _free(self, key: int) -> None:
        device, nbytes, category, epoch = self._records.pop(key)
        self.live[(device, category)] -= nbytes
        self.device_live[device] -= nbytes
        if epoch and epoch == self._epoch:
            self.new_live -= nbytes

    def mark(self) -> None:
        """Start counting ``new_live`` / ``new_peak`` from zero, for storages made from now on."""
        self._epoch += 1
        self.new_live = self.new_peak = 0

    @contextlib.contextmanager
    def phase(self, name: str, category: Optional[str] = None):
        """New storages count as ``category`` (default ``"activations: <name>"``) and phase ``name``
        records its own peak (starting from what is live when it begins)."""
        saved = self.category, self.phase_name
        self.category, self.phase_name = category or f"activations: {name}", name
        seen = self.phases.setdefault(name, {})
        for device, now in self.device_live.items():
            if now > seen.get(device, (-1, None))[0]:
                seen[device] = (now, {k: v for k, v in self.live.items() if v})
        try:
            yield
        finally:
            self.category, self.phase_name = saved

    # ---------------------------------------------------------------- dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inherit = None
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor):
            # a weight (or any tensor with a category) moved to another device keeps its category;
            # a dtype cast is a new temporary of the current phase
            if (kwargs or {}).get("dtype", args[0].dtype) == args[0].dtype:
                inherit = self.category_of(args[0])
        inputs = None
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if inputs is None:  # a view of (or in-place op on) an input allocates nothing: a
                    # storage made before tracking began (a weight seen through .t()) stays unseen
                    inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs))
                              if isinstance(a, torch.Tensor)}
                if t.untyped_storage()._cdata not in inputs:
                    self.track(t, inherit)
        if self._fake is not None:
            # FakeTensorMode memoises every fake tensor it makes through a weak reference, and
            # torch.utils.swap_tensors (Module.to on fake parameters) refuses tensors that have one
            self._fake.fake_tensor_converter.meta_converter.tensor_memo.clear()
        return out


# --------------------------------------------------------------------------- fake devices


_DATA_SETTER = torch.Tensor.data.__set__


def _sdpa_choice_cuda(q: torch.Tensor) -> int:
    """``torch.backends.cuda.SDPBackend`` that torch's CUDA selector takes for Wan's attention
    (no mask, no dropout) on an Ampere/Hopper GPU: flash for fp16/bf16 with head dim a multiple
    of 8 up to 256, else memory-efficient (any dtype, head dim a multiple of 8), else math."""
    head_dim = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
        return 1
    return 2 if head_dim % 8 == 0 else 0


class _DataDevice(TorchFunctionMode):
    """``tensor.data = other`` across devices (``move_frozen_``, ``_setup``): fake tensors of two
    devices have different dispatch keys, which ``set_data`` refuses, so the tensor's contents are
    swapped for ``other``'s instead (``torch.utils.swap_tensors``, as ``Module.to`` does with fake
    parameters): the same Python object, now on ``other``'s storage and device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func == _DATA_SETTER and hasattr(args[0], "fake_device") and hasattr(args[1], "fake_device"):
            old, new = args
            if old.fake_device != new.fake_device:
                new = new.detach()
                if isinstance(old, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
                else:
                    new.requires_grad_(old.requires_grad)
                torch.utils.swap_tensors(old, new)
                return None
        return func(*args, **(kwargs or {}))


def _emulated_attention(target: str, sdpa):
    """``scaled_dot_product_attention`` with the kernel the target device would run.

    torch picks the kernel from the device, and on meta that is the math kernel, which
    materialises the (L, L) attention matrix; on the accelerator this runs the target's kernel
    instead (CUDA: :func:`_sdpa_choice_cuda`; CPU: torch's own CPU selector), with its saved
    tensors. A plain function, not a mode: checkpoint recomputation in backward must see it too.
    """
    aten = torch.ops.aten

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device != ACCELERATOR or attn_mask is not None or dropout_p or enable_gqa:
            return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if target == "cuda":
            choice = _sdpa_choice_cuda(q)
        else:  # the CPU selector, asked with small real tensors of the same dtype and head dim
            with _disable_current_modes():
                small = torch.zeros(1, 1, 8, q.shape[-1], dtype=q.dtype, requires_grad=q.requires_grad)
                choice = int(torch._fused_sdp_choice(small, small, small, None, 0.0, is_causal, scale=scale))
        if choice == 1 and target == "cuda":
            return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[0]
        if choice == 1:
            return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)[0]
        if choice == 2:
            grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            return aten._scaled_dot_product_efficient_attention(q, k, v, None, grad, 0.0, is_causal, scale=scale)[0]
        return sdpa(q, k, v, None, 0.0, is_causal, scale=scale)

    return attention


@contextlib.contextmanager
def fake_device(target: str = "cuda"):
    """``(tracker, accelerator)``: fake tensors everywhere, the accelerator played by ``meta``.

    Inside, factories make fake tensors (no memory), and :class:`MemoryTracker` counts them.
    ``target`` is the device the plan is for ("cuda" or "cpu"). Two device-dependent choices of
    the real code are answered for it: :class:`_DataDevice` and :func:`_emulated_attention`.
    """
    if target not in ("cuda", "cpu"):
        raise ValueError(f"target: must be cuda or cpu, got {target!r}")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.allow_meta = True
    tracker = MemoryTracker(mode)
    functional = torch.nn.functional
    sdpa = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _emulated_attention(target, sdpa)
    try:
        with mode, tracker, _DataDevice():
            yield tracker, ACCELERATOR
    finally:
        functional.scaled_dot_product_attention = sdpa


@contextlib.contextmanager
def _real_device(device):
    """``(tracker, device)`` for a run on real tensors (a measured trace)."""
    tracker = MemoryTracker()
    with tracker:
        yield tracker, torch.device(device)


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """A prediction. Bytes per rank; ``phases``: (name, accelerator peak, host peak) in step order;
    ``components``: (what, bytes, where) live at the accelerator's peak, largest first."""

    model: str
    size: tuple[int, int, int]  # frames, height, width
    batch: int
    target: str
    gpu_bytes: int
    world_size: int
    engine: str
    peak: int
    host_peak: int
    host_load_peak: int
    #: the peak of what the step itself allocates, all devices together (what existed before it:
    #: weights, optimizer states, not counted): comparable with a measured trace of a real step
    step_peak: int
    peak_phase: str
    components: list[tuple[str, int, str]]
    phases: list[tuple[str, int, int]]
    notes: list[str]
    mode: str
    seconds: float
    levers: list[dict] = dataclasses.field(default_factory=list)
    #: per phase, the accelerator's bytes by category at that phase's peak
    snapshots: dict = dataclasses.field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes

    def to_json(self) -> dict:
        lever = min(self.levers, key=lambda x: x["delta_gib"]) if self.levers else None
        return {
            "peak_gib": round(self.peak / GiB, 3), "fits": self.fits, "gpu_memory_gib": round(self.gpu_bytes / GiB, 3),
            "world_size": self.world_size, "engine": self.engine, "model": self.model,
            "size": {"frames": self.size[0], "height": self.size[1], "width": self.size[2], "batch": self.batch},
            "peak_phase": self.peak_phase, "host_peak_gib": round(self.host_peak / GiB, 3),
            "host_load_peak_gib": round(self.host_load_peak / GiB, 3),
            "components": [{"component": c, "gib": round(b / GiB, 3), "where": w} for c, b, w in self.components],
            "phases": [{"phase": n, "gpu_gib": round(g / GiB, 3), "host_gib": round(h / GiB, 3)}
                       for n, g, h in self.phases],
            "lever": lever, "levers": self.levers, "notes": self.notes, "mode": self.mode,
            "seconds": round(self.seconds, 1),
        }


def video_size(cfg: TrainConfig) -> tuple[int, int, int]:
    """(frames, height, width) of the training clips: ``data.height``/``width`` when set, else the
    largest 480:832 (Wan's landscape) frame within ``data.max_pixels``, sides multiples of 16."""
    d = cfg.data
    if d.height and d.width:
        return d.num_frames, d.height, d.width
    h = int(math.sqrt(d.max_pixels * 480 / 832)) // 16 * 16
    w = int(math.sqrt(d.max_pixels * 832 / 480)) // 16 * 16
    while h * w > d.max_pixels:
        w -= 16
    return d.num_frames, h, w


def plan_memory(cfg: TrainConfig, plugins: dict, *, preset: Optional[str] = None, spec=None,
                gpu_bytes: int = 80 * GiB, world_size: int = 1, target: str = "cuda", fast: bool = False) -> Plan:
    """Predict one training step's peak memory per rank (see the module docstring).

    ``cfg`` resolved (``registry.resolve_config``) with ``plugins`` from ``registry.resolve_plugins``;
    ``preset``: architecture without files (``plugins.PRESETS``), or ``spec`` (a
    ``plugins.ModelSpec``) directly; ``target``: "cuda" (the plan) or "cpu" (to compare with a
    measured CPU run); ``fast``: extrapolate from 1- and 2-block DiTs.
    """

    t0 = time.perf_counter()
    spec = spec or resolve_spec(cfg, preset)
    layers = spec.dit.kwargs["num_layers"]
    if fast and layers > 2:
        cfg = _settle_auto_choices(cfg, plugins, spec, gpu_bytes, target)
        one = run_step(cfg, plugins, spec.with_layers(1), gpu_bytes=gpu_bytes, world_size=world_size, target=target)
        two = run_step(cfg, plugins, spec.with_layers(2), gpu_bytes=gpu_bytes, world_size=world_size, target=target)
        result = _extrapolate(one, two, layers)
        mode = f"extrapolated to {layers} DiT blocks from runs with 1 and 2"
    else:
        result = run_step(cfg, plugins, spec, gpu_bytes=gpu_bytes, world_size=world_size, target=target)
        mode = f"full ({layers} DiT blocks run)"
    if not (cfg.data.height and cfg.data.width):
        _, h, w = video_size(cfg)
        result["notes"].append(f"data.height/data.width unset: planned at {h}x{w}, the largest 480:832 frame within "
                               "data.max_pixels (set them to plan another size)")
    return _summarise(cfg, spec, result, target=target, gpu_bytes=gpu_bytes, world_size=world_size, mode=mode,
                      seconds=time.perf_counter() - t0)


def _summarise(cfg, spec, result: dict, *, target, gpu_bytes, world_size, mode, seconds) -> Plan:
    phases, gpu = result["phases"], result["device"]
    name, (peak, snapshot) = max(((n, p[gpu]) for n, p in phases.items() if gpu in p), key=lambda x: x[1][0])
    host_peak = max((p["cpu"][0] for n, p in phases.items() if "cpu" in p and n != "setup"), default=0)
    host_load = phases.get("setup", {}).get("cpu", (0, None))[0]
    where = "GPU" if target == "cuda" else "device"
    components = sorted(((c, b, where) for (d, c), b in snapshot.items() if b > 0 and d == gpu), key=lambda x: -x[1])
    if gpu != "cpu":
        components += sorted(((c, b, "CPU") for (d, c), b in snapshot.items() if b > 0 and d == "cpu"),
                             key=lambda x: -x[1])
    order = [(n, p.get(gpu, (0, None))[0], p.get("cpu", (0, None))[0] if gpu != "cpu" else 0)
             for n, p in phases.items() if n != "setup"]
    return Plan(model=spec.source, size=video_size(cfg), batch=cfg.per_device_train_batch_size, target=target,
                gpu_bytes=gpu_bytes, world_size=world_size, engine=result["engine"], peak=peak, host_peak=host_peak,
                host_load_peak=host_load, step_peak=result["step_peak"], peak_phase=name, components=components,
                phases=order, notes=result["notes"], mode=mode, seconds=seconds,
                snapshots={n: {c: b for (d, c), b in p[gpu][1].items() if d == gpu and b > 0}
                           for n, p in phases.items() if gpu in p})


def _settle_auto_choices(cfg, plugins, spec, gpu_bytes: int, target: str):
    """``cfg`` with ``model.offload_idle_expert: auto`` decided for the full-size model (the
    plugin's rule weighs the experts' bytes, which 1- and 2-block runs would understate)."""

    if getattr(cfg.model, "offload_idle_expert", None) != "auto":
        return cfg
    with fake_device(target) as (_, device):
        model = build_skeleton(plugins["model"], cfg, copy.deepcopy(cfg.model), spec, device=device, target=target,
                               gpu_bytes=gpu_bytes)
        decided = "yes" if model.offload_experts else "no"
        del model
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, offload_idle_expert=decided))


def _extrapolate(one: dict, two: dict, layers: int) -> dict:
    """Every phase's peak (and what was live at it) linear in the block count: f(1) + (L-1)(f(2)-f(1))."""
    def lin(a, b):
        return max(0, int(round(a + (layers - 1) * (b - a))))

    phases = {}
    for name, devices in two["phases"].items():
        phases[name] = {}
        for device, (peak2, snap2) in devices.items():
            peak1, snap1 = one["phases"].get(name, {}).get(device, (0, {}))
            keys = set(snap1) | set(snap2)
            phases[name][device] = (lin(peak1, peak2), {k: lin(snap1.get(k, 0), snap2.get(k, 0)) for k in keys})
    return dict(two, phases=phases, step_peak=lin(one["step_peak"], two["step_peak"]))


# --------------------------------------------------------------------------- one step


def run_step(cfg, plugins, spec, *, gpu_bytes: int = 80 * GiB, world_size: int = 1, target: str = "cuda",
             device: Optional[torch.device] = None) -> dict:
    """Build the model of ``spec`` and run one training step under a :class:`MemoryTracker`.

    Without ``device``: on fake tensors (the prediction). With a real ``device`` (the GPU check):
    the same code on real tensors there, weights random. Returns ``{"phases", "notes", "engine",
    "step_peak", "device"}`` (``device``: the tracker's name for the accelerator).
    """

    cfg = copy.deepcopy(cfg)
    notes: list[str] = []
    engine_name, ds = _engine(cfg, world_size)
    reward = FacePlan.load(cfg, plugins["reward"], notes)
    sampler = plugins["sampler"](cfg, cfg.sampler.options, device=device or ACCELERATOR)
    context = fake_device(target) if device is None else _real_device(device)
    with context as (tracker, accelerator), FacePlan.emulation(target if device is None else None):
        _step(cfg, plugins, spec, sampler, reward, tracker, accelerator, gpu_bytes=gpu_bytes, world_size=world_size,
              target=target, ds=ds, notes=notes, real=device is not None)
    return {"phases": tracker.phases, "notes": notes, "engine": engine_name, "step_peak": tracker.new_peak,
            "device": accelerator.type}


def _step(cfg, plugins, spec, sampler, reward, tracker, device, *, gpu_bytes, world_size, target, ds, notes, real):
    with tracker.phase("setup", "setup"):
        model = build_skeleton(plugins["model"], cfg, cfg.model, spec, device=device, target=target,
                               gpu_bytes=gpu_bytes, build_device=device if real else None)
        _tag_weights(tracker, model)
        if reward is not None:
            reward.place(tracker, device, fake=not real)
        with _disable_current_modes():  # the schedule is a few real numbers; planned as Trainer does
            plan = plan_steps(cfg, sampler, model.experts, model.trainable_experts(),
                              expert_boundary_of(plugins["model"], cfg))
        params = [p for _, p in model.trainable_parameters()]
        if not params:
            raise ConfigError("trainable_models: the model has no trainable parameters with this config")
        engine = _build_engine(cfg, tracker, params, ds, world_size, device)
    if model.offload_experts:
        notes.append("offload_idle_expert: on (the idle expert's frozen weights wait in CPU memory)")
    tracker.mark()
    # the algorithm's class as the registry resolves it (a caller may hand over only model, sampler and reward)
    algorithm_cls = plugins.get("algorithm") or load_plugin("algorithm", cfg.algorithm.name)
    scored = _train_step(cfg, model, sampler, plan, reward, engine, tracker, device, algorithm_cls,
                         plugins["reward"])
    if not scored:  # a policy gradient alone: the reward ran without gradient, what FacePlan said does not apply
        notes[:] = [n for n in notes if not n.startswith("reward")]
        notes.append(f"reward: scored without gradient under algorithm {cfg.algorithm.name} (not planned: on the "
                     "GPU it holds only the frames it converts)")


def _tag_weights(tracker: MemoryTracker, model) -> None:
    """Name every module's storages after what they hold (they were born as "setup")."""
    def tag(module, name):
        for p in module.parameters():
            if not p.requires_grad:
                tracker.retag(p, f"{name} weights, {dtype_name(p)}")
        for b in module.buffers():
            tracker.retag(b, f"{name} weights, {dtype_name(b)}")

    names = {"dit": "dit (high-noise expert)", "dit2": "dit2 (low-noise expert)"}
    if len(model.experts) == 1:
        names = {model.experts[0]: f"{model.experts[0]} (expert)"}
    for r, dit in model.dits.items():
        tag(dit, names.get(r, r))
        for t in getattr(dit, "freqs", ()):
            tracker.retag(t, "DiT RoPE tables (per expert, kept on the CPU)")
    for r, dit in model.frozen_copies.items():
        tag(dit, f"{r} frozen copy (regulariser)")
    if model.text_encoder is not None:
        tag(model.text_encoder, "text encoder (umT5)")
    tag(model.vae, "VAE")
    kind = "LoRA" if model.lora_experts else "full fine-tuning"
    for _, p in model.trainable_parameters():
        tracker.retag(p, f"trainable parameters ({kind}), {dtype_name(p)}")


class _UnscoredReward(Reward):
    """The reward an algorithm is built with in the planner: never called (the planner's reward-backprop
    micro-batch scores with :class:`FacePlan` or a stand-in; a policy gradient's reward runs without
    gradient, outside what the planner counts). For ``hybrid``: a reward whose weighted entries all give
    gradients is reward backprop alone; otherwise both halves are planned (an upper bound when every
    entry gives none)."""

    def __init__(self, reward_cls, options):
        self.policy = reward_cls.gradient_problem(options) is not None

    def __call__(self, videos, contexts):
        raise RuntimeError("the planner does not score videos")

    def gradient_split(self):
        return self, (self if self.policy else None)


def _train_step(cfg, model, sampler, plan, reward, engine, tracker: MemoryTracker, device, algorithm_cls,
                reward_cls) -> bool:
    """One optimizer step of one micro-batch, as the trainer runs it: encode, sample, decode, reward, loss,
    backward, update; each part under its own phase. The micro-batch is the algorithm's
    (``Algorithm.planned_micro_batch``); reward backprop's is ``backprop`` below: the core's ``rollout``
    and the reward's loss. Returns whether that reward-backprop micro-batch ran (the reward's loss was planned)."""
    frames, height, width = video_size(cfg)
    batch_size = cfg.per_device_train_batch_size
    prompts = [f"prompt {i}" for i in range(batch_size)]
    # classifier-free guidance also encodes the negative prompt (rollout runs the model on both)
    with tracker.phase("encode (text encoder)"):
        model.plan_prompts(prompts + ([sampler.negative_prompt] if sampler.uses_guidance else []))
    algorithm = algorithm_cls(cfg, cfg.algorithm.options, model=model, sampler=sampler, plan=plan,
                              reward=_UnscoredReward(reward_cls, cfg.reward.options))
    # reward backprop's model calls are labelled with the sampling step they belong to (rollout runs the
    # plan in order); another algorithm's by expert and whether they carry gradient
    by_step = type(algorithm).planned_micro_batch is Algorithm.planned_micro_batch
    position = {"i": 0}
    denoise, step, encode, decode = model.denoise, sampler.step, model.encode, model.decode

    def labelled_denoise(expert, x, timestep, cond, *, base=False):
        grad = "grad" if torch.is_grad_enabled() else "no grad"
        if by_step:
            p = plan[min(position["i"], len(plan) - 1)]
            name = (f"step {p.index} ({expert}): regulariser's base forward (no grad)" if base else
                    f"step {p.index} ({expert}, {'grad' if p.grad else 'no grad'})")
        else:
            name = f"denoise ({expert}): reference forward (no grad)" if base else f"denoise ({expert}, {grad})"
        with tracker.phase(name):
            return denoise(expert, x, timestep, cond, base=base)

    def counted_step(*args, **kwargs):
        out = step(*args, **kwargs)
        position["i"] += 1
        return out

    def labelled(fn, name):
        def call(*args, **kwargs):
            with tracker.phase(name if torch.is_grad_enabled() else name.replace("with grad", "no grad")):
                return fn(*args, **kwargs)
        return call

    model.denoise, sampler.step = labelled_denoise, counted_step
    model.encode = labelled(encode, "encode (VAE: first frame)")
    model.decode = labelled(decode, "decode with grad (VAE)")
    batch = {"first_frame": torch.zeros(batch_size, 3, height, width), "prompt": prompts,
             "index": list(range(batch_size))}

    ran = []

    def backprop() -> MicroBatch:
        ran.append(True)
        videos, kl = rollout(model, sampler, plan, batch, num_frames=frames, step=0, seeds=list(range(batch_size)),
                             kl_weight=cfg.kl_weight)
        if reward is not None:
            reward_loss = reward.loss(videos, tracker, device)
        else:
            reward_loss = -videos.float().mean()  # a stand-in reward: the graph through decode and the DiT
        none = torch.zeros(batch_size, dtype=torch.bool)
        return MicroBatch(loss=reward_loss + cfg.kl_weight * kl, scores=none.float(), valid=none, reward_loss=0.0,
                          kl_loss=0.0, metrics={}, videos=videos)

    out = algorithm.planned_micro_batch(batch, 0, backprop)
    with tracker.phase("backward"):
        engine.backward(out.loss)
        del out
    with tracker.phase("optimizer update"):
        engine.update()
    return bool(ran)


# --------------------------------------------------------------------------- optimizer engines


def _engine(cfg, world_size: int) -> tuple[str, Optional[dict]]:
    """(description, DeepSpeed's ZeRO settings (``engines.zero_settings``) or None for the plain AdamW engine)."""
    if cfg.deepspeed is None:
        spread = f", gradients all-reduced over {world_size} processes" if world_size > 1 else ""
        return f"AdamW (plain engine{spread})", None
    settings = zero_settings(deepspeed_config(cfg, accum=cfg.gradient_accumulation_steps, world_size=world_size))
    name = (f"DeepSpeed ZeRO-{settings['stage']} over {world_size} rank{'s' if world_size > 1 else ''}"
            f"{', optimizer offloaded to CPU' if settings['offload'] else ''}{', bf16' if settings['bf16'] else ''}")
    return name, settings


class _PlainEngine:
    """``engines.PlainEngine`` on fake tensors: its AdamW (torch's, real code) with states made up
    front (as after the first update), its backward, and its update with the engine's own
    pre-update copies (``PlainEngine.pre_update_copy``: only for trainable weights up to
    ``engines.ROLLBACK_MAX_BYTES``)."""

    def __init__(self, cfg, tracker, params, accum: int):
        self.engine = PlainEngine(cfg, params, lambda step: 1.0, DistInfo())
        self.tracker, self.params, self.accum = tracker, params, accum
        with tracker.phase("setup", "optimizer states (AdamW), fp32"):
            for p in params:
                p.grad = torch.zeros_like(p)
            self.engine.optimizer.step()
            self.engine.optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, f"gradients, {dtype_name(p.grad)}"))
        if accum > 1:  # later micro-batches run with the earlier ones' gradients live
            for p in params:
                p.grad = torch.zeros_like(p)
                tracker.retag(p.grad, f"gradients, {dtype_name(p)}")

    def backward(self, loss):
        self.engine.backward(loss, self.accum)

    def update(self):
        e = self.engine
        torch.nn.utils.clip_grad_norm_(self.params, e.max_grad_norm)
        saved = e.pre_update_copy()  # live during the update, as in PlainEngine.step
        e.optimizer.step()
        del saved
        e.optimizer.zero_grad(set_to_none=True)


class _DeepSpeedEngine:
    """DeepSpeed ZeRO's per-rank buffers (``engines.zero_buffers``), allocated as fake tensors where
    DeepSpeed keeps them. Gradients are reduced into these buffers as backward produces them (freed
    at once here)."""

    def __init__(self, cfg, tracker, params, settings: dict, world_size: int, device):
        self.tracker, self.params = tracker, params
        dtype = zero_weight_dtype(settings)
        psi = sum(p.numel() for p in params)
        with tracker.phase("setup", "DeepSpeed buffers"):
            for p in params:  # DeepSpeed casts the trained modules to bf16 (engine.module.bfloat16())
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
                tracker.retag(p, f"trainable parameters (flat buffer), {dtype_name(p)}")
            self.buffers = {name: torch.empty(numel, dtype=dt, device="cpu" if on_cpu else device)
                            for name, (numel, dt, on_cpu) in zero_buffers(settings, psi, world_size).items()}
            for name, t in self.buffers.items():
                tracker.retag(t, f"DeepSpeed: {name}, {dtype_name(t)}")
        for p in params:  # reduced into the bucket / partition as they come
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

    def backward(self, loss):
        loss.backward()

    def update(self):  # the update runs inside the partitions above (on the CPU when offloaded)
        pass


def _build_engine(cfg, tracker, params, ds: Optional[dict], world_size: int, device):
    if ds is None:
        return _PlainEngine(cfg, tracker, params, cfg.gradient_accumulation_steps)
    return _DeepSpeedEngine(cfg, tracker, params, ds, world_size, device)


# --------------------------------------------------------------------------- levers


def lever_candidates(cfg: TrainConfig, plugins: dict) -> list[tuple[str, callable]]:
    """(what to set, how to change a config copy) for the memory levers this config has not pulled.

    Spatial VAE tiling (``model.vae_tile``) is not among them: its decode runs once per tile, which
    multiplies the fake decode's cost (minutes per tile at 81x480x832); plan it with ``--set``."""
    out = []
    o = cfg.model
    if not o.use_gradient_checkpointing_offload:
        out.append(("use_gradient_checkpointing_offload: true",
                    lambda c: setattr(c.model, "use_gradient_checkpointing_offload", True)))
    if not getattr(o, "gradient_checkpointing", True):
        out.append(("model.gradient_checkpointing: true", lambda c: setattr(c.model, "gradient_checkpointing", True)))
    if getattr(o, "offload_idle_expert", "no") in ("auto", "no", False):
        out.append(("model.offload_idle_expert: yes", lambda c: setattr(c.model, "offload_idle_expert", "yes")))
    if not getattr(o, "vae_checkpointing", True):
        out.append(("model.vae_checkpointing: true", lambda c: setattr(c.model, "vae_checkpointing", True)))
    if cfg.deepspeed is not None:
        section = read_deepspeed_section(cfg)
        zero = section.get("zero_optimization") or {}
        if (zero.get("offload_optimizer") or {}).get("device", "none") in ("none", None):
            def offload(c, section=section):
                s = copy.deepcopy(section)
                s.setdefault("zero_optimization", {"stage": 2})["offload_optimizer"] = {"device": "cpu"}
                c.deepspeed = s
            out.append(("deepspeed.zero_optimization.offload_optimizer.device: cpu", offload))
    else:
        def zero2(c):
            c.deepspeed = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
        out.append(("deepspeed: ZeRO-2 with offload_optimizer.device: cpu", zero2))
    return out


def evaluate_levers(cfg, plugins, plan: Plan, *, preset, log=None) -> list[dict]:
    """Re-plan (fast mode) with each lever and without; each lever's change of the peak."""
    kwargs = dict(preset=preset, gpu_bytes=plan.gpu_bytes, world_size=plan.world_size, target=plan.target, fast=True)
    base = plan_memory(cfg, plugins, **kwargs).peak
    out = []
    for what, change in lever_candidates(cfg, plugins):
        c = copy.deepcopy(cfg)
        change(c)
        if log:
            log(f"re-planning with {what} ...")
        peak = plan_memory(c, plugins, **kwargs).peak
        out.append({"change": what, "delta_gib": round((peak - base) / GiB, 3),
                    "peak_gib": round((plan.peak + peak - base) / GiB, 3)})
    return sorted(out, key=lambda x: x["delta_gib"])


# --------------------------------------------------------------------------- output


def parse_size(text: str) -> int:
    """``80GiB``, ``80GB``, ``81920MiB`` or a number of GiB -> bytes; ValueError naming --gpu-memory."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|[KMGT]?)\s*", text or "", re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-memory: expected a size such as 80GiB, 80GB or 80 (GiB), got {text!r}")
    value, unit = float(m.group(1)), m.group(2).upper()
    if not unit:
        unit = "GIB"
    power = "KMGT".index(unit[0]) + 1
    base = 1000 if unit.endswith("B") and "I" not in unit else 1024
    if value <= 0:
        raise ValueError(f"--gpu-memory: must be > 0, got {text!r}")
    return int(value * base**power)


def render(plan: Plan) -> str:
    f, h, w = plan.size
    lines = [f"model      {plan.model}",
             f"step       {plan.batch} x {f}x{h}x{w} (batch x frames x H x W); {plan.engine}",
             f"planned    {plan.mode}, {plan.seconds:.0f} s on the CPU (fake tensors)", ""]
    lines.append(f"{'at the peak (' + plan.peak_phase + ')':<72} {'GiB':>8}  where")
    for what, nbytes, where in plan.components:
        if nbytes >= 0.005 * GiB:
            lines.append(f"  {what:<70} {nbytes / GiB:8.2f}  {where}")
    lines += ["", f"{'peak by phase':<72} {'GPU GiB':>8}  {'host GiB':>8}"]
    for name, g, c in plan.phases:
        lines.append(f"  {name:<70} {g / GiB:8.2f}  {c / GiB:8.2f}")
    lines += ["", f"predicted peak per rank: {plan.peak / GiB:.1f} GiB (host memory: {plan.host_peak / GiB:.1f} GiB "
                  f"during the step, {plan.host_load_peak / GiB:.1f} GiB while the weights load)"]
    verdict = "fits" if plan.fits else "does not fit"
    lines.append(f"{verdict} in {plan.gpu_bytes / GiB:.0f} GiB")
    if plan.levers:
        best = plan.levers[0]
        if best["delta_gib"] < 0:
            lines.append(f"biggest lever: {best['change']}: {best['delta_gib']:+.1f} GiB (re-planned: "
                         f"{best['peak_gib']:.1f} GiB)")
        for lever in plan.levers[1:]:
            if lever["delta_gib"] < -0.05:  # those that change nothing here (already in effect) are left out
                lines.append(f"  other: {lever['change']}: {lever['delta_gib']:+.1f} GiB")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML training config")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="memory of one GPU, e.g. 80GiB (default: this machine's GPU, else 80GiB)")
    parser.add_argument("--world-size", type=int, default=1, metavar="N", help="ranks (GPUs) the step runs on")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for sections); repeatable")
    parser.add_argument("--preset", default=None,
                        help="architecture without weight files: wan2.2-i2v-a14b or wan2.2-ti2v-5b")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--fast", action="store_true",
                        help="run 1- and 2-block DiTs and extrapolate (A14B: about 1 min instead of 4 on 2 cores)")
    parser.add_argument("--levers", action="store_true", help="re-plan with each memory lever even when it fits")
    return parser


@user_error_exit("rewardfl.plan")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.world_size < 1:
        raise ValueError(f"--world-size: must be >= 1, got {args.world_size}")
    if args.gpu_memory is not None:
        gpu_bytes = parse_size(args.gpu_memory)
    elif torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu_bytes = 80 * GiB
    cfg = load_config(args.config, args.overrides, paths=False)
    if cfg.model_name not in ("wan2_2", "wan2_2_tiny"):
        raise ConfigError(f"model_name: the planner knows the wan2_2 family, not {cfg.model_name!r}")
    plugins = resolve_plugins(cfg)
    cfg = resolve_config(cfg, plugins)
    log = (lambda m: print(m, file=sys.stderr)) if not args.json else None
    # libraries print to stdout on import (DeepSpeed's accelerator notice): --json keeps it to one object
    with contextlib.redirect_stdout(sys.stderr):
        plan = plan_memory(cfg, plugins, preset=args.preset, gpu_bytes=gpu_bytes, world_size=args.world_size,
                           fast=args.fast)
        if args.levers or not plan.fits:
            plan.levers = evaluate_levers(cfg, plugins, plan, preset=args.preset, log=log)
    print(json.dumps(plan.to_json()) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
