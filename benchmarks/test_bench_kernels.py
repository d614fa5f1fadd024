"""Fused flow step and velocity regulariser against eager torch, torch.compile and a device copy.

GPU (skipped without CUDA): Wan latents at 480x832x81, ``(B, 16, 21, 60, 104)`` bf16,
B = 1 and 4, forward and full (forward + backward); the Triton kernels against the same arithmetic
as separate eager ops (with cast and first-frame injection), against
``torch.compile`` of those ops, and against a device-to-device copy of the same
bytes (GB/s). Targets (issue 3): the fused step within 1.2x of the copy and
>= 2.5x faster than eager; the regulariser >= 2x faster than eager.

CPU: Triton's interpreter is not a speed path; the torch reference path against
the eager ops at a small size, so that one pass takes seconds.

Run: ``pytest benchmarks/test_bench_kernels.py --benchmark-only`` (timings and the
table), or ``--benchmark-disable`` (each variant once, results compared).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import pytest
import torch

from rewardfl.kernels import flow_step, velocity_kl

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="GPU-sized kernel benchmarks need CUDA")

WAN_LATENT = (16, 21, 60, 104)  # (C, T, H, W) of 81 frames at 480x832
CPU_LATENT = (16, 5, 30, 52)
DT, SIGMA, GUIDANCE = -0.125, 0.625, 3.0


# --------------------------------------------------------------------------- the eager baselines


def eager_flow_step(x, v, v_uncond, mask, latent, dt, guidance, out_dtype):
    """The fused step as separate torch ops: upcast, guidance mix, update, injection, cast."""
    v = v.float()
    if v_uncond is not None:
        v = v_uncond.float() + guidance * (v - v_uncond.float())
    out = x.float() + dt * v
    out = torch.where(mask, latent.float(), out)
    return out.to(out_dtype)


def eager_velocity_kl(v, v_ref, sigma):
    return ((v.float() - v_ref.float()) ** 2).mean() / (2.0 * sigma * sigma)


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    """One op on one input: a forward per variant, and what the backward needs."""

    inputs: list  # leaves that want gradients
    forwards: dict[str, Callable[[], torch.Tensor]]
    grad_out: torch.Tensor
    fwd_bytes: int
    bwd_bytes: int


def flow_step_case(batch: int, latent_shape, device, dtype, guidance: bool, fused_backend: str) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (batch, *latent_shape)
    x, v, vu = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    vu = vu if guidance else None
    mask = torch.zeros(1, 1, shape[2], 1, 1, dtype=torch.bool, device=device)
    mask[:, :, 0] = True
    latent = torch.randn(batch, shape[1], 1, *shape[3:], generator=g).to(device, dtype)
    scale = GUIDANCE if guidance else 1.0
    compiled = torch.compile(eager_flow_step) if device.type == "cuda" else None
    forwards = {
        fused_backend: lambda: flow_step(x, v, DT, v_uncond=vu, guidance=scale, inject_mask=mask,
                                         inject_latent=latent, backend=fused_backend),
        "eager": lambda: eager_flow_step(x, v, vu, mask, latent, DT, scale, dtype),
    }
    if compiled is not None:
        forwards["compile"] = lambda: compiled(x, v, vu, mask, latent, DT, scale, dtype)
    n, size = x.numel(), x.element_size()
    streams = 3 if guidance else 2
    return Case(inputs=[t for t in (x, v, vu) if t is not None], forwards=forwards,
                grad_out=torch.randn(shape, generator=g).to(device, dtype),
                fwd_bytes=n * size * (streams + 1), bwd_bytes=n * size * (1 + streams))


def velocity_kl_case(batch: int, latent_shape, device, dtype, fused_backend: str) -> Case:
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (batch, *latent_shape)
    v = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    v_ref = torch.randn(shape, generator=g).to(device, dtype)
    compiled = torch.compile(eager_velocity_kl) if device.type == "cuda" else None
    forwards = {
        fused_backend: lambda: velocity_kl(v, v_ref, SIGMA, backend=fused_backend),
        "eager": lambda: eager_velocity_kl(v, v_ref, SIGMA),
    }
    if compiled is not None:
        forwards["compile"] = lambda: compiled(v, v_ref, SIGMA)
    n, size = v.numel(), v.element_size()
    return Case(inputs=[v], forwards=forwards, grad_out=torch.tensor(1.0, device=device),
                fwd_bytes=2 * n * size, bwd_bytes=3 * n * size)


# --------------------------------------------------------------------------- the benchmark


def run_case(benchmark, bench, op: str, case: Case, direction: str, label: str, device, dtype):
    """Time every variant of ``case`` ("forward", or "full" = forward + backward), benchmark the fused one.

    On a GPU the ms columns are CUDA-graph replays (device time, what the GB/s
    and copy ratios need); "fused launch ms" is the fused op timed call by call,
    launch overhead included.
    """
    fused = next(iter(case.forwards))
    calls: dict[str, Callable[[], object]] = {}
    for name, forward in case.forwards.items():
        if direction == "forward":
            calls[name] = forward
        else:
            calls[name] = (lambda forward: lambda: torch.autograd.grad(forward(), case.inputs, case.grad_out))(forward)
    # the variants agree (checked under --benchmark-disable too)
    results = {name: call() for name, call in calls.items()}
    for name, result in results.items():
        for got, want in zip(_tensors(result), _tensors(results["eager"])):
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-5, msg=f"{name} vs eager")
    nbytes = case.fwd_bytes + (case.bwd_bytes if direction == "full" else 0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    benchmark.group = f"{op} {direction} {label}"
    benchmark.extra_info.update(device=bench.device_name(device), bytes=nbytes)
    benchmark.pedantic(lambda: (calls[fused](), sync()), rounds=10 if bench.timing(benchmark) else 1, warmup_rounds=1)
    if not bench.timing(benchmark):
        return
    gpu = device.type == "cuda"
    row = {"case": f"{direction} {label}", "device": bench.device_name(device)}
    seconds = {}
    for name, call in calls.items():
        try:
            seconds[name] = bench.measure(call, device=device, graph=gpu)
        except RuntimeError as e:  # a variant that cannot be captured: timed call by call, and said so
            seconds[name] = bench.measure(call, device=device)
            row[f"{name} timing"] = f"no graph ({type(e).__name__})"
    row.update({f"{name} ms": s * 1e3 for name, s in seconds.items()})
    row["eager/fused"] = seconds["eager"] / seconds[fused]
    if "compile" in seconds:
        row["compile/fused"] = seconds["compile"] / seconds[fused]
    if gpu:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)  # a copy reads and writes: nbytes moved
        dst = torch.empty_like(src)
        copy = bench.measure(lambda: dst.copy_(src), device=device, graph=True)
        row["copy ms"] = copy * 1e3
        row["fused/copy"] = seconds[fused] / copy
        row["fused GB/s"] = nbytes / seconds[fused] / 1e9
        row["copy GB/s"] = nbytes / copy / 1e9
        row["fused launch ms"] = bench.measure(calls[fused], device=device) * 1e3
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, float)})
    bench.add(f"{op} ({fused} = fused, {dtype})", **row)


def _tensors(result) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else [t for t in result if t is not None]


# --------------------------------------------------------------------------- CPU: the reference path


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second thread waits on busy cores and
    turns 0.1 ms ops into tens of ms at random."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("direction", ["forward", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_flow_step_reference(benchmark, bench, one_thread, direction, dtype):
    device = torch.device("cpu")
    case = flow_step_case(1, CPU_LATENT, device, dtype, guidance=True, fused_backend="torch")
    run_case(benchmark, bench, "flow_step", case, direction, f"B=1 {CPU_LATENT} cfg", device, dtype)


@pytest.mark.parametrize("direction", ["forward", "full"])
def test_cpu_velocity_kl_reference(benchmark, bench, one_thread, direction):
    device = torch.device("cpu")
    case = velocity_kl_case(1, CPU_LATENT, device, torch.bfloat16, fused_backend="torch")
    run_case(benchmark, bench, "velocity_kl", case, direction, f"B=1 {CPU_LATENT}", device, torch.bfloat16)


# --------------------------------------------------------------------------- GPU: Wan-sized, Triton


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("direction", ["forward", "full"])
@pytest.mark.parametrize("guidance", [False, True], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_flow_step(benchmark, bench, batch, guidance, direction):
    device = torch.device("cuda")
    case = flow_step_case(batch, WAN_LATENT, device, torch.bfloat16, guidance, fused_backend="triton")
    label = f"B={batch}{' cfg' if guidance else ''}"
    run_case(benchmark, bench, "flow_step", case, direction, label, device, torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("direction", ["forward", "full"])
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_velocity_kl(benchmark, bench, batch, direction):
    device = torch.device("cuda")
    case = velocity_kl_case(batch, WAN_LATENT, device, torch.bfloat16, fused_backend="triton")
    run_case(benchmark, bench, "velocity_kl", case, direction, f"B={batch}", device, torch.bfloat16)
