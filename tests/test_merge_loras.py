"""``model.merge_loras``: LoRA files in the layouts users have, merged into the frozen experts at
load (before the trainable LoRA), checked against a float64 hand merge and DiffSynth-Studio's own
loader (``GeneralLoRALoader.fuse_lora_to_base_model``)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

from wan_fixtures import build_tiny, tiny_dir  # noqa: F401  (session fixture)

RANK = 2


def _factors(g, out_dim, in_dim, rank=RANK):
    return torch.randn(rank, in_dim, generator=g) * 0.1, torch.randn(out_dim, rank, generator=g) * 0.1


@pytest.fixture(scope="module")
def base(tiny_dir):  # noqa: F811
    return build_tiny(tiny_dir)


def _weights(model, expert):
    """{Wan parameter name: tensor} of an expert's frozen weights (peft's base_layer names undone)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.dits[expert].state_dict().items()
            if ".lora_" not in k}


def _files(folder, base):
    """LoRA files in six layouts and what each should add (in float64, by hand): (entries, {expert: {param: delta}})."""
    g = torch.Generator().manual_seed(0)
    w = _weights(base, "dit")
    shape = {k: tuple(v.shape) for k, v in w.items()}
    expected = {"dit": {}, "dit2": {}}

    def add(expert, param, delta):
        expected[expert][param] = expected[expert].get(param, 0) + delta

    entries = []
    # 1. ComfyUI: diffusion_model. + lora_A/lora_B + alpha (scale alpha/rank)
    d1, u1 = _factors(g, *shape["blocks.0.self_attn.q.weight"])
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": d1,
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": u1,
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(8.0)},
              os.path.join(folder, "comfy_high_noise.safetensors"))
    entries.append({"path": os.path.join(folder, "comfy_high_noise.safetensors"), "strength": 0.5})
    add("dit", "blocks.0.self_attn.q.weight", 0.5 * 8.0 / RANK * (u1.double() @ d1.double()))
    # 2. kohya names on Wan modules: diffusion_model. + lora_down/lora_up + alpha (the distilled pairs' layout)
    d2, u2 = _factors(g, *shape["blocks.1.ffn.0.weight"])
    save_file({"diffusion_model.blocks.1.ffn.0.lora_down.weight": d2,
               "diffusion_model.blocks.1.ffn.0.lora_up.weight": u2,
               "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(1.0)},
              os.path.join(folder, "lightning_high_noise_model.safetensors"))
    entries.append({"path": os.path.join(folder, "lightning_high_noise_model.safetensors")})
    add("dit", "blocks.1.ffn.0.weight", 1.0 / RANK * (u2.double() @ d2.double()))
    # 3. kohya's underscored module names, no alpha (scale 1), and diff / diff_b full differences
    d3, u3 = _factors(g, *shape["blocks.0.cross_attn.k.weight"])
    diff = torch.randn(shape["head.head.weight"], generator=g) * 0.01
    diff_b = torch.randn(shape["head.head.bias"], generator=g) * 0.01
    save_file({"lora_unet_blocks_0_cross_attn_k.lora_down.weight": d3,
               "lora_unet_blocks_0_cross_attn_k.lora_up.weight": u3,
               "diffusion_model.head.head.diff": diff, "diffusion_model.head.head.diff_b": diff_b},
              os.path.join(folder, "kohya.safetensors"))
    entries.append({"path": os.path.join(folder, "kohya.safetensors"), "expert": "dit", "strength": 2.0})
    add("dit", "blocks.0.cross_attn.k.weight", 2.0 * (u3.double() @ d3.double()))
    add("dit", "head.head.weight", 2.0 * diff.double())
    add("dit", "head.head.bias", 2.0 * diff_b.double())
    # 4. diffusers names (transformer.blocks.N.attn1.to_v), 5. DiffSynth (bare Wan names), both into both experts
    d4, u4 = _factors(g, *shape["blocks.1.self_attn.v.weight"])
    save_file({"transformer.blocks.1.attn1.to_v.lora_A.weight": d4, "transformer.blocks.1.attn1.to_v.lora_B.weight": u4},
              os.path.join(folder, "diffusers.safetensors"))
    entries.append({"path": os.path.join(folder, "diffusers.safetensors"), "expert": "both", "strength": -1.0})
    d5, u5 = _factors(g, *shape["blocks.0.self_attn.o.weight"])
    save_file({"blocks.0.self_attn.o.lora_A.weight": d5, "blocks.0.self_attn.o.lora_B.weight": u5},
              os.path.join(folder, "style.safetensors"))
    entries.append({"path": os.path.join(folder, "style.safetensors"), "expert": "low_noise", "strength": 0.7})
    for expert in ("dit", "dit2"):
        add(expert, "blocks.1.self_attn.v.weight", -1.0 * (u4.double() @ d4.double()))
    add("dit2", "blocks.0.self_attn.o.weight", 0.7 * (u5.double() @ d5.double()))
    return entries, expected


def test_merged_weights_equal_a_float64_hand_merge(tiny_dir, base, tmp_path):  # noqa: F811
    entries, expected = _files(str(tmp_path), base)
    merged = build_tiny(tiny_dir, {"merge_loras": entries})
    for expert in ("dit", "dit2"):
        before, after = _weights(base, expert), _weights(merged, expert)
        assert before.keys() == after.keys()
        for name in before:
            if name in expected[expert]:
                want = (before[name].double() + expected[expert][name]).float()
                torch.testing.assert_close(after[name], want, rtol=0, atol=2e-7)
                assert not torch.equal(after[name], before[name])
            else:
                assert torch.equal(after[name], before[name]), name
    # the trainable LoRA came after: fresh (B = 0), on top of the merged dit2
    lora = dict(merged.trainable_parameters())
    assert lora and all(torch.count_nonzero(p) == 0 for n, p in lora.items() if ".lora_B." in n)


def test_diffsynth_loader_fuses_the_same_weights(tiny_dir, base, tmp_path):  # noqa: F811
    """DiffSynth-Studio's fuse (its own key parsing, alpha/rank, lora_down/up) on the same files."""
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.utils.lora.general import GeneralLoRALoader
    from safetensors.torch import load_file

    entries, _ = _files(str(tmp_path), base)
    entries = [entries[0], entries[1]]  # the two layouts DiffSynth reads (comfyui + alpha, lora_down/up)
    merged = build_tiny(tiny_dir, {"merge_loras": entries})
    reference = WanModel(**base.arch.kwargs)
    reference.load_state_dict(_weights(base, "dit"))
    loader = GeneralLoRALoader()
    for e in entries:
        loader.fuse_lora_to_base_model(reference, load_file(e["path"]), alpha=e.get("strength", 1.0))
    got = _weights(merged, "dit")
    for name, want in reference.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=2e-7)


def test_a_key_matching_no_module_is_one_error_and_nothing_is_merged(tiny_dir, base, tmp_path):  # noqa: F811
    from rewardfl.models.wan.merge_loras import merge_loras, merge_plan

    good, _ = _files(str(tmp_path), base)
    bad = str(tmp_path / "other_model_high_noise.safetensors")
    save_file({"diffusion_model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(2, 64),
               "diffusion_model.blocks.7.self_attn.q.lora_B.weight": torch.zeros(64, 2)}, bad)
    with pytest.raises(ValueError) as e:
        build_tiny(tiny_dir, {"merge_loras": [{"path": bad}]})
    message = str(e.value)
    assert "\n" not in message and "model.merge_loras[0]" in message and bad in message
    assert "diffusion_model.blocks.7.self_attn.q.lora_A.weight" in message
    # a good file first, then the bad one: the good one is not merged either
    dits = {"dit": copy.deepcopy(base.dits["dit"])}
    before = {k: v.clone() for k, v in dits["dit"].state_dict().items()}
    plan = merge_plan(base.config, [good[0], {"path": bad}], ("dit",))
    with pytest.raises(ValueError, match="blocks.7.self_attn.q"):
        merge_loras(dits, plan)
    assert all(torch.equal(v, before[k]) for k, v in dits["dit"].state_dict().items())


def test_expert_must_be_known(tiny_dir, base, tmp_path):  # noqa: F811
    from rewardfl.config import ConfigError

    path = str(tmp_path / "style.safetensors")
    save_file({"blocks.0.self_attn.o.lora_A.weight": torch.zeros(2, 64),
               "blocks.0.self_attn.o.lora_B.weight": torch.zeros(64, 2)}, path)
    with pytest.raises(ConfigError, match=r"model.merge_loras\[0\].expert: style.safetensors does not say"):
        build_tiny(tiny_dir, {"merge_loras": [{"path": path}]})
    with pytest.raises(ConfigError, match=r"model.merge_loras\[0\].strength: expected a number"):
        build_tiny(tiny_dir, {"merge_loras": [{"path": path, "expert": "dit", "strength": "high"}]})
    with pytest.raises(FileNotFoundError, match=r"model.merge_loras\[0\].path: file not found"):
        build_tiny(tiny_dir, {"merge_loras": [{"path": str(tmp_path / "missing.safetensors"), "expert": "dit"}]})


from train_fixtures import make_config, small_dataset  # noqa: E402,F401  (fixtures)


def test_check_prints_the_merges_and_generate_builds_the_same_merged_model(make_config, base, tmp_path, capsys):  # noqa: F811
    from rewardfl import run
    from rewardfl.config import load_config
    from rewardfl.sampling.generator import Generator
    from rewardfl.registry import resolve_plugins

    entries, expected = _files(str(tmp_path), base)
    config = make_config(model={"merge_loras": entries[:2]})
    assert run.main(["--check", config]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "merge_loras" in ln]
    assert lines == [f"model    merge_loras: {entries[0]['path']} -> dit strength 0.5 (1 LoRA layer(s), 0 difference(s))",
                     f"model    merge_loras: {entries[1]['path']} -> dit strength 1 (1 LoRA layer(s), 0 difference(s))"]
    cfg = load_config(config)
    generator = Generator.build(cfg, resolve_plugins(cfg))  # what generate and evaluate build
    before, after = _weights(base, "dit"), _weights(generator.model, "dit")
    for name in ("blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight"):
        want = (before[name].double() + expected["dit"][name]).float()
        torch.testing.assert_close(after[name], want, rtol=0, atol=2e-7)


def test_export_merge_with_the_config_writes_the_fully_merged_expert(tiny_dir, base, tmp_path):  # noqa: F811
    """``export --merge --config``: the expert as training loaded it (merge_loras) plus the trained LoRA."""
    import yaml
    from safetensors.torch import load_file

    from rewardfl.export import main as export_main
    from rewardfl.models.wan.architectures import dit_key

    entries, expected = _files(str(tmp_path), base)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model_name": "wan2_2_tiny", "model_paths": os.path.join(tiny_dir, "model_paths.json"),
                                      "model": {"merge_loras": entries}}))
    g = torch.Generator().manual_seed(1)
    w = _weights(base, "dit")
    d, u = _factors(g, *w["blocks.0.self_attn.q.weight"].shape)
    trained = str(tmp_path / "trained.safetensors")
    save_file({"blocks.0.self_attn.q.lora_A.weight": d, "blocks.0.self_attn.q.lora_B.weight": u}, trained,
              metadata={"expert": "dit"})
    out = str(tmp_path / "dit_merged.safetensors")
    assert export_main(["--merge", "--config", str(config), "--lora", trained, "--out", out, "--dtype", "fp32"]) == 0
    merged = {dit_key(k) or k: v for k, v in load_file(out).items()}
    expected["dit"]["blocks.0.self_attn.q.weight"] = (expected["dit"]["blocks.0.self_attn.q.weight"]
                                                      + u.double() @ d.double())
    assert merged.keys() == w.keys()
    for name, before in w.items():
        want = (before.double() + expected["dit"].get(name, 0)).float()
        torch.testing.assert_close(merged[name], want, rtol=0, atol=4e-7)
