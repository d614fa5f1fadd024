"""The planner against a measured GPU step: ``python benchmarks/gpu_check.py plan [--dry-run]``.

Part of ``benchmarks/gpu_check.sh``. A mid-size config (the Wan2.2-I2V-A14B expert with
``--layers`` of its 40 blocks, the real umT5-xxl text encoder and Wan2.1 VAE shapes, 17x480x832,
LoRA r32 on dit2, the face reward when its models are in the cache) is planned on fake tensors
(``rewardfl.plan``), then the same step runs on the GPU with random weights and
``torch.cuda.max_memory_allocated`` is read. Each variant (block checkpointing; with the
activations offloaded) gives one row: predicted GiB, measured GiB, their ratio, and the
tracker's own count on the real tensors. Rows go to ``$OUT/plan_check.json`` as each finishes, and
a table to stdout at the end. Exit code 1 when a prediction is off by more than 10 %.

``--dry-run`` (no GPU): plans a 1-block variant of one frame at 64x64 on the CPU, without the face
reward, and prints what the real run would do; nothing is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOLERANCE = 0.10
VARIANTS = (("block checkpointing", {}), ("checkpointing + activation offload",
                                           {"use_gradient_checkpointing_offload": True}))


def config(frames: int, height: int, width: int, overrides: dict, face_pack):
    from rewardfl.config import config_from_dict
    from rewardfl.models.wan.model import Wan22Model
    from rewardfl.registry import resolve_config
    from rewardfl.rewards.face_identity import FaceIdentityReward
    from rewardfl.samplers.flow_match_euler import FlowMatchEulerSampler

    raw = {"model_name": "wan2_2", "mixed_precision": "bf16", "lora_rank": 32,
           "reward_model_path": face_pack,
           "data": {"num_frames": frames, "height": height, "width": width}, **overrides}
    plugins = {"model": Wan22Model, "sampler": FlowMatchEulerSampler, "reward": FaceIdentityReward}
    return resolve_config(config_from_dict(raw), plugins), plugins


def face_pack():
    """The scrfd_sface pack from the face-asset cache ($REWARDFL_CACHE), unpacked from the carried
    archives when needed; None when there is none (the step then uses a stand-in reward)."""
    try:
        from rewardfl.demo.assets import fetch_face_assets

        return fetch_face_assets().scrfd_sface
    except Exception as e:  # noqa: BLE001 - no network and no carried archives: plan without the reward
        print(f"gpu_check: no face models ({type(e).__name__}: {e}); the reward is a stand-in", file=sys.stderr)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["plan"])
    parser.add_argument("--layers", type=int, default=8, help="DiT blocks of the A14B expert (40 in the real one)")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    out = os.environ.get("OUT") or os.path.join(os.environ.get("TMPDIR", "/tmp"), "rewardfl_gpu_check")
    os.makedirs(out, exist_ok=True)

    import torch

    from rewardfl.plan import planner
    from rewardfl.plan.plugins import spec_from_preset

    dry = args.dry_run or not torch.cuda.is_available()
    layers, size = (1, (1, 64, 64)) if dry else (args.layers, (args.frames, 480, 832))
    spec = spec_from_preset("wan2.2-i2v-a14b").with_layers(layers)
    pack = None if dry else face_pack()
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if not dry else 80 * planner.GiB
    rows = []
    for name, overrides in VARIANTS[:1] if dry else VARIANTS:
        cfg, plugins = config(*size, overrides, pack)
        t0 = time.perf_counter()
        predicted = planner.plan_memory(cfg, plugins, spec=spec, gpu_bytes=gpu_bytes, target="cuda")
        row = {"variant": name, "layers": layers, "size": "x".join(map(str, size)),
               "predicted_gib": round(predicted.peak / planner.GiB, 3), "peak_phase": predicted.peak_phase,
               "plan_seconds": round(time.perf_counter() - t0, 1)}
        if dry:
            print(planner.render(predicted))
            print(f"gpu_check (dry run): would run this step on the GPU with random weights and compare "
                  f"{row['predicted_gib']} GiB with torch.cuda.max_memory_allocated (tolerance {TOLERANCE:.0%}); "
                  f"then the same with {VARIANTS[1][0]}, at {args.layers} blocks, {args.frames}x480x832")
            rows.append(row)
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        result = planner.run_step(cfg, plugins, spec, gpu_bytes=gpu_bytes, target="cuda", device=torch.device("cuda"))
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base
        tracked = max(p["cuda"][0] for p in result["phases"].values() if "cuda" in p)
        row.update(measured_gib=round(measured / planner.GiB, 3), tracker_on_real_gib=round(tracked / planner.GiB, 3),
                   ratio=round(predicted.peak / measured, 4), step_seconds=round(time.perf_counter() - t0, 1),
                   device=torch.cuda.get_device_name(0))
        row["within_tolerance"] = abs(row["ratio"] - 1) <= TOLERANCE
        rows.append(row)
        _write(out, rows)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    _write(out, rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return 0 if all(r.get("within_tolerance", True) for r in rows) else 1


def _write(out: str, rows: list) -> None:
    with open(os.path.join(out, "plan_check.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
