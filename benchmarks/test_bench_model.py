"""The wan2_2 model: one reward-FL-shaped training step, and tiny-twin sampling speed.

The step (``rl_step``) is the training loop's pattern with a stand-in reward: the 8-step
flow-matching plan (shift 5, boundary 0.9, gradient on steps 4..7), steps without gradient on
the high-noise expert, gradient steps on the low-noise expert's LoRA each with a second
adapters-off forward for the regulariser, a differentiable decode, ``-mean(video) + kl``, backward.

GPU (skipped without CUDA): random weights of the real Wan2.2-I2V-A14B expert shapes (same
compute and memory as the real ones; idle expert parked on the CPU), 480x832, 17 frames
(and 81 with ``REWARDFL_BENCH_81=1``; several minutes per variant): time and peak GPU memory,
block checkpointing against checkpointing with the block inputs (and the VAE decoder's caches)
offloaded to the CPU; an out-of-memory variant is recorded as OOM. Goal: the whole step on one
80 GB GPU.

CPU: the tiny twin (random weights, same code path): the step with checkpointing / offload
against no checkpointing (time ratio); sampling a 5-frame 64x64 video in 4 steps against the
same steps through diffsynth's ``model_fn_wan_video``.

Run: ``pytest benchmarks/test_bench_model.py --benchmark-only`` or ``--benchmark-disable`` (once).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="real-scale Wan2.2 A14B benchmark needs CUDA")
A14B_I2V = "5b013604280dd715f8457c6ed6d6a626"  # diffsynth's hash of Wan2.2-I2V-A14B's DiT


def build(dit: str, device, *, offload: bool, vae_dim: int, text_len: int):
    from rewardfl.config import config_from_dict
    from rewardfl.models.wan.model import Wan22Model

    cfg = config_from_dict({})
    opts = Wan22Model.Options(text_len=text_len, vae_checkpointing=True, use_gradient_checkpointing_offload=offload,
                              lora_rank=32)
    return Wan22Model.with_random_weights(cfg, opts, dit=dit, vae_dim=vae_dim, device=device)


def rl_step(model, frames: int, height: int, width: int, seed: int = 0) -> float:
    """One reward-FL-shaped step (see the module doc); returns the loss."""
    from rewardfl import registry
    from rewardfl.config import config_from_dict
    from rewardfl.models.wan.model import WanCondition

    from rewardfl.sampling.policy import plan_steps

    cfg = config_from_dict({})
    sampler = registry.create("sampler", "flow_match_euler", cfg, {})
    plan = plan_steps(cfg, sampler, model.experts, model.trainable_experts(), model.options.boundary)
    C, T, h, w = model.latent_shape(frames, height, width)
    g = torch.Generator(device=model.device).manual_seed(seed)
    dev, dt = model.device, model.dtype
    cond = WanCondition(
        context=torch.randn(1, model.options.text_len, model.arch.kwargs["text_dim"], generator=g, device=dev).to(dt),
        y=torch.randn(1, 4 + C, T, h, w, generator=g, device=dev).to(dt), inject_mask=None, inject_latent=None,
        size=(frames, height, width))
    x = torch.randn(1, C, T, h, w, generator=g, device=dev)
    kl = torch.zeros((), device=dev)
    n_grad = 0
    for step in plan:
        t = torch.tensor([step.timestep], device=dev)
        with torch.set_grad_enabled(step.grad):
            v = model.denoise(step.expert, x, t, cond)
            if step.grad and step.expert in model.trainable_experts():
                kl = kl + sampler.regularizer(v, model.denoise(step.expert, x, t, cond, base=True), step)
                n_grad += 1
            x = sampler.step(x, v, step)
    video = model.decode(x)
    loss = -video.float().mean() + kl / max(n_grad, 1)
    loss.backward()
    for _, p in model.trainable_parameters():
        p.grad = None
    return float(loss.detach())


# --------------------------------------------------------------------------- CPU (tiny twin)


def test_tiny_training_step_checkpointing_cost(bench, benchmark):
    torch.manual_seed(0)
    variants = {}
    for name, offload, ckpt in (("no checkpointing", False, False), ("block checkpointing", False, True),
                                ("checkpointing + CPU offload", True, True)):
        model = build("tiny-i2v", "cpu", offload=offload, vae_dim=8, text_len=32)
        model.options.gradient_checkpointing = ckpt
        model.options.vae_checkpointing = ckpt
        variants[name] = model
    losses = {name: rl_step(m, 5, 64, 64) for name, m in variants.items()}
    base = losses["no checkpointing"]
    for name, loss in losses.items():  # same weights (same seed), same step: same loss
        assert abs(loss - base) <= 1e-5 * max(1.0, abs(base)), (name, loss, base)
    if not bench.timing(benchmark):
        return
    times = {name: bench.measure(lambda m=m: rl_step(m, 5, 64, 64), device="cpu", reps=3, warmup=1)
             for name, m in variants.items()}
    for name, t in times.items():
        bench.add("wan2_2_tiny reward-FL step, 5x64x64, 8 steps (4 with grad) + decode", variant=name,
                  device=bench.device_name("cpu"), seconds=t, ratio_vs_no_checkpointing=t / times["no checkpointing"])
    benchmark.pedantic(lambda: rl_step(variants["checkpointing + CPU offload"], 5, 64, 64), rounds=1, iterations=1)


def test_tiny_sampling_speed(bench, benchmark):
    """4 steps of a 5-frame 64x64 video + decode, against the same steps through diffsynth's model_fn."""
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    from rewardfl.models.wan.model import WanCondition

    model = build("tiny-i2v", "cpu", offload=False, vae_dim=8, text_len=32)
    C, T, h, w = model.latent_shape(5, 64, 64)
    g = torch.Generator().manual_seed(1)
    cond = WanCondition(torch.randn(1, 32, 32, generator=g), torch.randn(1, 4 + C, T, h, w, generator=g), None, None,
                        (5, 64, 64))
    x0 = torch.randn(1, C, T, h, w, generator=g)
    sig = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25, 0.0)]

    @torch.no_grad()
    def ours():
        x = x0
        for i in range(4):
            expert = "dit" if sig[i] >= 0.9 else "dit2"
            x = x + (sig[i + 1] - sig[i]) * model.denoise(expert, x, torch.tensor([1000 * sig[i]]), cond)
        return model.decode(x)

    @torch.no_grad()
    def diffsynth():
        x = x0
        for i in range(4):
            dit = model.dits["dit" if sig[i] >= 0.9 else "dit2"]
            v = model_fn_wan_video(dit=dit, latents=x, timestep=torch.tensor([1000 * sig[i]]), context=cond.context,
                                   y=cond.y)
            x = x + (sig[i + 1] - sig[i]) * v
        return model.decode(x)

    torch.testing.assert_close(ours(), diffsynth(), rtol=1e-4, atol=1e-4)
    if not bench.timing(benchmark):
        return
    t_ours = bench.measure(ours, device="cpu", reps=3, warmup=1)
    t_ref = bench.measure(diffsynth, device="cpu", reps=3, warmup=1)
    bench.add("wan2_2_tiny sampling, 5x64x64, 4 steps + decode", device=bench.device_name("cpu"),
              rewardfl_s=t_ours, diffsynth_model_fn_s=t_ref, ratio=t_ours / t_ref)
    benchmark.pedantic(ours, rounds=1, iterations=1)


# --------------------------------------------------------------------------- GPU (real A14B shapes)


@needs_gpu
@pytest.mark.parametrize("frames", [17] + ([81] if os.environ.get("REWARDFL_BENCH_81") == "1" else []))
def test_a14b_step_memory_and_time(bench, benchmark, frames):
    rows = {}
    for offload in (False, True):
        model = None
        torch.cuda.empty_cache()
        try:
            model = build(A14B_I2V, torch.device("cuda"), offload=offload, vae_dim=96, text_len=512)
            model.options.vae_tile, model.options.vae_tile_stride = [34, 34], [18, 16]
            if bench.timing(benchmark):
                rl_step(model, frames, 480, 832)  # warm-up (allocator, kernels)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            rl_step(model, frames, 480, 832, seed=1)
            torch.cuda.synchronize()
            rows[offload] = (time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30)
        except torch.cuda.OutOfMemoryError:
            rows[offload] = (float("nan"), float("inf"))  # recorded as OOM in the table
        del model
    for offload, (seconds, peak) in rows.items():
        bench.add(f"Wan2.2-I2V-A14B shapes, reward-FL step, {frames}x480x832, LoRA r32 on dit2",
                  device=bench.device_name("cuda"), activation_offload=offload,
                  seconds=seconds, peak_GiB=peak if peak != float("inf") else "OOM",
                  ratio_vs_no_offload=seconds / rows[False][0])
    assert rows[True][1] < 80, f"with activation offload the step needs {rows[True][1]:.1f} GiB: not one 80 GB GPU"
    if bench.timing(benchmark):
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
