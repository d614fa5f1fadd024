"""What the Triton ops share: the backend switch, autotuning, and launch helpers.

Backends: ``"triton"`` (the fused kernels), ``"torch"`` (the pure-torch
reference, the test oracle) and ``"auto"`` (Triton for CUDA tensors, torch
otherwise). Triton on CPU tensors works only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported), which the tests use.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")

_backend = os.environ.get("REWARDFL_KERNELS", "auto")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_backend(name: str, key: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{key}: must be one of {list(BACKENDS)}, got {name!r}")
    return name


def get_backend() -> str:
    """The process-wide backend (``REWARDFL_KERNELS`` env var or :func:`set_backend`)."""
    return _check_backend(_backend, "REWARDFL_KERNELS")


def set_backend(name: str) -> None:
    """Force ``"triton"`` or ``"torch"`` for every op, or ``"auto"`` (the default)."""
    global _backend
    _backend = _check_backend(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("torch"): ...`` forces a backend inside the block."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(requested: Optional[str], tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op on ``tensor``.

    ``requested`` (a call's ``backend=``) wins over the process-wide setting.
    Float64 always runs the reference (the kernels compute in fp32).
    """
    name = _check_backend(requested or get_backend(), "backend")
    if name == "auto":
        return "triton" if tensor.is_cuda and tensor.dtype != torch.float64 else "torch"
    if name == "triton":
        if tensor.dtype == torch.float64:
            raise ValueError("backend='triton': the kernels compute in fp32; use backend='torch' for float64")
        if not tensor.is_cuda and not interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton "
                "to run the kernels on CPU tensors in Triton's interpreter"
            )
    return name


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), a no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


#: autotune on a real GPU only; the interpreter runs the first config
AUTOTUNE = torch.cuda.is_available() and not interpreting()


def autotune(configs: Sequence[triton.Config], key: Sequence[str]):
    """``triton.autotune`` on a GPU, identity under the interpreter (see :func:`launch_meta`)."""
    if AUTOTUNE:
        return triton.autotune(configs=list(configs), key=list(key))
    return lambda fn: fn


def launch_meta(configs: Sequence[triton.Config]) -> dict:
    """Keyword meta-parameters a launch passes: none when autotuned, else the first config's."""
    if AUTOTUNE:
        return {}
    config = configs[0]
    return {**config.kwargs, "num_warps": config.num_warps}


def elementwise_configs() -> list[triton.Config]:
    """Block sizes for memory-bound elementwise kernels; the first is the interpreter's."""
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=8),
        triton.Config({"BLOCK": 8192}, num_warps=16),
    ]


def broadcast_strides(t: torch.Tensor, shape: Sequence[int], name: str) -> tuple[int, ...]:
    """Element strides of ``t`` broadcast to ``shape`` (0 along broadcast dims); no copy."""
    try:
        return torch.broadcast_to(t, tuple(shape)).stride()
    except RuntimeError as e:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not broadcast to {tuple(shape)}") from e


def collapse_dims(
    shape: Sequence[int], strides: Sequence[Sequence[int]], ndim: int = 5
) -> Optional[tuple[list[int], list[list[int]]]]:
    """Merge adjacent dims that every stride set walks contiguously, then left-pad to ``ndim`` dims.

    ``strides`` holds one stride tuple per tensor indexed over ``shape`` (the
    output is contiguous, broadcast operands have zeros). Returns ``(shape,
    strides)`` with exactly ``ndim`` dims, or None when more remain.
    """
    dims = [(s, [st[d] for st in strides]) for d, s in enumerate(shape) if s != 1]
    merged: list[tuple[int, list[int]]] = []
    for size, sts in dims:
        if merged and all(prev == cur * size for prev, cur in zip(merged[-1][1], sts)):
            merged[-1] = (merged[-1][0] * size, sts)
        else:
            merged.append((size, sts))
    if len(merged) > ndim:
        return None
    pad = [(1, [0] * len(strides))] * (ndim - len(merged))
    merged = pad + merged
    return [m[0] for m in merged], [[m[1][k] for m in merged] for k in range(len(strides))]


@triton.jit
def cast_for_store(x, ptr):
    """fp32 ``x`` in ``ptr``'s element type, rounded to nearest even.

    bf16 is rounded by hand on the fp32 bits (then the cast is exact): Triton's
    interpreter truncates fp32 -> bf16, the GPU rounds to nearest even; this
    makes both give torch's result. NaN and inf survive (their low bits are dropped).
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)
