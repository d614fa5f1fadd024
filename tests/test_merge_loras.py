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


# --------------------------------------------------------------------------- run --check on one-expert models


@pytest.mark.parametrize("form", ["dict", "list"])
def test_check_plans_merges_against_the_experts_the_files_hold(make_config, tiny_dir, tmp_path, capsys, form):  # noqa: F811
    """A model_paths with one DiT (TI2V-5B, or A14B's high-noise expert alone): ``run --check`` checks each
    entry against that one expert, as loading does (it used to check against both)."""
    from wan_fixtures import write_paths

    from rewardfl import run
    from rewardfl.config import ConfigError

    files = {"high_noise_model": "dit_high_noise.safetensors", "text_encoder": "text_encoder.safetensors",
             "vae": "vae.safetensors"}
    spec = ({**{k: os.path.join(tiny_dir, v) for k, v in files.items()}, "tokenizer": os.path.join(tiny_dir, "tokenizer")}
            if form == "dict" else [os.path.join(tiny_dir, v) for v in files.values()])
    paths = write_paths(str(tmp_path), spec)
    style = str(tmp_path / "style.safetensors")  # its name says no expert: fine with one
    save_file({"blocks.0.self_attn.o.lora_A.weight": torch.zeros(2, 64),
               "blocks.0.self_attn.o.lora_B.weight": torch.zeros(64, 2)}, style)
    common = dict(model_paths=paths, trainable_models="dit", lora_base_model="dit", tokenizer_path=os.path.join(tiny_dir, "tokenizer"))
    assert run.main(["--check", make_config(**common, model={"merge_loras": [style], "boundary": 0.0})]) == 0
    assert f"model    merge_loras: {style} -> dit strength 1 (1 LoRA layer(s), 0 difference(s))" in \
        capsys.readouterr().out.splitlines()
    # an expert the files do not hold: one line naming the entry and the experts there are, before loading
    bad = make_config(**common, model={"merge_loras": [{"path": style, "expert": "low_noise"}], "boundary": 0.0})
    assert run.main(["--check", bad]) == 2
    message = "model.merge_loras[0].expert: the model has no expert dit2 (it has dit)"
    assert capsys.readouterr().err.strip().splitlines() == [f"rewardfl.run: error: {message}"]
    with pytest.raises(ConfigError) as e:  # loading says the same
        build_tiny(tiny_dir, {"merge_loras": [{"path": style, "expert": "low_noise"}]}, **common)
    assert str(e.value) == message


def test_check_plans_the_steps_with_the_experts_the_files_hold(make_config, tiny_dir, tmp_path, capsys):  # noqa: F811
    """One DiT in model_paths and trainable_models: dit: every step runs it, so ``run --check`` plans the
    gradient window on it, as training does (it planned with both roles and refused: "no gradient step runs
    a trainable expert"), and it names dit2 as absent when asked to train it."""
    from wan_fixtures import write_paths

    from rewardfl import run

    files = ("dit_high_noise.safetensors", "text_encoder.safetensors", "vae.safetensors")
    paths = write_paths(str(tmp_path), [os.path.join(tiny_dir, f) for f in files])
    common = dict(model_paths=paths, tokenizer_path=os.path.join(tiny_dir, "tokenizer"))
    assert run.main(["--check", make_config(**common, trainable_models="dit", lora_base_model="dit")]) == 0
    assert "plan     4 steps, gradient at 2:dit, 3:dit" in capsys.readouterr().out.splitlines()
    assert run.main(["--check", make_config(**common, trainable_models="dit2", lora_base_model="dit2")]) == 2
    assert capsys.readouterr().err.strip() == ("rewardfl.run: error: trainable_models: 'dit2' does not exist in "
                                               "these model_paths (its experts: dit)")


# --------------------------------------------------------------------------- the published Lightning pair's layout

#: the Linear layers of a Wan block (original names) a Lightning file adapts
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
LIGHTNING_RANK, LIGHTNING_ALPHA = 64, 32.0  # the published rank; an alpha != rank, so a lost or doubled scale shows


def _lightning_file(path, weights, seed):
    """A file laid out as lightx2v's Wan2.2-Lightning ``high_noise_model.safetensors`` /
    ``low_noise_model.safetensors`` (``Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/``), for the tiny expert
    ``weights``; returns ``{Wan parameter: float64 delta}``.

    The layout, from the public code that reads these files: the authors' own merge,
    ``load_and_merge_lora_weight`` in ModelTC/Wan2.2-Lightning ``wan/utils/utils.py``, builds for each model
    parameter ``<module>.weight`` the keys ``diffusion_model.<module>.lora_down.weight`` (rank x in),
    ``diffusion_model.<module>.lora_up.weight`` (out x rank) and ``diffusion_model.<module>.alpha`` (read with
    ``float()``: a scalar), asserts both factors are float32, and adds ``alpha / rank * up @ down``; lightx2v's
    converter for these files (ModelTC/LightX2V ``tools/extract/convert_lightning_to_x2v_lora.py``) names the
    same three keys per layer (``diffusion_model.blocks.0.cross_attn.o.alpha`` ...) and keeps no other kind.
    The layers are the Linear layers of every block (self/cross attention q, k, v, o and ffn.0, ffn.2; rank 64
    over 40 blocks of A14B is the published 1.2 GB in float32); no ``diff``/``diff_b`` (biases, norms) or
    ``lora_A``/``lora_B`` keys: the authors' loader reads none. No safetensors metadata is needed by any of them.
    """
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for name, w in weights.items():
        module = name[: -len(".weight")]
        if not name.endswith(".weight") or module.split(".", 2)[-1] not in BLOCK_LINEARS or not module.startswith("blocks."):
            continue
        down = torch.randn(LIGHTNING_RANK, w.shape[1], generator=g, dtype=torch.float32) * 0.02
        up = torch.randn(w.shape[0], LIGHTNING_RANK, generator=g, dtype=torch.float32) * 0.02
        state[f"diffusion_model.{module}.lora_down.weight"] = down
        state[f"diffusion_model.{module}.lora_up.weight"] = up
        state[f"diffusion_model.{module}.alpha"] = torch.tensor(LIGHTNING_ALPHA)
        expected[name] = LIGHTNING_ALPHA / LIGHTNING_RANK * (up.double() @ down.double())
    save_file(state, path)
    return expected


def test_the_lightning_pair_layout_merges_every_key(tiny_dir, base, tmp_path, caplog):  # noqa: F811
    """The Lightning pair as published (names, tensors, alpha), given as bare paths (strength 1, the expert
    from the file name): every one of its keys is merged (each adapted layer equals the float64 hand merge,
    every other weight is unchanged), none skipped."""
    import logging

    folder = tmp_path / "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"
    folder.mkdir()
    paths = {"dit": str(folder / "high_noise_model.safetensors"), "dit2": str(folder / "low_noise_model.safetensors")}
    expected = {r: _lightning_file(paths[r], _weights(base, r), seed) for seed, r in enumerate(("dit", "dit2"))}
    assert all(len(e) == len(BLOCK_LINEARS) * 2 for e in expected.values())  # 10 layers x 2 blocks, 60 keys a file
    with caplog.at_level(logging.INFO, logger="rewardfl"):
        merged = build_tiny(tiny_dir, {"merge_loras": [paths["dit"], paths["dit2"]]})
    for r in ("dit", "dit2"):
        assert f"merged {paths[r]} into {r}: 20 LoRA layers, 0 differences, strength 1" in caplog.text
        before, after = _weights(base, r), _weights(merged, r)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed == set(expected[r])
        for name, delta in expected[r].items():
            torch.testing.assert_close(after[name], (before[name].double() + delta).float(), rtol=0, atol=2e-7)


# --------------------------------------------------------------------------- diffusers' own loader


def _diffusers_twin(base, expert):
    """A diffusers ``WanTransformer3DModel`` holding the tiny expert's weights, renamed by diffusers' own
    ``convert_wan_transformer_to_diffusers`` (not rewardfl's table); loaded strictly."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    dit = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=36,
                                out_channels=16, text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2,
                                cross_attn_norm=True, eps=1e-6)
    dit.load_state_dict(convert_wan_transformer_to_diffusers(_weights(base, expert)), strict=True)
    return dit.eval()


def _diffusers_layout_file(path, dit, seed):
    """A random LoRA in diffusers' own layout for every Linear of ``dit`` (``transformer.<diffusers module>.lora_A
    / lora_B.weight``, the module names taken from the model itself); returns ``{diffusers param: float64 delta}``."""
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for name, m in dit.named_modules():
        if isinstance(m, torch.nn.Linear):
            a, b = _factors(g, m.out_features, m.in_features, rank=4)
            state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = a, b
            expected[f"{name}.weight"] = b.double() @ a.double()
    save_file(state, path)
    return expected


def _diffusers_fuse(dit, path, strength):
    """``dit`` with the file fused by diffusers: ``WanLoraLoaderMixin.lora_state_dict`` (its converter for
    ``diffusion_model.`` files), ``load_lora_adapter``, ``fuse_lora(lora_scale=strength)``, ``unload_lora``."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    dit = copy.deepcopy(dit)
    dit.load_lora_adapter(WanLoraLoaderMixin.lora_state_dict(path), adapter_name="merge", prefix="transformer")
    dit.fuse_lora(lora_scale=strength)
    dit.unload_lora()
    return {k: v.detach() for k, v in dit.state_dict().items()}


@pytest.mark.parametrize("layout", ["diffusers", "lightning"])
def test_diffusers_loader_fuses_the_same_weights(tiny_dir, base, tmp_path, layout):  # noqa: F811
    """diffusers' own LoRA loading and fusing, on a ``WanTransformer3DModel`` equal to the tiny expert, against
    what ``merge_loras`` makes of the same file: on the Wan (DiffSynth) model, and on the diffusers model as
    the ``wan2_2_diffusers`` plugin merges (its names mapped by ``diffusers_to_wan_key``). Both equal the
    float64 hand merge. Layouts: diffusers' own (``transformer.`` names, lora_A/lora_B, every Linear of the
    DiT including the embedders and the head) and the Lightning pair's (``diffusion_model.`` Wan names,
    lora_down/lora_up + alpha), which diffusers reads through ``_convert_non_diffusers_wan_lora_to_diffusers``.

    What diffusers cannot load, and so is not compared here: a ``diffusion_model.`` file with ``.alpha`` on a
    layer outside the blocks (its converter reads alpha for block layers only and raises on the left-over
    key), and full differences (it turns ``head.head.diff`` into a LoRA factor with an identity partner, drops
    norm diffs, and leaves any other ``.diff``/``.diff_m`` unapplied with an info log): ``merge_loras`` adds
    those as full differences, as ComfyUI and lightx2v do (checked against the hand merge above).
    """
    from rewardfl.models.wan.diffusers_keys import diffusers_to_wan_key
    from rewardfl.models.wan.merge_loras import merge_loras, merge_plan

    twin = _diffusers_twin(base, "dit")
    path, strength = str(tmp_path / f"{layout}_high_noise.safetensors"), -0.7
    if layout == "diffusers":
        expected = {diffusers_to_wan_key(k): v for k, v in _diffusers_layout_file(path, twin, 3).items()}
    else:
        expected = _lightning_file(path, _weights(base, "dit"), 3)
    fused = {diffusers_to_wan_key(k): v for k, v in _diffusers_fuse(twin, path, strength).items()}
    merged = _weights(build_tiny(tiny_dir, {"merge_loras": [{"path": path, "strength": strength}]}), "dit")
    plugin = copy.deepcopy(twin)  # the wan2_2_diffusers plugin's merge: diffusers modules, Wan names
    merge_loras({"dit": plugin}, merge_plan(base.config, [{"path": path, "strength": strength}], ("dit",)),
                wan_name=diffusers_to_wan_key)
    plugin = {diffusers_to_wan_key(k): v.detach() for k, v in plugin.state_dict().items()}
    before = _weights(base, "dit")
    assert fused.keys() == merged.keys() == plugin.keys() == before.keys()
    for name, w in before.items():
        want = (w.double() + strength * expected[name]).float() if name in expected else w
        for got in (fused[name], merged[name], plugin[name]):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-7, msg=name)
        torch.testing.assert_close(merged[name], fused[name], rtol=0, atol=2e-7)
    assert all(not torch.equal(before[n], merged[n]) for n in expected)


def test_full_differences_of_biases_norms_and_modulation_are_merged(tiny_dir, base, tmp_path):  # noqa: F811
    """A step-distill LoRA extracted with full differences (Kijai's lightx2v files: ComfyUI-WanVideoWrapper
    issue 807 logs ``diffusion_model.blocks.0.diff_m`` among their keys): ``.diff_b`` on Linear biases,
    ``.diff``/``.diff_b`` on norms, ``blocks.N.diff_m`` on the block's modulation, each added times strength
    (lightx2v's own ``LoRALoader.extract_lora_diffs``: diff -> weight, diff_b -> bias, diff_m -> modulation)."""
    g = torch.Generator().manual_seed(5)
    w = _weights(base, "dit2")
    d, u = _factors(g, *w["blocks.1.cross_attn.v.weight"].shape)
    diffs = {"blocks.0.diff_m": "blocks.0.modulation", "blocks.1.norm3.diff": "blocks.1.norm3.weight",
             "blocks.1.norm3.diff_b": "blocks.1.norm3.bias", "blocks.1.cross_attn.v.diff_b": "blocks.1.cross_attn.v.bias",
             "head.head.diff_b": "head.head.bias"}
    state = {f"diffusion_model.{k}": torch.randn(w[p].shape, generator=g) * 0.01 for k, p in diffs.items()}
    state.update({"diffusion_model.blocks.1.cross_attn.v.lora_down.weight": d,
                  "diffusion_model.blocks.1.cross_attn.v.lora_up.weight": u,
                  "diffusion_model.blocks.1.cross_attn.v.alpha": torch.tensor(4.0)})
    path = str(tmp_path / "lightx2v_step_distill_low_noise.safetensors")
    save_file(state, path)
    strength = 0.8
    want = {p: strength * state[f"diffusion_model.{k}"].double() for k, p in diffs.items()}
    want["blocks.1.cross_attn.v.weight"] = strength * 4.0 / RANK * (u.double() @ d.double())
    after = _weights(build_tiny(tiny_dir, {"merge_loras": [{"path": path, "strength": strength}]}), "dit2")
    for name, before in w.items():
        expected = (before.double() + want[name]).float() if name in want else before
        torch.testing.assert_close(after[name], expected, rtol=0, atol=2e-7, msg=name)
