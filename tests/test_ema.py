"""``ema_decay``: the moving average of the trainable weights, checked against a float64 hand
computation over the checkpoints' own weights (with diffusers' warm-up), against diffusers'
``EMAModel`` itself, resumed exactly, and used by generate/evaluate."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import tiny_dir  # noqa: F401  (session fixture)

from rewardfl import generate as generate_cli
from rewardfl import run
from rewardfl.sampling.weights import trainable_weights_of

DECAY = 0.6


def _ckpt(out, step, name):
    return load_file(os.path.join(out, "checkpoints", f"checkpoint-{step}", name))


def test_ema_follows_the_hand_computed_average_and_resumes_exactly(make_config, tmp_path, capsys):  # noqa: F811
    config = make_config(max_steps=3, save_steps=1, save_total_limit=None, ema_decay=DECAY, report_to=[])
    assert run.main([config]) == 0
    out = yaml.safe_load(open(config))["output_dir"]
    # the first update copies the weights (decay 0), as diffusers' EMAModel does
    first, w1 = _ckpt(out, 1, "ema.safetensors"), _ckpt(out, 1, "trainable.safetensors")
    assert all(torch.equal(first[key], w1[key].float()) for key in first)
    # ema_k = d_k * ema_{k-1} + (1 - d_k) * w_k, in float64 from the checkpoints' own trained weights, with
    # the warm-up d_k = min(decay, (1 + n) / (10 + n)), n = k - 1 updates before: by hand 2/11 and 3/12,
    # both below DECAY = 0.6 (without the warm-up it would be 0.6 at every update)
    for k, d in ((2, 2 / 11), (3, 3 / 12)):
        prev, w, ema = _ckpt(out, k - 1, "ema.safetensors"), _ckpt(out, k, "trainable.safetensors"), \
            _ckpt(out, k, "ema.safetensors")
        assert set(ema) == set(w)
        moved = 0
        for key in ema:
            want = d * prev[key].double() + (1 - d) * w[key].double()
            torch.testing.assert_close(ema[key].double(), want, rtol=1e-6, atol=1e-7)
            moved += int(not torch.equal(ema[key], w[key]))
        assert moved > 0  # the average lags the weights
    # resumed at step 2, the run reaches the same average at step 3, bit for bit
    cfg = yaml.safe_load(open(config))
    again = str(tmp_path / "again")
    os.makedirs(os.path.join(again, "checkpoints"))
    import shutil

    shutil.copytree(os.path.join(out, "checkpoints", "checkpoint-2"), os.path.join(again, "checkpoints", "checkpoint-2"))
    cfg.update(output_dir=again, resume_from_checkpoint=True)
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run.main([str(path)]) == 0
    a, b = _ckpt(out, 3, "ema.safetensors"), _ckpt(again, 3, "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the export holds the average too, and generate/evaluate read it with --weights ema
    from rewardfl.sampling.generator import Generator
    from rewardfl.registry import load_resolved

    gen = Generator.build(*load_resolved(config))
    gen.load(os.path.join(out, "final"), "ema")
    exported = gen.model.trainable_state_dict()
    assert exported.keys() == a.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value.float(), a[key].float(), rtol=1e-6, atol=1e-7)
    ckpt3 = os.path.join(out, "checkpoints", "checkpoint-3")
    assert trainable_weights_of(ckpt3, "ema").keys() == a.keys()
    videos = {}
    for which in ("trained", "ema"):
        dest = str(tmp_path / f"gen-{which}")
        assert generate_cli.main([config, "--checkpoint", ckpt3, "--weights", which, "--out", dest,
                                  "--metadata", cfg["data"]["metadata_path"]]) == 0
        videos[which] = sorted(os.listdir(dest))
        videos[which] = [open(os.path.join(dest, n), "rb").read() for n in videos[which] if n.endswith(".mp4")]
    assert videos["trained"] != videos["ema"]
    capsys.readouterr()


def test_ema_warm_up_equals_diffusers_ema_model_and_a_hand_calculation():
    """The EMA against diffusers' own ``EMAModel`` (``use_ema_warmup`` off, the default) over 40 random
    updates at decay 0.999, and the weight the average keeps on the base model after 300 updates by
    hand: with the warm-up it is 0 (the first update copies the weights); without, 0.999^300 = 0.741."""
    from diffusers.training_utils import EMAModel

    from rewardfl.training.ema import EMA

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64)) for _ in range(2)]
    ours = EMA({f"p{i}": p for i, p in enumerate(params)}, 0.999)
    theirs = EMAModel(params, decay=0.999)
    for _ in range(40):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        ours.update({f"p{i}": p for i, p in enumerate(params)})
        theirs.step(params)
        assert ours.current_decay() == pytest.approx(theirs.get_decay(theirs.optimization_step + 1), rel=1e-12)
    for i, shadow in enumerate(theirs.shadow_params):
        torch.testing.assert_close(ours.shadow[f"p{i}"].double(), shadow, rtol=1e-6, atol=1e-6)  # ours is float32
    # the weight on the base model: prod_k d_k over 300 updates (d_1 = 0), against constant decay
    base = {"w": torch.zeros(1)}
    ema = EMA(base, 0.999)
    for _ in range(300):
        ema.update({"w": torch.ones(1)})  # weights jump to 1 at once: the average's 1 - ema is the base's weight
    assert float(1 - ema.shadow["w"]) == pytest.approx(0.0, abs=1e-6)
    assert 0.999 ** 300 == pytest.approx(0.7407, abs=1e-4)  # what it was before the warm-up
    # the decays by hand: 0, 2/11, 3/12, ..., capped at 0.999 from n = 8991 on
    fresh = EMA(base, 0.999)
    seen = []
    for _ in range(3):
        seen.append(fresh.current_decay())
        fresh.update(base)
    assert seen == pytest.approx([0.0, 2 / 11, 3 / 12])
    fresh.updates = 9000
    assert fresh.current_decay() == 0.999


def test_weights_ema_without_an_ema_is_one_line(make_config, capsys):  # noqa: F811
    config = make_config(max_steps=1, save_steps=1, report_to=[])
    assert run.main([config]) == 0
    out = yaml.safe_load(open(config))["output_dir"]
    capsys.readouterr()
    assert generate_cli.main([config, "--checkpoint", os.path.join(out, "checkpoints", "checkpoint-1"),
                              "--weights", "ema", "--out", os.path.join(out, "g")]) == 2
    err = capsys.readouterr().err
    assert "--weights ema" in err and "ema.safetensors" in err and len(err.strip().splitlines()) == 1


def test_ema_decay_out_of_range_names_the_key(make_config, capsys):  # noqa: F811
    assert run.main([make_config(ema_decay=1.0), "--check"]) == 2
    assert "ema_decay" in capsys.readouterr().err


def test_a_resume_with_ema_decay_0_replaces_final_whole_and_says_it_drops_the_ema(make_config, capsys,  # noqa: F811
                                                                                  caplog):
    config = make_config(max_steps=1, save_steps=1, ema_decay=DECAY, report_to=[])
    assert run.main([config]) == 0
    out = yaml.safe_load(open(config))["output_dir"]
    assert os.path.isfile(os.path.join(out, "final", "ema", "trainable_low_noise.safetensors"))
    # resumed without the average (no step left to train: the export is redone from checkpoint-1)
    assert run.main([make_config(max_steps=1, save_steps=1, ema_decay=0, report_to=[],
                                 resume_from_checkpoint=True)]) == 0
    assert not os.path.exists(os.path.join(out, "final", "ema"))  # no stale average for --weights ema to read
    assert sorted(os.listdir(os.path.join(out, "final"))) == ["trainable_low_noise.safetensors"]
    assert not [n for n in os.listdir(out) if n.startswith(("final.", "best."))]
    dropped = [r.getMessage() for r in caplog.records if "holds an EMA" in r.getMessage()]
    assert len(dropped) == 1 and "this run drops it" in dropped[0], dropped
    capsys.readouterr()
    assert generate_cli.main([config, "--checkpoint", os.path.join(out, "final"), "--weights", "ema",
                              "--out", os.path.join(out, "g")]) == 2
    assert "has no ema/ export" in capsys.readouterr().err
    # a resume refused (a checkpoint that does not fit lora_rank 8) leaves the run's config.yaml as it was
    before = open(os.path.join(out, "config.yaml")).read()
    assert run.main([make_config(max_steps=1, save_steps=1, lora_rank=8, report_to=[],
                                 resume_from_checkpoint=True)]) == 2
    assert "resume_from_checkpoint" in capsys.readouterr().err
    assert open(os.path.join(out, "config.yaml")).read() == before
