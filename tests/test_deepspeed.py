"""DeepSpeed ZeRO on CPU (gloo): 2 processes match 1 process with the same global batch; ZeRO-3 resumes.

The multi-process runs go through the real launcher (``torchrun``) and the real
CLI, on the tiny Wan twin, the real face models and real videos.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import run
from rewardfl.config import ConfigError, config_from_dict
from rewardfl.training.engines import deepspeed_config

pytest.importorskip("deepspeed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO2 = {"zero_optimization": {"stage": 2}}
ZERO3 = {"zero_optimization": {"stage": 3}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(cfg_path: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "rewardfl.run", cfg_path]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_trained_weights(want_dir, got_dir, step: int) -> None:
    """The two runs' checkpoint-``step`` trainable weights (gathered: they load without DeepSpeed) hold the
    same keys and differ by under 1e-3 of the update (LoRA B starts at 0, so its value is the update)."""
    name = os.path.join("checkpoints", f"checkpoint-{step}", "trainable.safetensors")
    a, b = load_file(os.path.join(want_dir, name)), load_file(os.path.join(got_dir, name))
    assert sorted(a) == sorted(b)
    diff = sum(float((a[k] - b[k]).double().norm() ** 2) for k in a) ** 0.5
    update = sum(float(a[k].double().norm() ** 2) for k in a if "lora_B" in k) ** 0.5
    assert update > 1e-5  # the weights did move
    assert diff < 1e-3 * update, (diff, update)


def test_deepspeed_config_takes_batch_accumulation_clipping_and_optimizer_from_our_keys():
    cfg = config_from_dict({"per_device_train_batch_size": 2, "max_grad_norm": 0.5, "learning_rate": 1e-4,
                            "weight_decay": 0.01, "mixed_precision": "bf16",
                            "deepspeed": {"zero_optimization": {"stage": 3}, "gradient_clipping": "auto"}})
    ds = deepspeed_config(cfg, accum=3, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "weight_decay": 0.01, "torch_adam": True}}
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3}


def test_deepspeed_config_with_cpu_offload_uses_deepspeeds_cpu_adam(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    ds = deepspeed_config(config_from_dict({"deepspeed": str(path)}), accum=1, world_size=1)
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.parametrize("section,message", [
    ({"gradient_accumulation_steps": 4}, r"deepspeed\.gradient_accumulation_steps: 4 disagrees with "
                                         r"gradient_accumulation_steps \(1\)"),
    ({"train_micro_batch_size_per_gpu": 8}, r"disagrees with per_device_train_batch_size \(1\)"),
    ({"gradient_clipping": 2.0}, r"deepspeed\.gradient_clipping: 2\.0 disagrees with max_grad_norm \(1\.0\)"),
    ({"optimizer": {"type": "Adam"}}, r"deepspeed\.optimizer: set by rewardfl from learning_rate"),
    ({"zero_optimization": {"stage": 5}}, r"deepspeed\.zero_optimization\.stage: must be 0, 1, 2 or 3"),
])
def test_deepspeed_config_that_disagrees_is_an_error(section, message):
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(config_from_dict({"deepspeed": section}), accum=1, world_size=1)


def test_missing_deepspeed_json_is_a_one_line_error(make_config, capsys):
    assert run.main([make_config(deepspeed="/nonexistent/ds.json"), "--check"]) == 2
    assert "deepspeed: DeepSpeed JSON not found: /nonexistent/ds.json" in capsys.readouterr().err


def test_zero2_on_two_processes_matches_one_process_with_the_same_global_batch(make_config, tmp_path):
    # a large Adam epsilon makes the update linear in small gradients (with 1e-8 an element whose
    # gradient is ~0 moves by +-lr on its sign alone), so the two runs' weights compare sharply
    single = make_config(max_steps=2, save_steps=2, per_device_train_batch_size=2, adam_epsilon=1e-2,
                         output_dir=str(tmp_path / "single"))
    assert run.main([single]) == 0
    zero2 = make_config(max_steps=2, save_steps=2, deepspeed=ZERO2, adam_epsilon=1e-2,
                        output_dir=str(tmp_path / "zero2"))
    torchrun(zero2)

    want, got = metrics(str(tmp_path / "single")), metrics(str(tmp_path / "zero2"))
    assert [r["step"] for r in got] == [1, 2]
    for w, g in zip(want, got):
        # same samples and noise per step; batched (B=2) vs per-process (B=1) arithmetic differs in
        # the last float32 bits, and AdamW updates carry that into step 2
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6)
        assert g["reward_score"] == pytest.approx(w["reward_score"], rel=1e-4, abs=1e-6)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-2)
    # the exported trainable weights load without DeepSpeed and agree with the single-process run
    assert_same_trained_weights(tmp_path / "single", tmp_path / "zero2", step=2)
    # rank 0 alone writes outputs: one metrics file, one config, no per-rank copies
    out = sorted(os.listdir(tmp_path / "zero2"))
    assert out == ["checkpoints", "config.yaml", "final", "metrics.jsonl", "reward_curve.png", "tensorboard"]
    assert len(got) == 2  # not one line per process


def test_grpo_zero2_on_two_processes_matches_one_process_with_twice_the_batch(make_config, tmp_path):
    """GRPO (the face reward used without gradient, groups of 2, stochastic steps 1..3, 0.6 of them
    trained per step: 1 of the 2 that run the trained expert) on two processes under ZeRO-2, one clip
    each, against one process with both clips: each video's starting and SDE noise is keyed by its clip
    and group member and the trained steps by the step alone, so the samples, advantages and losses are
    the same, and the averaged gradient too (with the noise keyed by the micro-batch, they were not)."""
    grpo = {"name": "grpo", "group_size": 2, "noise_level": 0.7, "beta": 0.04, "train_fraction": 0.6}
    common = dict(algorithm=grpo, mid_timestep=1, final_timestep=3, learning_rate=3e-3, max_steps=2, save_steps=2,
                  adam_epsilon=1e-2)
    single = make_config(per_device_train_batch_size=2, output_dir=str(tmp_path / "single"), **common)
    assert run.main([single]) == 0
    torchrun(make_config(deepspeed=ZERO2, output_dir=str(tmp_path / "zero2"), **common))

    want, got = metrics(str(tmp_path / "single")), metrics(str(tmp_path / "zero2"))
    assert [r["step"] for r in got] == [1, 2]
    for w, g in zip(want, got):
        assert g["reward/grpo/trained_steps"] == w["reward/grpo/trained_steps"] == 1.0  # of the 2 on dit2
        assert g["reward_score"] == pytest.approx(w["reward_score"], rel=1e-4, abs=1e-6)
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-3, abs=1e-6)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-2)
    assert_same_trained_weights(tmp_path / "single", tmp_path / "zero2", step=2)


def test_zero3_runs_and_resumes(make_config, tmp_path):
    out = str(tmp_path / "zero3")
    torchrun(make_config(max_steps=1, save_steps=1, deepspeed=ZERO3, output_dir=out))
    ckpt = os.path.join(out, "checkpoints", "checkpoint-1")
    assert os.path.isdir(os.path.join(ckpt, "deepspeed"))  # DeepSpeed's own (partitioned) checkpoint
    torchrun(make_config(max_steps=2, save_steps=1, deepspeed=ZERO3, output_dir=out, resume_from_checkpoint=True))
    got = metrics(out)
    assert [r["step"] for r in got] == [1, 2]

    reference = make_config(max_steps=2, save_steps=2, per_device_train_batch_size=2,
                            output_dir=str(tmp_path / "single"))
    assert run.main([reference]) == 0
    want = metrics(str(tmp_path / "single"))
    for w, g in zip(want, got):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4, abs=1e-6)
    weights = load_file(os.path.join(out, "checkpoints", "checkpoint-2", "trainable.safetensors"))
    assert weights and all(v.numel() > 0 for v in weights.values())  # gathered, not ZeRO-3 shards


def test_grpo_under_zero3_with_inner_updates_resumes_mid_cycle_as_one_process_runs(make_config, tmp_path):
    """GRPO (groups of 2, 2 updates per sampled batch, KL to the base model: the adapters switched off on
    partitioned weights) on two processes under ZeRO-3, killed after the first update of a cycle (a
    checkpoint that keeps each process's sampled groups) and resumed: its steps equal one process with
    both clips run straight through."""
    grpo = {"name": "grpo", "group_size": 2, "noise_level": 0.7, "beta": 0.04, "inner_updates": 2}
    common = dict(algorithm=grpo, mid_timestep=1, final_timestep=3, learning_rate=3e-3, adam_epsilon=1e-2)
    out = str(tmp_path / "zero3")
    torchrun(make_config(max_steps=1, save_steps=1, deepspeed=ZERO3, output_dir=out, **common))
    ckpt = os.path.join(out, "checkpoints", "checkpoint-1")
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("algorithm-")) == ["algorithm-0.safetensors",
                                                                                "algorithm-1.safetensors"]
    torchrun(make_config(max_steps=3, save_steps=1, deepspeed=ZERO3, output_dir=out, resume_from_checkpoint=True,
                         **common))
    got = metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3]

    single = str(tmp_path / "single")
    assert run.main([make_config(max_steps=3, save_steps=3, per_device_train_batch_size=2, output_dir=single,
                                 **common)]) == 0
    want = metrics(single)
    for w, g in zip(want, got):
        assert g["reward_score"] == pytest.approx(w["reward_score"], rel=1e-4, abs=1e-6)
        assert g["reward/grpo/ratio_max_dev"] == pytest.approx(w["reward/grpo/ratio_max_dev"], rel=0.05, abs=1e-7)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-2)
    assert got[1]["reward/grpo/ratio_max_dev"] > 0  # the replay trained on moved weights


def test_zero3_eval_at_end_loads_the_final_weights_into_the_partitioned_model(make_config, tmp_path, small_dataset):
    """Under ZeRO-3 each process holds a slice of every trainable weight: the end-of-run evaluation must
    load base and final into the gathered weights (before: "... is (8, 64), model has (0,)", exit 1). Its
    numbers equal rewardfl.evaluate run afterwards on the same export in one process."""
    from rewardfl import evaluate as evaluate_cli

    out = str(tmp_path / "zero3")
    config = make_config(max_steps=1, save_steps=1, deepspeed=ZERO3, output_dir=out, report_to=[],
                         data={"eval_metadata_path": small_dataset}, eval={"at_end": True, "seeds": 1})
    printed = torchrun(config).stdout
    assert "| metric | base | final | final - base |" in printed
    during = json.load(open(os.path.join(out, "eval", "eval.json")))
    again = str(tmp_path / "again")
    assert evaluate_cli.main([config, "--checkpoint", os.path.join(out, "final"), "--out", again]) == 0
    after = json.load(open(os.path.join(again, "eval.json")))
    for key in ("reward_score", "motion", "first_frame_psnr"):
        a, b = [r[key] for r in during["videos"]], [r[key] for r in after["videos"]]
        assert [x is None for x in a] == [x is None for x in b], key
        assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], rel=1e-4,
                                                                 abs=1e-5), key
    final = [r["motion"] for r in during["videos"] if r["checkpoint"] == "final"]
    base = [r["motion"] for r in during["videos"] if r["checkpoint"] == "base"]
    assert final != base  # the trained weights were loaded, not the base twice
