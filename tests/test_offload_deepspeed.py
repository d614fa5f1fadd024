"""``offload_idle_expert`` under DeepSpeed ZeRO-2: parking an expert must not cut the trainable
weights loose from DeepSpeed's flat buffers.

ZeRO-1/2 make every trainable parameter's ``.data`` a view into one flat buffer per group, which
the optimizer updates after each step. ``Module.to`` rebinds ``param.data`` to a fresh tensor, so
an expert moved to the CPU and back (what ``_place`` did) keeps sampling with the weights of the
move while DeepSpeed updates a buffer nobody reads. Now only frozen weights move
(``offload.move_frozen_``).

On a CPU-only machine "the device" and "the CPU" are one device: the test runs the real code path
(DeepSpeed, two processes, offload forced on, both experts every step) but its moves are no-ops,
so it guards the integration, not the storage link itself (that needs a GPU: ``Module.to`` cannot
move a CPU parameter's storage anywhere else on this machine; ``meta`` replaces the Parameter).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
from wan_fixtures import build_tiny, tiny_dir  # noqa: F401  (session fixture)

pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: DeepSpeed setups whose optimizers keep the trainable parameters as views into flat buffers
CONFIGS = {
    # ZeRO-2 (stage_1_and_2.py, which also re-points the parameters at its buffer after each step)
    "zero2": dict(deepspeed={"zero_optimization": {"stage": 2}}),
    # ZeRO-1, bf16 weights, fp32 gradient accumulation: DeepSpeed's BF16_Optimizer, which copies
    # each update into its flat buffer and relies on the parameters still viewing it
    "zero1-bf16-optimizer": dict(deepspeed={"zero_optimization": {"stage": 1},
                                            "data_types": {"grad_accum_dtype": "fp32"}}, mixed_precision="bf16"),
}


def _train_and_check(label: str, overrides: dict, rank: int, tiny_dir: str) -> None:  # noqa: F811
    """DeepSpeed over the tiny twin's dit2 LoRA with offload_idle_expert forced on: three optimizer
    steps that run both experts, then checks (raises on failure)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from rewardfl.runtime import init_distributed
    from rewardfl.training.engines import DeepSpeedEngine
    from rewardfl.models.wan.lora import diffsynth_lora_key

    model = build_tiny(tiny_dir, options={"offload_idle_expert": "yes"}, learning_rate=1e-2, device="cpu",
                       **overrides)
    assert model.offload_experts
    dist = init_distributed(model.config)
    params = [p for _, p in model.trainable_parameters()]
    engine = DeepSpeedEngine(model.config, model, params, lambda step: 1.0, dist, accum=1)

    g = torch.Generator().manual_seed(10 + rank)  # each process its own sample
    first = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    cond = model.encode(["a face"], first, 5)
    x = torch.randn(1, *model.latent_shape(5, 32, 32), generator=g)
    target = torch.randn(x.shape, generator=g)
    for _ in range(3):
        engine.zero_grad()
        with torch.no_grad():  # the high-noise expert runs: dit2's frozen weights are parked
            x_mid = x + 0.1 * model.denoise("dit", x, torch.tensor([950.0]), cond)
        v = model.denoise("dit2", x_mid, torch.tensor([500.0]), cond)
        engine.backward((v - target).square().mean(), accum=1)
        engine.step()

    # the weights the model samples with are DeepSpeed's fp32 master weights, rounded to their dtype
    master = {}
    for name, p in model.trainable_parameters():
        full = safe_get_full_fp32_param(p)  # collective: every process, same order
        torch.testing.assert_close(p.detach(), full.to(p.dtype), rtol=0, atol=0,
                                   msg=f"{label}: {name} is not DeepSpeed's weight")
        master[diffsynth_lora_key(name)] = full.to(p.dtype)
    update = sum(float(v.norm() ** 2) for k, v in master.items() if "lora_B" in k) ** 0.5
    assert update > 1e-3, (label, update)  # LoRA B starts at 0: it is the sum of the three updates

    if rank == 0:  # the trained model samples like a fresh one loaded with DeepSpeed's weights
        plain = {k: v for k, v in overrides.items() if k != "deepspeed"}
        fresh = build_tiny(tiny_dir, options={"offload_idle_expert": "no"}, **plain)
        for (_, p), (_, q) in zip(fresh.trainable_parameters(), model.trainable_parameters()):
            p.data = p.data.to(q.dtype)  # DeepSpeed's bf16 mode cast the trained LoRA to bf16
        fresh.load_trainable_state_dict(master)
        with torch.no_grad():
            got = model.denoise("dit2", x, torch.tensor([500.0]), cond)
            want = fresh.denoise("dit2", x, torch.tensor([500.0]), cond)
            base = model.denoise("dit2", x, torch.tensor([500.0]), cond, base=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{label}: {m}")
        assert (got - base).abs().max() > 1e-4, label  # and the training shows in the velocity
    torch.distributed.barrier()


def _worker(rank: int, world: int, port: int, tiny_dir: str) -> None:  # noqa: F811
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:  # both setups in one pair of processes: starting them dominates the run time
        for label, overrides in CONFIGS.items():
            _train_and_check(label, overrides, rank, tiny_dir)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_offload_forced_on_under_deepspeed_trains_the_weights_used_for_sampling(tiny_dir):  # noqa: F811
    """Two processes; ZeRO-2 and ZeRO-1 with DeepSpeed's BF16_Optimizer (see CONFIGS)."""
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), tiny_dir), nprocs=2, join=True)
