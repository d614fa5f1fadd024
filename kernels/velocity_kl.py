"""Fused velocity regulariser: ``mean((v - v_ref)^2) / (2 * sigma^2)`` in one pass, fp32.

One op, one file (Liger-Kernel style): Triton forward (fp32 partial sums per
8192-element chunk, then one single-program kernel that adds them in a fixed
order and scales: deterministic, two launches) and backward kernels, the pure-torch
reference, and the ``torch.autograd.Function``. Public entry point:
:func:`velocity_kl`.

Gradients: ``grad_v = grad_out * (v - v_ref) / (numel * sigma^2)``; ``v_ref`` (the
base model's velocity) gets none.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import autotune, cast_for_store, device_guard, elementwise_configs, launch_meta, resolve_backend

__all__ = ["velocity_kl", "velocity_kl_reference", "VelocityKLFunction"]

_CONFIGS = elementwise_configs()
#: elements one forward program reduces to one partial sum (a multiple of every BLOCK)
_CHUNK = 8192
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- Triton kernels


@autotune(_CONFIGS, key=["n"])
@triton.jit
def _velocity_kl_fwd_kernel(v_ptr, r_ptr, partial_ptr, n, INT64: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        offs = pid * CHUNK + start + tl.arange(0, BLOCK)
        valid = offs < n
        d = tl.load(v_ptr + offs, mask=valid, other=0.0).to(tl.float32) \
            - tl.load(r_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        acc += d * d
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _velocity_kl_finish_kernel(partial_ptr, out_ptr, num_partials, scale, BLOCK: tl.constexpr):
    """One program: the sum of the partials, times ``scale``, into the 0-dim output (one launch, in order)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < num_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@autotune(_CONFIGS, key=["n"])
@triton.jit
def _velocity_kl_bwd_kernel(v_ptr, r_ptr, gout_ptr, gv_ptr, n, scale, INT64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    # the upstream gradient is read on the device: no host sync
    factor = tl.load(gout_ptr).to(tl.float32) * scale
    d = tl.load(v_ptr + offs, mask=valid).to(tl.float32) - tl.load(r_ptr + offs, mask=valid).to(tl.float32)
    tl.store(gv_ptr + offs, cast_for_store(d * factor, gv_ptr), mask=valid)


def _num_partials(n: int) -> int:
    return triton.cdiv(n, _CHUNK)


def _velocity_kl_triton(v, v_ref, sigma: float, partials: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``partials``: ``(_num_partials(n),)`` fp32 scratch the kernel fills (allocated when None)."""
    n = v.numel()
    if partials is None:
        partials = torch.empty(_num_partials(n), dtype=torch.float32, device=v.device)
    out = torch.empty((), dtype=torch.float32, device=v.device)
    with device_guard(v):
        _velocity_kl_fwd_kernel[(partials.numel(),)](v, v_ref, partials, n, INT64=n > _INT32_MAX, CHUNK=_CHUNK,
                                                     **launch_meta(_CONFIGS))
        _velocity_kl_finish_kernel[(1,)](partials, out, partials.numel(), 1.0 / (n * 2.0 * sigma * sigma),
                                         BLOCK=1024)
    return out


def _velocity_kl_backward_triton(g, v, v_ref, sigma: float, grad_v: Optional[torch.Tensor] = None) -> torch.Tensor:
    n = v.numel()
    if grad_v is None:
        grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
    with device_guard(v):
        _velocity_kl_bwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            v, v_ref, g.contiguous(), grad_v, n, 1.0 / (n * sigma * sigma), INT64=n > _INT32_MAX,
            **launch_meta(_CONFIGS),
        )
    return grad_v


# --------------------------------------------------------------------------- torch reference


def _compute_dtype(v, v_ref) -> torch.dtype:
    return torch.float64 if torch.float64 in (v.dtype, v_ref.dtype) else torch.float32


def velocity_kl_reference(v: torch.Tensor, v_ref: torch.Tensor, sigma: float) -> torch.Tensor:
    """The regulariser's semantics in plain torch ops (``v_ref`` detached, as in the fused op)."""
    c = _compute_dtype(v, v_ref)
    d = v.to(c) - v_ref.detach().to(c)
    return (d * d).mean() / (2.0 * sigma * sigma)


def _velocity_kl_backward_reference(g, v, v_ref, sigma: float) -> torch.Tensor:
    c = _compute_dtype(v, v_ref)
    return ((v.to(c) - v_ref.to(c)) * (g.to(c) / (v.numel() * sigma * sigma))).to(v.dtype)


# --------------------------------------------------------------------------- autograd


class VelocityKLFunction(torch.autograd.Function):
    """Autograd for the regulariser; ``backend`` is ``"triton"`` or ``"torch"``."""

    @staticmethod
    def forward(ctx, v, v_ref, sigma, backend):
        ctx.save_for_backward(v, v_ref)
        ctx.sigma = sigma
        ctx.backend = backend
        if backend == "triton":
            return _velocity_kl_triton(v, v_ref, sigma)
        return velocity_kl_reference(v, v_ref, sigma)

    @staticmethod
    def backward(ctx, g):
        v, v_ref = ctx.saved_tensors
        grad_v = None
        if ctx.needs_input_grad[0]:
            if ctx.backend == "triton":
                grad_v = _velocity_kl_backward_triton(g, v, v_ref, ctx.sigma)
            else:
                grad_v = _velocity_kl_backward_reference(g, v, v_ref, ctx.sigma)
        return grad_v, None, None, None


# --------------------------------------------------------------------------- public entry point


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor, sigma: float, *, backend: Optional[str] = None) -> torch.Tensor:
    """``mean((v - v_ref)^2) / (2 * sigma^2)``: the velocity regulariser of one sampling step.

    Args:
        v: velocity of the trained model, any shape, fp32/bf16/fp16 (float64 runs the reference).
        v_ref: the base model's velocity at the same input, same shape; gets no gradient.
        sigma: the step's noise level, > 0 (``timestep / 1000``).
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (default: the process-wide setting).

    Returns:
        0-dim fp32 tensor (float64 when an input is float64), reduced in fp32.
    """
    if v.shape != v_ref.shape:
        raise ValueError(f"velocity_kl: v has shape {tuple(v.shape)}, v_ref {tuple(v_ref.shape)}; they must match")
    if v.device != v_ref.device:
        raise ValueError(f"velocity_kl: v is on {v.device}, v_ref on {v_ref.device}")
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"velocity_kl: sigma must be > 0, got {sigma}")
    if v.numel() == 0:
        raise ValueError("velocity_kl: v is empty; the mean of no elements is undefined")
    chosen = resolve_backend(backend, v)
    if chosen == "triton" and v_ref.dtype == torch.float64:
        chosen = "torch"  # the kernels compute in fp32
    if chosen == "triton":
        v, v_ref = v.contiguous(), v_ref.contiguous()
    return VelocityKLFunction.apply(v, v_ref.detach(), sigma, chosen)
