"""Moving weights and activations to host memory and back: idle experts' frozen weights
(``move_frozen_``) and checkpointed activations (``offloaded_checkpoint``).

Activation checkpointing whose saved inputs wait in CPU memory until backward:

``torch.utils.checkpoint`` (non-reentrant) keeps a checkpoint's inputs alive where they are, so
wrapping it in ``torch.autograd.graph.save_on_cpu`` (as diffsynth does) moves nothing: the block
inputs stay on the GPU. Here a checkpointed call copies the inputs marked in ``offload`` to
(pinned) host memory in forward, runs ``fn`` without a graph, and in backward copies them back,
re-runs ``fn`` with autograd and back-propagates into them and into ``fn``'s trainable weights.
Used for the DiT blocks (input 335 MB per block at 480x832x81 for the 14B expert) and for the
VAE decoder's per-frame steps (their causal-conv caches, about 2 GB per latent frame at 480x832).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["offloaded_checkpoint", "move_frozen_"]


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def move_frozen_(module: torch.nn.Module, device) -> None:
    """Move ``module``'s frozen parameters (``requires_grad`` False) and its buffers to ``device``.

    In place; the Parameter objects stay, only frozen ones get new storage. Trainable parameters
    are never touched. DeepSpeed ZeRO-1/2 make their ``.data`` views into its flat buffers, which
    the optimizer updates; ``Module.to`` across devices rebinds every ``param.data`` to a fresh
    tensor. DeepSpeed 0.19's ZeRO-1/2 optimizer re-points the views after each step (until then a
    moved parameter is a second copy), but its BF16_Optimizer (ZeRO-1, bf16 weights, fp32 gradient
    accumulation) does not, and the model would keep sampling with the weights of its first move.
    Parameters partitioned by ZeRO-3 (``ds_id``) are DeepSpeed's to place and are skipped too.
    Tensors already on ``device`` are left as they are.
    """
    device = torch.device(device)
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad or hasattr(p, "ds_id") or _on(p, device):
                continue
            p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            if not _on(b, device):
                setattr(m, name, b.to(device))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    pin = t.device.type == "cuda"
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    host.copy_(t.detach(), non_blocking=pin)
    return host


class _OffloadedCheckpoint(torch.autograd.Function):
    """``anchor`` is an empty tensor requiring grad: backward then runs even when no input needs a
    gradient (the trainable weights are inside ``fn``)."""

    @staticmethod
    def forward(ctx, fn, offload, anchor, *args):
        ctx.fn = fn
        ctx.meta = []  # per arg: (kind, device, requires_grad)
        kept = []
        for a, off in zip(args, offload):
            if isinstance(a, torch.Tensor):
                ctx.meta.append(("host" if off else "kept", a.device, a.requires_grad))
                kept.append(_to_host(a) if off else a.detach())
            else:
                ctx.meta.append(("obj", None, False))
                kept.append(a)
        ctx.kept = kept
        with torch.no_grad():
            out = fn(*args)
        ctx.single = not isinstance(out, tuple)
        return out if ctx.single else tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        args = []
        for (kind, device, req), a in zip(ctx.meta, ctx.kept):
            if kind == "obj":
                args.append(a)
                continue
            t = a.to(device, non_blocking=True) if kind == "host" else a
            args.append(t.detach().requires_grad_(req))
        ctx.kept = None
        with torch.enable_grad():
            out = ctx.fn(*args)
        outs = (out,) if ctx.single else tuple(out)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:  # accumulates into fn's trainable weights, hooks included
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        arg_grads = [a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]
        return (None, None, None, *arg_grads)


def offloaded_checkpoint(fn: Callable, *args, offload: Sequence[bool]):
    """``fn(*args)`` checkpointed, with the tensor args flagged in ``offload`` kept on the CPU.

    ``fn`` must be deterministic (it runs again in backward). Non-tensor args and outputs pass
    through unchanged. Without autograd it is simply ``fn(*args)``.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    if len(offload) != len(args):
        raise ValueError(f"offloaded_checkpoint: {len(args)} args but {len(offload)} offload flags")
    anchor = torch.empty(0, requires_grad=True)
    return _OffloadedCheckpoint.apply(fn, tuple(offload), anchor, *args)
