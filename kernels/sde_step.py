"""Fused stochastic flow step with its log-probability: the policy of a policy-gradient method.

A flow model's ODE ``dx/dt = v(x, t)`` (rectified flow, ``x_t = (1 - t) x_0 + t eps``, sampled from
``t = 1`` down to 0) has a family of SDEs with the same marginals. Going down by ``dt < 0``::

    dx = [v + g^2 / (2 t) * (x + (1 - t) v)] dt + g sqrt(-dt) z,      z ~ N(0, I)

because the score of the marginal is ``-(x + (1 - t) v) / t`` for this interpolation (``x + (1 - t) v``
is the posterior mean of the noise). ``g = a * sqrt(t / (1 - t))`` with the noise level ``a`` (a = 0
is the ODE's Euler step) is Flow-GRPO's choice; :func:`sde_coefficients` computes it. One Euler-
Maruyama step is then a Gaussian transition ``x_next ~ N(mean, s^2 I)`` with::

    mean = c_x * x + c_v * v,   c_x = 1 + g^2 dt / (2 t),   c_v = (1 + g^2 (1 - t) / (2 t)) dt,
    s = g * sqrt(-dt)

Coefficients-preserving sampling (Flow-CPS: Wang & Yu 2025, arXiv 2509.05952; :func:`cps_coefficients`)
is another Gaussian transition of the same form. With the model's estimates of the clean sample
``x0 = x - t v`` and of the noise ``x1 = x + (1 - t) v``, the step to ``t_next`` is::

    x_next = (1 - t_next) x0 + t_next cos(a pi / 2) x1 + t_next sin(a pi / 2) z

so ``c_x = 1 - t_next + t_next cos(a pi / 2)``, ``c_v = -(1 - t_next) t + t_next cos(a pi / 2) (1 - t)``,
``s = t_next sin(a pi / 2)``: the coefficients of ``x0`` and of unit noise are exactly the
interpolation's at ``t_next``, whatever the step's size, where the Euler-Maruyama step above is exact
only as ``dt -> 0`` (with a few large steps it leaves extra noise in the sample). a = 0 is the
Euler step; the step into ``t_next = 0`` is deterministic (``s = 0``: no log-probability).

and its log-density, averaged over the elements of each sample (the per-element scale that Flow-GRPO
uses for its importance ratios), is::

    log_prob[b] = -mean_i((x_next - mean)^2) / (2 s^2) - log(s) - log(2 pi) / 2

One op, one file (as ``velocity_kl.py``): Triton forward (per sample, fp32 partial sums per
8192-element chunk, then one program per sample adds them in order: deterministic) and backward
kernels, the pure-torch reference, and the ``torch.autograd.Function``. The residual is always taken
against the *stored* ``x_next`` (in its own dtype), so a log-probability recomputed later from the same
``x`` and ``v`` is bit-identical: the importance ratio of the first inner update is exactly 1.

Gradients: ``d log_prob[b] / d mean = (x_next - mean) / (D s^2)`` (D elements per sample), so
``grad_v = g_b c_v r / (D s^2)`` and ``grad_x = g_b c_x r / (D s^2)``; ``x_next`` and the noise get none.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._utils import autotune, cast_for_store, device_guard, elementwise_configs, launch_meta, resolve_backend

__all__ = ["SdeCoefficients", "sde_coefficients", "cps_coefficients", "sde_step", "sde_step_reference",
           "SdeStepFunction"]

_CONFIGS = elementwise_configs()
#: elements one forward program reduces to one partial sum (a multiple of every BLOCK)
_CHUNK = 8192
_INT32_MAX = 2**31 - 1
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class SdeCoefficients(NamedTuple):
    """One step's Gaussian transition: ``mean = c_x * x + c_v * v``, standard deviation ``s``."""

    c_x: float
    c_v: float
    s: float


def _checked_sigmas(caller: str, sigma: float, sigma_next: float) -> tuple[float, float]:
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not 0.0 < sigma <= 1.0 or not 0.0 <= sigma_next < sigma:
        raise ValueError(f"{caller}: need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")
    return sigma, sigma_next


def sde_coefficients(sigma: float, sigma_next: float, noise_level: float, *, sigma_cap: Optional[float] = None
                     ) -> SdeCoefficients:
    """The coefficients of the step from ``sigma`` down to ``sigma_next`` (flow times in [0, 1]).

    ``g = noise_level * sqrt(sigma / (1 - sigma))`` is infinite at ``sigma = 1`` (the first step of
    a shifted schedule); there ``1 - sigma`` is taken at ``sigma_cap`` instead (the next lower sigma of
    the schedule, as Flow-GRPO does), which must then be given.
    """
    (sigma, sigma_next), a = _checked_sigmas("sde_coefficients", sigma, sigma_next), float(noise_level)
    if not a >= 0.0 or not math.isfinite(a):
        raise ValueError(f"sde_coefficients: noise_level must be a finite number >= 0, got {noise_level}")
    one_minus = 1.0 - sigma
    if one_minus <= 0.0:
        if sigma_cap is None or not 0.0 < float(sigma_cap) < 1.0:
            raise ValueError("sde_coefficients: sigma = 1 needs sigma_cap in (0, 1) (the schedule's next sigma)")
        one_minus = 1.0 - float(sigma_cap)
    dt = sigma_next - sigma
    g2 = a * a * sigma / one_minus
    c_x = 1.0 + g2 * dt / (2.0 * sigma)
    c_v = (1.0 + g2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    return SdeCoefficients(c_x, c_v, math.sqrt(g2 * -dt))


def cps_coefficients(sigma: float, sigma_next: float, noise_level: float) -> SdeCoefficients:
    """Flow-CPS's coefficients of the step from ``sigma`` down to ``sigma_next``: the fresh noise's share
    of the noise at ``sigma_next`` is ``sin(noise_level * pi / 2)`` (``noise_level`` in [0, 1]; 1 replaces
    the predicted noise entirely). ``s`` is 0 at ``sigma_next = 0``: that step is deterministic."""
    (sigma, sigma_next), a = _checked_sigmas("cps_coefficients", sigma, sigma_next), float(noise_level)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"cps_coefficients: noise_level must be in [0, 1], got {noise_level}")
    kept = sigma_next * math.cos(a * math.pi / 2.0)  # the predicted noise's coefficient at sigma_next
    c_x = 1.0 - sigma_next + kept
    c_v = -(1.0 - sigma_next) * sigma + kept * (1.0 - sigma)
    return SdeCoefficients(c_x, c_v, sigma_next * math.sin(a * math.pi / 2.0))


# --------------------------------------------------------------------------- Triton kernels


@autotune(_CONFIGS, key=["d"])
@triton.jit
def _sde_fwd_kernel(x_ptr, v_ptr, z_ptr, xn_ptr, partial_ptr, d, num_chunks, c_x, c_v, s,
                    SAMPLE: tl.constexpr, INT64: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (B, chunks): the squared residuals of one chunk of one sample into ``partial[b, chunk]``.
    SAMPLE: write ``x_next = mean + s * z`` first (in x_next's dtype), then take the residual from it."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    if INT64:
        b = b.to(tl.int64)
        c = c.to(tl.int64)
    base = b * d
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        offs = c * CHUNK + start + tl.arange(0, BLOCK)
        valid = offs < d
        x = tl.load(x_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        mean = c_x * x + c_v * v
        if SAMPLE:
            z = tl.load(z_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
            stored = cast_for_store(mean + s * z, xn_ptr)
            tl.store(xn_ptr + base + offs, stored, mask=valid)
            xn = stored.to(tl.float32)
        else:
            xn = tl.load(xn_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
        r = tl.where(valid, xn - mean, 0.0)
        acc += r * r
    tl.store(partial_ptr + b * num_chunks + c, tl.sum(acc, axis=0))


@triton.jit
def _sde_finish_kernel(partial_ptr, out_ptr, num_chunks, scale, offset, BLOCK: tl.constexpr):
    """Grid (B,): ``log_prob[b] = -sum(partials[b]) * scale - offset``, summed in order."""
    b = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_chunks, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + b * num_chunks + offs, mask=offs < num_chunks, other=0.0)
    tl.store(out_ptr + b, -tl.sum(acc, axis=0) * scale - offset)


@autotune(_CONFIGS, key=["d"])
@triton.jit
def _sde_bwd_kernel(x_ptr, v_ptr, xn_ptr, g_ptr, gx_ptr, gv_ptr, d, c_x, c_v, scale,
                    WANT_X: tl.constexpr, WANT_V: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (B, cdiv(d, BLOCK)): ``grad = g[b] * scale * r * c`` with ``scale = 1 / (d s^2)``."""
    b = tl.program_id(0)
    p = tl.program_id(1)
    if INT64:
        b = b.to(tl.int64)
        p = p.to(tl.int64)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    valid = offs < d
    base = b * d
    # the upstream gradient is read on the device: no host sync
    factor = tl.load(g_ptr + b).to(tl.float32) * scale
    x = tl.load(x_ptr + base + offs, mask=valid).to(tl.float32)
    v = tl.load(v_ptr + base + offs, mask=valid).to(tl.float32)
    r = tl.load(xn_ptr + base + offs, mask=valid).to(tl.float32) - (c_x * x + c_v * v)
    if WANT_X:
        tl.store(gx_ptr + base + offs, cast_for_store(r * (factor * c_x), gx_ptr), mask=valid)
    if WANT_V:
        tl.store(gv_ptr + base + offs, cast_for_store(r * (factor * c_v), gv_ptr), mask=valid)


def _log_prob_constants(d: int, s: float) -> tuple[float, float]:
    """``(scale, offset)`` with ``log_prob = -sum(r^2) * scale - offset``."""
    return 1.0 / (2.0 * d * s * s), math.log(s) + _HALF_LOG_2PI


def _sde_triton(x, v, z, x_next, coef: SdeCoefficients):
    """``(x_next, log_prob)``; samples into a new ``x_next`` when ``z`` is given."""
    bsz = x.shape[0]
    d = x.numel() // bsz
    sample = z is not None
    if sample:
        x_next = torch.empty_like(x, memory_format=torch.contiguous_format)
    chunks = triton.cdiv(d, _CHUNK)
    partials = torch.empty((bsz, chunks), dtype=torch.float32, device=x.device)
    out = torch.empty((bsz,), dtype=torch.float32, device=x.device)
    scale, offset = _log_prob_constants(d, coef.s)
    with device_guard(x):
        _sde_fwd_kernel[(bsz, chunks)](x, v, z if sample else x, x_next, partials, d, chunks, coef.c_x, coef.c_v,
                                       coef.s, SAMPLE=sample, INT64=x.numel() > _INT32_MAX, CHUNK=_CHUNK,
                                       **launch_meta(_CONFIGS))
        _sde_finish_kernel[(bsz,)](partials, out, chunks, scale, offset, BLOCK=1024)
    return x_next, out


def _sde_backward_triton(g, x, v, x_next, coef: SdeCoefficients, want_x: bool, want_v: bool):
    bsz = x.shape[0]
    d = x.numel() // bsz
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if want_x else None
    gv = torch.empty_like(v, memory_format=torch.contiguous_format) if want_v else None
    with device_guard(x):
        _sde_bwd_kernel[lambda meta: (bsz, triton.cdiv(d, meta["BLOCK"]))](
            x, v, x_next, g.contiguous(), gx if want_x else x, gv if want_v else v, d, coef.c_x, coef.c_v,
            1.0 / (d * coef.s * coef.s), WANT_X=want_x, WANT_V=want_v, INT64=x.numel() > _INT32_MAX,
            **launch_meta(_CONFIGS),
        )
    return gx, gv


# --------------------------------------------------------------------------- torch reference


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def sde_step_reference(x, v, coef: SdeCoefficients, *, noise=None, x_next=None):
    """The op's semantics in plain torch (differentiable in ``x`` and ``v``): ``(x_next, log_prob)``."""
    c = _compute_dtype(x, v, noise, x_next)
    mean = coef.c_x * x.to(c) + coef.c_v * v.to(c)
    if noise is not None:
        x_next = (mean.detach() + coef.s * noise.to(c)).to(x.dtype)
    r = x_next.detach().to(c) - mean
    d = r[0].numel()
    scale, offset = _log_prob_constants(d, coef.s)
    return x_next, -(r * r).flatten(1).sum(1) * scale - offset


# --------------------------------------------------------------------------- autograd


class SdeStepFunction(torch.autograd.Function):
    """Autograd for the fused step (Triton); returns ``(x_next, log_prob)``, the gradient flows
    from ``log_prob`` into ``x`` and ``v``."""

    @staticmethod
    def forward(ctx, x, v, noise, x_next, coef):
        x_next, log_prob = _sde_triton(x, v, noise, x_next, coef)
        ctx.save_for_backward(x, v, x_next)
        ctx.coef = coef
        ctx.mark_non_differentiable(x_next)
        return x_next, log_prob

    @staticmethod
    def backward(ctx, _g_next, g_log_prob):
        x, v, x_next = ctx.saved_tensors
        gx, gv = _sde_backward_triton(g_log_prob, x, v, x_next, ctx.coef, ctx.needs_input_grad[0],
                                      ctx.needs_input_grad[1])
        return gx, gv, None, None, None


# --------------------------------------------------------------------------- public entry point


def sde_step(x: torch.Tensor, v: torch.Tensor, coef: SdeCoefficients, *, noise: Optional[torch.Tensor] = None,
             x_next: Optional[torch.Tensor] = None, backend: Optional[str] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic flow step and the log-probability of its transition, per sample.

    Give exactly one of ``noise`` (sample: ``x_next = mean + s * noise``) or ``x_next`` (score a
    stored transition, e.g. when training on a sampled trajectory).

    Args:
        x: latents at this step, ``(B, ...)``, fp32/bf16/fp16 (float64 runs the reference).
        v: the model's velocity at ``x``, same shape and device.
        coef: from :func:`sde_coefficients`; ``coef.s`` must be > 0 (a = 0 has no density).
        noise: standard normal noise, same shape (the caller's generator: resumable).
        x_next: the stored next latents, same shape.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (default: the process-wide setting).

    Returns:
        ``(x_next, log_prob)``: ``x_next`` in ``x``'s dtype (the given one when scoring), no gradient;
        ``log_prob`` ``(B,)`` fp32 (float64 for float64 inputs), the per-element mean log-density,
        differentiable in ``x`` and ``v``.
    """
    if (noise is None) == (x_next is None):
        raise ValueError("sde_step: give exactly one of noise (to sample) or x_next (to score a stored step)")
    other = noise if noise is not None else x_next
    for name, t in (("v", v), ("noise" if noise is not None else "x_next", other)):
        if t.shape != x.shape:
            raise ValueError(f"sde_step: {name} has shape {tuple(t.shape)}, x {tuple(x.shape)}; they must match")
        if t.device != x.device:
            raise ValueError(f"sde_step: {name} is on {t.device}, x on {x.device}")
    if x.dim() < 1 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"sde_step: x must be a non-empty (B, ...) tensor, got shape {tuple(x.shape)}")
    if not coef.s > 0 or not all(math.isfinite(c) for c in coef):
        raise ValueError(f"sde_step: the step's standard deviation must be finite and > 0, got {coef}")
    chosen = resolve_backend(backend, x)
    if chosen == "triton" and torch.float64 in (v.dtype, other.dtype):
        chosen = "torch"  # the kernels compute in fp32
    if chosen == "torch":
        return sde_step_reference(x, v, coef, noise=noise, x_next=x_next)
    x, v, other = x.contiguous(), v.contiguous(), other.contiguous()
    if noise is not None:
        return SdeStepFunction.apply(x, v, other, None, coef)
    return SdeStepFunction.apply(x, v, None, other.detach(), coef)
