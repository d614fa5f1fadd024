"""Fused flow-matching Euler step: ``x_next = x + dt * v_mix``, cast, first-frame injection.

One op, one file (Liger-Kernel style): the Triton forward and backward kernels,
the pure-torch reference (the test oracle, and the CPU path), and the
``torch.autograd.Function`` tying them together. The public entry point is
:func:`flow_step`.

Semantics (all arithmetic in fp32, float64 for float64 inputs)::

    v_mix  = v_uncond + guidance * (v - v_uncond)    # classifier-free guidance; v when v_uncond is None
    x_next = x + dt * v_mix                          # = x + (dt*g) * v + (dt*(1-g)) * v_uncond
    x_next = where(inject_mask != 0, inject_latent, x_next)
    return x_next.to(out_dtype)

Gradients: ``grad_x = g``, ``grad_v = dt*guidance*g``, ``grad_v_uncond = dt*(1-guidance)*g``,
all zero where injected; ``grad_inject_latent`` is ``g`` where injected (summed over
broadcast dims); the mask gets none.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (
    autotune,
    broadcast_strides,
    cast_for_store,
    collapse_dims,
    device_guard,
    elementwise_configs,
    launch_meta,
    resolve_backend,
)

__all__ = ["flow_step", "flow_step_reference", "FlowStepFunction"]

_CONFIGS = elementwise_configs()
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- Triton kernels


@triton.jit
def _block(S1, S2, S3, S4, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of a contiguous ``(S0, S1, S2, S3, S4)`` index space.

    Programs walk rows (one index of the first four dims) and BLOCK-wide pieces of
    the innermost dim, so the row's indices cost scalar divisions once per program,
    not per element. Returns (flat offsets, in-bounds mask, innermost index, i0, i1, i2, i3).
    """
    pid = tl.program_id(0)
    columns = tl.cdiv(S4, BLOCK)
    row = pid // columns
    inner = (pid % columns) * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        row = row.to(tl.int64)
        inner = inner.to(tl.int64)
    i3 = row % S3
    rest = row // S3
    i2 = rest % S2
    rest = rest // S2
    return row * S4 + inner, inner < S4, inner, rest // S1, rest % S1, i2, i3


@autotune(_CONFIGS, key=["n", "S4", "HAS_UNCOND", "HAS_INJECT"])
@triton.jit
def _flow_step_fwd_kernel(
    x_ptr, v_ptr, vu_ptr, mask_ptr, lat_ptr, out_ptr,
    n, a, b,  # a = dt * guidance, b = dt * (1 - guidance)
    S1, S2, S3, S4,
    ms0, ms1, ms2, ms3, ms4,
    ls0, ls1, ls2, ls3, ls4,
    HAS_UNCOND: tl.constexpr, HAS_INJECT: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, valid, inner, i0, i1, i2, i3 = _block(S1, S2, S3, S4, INT64, BLOCK)
    out = tl.load(x_ptr + offs, mask=valid).to(tl.float32) + a * tl.load(v_ptr + offs, mask=valid).to(tl.float32)
    if HAS_UNCOND:
        out += b * tl.load(vu_ptr + offs, mask=valid).to(tl.float32)
    if HAS_INJECT:
        mask_row = i0 * ms0 + i1 * ms1 + i2 * ms2 + i3 * ms3
        inject = tl.load(mask_ptr + mask_row + inner * ms4, mask=valid, other=0) != 0
        lat_row = i0 * ls0 + i1 * ls1 + i2 * ls2 + i3 * ls3
        latent = tl.load(lat_ptr + lat_row + inner * ls4, mask=valid & inject, other=0.0).to(tl.float32)
        out = tl.where(inject, latent, out)
    tl.store(out_ptr + offs, cast_for_store(out, out_ptr), mask=valid)


@autotune(_CONFIGS, key=["n", "S4", "WRITE_GX", "WRITE_GV", "WRITE_GVU", "HAS_INJECT"])
@triton.jit
def _flow_step_bwd_kernel(
    g_ptr, mask_ptr, gx_ptr, gv_ptr, gvu_ptr,
    n, a, b,
    S1, S2, S3, S4,
    ms0, ms1, ms2, ms3, ms4,
    WRITE_GX: tl.constexpr, WRITE_GV: tl.constexpr, WRITE_GVU: tl.constexpr, HAS_INJECT: tl.constexpr,
    INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, valid, inner, i0, i1, i2, i3 = _block(S1, S2, S3, S4, INT64, BLOCK)
    g = tl.load(g_ptr + offs, mask=valid).to(tl.float32)
    if HAS_INJECT:
        mask_row = i0 * ms0 + i1 * ms1 + i2 * ms2 + i3 * ms3
        inject = tl.load(mask_ptr + mask_row + inner * ms4, mask=valid, other=0) != 0
        g = tl.where(inject, 0.0, g)
    if WRITE_GX:
        tl.store(gx_ptr + offs, cast_for_store(g, gx_ptr), mask=valid)
    if WRITE_GV:
        tl.store(gv_ptr + offs, cast_for_store(a * g, gv_ptr), mask=valid)
    if WRITE_GVU:
        tl.store(gvu_ptr + offs, cast_for_store(b * g, gvu_ptr), mask=valid)


def _grid(n: int, inner: int):
    """Rows of the first four dims times BLOCK-wide pieces of the innermost (``inner`` elements)."""
    return lambda meta: ((n // inner) * triton.cdiv(inner, meta["BLOCK"]),)


class _Injection:
    """The injection mask and latent as 5-D broadcast strides over the output's index space."""

    def __init__(self, shape, mask: torch.Tensor, latent: torch.Tensor):
        strides = [broadcast_strides(mask, shape, "inject_mask"), broadcast_strides(latent, shape, "inject_latent")]
        collapsed = collapse_dims(shape, strides)
        if collapsed is None:  # more than 5 dims that broadcast differently: materialise both
            mask, latent = (torch.broadcast_to(t, shape).contiguous() for t in (mask, latent))
            collapsed = collapse_dims(shape, [mask.stride(), latent.stride()])
        self.mask, self.latent = mask, latent
        self.sizes, (self.mask_strides, self.latent_strides) = collapsed


def _injection_args(inj: Optional[_Injection], n: int) -> tuple:
    """The kernels' S1..S4 and mask strides; without injection one row of ``n`` (strides unused)."""
    if inj is None:
        return (1, 1, 1, n, *(0,) * 5)
    return (*inj.sizes[1:], *inj.mask_strides)


def _flow_step_triton(x, v, v_uncond, inj: Optional[_Injection], a: float, b: float, out: torch.Tensor):
    """Launch the forward kernel writing into ``out`` (contiguous, shaped like ``x``)."""
    n = x.numel()
    if n == 0:
        return out
    args = _injection_args(inj, n)
    with device_guard(x):
        _flow_step_fwd_kernel[_grid(n, args[3])](
            x, v, v_uncond if v_uncond is not None else x, inj.mask if inj else x, inj.latent if inj else x, out,
            n, a, b, *args, *(inj.latent_strides if inj else (0,) * 5),
            HAS_UNCOND=v_uncond is not None, HAS_INJECT=inj is not None, INT64=n > _INT32_MAX,
            **launch_meta(_CONFIGS),
        )
    return out


def _flow_step_backward_triton(g, inj: Optional[_Injection], a, b, grads):
    """Launch the backward kernel writing into ``grads``: (grad_x, grad_v, grad_v_uncond), None = not wanted."""
    g = g.contiguous()
    n = g.numel()
    if n == 0 or all(t is None for t in grads):
        return grads
    args = _injection_args(inj, n)
    with device_guard(g):
        _flow_step_bwd_kernel[_grid(n, args[3])](
            g, inj.mask if inj else g, *(t if t is not None else g for t in grads),
            n, a, b, *args,
            WRITE_GX=grads[0] is not None, WRITE_GV=grads[1] is not None, WRITE_GVU=grads[2] is not None,
            HAS_INJECT=inj is not None, INT64=n > _INT32_MAX, **launch_meta(_CONFIGS),
        )
    return grads


# --------------------------------------------------------------------------- torch reference


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def flow_step_reference(
    x: torch.Tensor,
    v: torch.Tensor,
    dt: float,
    *,
    v_uncond: Optional[torch.Tensor] = None,
    guidance: float = 1.0,
    inject_mask: Optional[torch.Tensor] = None,
    inject_latent: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The fused step's semantics in plain torch ops (differentiable by autograd)."""
    c = _compute_dtype(x, v, v_uncond)
    out = x.to(c) + (dt * guidance) * v.to(c)
    if v_uncond is not None:
        out = out + (dt * (1.0 - guidance)) * v_uncond.to(c)
    if inject_mask is not None:
        out = torch.where(inject_mask != 0, inject_latent.to(c), out)
    return out.to(out_dtype or x.dtype)


def _sum_to_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``t`` over the dims along which a tensor of ``shape`` was broadcast to it."""
    lead = t.dim() - len(shape)
    if lead > 0:
        t = t.sum(dim=tuple(range(lead)))
    return t.sum_to_size(shape)


def _flow_step_backward_reference(g, mask, a, b, dtypes, needs):
    c = torch.float64 if g.dtype == torch.float64 else torch.float32
    g = g.to(c)
    if mask is not None:
        g = torch.where(mask != 0, torch.zeros((), dtype=c, device=g.device), g)
    scaled = (g, a * g, b * g)
    return [s.to(dt) if need else None for s, dt, need in zip(scaled, dtypes, needs)]


# --------------------------------------------------------------------------- autograd


class FlowStepFunction(torch.autograd.Function):
    """Autograd for the fused step; ``backend`` is ``"triton"`` or ``"torch"``."""

    @staticmethod
    def forward(ctx, x, v, v_uncond, inject_mask, inject_latent, dt, guidance, out_dtype, backend):
        a = dt * guidance
        b = dt * (1.0 - guidance)
        if backend == "triton":
            injection = _Injection(x.shape, inject_mask, inject_latent) if inject_mask is not None else None
            out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            _flow_step_triton(x, v, v_uncond, injection, a, b, out)
        else:
            injection = None
            out = flow_step_reference(x, v, dt, v_uncond=v_uncond, guidance=guidance, inject_mask=inject_mask,
                                      inject_latent=inject_latent, out_dtype=out_dtype)
        ctx.save_for_backward(inject_mask)
        ctx.injection = injection
        ctx.coefficients = (a, b)
        ctx.dtypes = (x.dtype, v.dtype, v_uncond.dtype if v_uncond is not None else None)
        ctx.latent_meta = (inject_latent.shape, inject_latent.dtype) if inject_latent is not None else None
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        a, b = ctx.coefficients
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.backend == "triton":
            grads = [torch.empty(g.shape, dtype=dt, device=g.device) if need else None
                     for dt, need in zip(ctx.dtypes, needs)]
            gx, gv, gvu = _flow_step_backward_triton(g, ctx.injection, a, b, grads)
        else:
            gx, gv, gvu = _flow_step_backward_reference(g, mask, a, b, ctx.dtypes, needs)
        g_latent = None
        if ctx.needs_input_grad[4]:
            shape, dtype = ctx.latent_meta
            g_latent = _sum_to_shape(torch.where(mask != 0, g, torch.zeros((), dtype=g.dtype, device=g.device)),
                                     shape).to(dtype)
        return gx, gv, gvu, None, g_latent, None, None, None, None


# --------------------------------------------------------------------------- public entry point


def flow_step(
    x: torch.Tensor,
    v: torch.Tensor,
    dt: float,
    *,
    v_uncond: Optional[torch.Tensor] = None,
    guidance: float = 1.0,
    inject_mask: Optional[torch.Tensor] = None,
    inject_latent: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One Euler step of a flow-matching ODE, fused: ``x + dt * v_mix``, injection, cast.

    Args:
        x: latents, any shape (``(B, C, T, H, W)`` for video), fp32/bf16/fp16 (float64 runs the reference).
        v: velocity, same shape as ``x``, any float dtype.
        dt: ``sigma_next - sigma`` (negative when denoising).
        v_uncond: unconditional velocity for classifier-free guidance, same shape; None for no guidance.
        guidance: guidance scale ``g``: ``v_mix = v_uncond + g * (v - v_uncond)``; must be 1 without ``v_uncond``.
        inject_mask: broadcastable to ``x``; where nonzero, ``x_next`` is overwritten by ``inject_latent``
            (first-frame latent injection: e.g. ``(1, 1, T, 1, 1)`` with ones at frame 0).
        inject_latent: broadcastable to ``x`` (e.g. ``(B, C, 1, H, W)``), given with ``inject_mask``.
        out_dtype: dtype of ``x_next``; default ``x.dtype``.
        backend: ``"triton"``, ``"torch"`` or ``"auto"``; default the process-wide
            :func:`rewardfl.kernels.set_backend` setting (auto: Triton for CUDA tensors).

    Returns:
        ``x_next`` shaped like ``x``, in ``out_dtype`` (contiguous on the Triton path).
    """
    for name, t in (("v", v), ("v_uncond", v_uncond)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"flow_step: {name} has shape {tuple(t.shape)}, x has {tuple(x.shape)}; they must match")
        if t is not None and t.device != x.device:
            raise ValueError(f"flow_step: {name} is on {t.device}, x on {x.device}")
    if v_uncond is None and guidance != 1.0:
        raise ValueError(f"flow_step: guidance={guidance} needs v_uncond (the unconditional velocity)")
    if (inject_mask is None) != (inject_latent is None):
        raise ValueError("flow_step: give inject_mask and inject_latent together (or neither)")
    for name, t in (("inject_mask", inject_mask), ("inject_latent", inject_latent)):
        if t is not None:
            broadcast_strides(t, x.shape, name)
            if t.device != x.device:
                raise ValueError(f"flow_step: {name} is on {t.device}, x on {x.device}")
    out_dtype = out_dtype or x.dtype
    if not out_dtype.is_floating_point:
        raise ValueError(f"flow_step: out_dtype must be a float dtype, got {out_dtype}")
    chosen = resolve_backend(backend, x)
    if chosen == "triton":
        if any(t is not None and t.dtype == torch.float64 for t in (v, v_uncond, inject_latent)):
            chosen = "torch"  # the kernels compute in fp32
    if chosen == "triton":
        x, v = x.contiguous(), v.contiguous()
        v_uncond = v_uncond.contiguous() if v_uncond is not None else None
        if inject_mask is not None and inject_mask.dtype != torch.bool:
            inject_mask = inject_mask != 0
    return FlowStepFunction.apply(x, v, v_uncond, inject_mask, inject_latent, float(dt), float(guidance),
                                  out_dtype, chosen)
