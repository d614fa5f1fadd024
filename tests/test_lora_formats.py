"""LoRA export formats: the files load in the real diffusers and DiffSynth loaders and under ComfyUI's key rules.

References, none of them rewardfl's key tables: diffusers' own ``WanLoraLoaderMixin.lora_state_dict`` +
``WanTransformer3DModel.load_lora_adapter`` against a float64 hand merge ``W + alpha/rank * B @ A``;
DiffSynth-Studio's ``GeneralLoRALoader`` and forward (``model_fn_wan_video``); ComfyUI's rules
reproduced from its source (ComfyUI is not installable here: PyPI's ``comfyui`` is an unrelated
0.0.1 placeholder), see ``_comfyui_merge``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from wan_fixtures import build_tiny, perturb_lora, tiny_dir  # noqa: F401

torch.set_num_threads(min(2, torch.get_num_threads()))

RANK, ALPHA = 4, 8.0  # scale 2: a file that lost or doubled the scale is caught

#: Wan module in a block -> diffusers' WanTransformer3DModel module, written here from diffusers'
#: ``_convert_non_diffusers_wan_lora_to_diffusers`` (loaders/lora_conversion_utils.py), for the
#: default lora_target_modules q,k,v,o,ffn.0,ffn.2
DIFFUSERS_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                   "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                   "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                   "ffn.2": "ffn.net.2"}


@pytest.fixture(scope="module")
def trained(tiny_dir):  # noqa: F811
    """The tiny twin with dit2 LoRA (rank 4, alpha 8) set to random values."""
    model = build_tiny(tiny_dir, lora_rank=RANK, lora_alpha=ALPHA)
    perturb_lora(model, seed=7, scale=0.1)
    return model


def _layers(model, expert="dit2"):
    """{Wan module: (A, B as trained)} from the model's own parameters."""
    state = model.trainable_state_dict()
    out = {}
    for k, a in state.items():
        if k.startswith(f"{expert}.") and k.endswith(".lora_A.weight"):
            module = k[len(expert) + 1: -len(".lora_A.weight")]
            out[module] = (a, state[k.replace(".lora_A.", ".lora_B.")])
    return out


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    C, T, h, w = model.latent_shape(5, 32, 32)
    return first, torch.randn(1, C, T, h, w, generator=g)


def _plain_dit(path):
    from diffsynth.models.wan_video_dit import WanModel

    from rewardfl.models.wan.architectures import TINY_DITS

    dit = WanModel(**TINY_DITS["tiny-i2v"])
    dit.load_state_dict(load_file(path))
    return dit.eval()


def _diffsynth_v(dit, x, t, cond):
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    with torch.no_grad():
        return model_fn_wan_video(dit=dit, latents=x, timestep=t, context=cond.context, y=cond.y)


# --------------------------------------------------------------------------- diffusers' real loader


def _tiny_diffusers_transformer():
    """A WanTransformer3DModel of the tiny twin's sizes (dim 64 = 2 heads x 32, ffn 128, text 32, 2 blocks)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).eval()


def _diffusers_forward(transformer, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([600.0]), encoder_hidden_states=text,
                           return_dict=False)[0]


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_export_loads_in_diffusers_wan_loader_and_equals_the_hand_merge(trained, tmp_path, fmt):
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    (path,) = trained.save_trainable(str(tmp_path / f"lora_{fmt}.safetensors"), fmt)
    base = _tiny_diffusers_transformer()
    reference = copy.deepcopy(base)
    layers = _layers(trained)
    with torch.no_grad():  # W + alpha / rank * B @ A in float64, into the module diffusers names
        for module, (a, b) in layers.items():
            block, rest = module.split(".", 2)[1], module.split(".", 2)[2]
            lin = reference.get_submodule(f"blocks.{block}.{DIFFUSERS_NAMES[rest]}")
            merged = lin.weight.double() + ALPHA / RANK * (b.double() @ a.double())
            lin.weight.copy_(merged.float())
    state = WanLoraLoaderMixin.lora_state_dict(path)
    assert len(state) == 2 * len(layers)  # every layer converted, no alpha or stray key left
    loaded = copy.deepcopy(base)
    loaded.load_lora_adapter(state, adapter_name="rewardfl", prefix="transformer")
    from peft.tuners.lora import LoraLayer

    assert sum(isinstance(m, LoraLayer) for m in loaded.modules()) == len(layers)
    out, ref = _diffusers_forward(loaded), _diffusers_forward(reference)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (ref - _diffusers_forward(base)).abs().max() > 1e-3  # the LoRA changes the output


# --------------------------------------------------------------------------- ComfyUI's rules, reproduced


def _comfyui_merge(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0):
    """ComfyUI's LoRA rules for a Wan model, reproduced from its source (ComfyUI is not pip-installable):

    - ``comfy/lora.py`` ``model_lora_keys_unet``: for every model key ``diffusion_model.<m>.weight``,
      ``key_map["diffusion_model.<m>"] = that key`` ("generic lora format without any weird key
      names"); ComfyUI's Wan model (``comfy/ldm/wan/model.py``) uses the original Wan module names,
      which are DiffSynth's WanModel names, under ``diffusion_model.``.
    - ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.load``: for a prefix x, ``x.lora_B.weight`` is
      up (mat1), ``x.lora_A.weight`` down (mat2); ``comfy/lora.py`` ``load_lora`` reads alpha from
      ``x.alpha`` (``.item()``); ``calculate_weight``: ``alpha = alpha / mat2.shape[0]`` (1.0 when
      absent), ``weight += strength * alpha * mat1 @ mat2``.
    - ``load_lora`` logs "lora key not loaded" for every key it did not use: returned here.
    Computed in float64. ``weights``: the DiT's state dict in Wan names (no prefix).
    """
    key_map = {f"diffusion_model.{k[:-len('.weight')]}": k for k in weights if k.endswith(".weight")}
    out = {k: v.double().clone() for k, v in weights.items()}
    loaded = set()
    for x, target in key_map.items():
        up_name, down_name, alpha_name = f"{x}.lora_B.weight", f"{x}.lora_A.weight", f"{x}.alpha"
        if up_name not in lora:
            continue
        up, down = lora[up_name].double(), lora[down_name].double()
        alpha = lora[alpha_name].item() / down.shape[0] if alpha_name in lora else 1.0
        out[target] = out[target] + strength * alpha * (up @ down)
        loaded |= {up_name, down_name} | ({alpha_name} if alpha_name in lora else set())
    return {k: v.float() for k, v in out.items()}, sorted(set(lora) - loaded)


def test_comfyui_export_follows_comfyuis_key_rules_and_reproduces_the_adapter_model(trained, tiny_dir, tmp_path):  # noqa: F811
    (path,) = trained.save_trainable(str(tmp_path / "lora.safetensors"), "comfyui")
    lora = load_file(path)
    # the layout: diffusion_model.<Wan module>.lora_A/B.weight and a 0-dim alpha = lora_alpha per layer
    layers = _layers(trained)
    assert set(lora) == {f"diffusion_model.{m}.{s}" for m in layers for s in ("lora_A.weight", "lora_B.weight", "alpha")}
    for m, (a, b) in layers.items():
        assert torch.equal(lora[f"diffusion_model.{m}.lora_A.weight"], a)
        assert torch.equal(lora[f"diffusion_model.{m}.lora_B.weight"], b)  # unscaled: the scale is alpha / rank
        assert lora[f"diffusion_model.{m}.alpha"].shape == () and lora[f"diffusion_model.{m}.alpha"].item() == ALPHA
    dit_file = os.path.join(tiny_dir, "dit_low_noise.safetensors")
    merged, not_loaded = _comfyui_merge(load_file(dit_file), lora)
    assert not_loaded == []  # ComfyUI would warn "lora key not loaded" for each of these
    dit = _plain_dit(dit_file)
    dit.load_state_dict(merged)
    first, x = _inputs(trained)
    cond = trained.encode(["a face"], first, 5)
    t = torch.tensor([400.0])
    torch.testing.assert_close(_diffsynth_v(dit, x, t, cond), trained.denoise("dit2", x, t, cond), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["comfyui", "diffsynth"])
def test_export_loads_in_diffsynths_loader(trained, tiny_dir, tmp_path, fmt):  # noqa: F811
    from diffsynth.utils.lora.general import GeneralLoRALoader

    (path,) = trained.save_trainable(str(tmp_path / "lora.safetensors"), fmt)
    dit = _plain_dit(os.path.join(tiny_dir, "dit_low_noise.safetensors"))
    GeneralLoRALoader().fuse_lora_to_base_model(dit, load_file(path))
    first, x = _inputs(trained, seed=2)
    cond = trained.encode(["p"], first, 5)
    t = torch.tensor([250.0])
    torch.testing.assert_close(_diffsynth_v(dit, x, t, cond), trained.denoise("dit2", x, t, cond), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- conversion and merge (the CLI)


def _tensors_and_meta(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def test_diffsynth_to_comfyui_to_diffsynth_is_exact_through_the_cli(trained, tmp_path):
    from rewardfl.export import main

    (ds,) = trained.save_trainable(str(tmp_path / "ds.safetensors"), "diffsynth")
    original, meta = _tensors_and_meta(ds)
    for m, (a, b) in _layers(trained).items():  # DiffSynth's layout: the scale alpha / rank folded into B
        assert torch.equal(original[f"{m}.lora_B.weight"], b * (ALPHA / RANK))
    comfy, back = str(tmp_path / "comfy.safetensors"), str(tmp_path / "back.safetensors")
    assert main(["--to", "comfyui", "--lora", ds, "--out", comfy]) == 0
    assert main(["--to", "diffsynth", "--lora", comfy, "--out", back]) == 0
    middle, middle_meta = _tensors_and_meta(comfy)
    assert all(k.startswith("diffusion_model.") for k in middle) and middle_meta["format"] == "comfyui-lora"
    again, again_meta = _tensors_and_meta(back)
    assert sorted(again) == sorted(original) and all(torch.equal(again[k], original[k]) for k in original)
    assert again_meta["expert"] == meta["expert"] == "dit2" and again_meta["format"] == "diffsynth-lora"


def test_conversions_keep_each_layers_update(trained, tmp_path):
    """comfyui -> diffusers -> comfyui: the tensors change (the scale is folded), scale * B @ A does not."""
    from rewardfl.export import main

    (comfy,) = trained.save_trainable(str(tmp_path / "c.safetensors"), "comfyui")
    diff, comfy2 = str(tmp_path / "d.safetensors"), str(tmp_path / "c2.safetensors")
    assert main(["--to", "diffusers", "--lora", comfy, "--out", diff]) == 0
    assert main(["--to", "comfyui", "--lora", diff, "--out", comfy2]) == 0
    d = load_file(diff)
    c2 = load_file(comfy2)
    for m, (a, b) in _layers(trained).items():
        block, rest = m.split(".", 2)[1], m.split(".", 2)[2]
        dkey = f"transformer.blocks.{block}.{DIFFUSERS_NAMES[rest]}"
        want = ALPHA / RANK * (b.double() @ a.double())
        torch.testing.assert_close((d[f"{dkey}.lora_B.weight"].double() @ d[f"{dkey}.lora_A.weight"].double()), want,
                                   rtol=1e-6, atol=1e-7)
        assert f"diffusion_model.{m}.alpha" not in c2  # from a folded file: scale 1, no alpha
        torch.testing.assert_close(c2[f"diffusion_model.{m}.lora_B.weight"].double()
                                   @ c2[f"diffusion_model.{m}.lora_A.weight"].double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_cli_merge_of_any_format_equals_the_float64_hand_merge(trained, tiny_dir, tmp_path, fmt):  # noqa: F811
    from rewardfl.export import main

    (lora,) = trained.save_trainable(str(tmp_path / "lora.safetensors"), fmt)
    out = str(tmp_path / "merged.safetensors")
    assert main(["--merge", "--model-paths", os.path.join(tiny_dir, "model_paths.json"), "--lora", lora,
                 "--out", out]) == 0  # the expert comes from the file's metadata (dit2)
    base, merged = load_file(os.path.join(tiny_dir, "dit_low_noise.safetensors")), load_file(out)
    assert sorted(merged) == sorted(base)
    layers = _layers(trained)
    for key, w in base.items():
        module = key[: -len(".weight")]
        if module in layers:
            a, b = layers[module]
            want = w.double() + ALPHA / RANK * (b.double() @ a.double())
            torch.testing.assert_close(merged[key].double(), want, rtol=0, atol=1e-6)
            assert (merged[key] - w).abs().max() > 1e-4
        else:
            assert torch.equal(merged[key], w), key


def test_read_exported_gives_the_trained_weights_back_from_every_format(trained, tmp_path):
    want = trained.trainable_state_dict()
    for fmt in ("comfyui", "diffsynth", "diffusers"):
        files = trained.save_trainable(str(tmp_path / f"{fmt}.safetensors"), fmt)
        got = trained.read_exported(files)
        assert sorted(got) == sorted(want)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- options and user errors


def test_lora_format_option_is_the_default_export_and_is_validated(tiny_dir, tmp_path):  # noqa: F811
    from rewardfl.config import ConfigError

    model = build_tiny(tiny_dir, lora_rank=RANK)
    assert model.options.lora_format == "comfyui"
    (path,) = model.save_trainable(str(tmp_path / "default.safetensors"))
    assert all(k.startswith("diffusion_model.") for k in load_file(path))
    model = build_tiny(tiny_dir, options={"lora_format": "diffusers"}, lora_rank=RANK)
    (path,) = model.save_trainable(str(tmp_path / "diffusers.safetensors"))
    assert all(k.startswith("transformer.blocks.") for k in load_file(path))
    with pytest.raises((ConfigError, ValueError), match="lora_format"):
        build_tiny(tiny_dir, options={"lora_format": "kohya"})


def test_cli_user_errors_are_one_line(trained, tmp_path, capsys):
    from rewardfl.export import main

    bad = str(tmp_path / "bad.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4),
               "diffusion_model.blocks.0.self_attn.q.lora_mid.weight": torch.zeros(4, 4)}, bad)
    assert main(["--to", "diffsynth", "--lora", bad, "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "diffusion_model.blocks.0.self_attn.q.lora_mid.weight" in err, err
    assert main(["--model", "no_such_model", "--to", "comfyui", "--lora", bad, "--out", "x"]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert main(["--merge", "--lora", bad, "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "--model-paths" in capsys.readouterr().err
    assert main(["--to", "comfyui", "--lora", str(tmp_path / "missing.safetensors"), "--out", "x"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    from rewardfl.models.wan.lora_formats import diffusers_module

    with pytest.raises(ValueError, match="patch_embedding"):
        diffusers_module("patch_embedding")
