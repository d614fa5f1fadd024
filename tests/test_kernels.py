"""rewardfl.kernels: the fused Triton kernels against their torch reference, and both against float64 math.

The Triton tests run under ``TRITON_INTERPRET=1`` on CPU tensors (CI sets it) or on
a CUDA device, and skip otherwise. Interpreter sizes stay <= 64k elements.
"""

import os

import pytest
import torch

from rewardfl import kernels
from rewardfl.kernels import flow_step, flow_step_reference, velocity_kl, velocity_kl_reference
from rewardfl.kernels._utils import collapse_dims, resolve_backend
from rewardfl.kernels.flow_step import FlowStepFunction, _flow_step_backward_triton, _flow_step_triton, _Injection
from rewardfl.kernels.velocity_kl import (VelocityKLFunction, _num_partials, _velocity_kl_backward_triton,
                                         _velocity_kl_finish_kernel, _velocity_kl_triton)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = INTERPRET or torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 to run on CPU tensors")

BF16_ULP = 2.0 ** -7  # one unit in the last place, relative, at worst (8 significand bits)
FP16_ULP = 2.0 ** -10
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=BF16_ULP, atol=0.0),
       torch.float16: dict(rtol=FP16_ULP, atol=0.0)}


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def frame0_mask(shape):
    """``(1, 1, T, 1, 1)`` bool, True at frame 0 (TI2V first-frame injection)."""
    mask = torch.zeros(1, 1, shape[2], 1, 1, dtype=torch.bool, device=DEVICE)
    mask[:, :, 0] = True
    return mask


def step_float64(x, v, dt, v_uncond=None, guidance=1.0, mask=None, latent=None):
    """The Euler step written out independently, in float64."""
    v_mix = v.double() if v_uncond is None else v_uncond.double() + guidance * (v.double() - v_uncond.double())
    out = x.double() + dt * v_mix
    if mask is not None:
        out = torch.where(mask.bool(), latent.double().expand_as(out), out)
    return out


# --------------------------------------------------------------------------- flow_step forward

SHAPES = [(7,), (1, 16, 3, 8, 13), (2, 4, 5, 33, 47), (3, 1000, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_float64_math(shape, dtype):
    x, v = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
    out = flow_step_reference(x, v, -0.125)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), step_float64(x, v, -0.125).to(dtype).double(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_forward_matches_reference(shape, dtype):
    x, v, vu = (randn(*shape, dtype=dtype, seed=s) for s in range(3))
    injection = len(shape) == 5
    mask = frame0_mask(shape) if injection else None
    latent = randn(shape[0], shape[1], 1, *shape[3:], dtype=dtype, seed=3) if injection else None
    dt, g = -0.2083, 3.5
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # poison: every element must be written
    inj = _Injection(shape, mask, latent) if injection else None
    _flow_step_triton(x, v, vu, inj, dt * g, dt * (1 - g), out)
    expected = flow_step_reference(x, v, dt, v_uncond=vu, guidance=g, inject_mask=mask, inject_latent=latent)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **TOL[dtype])
    # against float64 math: fp32 arithmetic on terms of size ~10 may cancel, hence the small atol
    truth = step_float64(x, v, dt, vu, g, mask, latent).to(dtype)
    torch.testing.assert_close(out, truth, rtol=TOL[dtype]["rtol"], atol=1e-5)


@needs_triton
@pytest.mark.parametrize("n", [1, 1023, 1025, 8193, 65_000])
def test_triton_forward_odd_sizes(n):
    x, v = randn(n), randn(n, seed=1)
    out = torch.full((n,), float("nan"), device=DEVICE)
    _flow_step_triton(x, v, None, None, -0.3, 0.0, out)
    torch.testing.assert_close(out.double(), step_float64(x, v, -0.3), rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_casts_to_out_dtype_like_torch(out_dtype):
    x, v = randn(2, 4, 3, 8, 9), randn(2, 4, 3, 8, 9, dtype=torch.bfloat16, seed=1)
    out = flow_step(x, v, -0.0625, out_dtype=out_dtype, backend="triton")
    assert out.dtype == out_dtype
    # torch's fp32 -> out_dtype cast rounds to nearest even; the kernel must give the same bits
    # (on a GPU an fp32 FMA may move a result by one fp32 ulp first)
    expected = flow_step_reference(x, v, -0.0625, out_dtype=out_dtype)
    torch.testing.assert_close(out, expected, **(dict(rtol=0, atol=0) if INTERPRET else TOL[out_dtype]))
    torch.testing.assert_close(out, step_float64(x, v, -0.0625).to(out_dtype), **TOL[out_dtype])


@needs_triton
def test_injection_overwrites_frame0_exactly():
    shape = (2, 3, 4, 5, 6)
    x, v = randn(*shape), randn(*shape, seed=1)
    latent = randn(2, 3, 1, 5, 6, dtype=torch.bfloat16, seed=2)
    for backend in ("triton", "torch"):
        out = flow_step(x, v, -0.5, inject_mask=frame0_mask(shape).float(), inject_latent=latent, backend=backend)
        assert torch.equal(out[:, :, :1], latent.float())
        torch.testing.assert_close(out[:, :, 1:].double(), step_float64(x, v, -0.5)[:, :, 1:])


@needs_triton
@pytest.mark.parametrize("mask_shape,latent_shape,transpose_latent", [
    ((2, 1, 1, 1, 1), (1, 3, 4, 5, 33), False),  # per-sample switch, latent broadcast over the batch
    ((1, 1, 1, 1, 33), (2, 3, 4, 33, 5), True),  # varies along the innermost dim; latent a transposed view
    ((2, 3, 4, 5, 33), (1,), False),  # a full mask, a scalar-like latent
    ((1, 3, 1, 5, 1), (2, 1, 4, 1, 33), False),  # alternating broadcast dims: nothing collapses
])
def test_injection_with_any_broadcast(mask_shape, latent_shape, transpose_latent):
    shape = (2, 3, 4, 5, 33)
    x, v = randn(*shape), randn(*shape, seed=1)
    mask = randn(*mask_shape, seed=2) > 0
    latent = randn(*latent_shape, seed=3)
    if transpose_latent:
        latent = latent.transpose(-1, -2)
    grad_out = randn(*shape, seed=4)
    expected = step_float64(x, v, -0.25, mask=mask, latent=latent)
    x_leaf = x.clone().requires_grad_()
    out = flow_step(x_leaf, v, -0.25, inject_mask=mask, inject_latent=latent, backend="triton")
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    (grad_x,) = torch.autograd.grad(out, x_leaf, grad_out)
    torch.testing.assert_close(grad_x, torch.where(mask, 0.0, grad_out))


@needs_triton
def test_injection_with_more_than_five_dims_that_do_not_collapse():
    shape = (2, 3, 2, 3, 2, 3, 5)
    x, v = randn(*shape), randn(*shape, seed=1)
    mask = (torch.arange(2 * 2 * 2, device=DEVICE).reshape(2, 1, 2, 1, 2, 1, 1) % 3) == 0
    latent = randn(1, 3, 1, 3, 1, 3, 5, seed=2)
    assert collapse_dims(shape, [torch.broadcast_to(mask, shape).stride(),
                                 torch.broadcast_to(latent, shape).stride()]) is None
    out = flow_step(x, v, -0.25, inject_mask=mask, inject_latent=latent, backend="triton")
    torch.testing.assert_close(out.double(), step_float64(x, v, -0.25, mask=mask, latent=latent),
                               rtol=1e-6, atol=1e-6)


def test_collapse_dims_merges_what_walks_contiguously():
    shape = (2, 16, 21, 6, 10)
    mask = torch.broadcast_to(torch.ones(1, 1, 21, 1, 1), shape).stride()
    sizes, (strides,) = collapse_dims(shape, [mask])
    assert sizes == [1, 1, 32, 21, 60]  # (B*C) broadcast, T, (H*W) broadcast
    assert strides == [0, 0, 0, 1, 0]


# --------------------------------------------------------------------------- flow_step backward


def _grads_of_reference(x, v, vu, latent, mask, dt, g, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, v, vu, latent)]
    out = flow_step_reference(leaves[0], leaves[1], dt, v_uncond=leaves[2], guidance=g, inject_mask=mask,
                              inject_latent=leaves[3])
    return torch.autograd.grad(out, leaves, grad_out)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_matches_autograd_of_reference(dtype):
    shape = (2, 4, 5, 9, 11)
    x, v, vu = (randn(*shape, dtype=dtype, seed=s) for s in range(3))
    latent, mask = randn(2, 4, 1, 9, 11, dtype=dtype, seed=3), frame0_mask(shape)
    grad_out = randn(*shape, dtype=dtype, seed=4)
    dt, g = -0.104, 2.0
    expected = _grads_of_reference(x, v, vu, latent, mask, dt, g, grad_out)
    leaves = [t.detach().clone().requires_grad_() for t in (x, v, vu, latent)]
    out = flow_step(leaves[0], leaves[1], dt, v_uncond=leaves[2], guidance=g, inject_mask=mask,
                    inject_latent=leaves[3], backend="triton")
    got = torch.autograd.grad(out, leaves, grad_out)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])
    # the masked frame carries no gradient to x, v, v_uncond; the latent gets it all
    assert not got[0][:, :, 0].any() and not got[1][:, :, 0].any()
    torch.testing.assert_close(got[3], grad_out[:, :, :1], **TOL[dtype])


@needs_triton
def test_triton_backward_writes_every_element():
    shape = (3, 5, 7, 11)  # 1155 elements: not a multiple of the block
    grad_out = randn(*shape)
    grads = [torch.full(shape, float("nan"), device=DEVICE) for _ in range(3)]
    _flow_step_backward_triton(grad_out, None, -0.5, 0.25, grads)
    for got, scale in zip(grads, (1.0, -0.5, 0.25)):
        torch.testing.assert_close(got.double(), scale * grad_out.double(), rtol=1e-6, atol=1e-7)


def test_flow_step_gradcheck_float64():
    shape = (2, 3, 4, 2, 3)
    x, v, vu = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    latent = torch.randn(3, 1, 2, 3, dtype=torch.float64, requires_grad=True)  # broadcast over B and T
    mask = torch.zeros(1, 1, 4, 1, 1, dtype=torch.bool)
    mask[:, :, 0] = True
    fn = lambda x, v, vu, lat: FlowStepFunction.apply(x, v, vu, mask, lat, -0.3, 4.0, torch.float64, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, v, vu, latent))
    fn_plain = lambda x, v: FlowStepFunction.apply(x, v, None, None, None, -0.7, 1.0, torch.float64, "torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn_plain, (x, v))


# --------------------------------------------------------------------------- velocity_kl


def kl_float64(v, v_ref, sigma):
    d = v.double() - v_ref.double()
    return (d * d).sum() / d.numel() / (2 * sigma ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_velocity_kl_reference_matches_float64(dtype):
    v, r = randn(3, 4, 5, 6, dtype=dtype), randn(3, 4, 5, 6, dtype=dtype, seed=1)
    out = velocity_kl(v, r, 0.625, backend="torch")
    assert out.dtype == torch.float32 and out.dim() == 0
    torch.testing.assert_close(out.double(), kl_float64(v, r, 0.625), rtol=1e-6, atol=0)


@needs_triton
@pytest.mark.parametrize("n", [1, 1000, 8192, 8193, 65_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_velocity_kl_forward(n, dtype):
    v, r = randn(n, dtype=dtype), randn(n, dtype=dtype, seed=1)
    partials = torch.full((_num_partials(n),), float("nan"), device=DEVICE)  # poison: every partial written
    out = _velocity_kl_triton(v, r, 0.4167, partials)
    assert out.dtype == torch.float32 and out.dim() == 0 and not partials.isnan().any()
    # the inputs are exact in fp32, so the only error is the fp32 reduction
    torch.testing.assert_close(out.double(), kl_float64(v, r, 0.4167), rtol=1e-6, atol=0)


@needs_triton
@pytest.mark.parametrize("num_partials", [1, 63, 64, 1000])
def test_triton_velocity_kl_finish_adds_every_partial(num_partials):
    # a small BLOCK makes the loop run several times (the real launch has few partials at test sizes)
    partials = randn(num_partials).abs()
    out = torch.full((), float("nan"), device=DEVICE)
    _velocity_kl_finish_kernel[(1,)](partials, out, num_partials, 0.5, BLOCK=64)
    torch.testing.assert_close(out.double(), partials.double().sum() * 0.5, rtol=1e-6, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_velocity_kl_backward_matches_autograd_of_reference(dtype):
    shape = (2, 4, 5, 9, 11)
    v, r = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
    grad_out = torch.tensor(1.7, device=DEVICE)
    leaf = v.clone().requires_grad_()
    (expected,) = torch.autograd.grad(velocity_kl_reference(leaf, r, 0.75), leaf, grad_out)
    leaf = v.clone().requires_grad_()
    ref_leaf = r.clone().requires_grad_()
    (got,) = torch.autograd.grad(velocity_kl(leaf, ref_leaf, 0.75, backend="triton"), leaf, grad_out)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **TOL[dtype])
    # v_ref gets no gradient
    loss = velocity_kl(leaf, ref_leaf, 0.75, backend="triton")
    loss.backward()
    assert ref_leaf.grad is None
    # poison: every element of grad_v written
    poisoned = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    _velocity_kl_backward_triton(grad_out, v, r, 0.75, poisoned)
    torch.testing.assert_close(poisoned, expected, **TOL[dtype])


def test_velocity_kl_gradcheck_float64():
    v = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: VelocityKLFunction.apply(v, r, 0.3, "torch"), (v,))


# --------------------------------------------------------------------------- dispatch and errors


def test_auto_dispatch_and_switch(monkeypatch):
    cpu = torch.zeros(3)
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend(None, cpu.double()) == "torch"
    before = kernels.get_backend()
    with kernels.use_backend("torch"):
        assert kernels.get_backend() == "torch"
        assert resolve_backend(None, cpu) == "torch"
    assert kernels.get_backend() == before
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        flow_step(cpu, cpu, -0.1, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("cuda")


@needs_triton
def test_forced_backend_runs_that_path():
    x, v = randn(4, 5), randn(4, 5, seed=1)
    with kernels.use_backend("triton"):
        out = flow_step(x, v, -0.5)
        kl = velocity_kl(x, v, 0.5)
    torch.testing.assert_close(out.double(), step_float64(x, v, -0.5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl.double(), kl_float64(x, v, 0.5), rtol=1e-6, atol=0)


def test_input_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="v has shape"):
        flow_step(x, torch.zeros(3, 2), -0.1)
    with pytest.raises(ValueError, match="needs v_uncond"):
        flow_step(x, x, -0.1, guidance=2.0)
    with pytest.raises(ValueError, match="together"):
        flow_step(x, x, -0.1, inject_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        flow_step(x, x, -0.1, inject_mask=torch.ones(4), inject_latent=torch.ones(1))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        velocity_kl(x, x, 0.0)
    with pytest.raises(ValueError, match="must match"):
        velocity_kl(x, torch.zeros(3), 0.5)


# --------------------------------------------------------------------------- GPU code generation without a GPU

_COMPILE_FOR_GPU = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rewardfl.kernels  # noqa: F401
fs = sys.modules["rewardfl.kernels.flow_step"]
vk = sys.modules["rewardfl.kernels.velocity_kl"]

def build(kernel, types, constexprs, arch):
    kernel = kernel.fn if hasattr(kernel, "configs") else kernel  # the JITFunction under an Autotuner
    sig = {name: types.get(name, "i32") for name in kernel.arg_names}
    sig.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"], kernel.__name__

fwd = dict(x_ptr="*fp32", v_ptr="*bf16", vu_ptr="*bf16", mask_ptr="*i1", lat_ptr="*fp16", out_ptr="*bf16",
           a="fp32", b="fp32")
bwd = dict(g_ptr="*bf16", mask_ptr="*i1", gx_ptr="*fp32", gv_ptr="*bf16", gvu_ptr="*fp16", a="fp32", b="fp32")
for arch in (80, 90):
    for flags in ((True, True, False), (False, False, True)):
        build(fs._flow_step_fwd_kernel, fwd,
              dict(HAS_UNCOND=flags[0], HAS_INJECT=flags[1], INT64=flags[2], BLOCK=2048), arch)
        build(fs._flow_step_bwd_kernel, bwd,
              dict(WRITE_GX=flags[0], WRITE_GV=True, WRITE_GVU=flags[1], HAS_INJECT=flags[1], INT64=flags[2],
                   BLOCK=1024), arch)
    build(vk._velocity_kl_fwd_kernel,
          dict(v_ptr="*bf16", r_ptr="*fp32", partial_ptr="*fp32"), dict(INT64=False, CHUNK=8192, BLOCK=4096), arch)
    build(vk._velocity_kl_finish_kernel, dict(partial_ptr="*fp32", out_ptr="*fp32", scale="fp32"),
          dict(BLOCK=1024), arch)
    build(vk._velocity_kl_bwd_kernel,
          dict(v_ptr="*bf16", r_ptr="*bf16", gout_ptr="*fp32", gv_ptr="*bf16", scale="fp32"),
          dict(INT64=True, BLOCK=1024), arch)
print("compiled")
'''


def test_kernels_compile_for_gpu_targets(tmp_path):
    """The GPU code path (which the interpreter does not exercise) compiles to cubin for sm_80 and sm_90."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
