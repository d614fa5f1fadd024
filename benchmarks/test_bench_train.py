"""Where a reward-FL step's time goes: sample / decode / reward / backward, and peak memory.

The tiny demo step on the CPU (the tiny Wan twin at 64x64x5, 4 sampling steps with the
gradient on the last 2, the real SCRFD + SFace models), through the trainer's own code
(``Trainer``, ``sample_latents``, the reward plugin). Each phase is reported as a share of the
whole step measured in the same run. On a GPU the same for Wan shapes is the model benchmark's
(``test_bench_model.py``).

Reproduce: ``pytest benchmarks/test_bench_train.py --benchmark-only``.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import pytest
import torch
import yaml


@pytest.fixture(scope="module")
def demo_trainer(tmp_path_factory):
    from rewardfl.demo.assets import fetch_face_assets
    from rewardfl.config import load_config
    from rewardfl.demo.example_data import build_from_face_assets
    from rewardfl.demo.make_tiny import make_tiny
    from rewardfl.registry import resolve_plugins
    from rewardfl.training import Trainer

    root = tmp_path_factory.mktemp("bench_train")
    assets = fetch_face_assets()
    csv = build_from_face_assets(str(root / "data"), assets=assets, photo_names=("person_a_1",), num_frames=5,
                                 size=(64, 64), clips_per_photo=1)
    raw = {"model_name": "wan2_2_tiny", "model_paths": make_tiny(str(root / "tiny")),
           "reward_model_path": assets.scrfd_sface, "lora_rank": 8, "mixed_precision": "fp32", "device": "cpu",
           "num_inference_steps": 4, "mid_timestep": 2, "final_timestep": 3, "output_dir": str(root / "out"),
           "reward": {"name": "face_identity", "landmark_fallback": True, "det_size": 160,
                      "reference_cache_dir": "none"},
           "data": {"metadata_path": csv, "num_frames": 5, "height": 64, "width": 64}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(root / "cfg.yaml"))
    return Trainer(cfg, resolve_plugins(cfg))


def one_step(trainer, timings: dict) -> None:
    from rewardfl.interfaces import SampleContext
    from rewardfl.sampling.rollout import sample_latents

    cfg = trainer.cfg
    batch = trainer.batches.next(trainer.state)
    contexts = [SampleContext(s, v, p, pr) for s, v, p, pr in
                zip(batch["sample_id"], batch["video"], batch["path"], batch["prompt"])]
    trainer.reward.prepare(contexts)
    t0 = time.perf_counter()
    latents, kl = sample_latents(trainer.model, trainer.sampler, trainer.plan, batch, num_frames=cfg.data.num_frames,
                                 step=0, seeds=[0], kl_weight=cfg.kl_weight)
    t1 = time.perf_counter()
    videos = trainer.model.decode(latents)
    t2 = time.perf_counter()
    out = trainer.reward(videos, contexts)
    loss = trainer.reward.loss(out) + cfg.kl_weight * kl
    t3 = time.perf_counter()
    loss.backward()
    t4 = time.perf_counter()
    trainer.engine.zero_grad()
    for name, dt in (("sample", t1 - t0), ("decode", t2 - t1), ("reward", t3 - t2), ("backward", t4 - t3)):
        timings.setdefault(name, []).append(dt)
    timings.setdefault("step", []).append(t4 - t0)


def test_tiny_demo_step_split(demo_trainer, bench, benchmark):
    timings: dict = {}
    reps = 5 if bench.timing(benchmark) else 1
    one_step(demo_trainer, {})  # warm-up: model loading, reference embeddings, allocator
    for _ in range(reps):
        one_step(demo_trainer, timings)
    med = {k: statistics.median(v) for k, v in timings.items()}
    assert all(v > 0 for v in med.values())
    assert abs(sum(med[k] for k in ("sample", "decode", "reward", "backward")) - med["step"]) < 0.5 * med["step"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    bench.add("reward-FL step, tiny demo (64x64x5, 4 steps, grad on 2)", device=bench.device_name("cpu"),
              step_s=med["step"], **{f"{k}_share": med[k] / med["step"] for k in ("sample", "decode", "reward",
                                                                                  "backward")},
              peak_rss_mb=peak_mb)
    if bench.timing(benchmark):
        benchmark.pedantic(lambda: one_step(demo_trainer, {}), rounds=1, iterations=1)
