"""wan2_2 / wan2_2_tiny: loading, conditioning, LoRA, checkpoints, export, gradients, bad input.

Everything runs on the tiny twin written by ``make_tiny`` (real files, real loading path).
References are independent of rewardfl's code: diffsynth's own ``model_fn_wan_video``,
its I2V pipeline unit and its LoRA loader, plain autograd without checkpointing, and hand
computations.
"""

from __future__ import annotations

import os
import shutil
import types

import numpy as np
import pytest
import torch
import yaml
from wan_fixtures import build_tiny, perturb_lora, tiny_config, tiny_dir, write_paths  # noqa: F401

torch.set_num_threads(min(2, torch.get_num_threads()))


def _inputs(model, batch=1, frames=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    C, T, h, w = model.latent_shape(frames, size, size)
    x = torch.randn(batch, C, T, h, w, generator=g)
    return first, x


def _plain_dit(path: str):
    """The DiT in ``path`` as a plain diffsynth WanModel (no rewardfl code in between)."""
    from diffsynth.models.wan_video_dit import WanModel
    from safetensors.torch import load_file

    from rewardfl.models.wan.architectures import TINY_DITS

    dit = WanModel(**TINY_DITS["tiny-i2v"])
    dit.load_state_dict(load_file(path))
    return dit.eval()


def _reference_v(dit, x, t, cond):
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    with torch.no_grad():
        return model_fn_wan_video(dit=dit, latents=x, timestep=t, context=cond.context, y=cond.y)


# --------------------------------------------------------------------------- loading


def test_load_dict_form_and_forward_matches_diffsynth(tiny_dir):
    model = build_tiny(tiny_dir)
    assert model.experts == ("dit", "dit2") and model.trainable_experts() == ("dit2",)
    first, x = _inputs(model)
    cond = model.encode(["a face"], first, 5)
    t = torch.tensor([937.5])
    for expert, fname in (("dit", "dit_high_noise.safetensors"), ("dit2", "dit_low_noise.safetensors")):
        ref = _reference_v(_plain_dit(os.path.join(tiny_dir, fname)), x, t, cond)
        v = model.denoise(expert, x, t, cond)
        assert v.shape == x.shape
        torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)


def test_list_form_in_any_order_gives_the_same_model(tiny_dir, tmp_path):
    d = tiny_dir
    spec = [os.path.join(d, "vae.safetensors"), [os.path.join(d, "dit_high_noise.safetensors")],
            os.path.join(d, "text_encoder.safetensors"), os.path.join(d, "dit_low_noise.safetensors")]
    paths = write_paths(str(tmp_path), spec)
    listed = build_tiny(d, model_paths=paths, tokenizer_path=os.path.join(d, "tokenizer"))
    named = build_tiny(d)
    first, x = _inputs(named, batch=2)
    cond_n, cond_l = named.encode(["a", "b"], first, 5), listed.encode(["a", "b"], first, 5)
    for expert in ("dit", "dit2"):  # first DiT listed = high noise
        a = named.denoise(expert, x, torch.tensor([900.0, 500.0]), cond_n)
        assert torch.equal(a, listed.denoise(expert, x, torch.tensor([900.0, 500.0]), cond_l))


def test_sharded_safetensors_with_index(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(tiny_dir, "dit_low_noise.safetensors"))
    keys = sorted(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    write_paths(str(tmp_path), index, "low.safetensors.index.json")
    spec = {"high_noise_model": os.path.join(tiny_dir, "dit_high_noise.safetensors"),
            "low_noise_model": str(tmp_path / "low.safetensors.index.json"),
            "text_encoder": os.path.join(tiny_dir, "text_encoder.safetensors"),
            "vae": os.path.join(tiny_dir, "vae.safetensors"), "tokenizer": os.path.join(tiny_dir, "tokenizer")}
    model = build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec))
    sd = {k: v for k, v in model.dits["dit2"].state_dict().items() if "lora" not in k}
    for k, v in state.items():
        key = k if k in sd else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(sd[key], v), k


def test_tiny_tokenizer_is_byte_level_with_eos_and_padding(tiny_dir):
    model = build_tiny(tiny_dir)
    out = model.tokenizer(["hé"], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    expected = [3 + alphabet.index(byte_char[b]) for b in "hé".encode()] + [1]  # </s> = 1
    assert out.input_ids[0].tolist() == expected + [0] * (8 - len(expected))
    assert out.attention_mask[0].tolist() == [1] * len(expected) + [0] * (8 - len(expected))


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's), written out."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs)))
    return [table[b] for b in range(256)]


def test_prompt_embeddings_are_cached_and_zero_past_the_prompt(tiny_dir):
    model = build_tiny(tiny_dir)
    calls = []
    model.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    e1 = model.encode_prompts(["ab", "abc", "ab"])
    e2 = model.encode_prompts(["abc"])
    assert calls == [2]  # two unique prompts, encoded once
    assert torch.equal(e1[0], e1[2]) and torch.equal(e1[1], e2[0])
    assert e1.shape == (3, model.options.text_len, 32)
    assert e1[0, 3:].abs().sum() == 0 and e1[0, :3].abs().sum() > 0  # "ab" + </s> = 3 tokens


def test_make_tiny_is_idempotent(tiny_dir):
    from rewardfl.demo.make_tiny import make_tiny

    before = {f: os.path.getmtime(os.path.join(tiny_dir, f)) for f in os.listdir(tiny_dir)}
    make_tiny(tiny_dir)
    assert {f: os.path.getmtime(os.path.join(tiny_dir, f)) for f in os.listdir(tiny_dir)} == before


# --------------------------------------------------------------------------- conditioning


def test_i2v_input_has_36_channels_built_from_the_first_frame(tiny_dir):
    """Against diffsynth's own I2V unit (WanVideoUnit_ImageEmbedderVAE) on the same VAE."""
    from diffsynth.pipelines.wan_video import WanVideoUnit_ImageEmbedderVAE
    from PIL import Image

    model = build_tiny(tiny_dir)
    frames, H = 9, 32
    first, _ = _inputs(model, size=H, seed=3)
    cond = model.encode(["x"], first, frames)
    C, T, h, w = model.latent_shape(frames, H, H)
    assert cond.y.shape == (1, 4 + C, T, h, w) and C + cond.y.shape[1] == 36
    assert model.dits["dit"].patch_embedding.in_channels == 36

    img = Image.fromarray(((first[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
    pixels = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
    pipe = types.SimpleNamespace(vae=model.vae, dit=types.SimpleNamespace(require_vae_embedding=True),
                                 device="cpu", torch_dtype=torch.float32, load_models_to_device=lambda names: None,
                                 preprocess_image=lambda im: pixels[None])
    ref = WanVideoUnit_ImageEmbedderVAE().process(pipe, img, None, frames, H, H, False, None, None)["y"]
    ours = model.encode(["x"], pixels[None], frames).y
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[0, :4, 0], torch.ones(4, h, w)) and ours[0, :4, 1:].abs().sum() == 0
    assert model.injection(cond) is None


def test_real_a14b_shapes_are_recognised_as_36_channel_i2v():
    from diffsynth.models.wan_video_dit import WanModel

    from rewardfl.models.wan.architectures import dit_architecture

    kw = dict(has_image_input=False, patch_size=(1, 2, 2), in_dim=36, dim=5120, ffn_dim=13824, freq_dim=256,
              text_dim=4096, out_dim=16, num_heads=40, num_layers=40, eps=1e-6, require_clip_embedding=False)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanModel(**kw).state_dict().items()}
    found = dit_architecture(shapes, "test")
    assert found.conditioning == "i2v" and found.kwargs["in_dim"] == 36 and found.kwargs["num_heads"] == 40


# --------------------------------------------------------------------------- LoRA, checkpoints, export


def test_fresh_lora_leaves_outputs_unchanged(tiny_dir):
    model = build_tiny(tiny_dir)
    first, x = _inputs(model)
    cond = model.encode(["p"], first, 5)
    t = torch.tensor([600.0])
    ref = _reference_v(_plain_dit(os.path.join(tiny_dir, "dit_low_noise.safetensors")), x, t, cond)
    torch.testing.assert_close(model.denoise("dit2", x, t, cond), ref, rtol=1e-5, atol=1e-5)
    perturb_lora(model)
    v = model.denoise("dit2", x, t, cond)
    assert (v - ref).abs().max() > 1e-3  # the adapters now act ...
    torch.testing.assert_close(model.denoise("dit2", x, t, cond, base=True), ref, rtol=1e-5, atol=1e-5)  # ... base=True bypasses them


def test_lora_target_and_rank_come_from_the_config(tiny_dir):
    model = build_tiny(tiny_dir, lora_target_modules="q,ffn.2", lora_rank=3)
    names = [n for n, _ in model.trainable_parameters()]
    # 2 layers x (self q, cross q, ffn.2) x (A, B)
    assert len(names) == 2 * 3 * 2 and all(n.startswith("dit2.blocks.") for n in names)
    assert {tuple(p.shape) for n, p in model.trainable_parameters() if "lora_A" in n} == {(3, 64), (3, 128)}


def test_trainable_state_roundtrip_is_exact(tiny_dir):
    a = build_tiny(tiny_dir)
    perturb_lora(a, seed=1)
    state = a.trainable_state_dict()
    assert all(k.startswith("dit2.blocks.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in state)
    b = build_tiny(tiny_dir)
    b.load_trainable_state_dict({k: v.clone() for k, v in state.items()})
    for k, v in b.trainable_state_dict().items():
        assert torch.equal(v, state[k])
    first, x = _inputs(a)
    t = torch.tensor([400.0])
    assert torch.equal(a.denoise("dit2", x, t, a.encode(["p"], first, 5)), b.denoise("dit2", x, t, b.encode(["p"], first, 5)))
    with pytest.raises(ValueError, match="keys do not match"):
        b.load_trainable_state_dict({k: v for k, v in list(state.items())[1:]})


def test_saved_lora_loads_in_diffsynths_loader(tiny_dir, tmp_path):
    """lora_alpha != rank: the file must carry the peft scale so that diffsynth's fuse reproduces it."""
    from diffsynth.utils.lora.general import GeneralLoRALoader
    from safetensors.torch import load_file

    model = build_tiny(tiny_dir, lora_rank=4, lora_alpha=8)
    perturb_lora(model, seed=2)
    (path,) = model.save_trainable(str(tmp_path / "lora.safetensors"))
    dit = _plain_dit(os.path.join(tiny_dir, "dit_low_noise.safetensors"))
    GeneralLoRALoader().fuse_lora_to_base_model(dit, load_file(path))
    first, x = _inputs(model)
    cond = model.encode(["p"], first, 5)
    t = torch.tensor([250.0])
    torch.testing.assert_close(model.denoise("dit2", x, t, cond), _reference_v(dit, x, t, cond), rtol=1e-5, atol=1e-5)


def test_merged_export_reproduces_the_adapter_model(tiny_dir, tmp_path):
    from rewardfl.models.wan.export import main

    model = build_tiny(tiny_dir, lora_rank=4, lora_alpha=2)
    perturb_lora(model, seed=3)
    (lora,) = model.save_trainable(str(tmp_path / "lora.safetensors"))
    out = str(tmp_path / "dit2_merged.safetensors")
    assert main(["--merge", "--model-paths", os.path.join(tiny_dir, "model_paths.json"), "--lora", lora,
                 "--out", out]) == 0
    spec = {"high_noise_model": os.path.join(tiny_dir, "dit_high_noise.safetensors"), "low_noise_model": out,
            "text_encoder": os.path.join(tiny_dir, "text_encoder.safetensors"),
            "vae": os.path.join(tiny_dir, "vae.safetensors"), "tokenizer": os.path.join(tiny_dir, "tokenizer")}
    merged = build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec), lora_base_model=None,
                        trainable_models="dit")
    first, x = _inputs(model, batch=2)
    t = torch.tensor([700.0, 100.0])
    v = model.denoise("dit2", x, t, model.encode(["p", "q"], first, 5))
    vm = merged.denoise("dit2", x, t, merged.encode(["p", "q"], first, 5))
    torch.testing.assert_close(vm, v, rtol=0, atol=1e-5)
    assert (v - model.denoise("dit2", x, t, model.encode(["p", "q"], first, 5), base=True)).abs().max() > 1e-3


def test_export_rejects_a_lora_for_another_architecture(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    from rewardfl.models.wan.export import main

    bad = str(tmp_path / "bad.safetensors")
    save_file({"blocks.7.self_attn.q.lora_A.weight": torch.zeros(4, 64),
               "blocks.7.self_attn.q.lora_B.weight": torch.zeros(64, 4)}, bad)
    with pytest.raises(ValueError, match="blocks.7.self_attn.q"):
        from rewardfl.models.wan.export import merge_expert

        merge_expert(os.path.join(tiny_dir, "model_paths.json"), bad, str(tmp_path / "o.safetensors"))
    assert main(["--merge", "--model-paths", os.path.join(tiny_dir, "model_paths.json"), "--lora", bad,
                 "--out", str(tmp_path / "o.safetensors")]) == 2


# --------------------------------------------------------------------------- sampling and gradients


def test_expert_switch_follows_the_sampler_plan(tiny_dir):
    from rewardfl import registry
    from rewardfl.config import config_from_dict

    model = build_tiny(tiny_dir)
    from rewardfl.sampling.policy import plan_steps

    cfg = config_from_dict({})
    sampler = registry.create("sampler", "flow_match_euler", cfg, {})
    plan = plan_steps(cfg, sampler, model.experts, model.trainable_experts(), model.options.boundary)
    ran = []
    for name, dit in model.dits.items():
        dit.patch_embedding.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
    first, x = _inputs(model)
    cond = model.encode(["p"], first, 5)
    with torch.no_grad():
        for step in plan:
            x = x + step.dt * model.denoise(step.expert, x, torch.tensor([step.timestep]), cond)
    # the A14B rule by hand: high-noise expert while t >= 900 (1000, 972, 938), low-noise after
    assert ran == [p.expert for p in plan] == ["dit"] * 3 + ["dit2"] * (len(plan) - 3)


@pytest.mark.parametrize("offload", [False, True])
def test_gradients_reach_only_trainable_parameters(tiny_dir, offload):
    """Checkpointed (and CPU-offloaded) blocks give plain autograd's gradients, on LoRA weights only."""
    plain = build_tiny(tiny_dir, options={"gradient_checkpointing": False})
    ckpt = build_tiny(tiny_dir, use_gradient_checkpointing_offload=offload)
    assert ckpt._checkpoint_mode == ("offload" if offload else "block")
    for m in (plain, ckpt):
        perturb_lora(m, seed=4)
    first, x = _inputs(plain)
    t = torch.tensor([500.0])
    grads = []
    for m in (plain, ckpt):
        cond = m.encode(["p"], first, 5)
        v = m.denoise("dit2", x, t, cond)
        (v.square().mean() + m.denoise("dit", x, t, cond).mean()).backward()
        trainable = dict(m.trainable_parameters())
        for r, dit in m.dits.items():
            for n, p in dit.named_parameters():
                if f"{r}.{n}" in trainable:
                    assert p.grad is not None and p.grad.abs().sum() > 0, n
                else:
                    assert p.grad is None, f"{r}.{n}"
        for mod in (m.vae, m.text_encoder):
            assert all(p.grad is None for p in mod.parameters())
        grads.append({n: p.grad for n, p in trainable.items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_decode_is_differentiable_through_saturated_pixels(tiny_dir):
    variants = [build_tiny(tiny_dir, options={"vae_checkpointing": True}),  # per-frame checkpoints
                build_tiny(tiny_dir, options={"vae_checkpointing": True}, use_gradient_checkpointing_offload=True),
                build_tiny(tiny_dir, options={"vae_tile": [2, 3], "vae_tile_stride": [1, 2]})]  # tiled, blended
    plain = build_tiny(tiny_dir)
    _, x = _inputs(plain, frames=5, size=32)
    x = (x * 3).requires_grad_(True)  # large latents: many pixels beyond [-1, 1]
    grads, videos = [], []
    for m in variants + [plain]:
        video = m.decode(x)
        assert video.shape == (1, 3, 5, 32, 32) and video.min() >= -1 and video.max() <= 1
        (grad,) = torch.autograd.grad((video * torch.linspace(-1, 1, 32)).sum(), x)
        grads.append(grad)
        videos.append(video.detach())
    for g in grads[:2]:  # checkpointed (and offloaded) == plain
        torch.testing.assert_close(g, grads[-1], rtol=1e-5, atol=1e-6)
    assert grads[2].abs().sum() > 0 and (videos[2] - videos[-1]).abs().mean() < 0.05  # tiles blend into the whole
    # reference: diffsynth's VideoVAE_.decode, unclamped; the straight-through clamp keeps its gradient
    raw = plain.vae.model.decode(x, plain.vae.scale)
    assert (raw.abs() > 1).float().mean() > 0.05
    (ref,) = torch.autograd.grad((raw * torch.linspace(-1, 1, 32)).sum(), x)
    torch.testing.assert_close(grads[1], ref, rtol=1e-5, atol=1e-6)
    hard = build_tiny(tiny_dir, options={"decode_clamp": "hard"})
    (g_hard,) = torch.autograd.grad((hard.decode(x) * torch.linspace(-1, 1, 32)).sum(), x)
    assert (g_hard - ref).abs().max() > 1e-2 * ref.abs().max()  # a hard clamp would cut it


def test_identity_vae_reconstructs_block_averages(tiny_dir):
    """make_tiny's VAE: latent channels 0-2 = 8x8 average colour; decode ~ bilinear upsampling."""
    model = build_tiny(tiny_dir)
    g = torch.Generator().manual_seed(5)
    small = torch.rand(1, 3, 1, 4, 4, generator=g) * 1.6 - 0.8
    video = torch.nn.functional.interpolate(small, size=(5, 32, 32), mode="nearest")
    cond_latent = model.vae.model.encode(video, model.vae.scale)
    torch.testing.assert_close(cond_latent[:, :3, 0], small[:, :, 0], rtol=0, atol=0.03)
    assert cond_latent[:, 3:].abs().max() < 1e-5
    decoded = model.decode(cond_latent)
    smooth = torch.nn.functional.interpolate(small[:, :, 0], size=(32, 32), mode="bilinear")
    assert (decoded[:, :, 0] - smooth).abs().mean() < 0.06
    assert (decoded[:, :, 0] - smooth).abs().mean() < 0.5 * (decoded[:, :, 0] - smooth.mean()).abs().mean()


def test_full_finetune_reference_is_a_frozen_copy(tiny_dir):
    model = build_tiny(tiny_dir, lora_base_model=None)
    assert model.full_experts == ["dit2"] and model.lora_experts == []
    first, x = _inputs(model)
    cond = model.encode(["p"], first, 5)
    t = torch.tensor([300.0])
    before = model.denoise("dit2", x, t, cond).detach()
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.01)
    assert (model.denoise("dit2", x, t, cond) - before).abs().max() > 1e-3
    torch.testing.assert_close(model.denoise("dit2", x, t, cond, base=True), before, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input


def _spec(d):
    return {"high_noise_model": os.path.join(d, "dit_high_noise.safetensors"),
            "low_noise_model": os.path.join(d, "dit_low_noise.safetensors"),
            "text_encoder": os.path.join(d, "text_encoder.safetensors"),
            "vae": os.path.join(d, "vae.safetensors"), "tokenizer": os.path.join(d, "tokenizer")}


def test_missing_file_names_the_role_and_path(tiny_dir, tmp_path):
    spec = _spec(tiny_dir)
    spec["vae"] = str(tmp_path / "nope" / "Wan2.1_VAE.pth")
    with pytest.raises(FileNotFoundError, match=r"model_paths\['vae'\].*nope/Wan2.1_VAE.pth"):
        build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec))
    with pytest.raises(FileNotFoundError, match=r"model_paths\[1\].*missing.safetensors"):
        build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), [spec["high_noise_model"],
                                                                       str(tmp_path / "missing.safetensors")]))


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_safetensors_is_a_clear_error(tiny_dir, tmp_path, cut):
    spec = _spec(tiny_dir)
    data = open(spec["low_noise_model"], "rb").read()
    bad = tmp_path / "low.safetensors"
    bad.write_bytes(data[:40] if cut == "header" else data[:-1000])
    spec["low_noise_model"] = str(bad)
    with pytest.raises(ValueError, match=r"model_paths\['low_noise_model'\].*truncated or corrupt"):
        build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec))


def test_unknown_architecture_is_a_clear_error(tiny_dir, tmp_path):
    from diffsynth.models.wan_video_dit import WanModel
    from safetensors.torch import save_file

    from rewardfl.models.wan.architectures import TINY_DITS

    odd = WanModel(**dict(TINY_DITS["tiny-i2v"], dim=48, ffn_dim=96))
    save_file(odd.state_dict(), str(tmp_path / "odd.safetensors"))
    spec = _spec(tiny_dir)
    spec["high_noise_model"] = str(tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match=r"high_noise_model.*dim=48.*match no known Wan architecture"):
        build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec))
    spec = _spec(tiny_dir)
    spec["vae"] = spec["text_encoder"]  # a text encoder where the VAE should be
    with pytest.raises(ValueError, match=r"model_paths\['vae'\].*not a Wan VAE"):
        build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec))


@pytest.mark.parametrize("overrides,match", [
    ({"trainable_models": "dit3"}, r"trainable_models: 'dit3' cannot be trained"),
    ({"trainable_models": "vae"}, r"trainable_models: 'vae' cannot be trained"),
    ({"lora_target_modules": "q,qkv"}, r"lora_target_modules: 'qkv' matches no linear layer"),
    ({"lora_base_model": "dit", "trainable_models": "dit2"}, r"lora_base_model: 'dit' is not in trainable_models"),
])
def test_bad_training_choice_fails_before_loading_weights(tiny_dir, monkeypatch, overrides, match):
    from rewardfl.models.wan import model as wan

    def no_heavy_work(*a, **k):
        raise AssertionError("weights were loaded before the config was checked")

    monkeypatch.setattr(wan, "load_state_dict", no_heavy_work)
    with pytest.raises(ValueError, match=match):
        build_tiny(tiny_dir, **overrides)


@pytest.mark.parametrize("section,match", [
    ("decode_clamp: clip", r"model\.decode_clamp: must be one of \['straight_through', 'hard', 'none'\], got 'clip'"),
    ("offload_idle_expert: maybe", r"model\.offload_idle_expert: must be one of .*got 'maybe'"),
])
def test_bad_model_option_is_a_config_error_before_anything_loads(section, match):
    from rewardfl import registry
    from rewardfl.config import ConfigError, config_from_dict

    cfg = config_from_dict({"model_name": "wan2_2_tiny", "model": yaml.safe_load(section)})
    with pytest.raises(ConfigError, match=match):
        registry.resolve_plugins(cfg)  # the config check (`run --check`): no file is opened


@pytest.mark.parametrize("text,want", [("yes", True), ("no", False), ("auto", "auto"), ("'yes'", "yes")])
def test_offload_idle_expert_accepts_yaml_yes_and_no(text, want):
    """YAML 1.1 reads a bare yes/no as a boolean: both spellings are the option's yes/no."""
    from rewardfl import registry
    from rewardfl.config import config_from_dict

    cfg = config_from_dict({"model_name": "wan2_2_tiny", "model": yaml.safe_load(f"offload_idle_expert: {text}")})
    cfg = registry.resolve_config(cfg, registry.resolve_plugins(cfg))
    assert cfg.model.offload_idle_expert == want


def test_single_dit_has_no_dit2(tiny_dir, tmp_path):
    spec = _spec(tiny_dir)
    del spec["low_noise_model"]
    with pytest.raises(ValueError, match=r"trainable_models: 'dit2' does not exist.*experts: dit"):
        build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec))
    model = build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec), trainable_models="dit",
                       lora_base_model="dit")
    assert model.experts == ("dit",) and model.trainable_experts() == ("dit",)


def test_missing_tokenizer_and_origin_paths_never_download(tiny_dir, tmp_path, monkeypatch):
    spec = _spec(tiny_dir)
    del spec["tokenizer"]
    with pytest.raises(ValueError, match="tokenizer_path: not set.*never downloads"):
        build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec))
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "models"))
    with pytest.raises(FileNotFoundError, match=r"model_id_with_origin_paths: no local file.*Wan-AI/Wan2.2-I2V-A14B"):
        build_tiny(tiny_dir, model_paths=None,
                   model_id_with_origin_paths="Wan-AI/Wan2.2-I2V-A14B:high_noise_model/*.safetensors")
    # the same files found locally under <base>/<model_id>/ load
    local = tmp_path / "models" / "tiny" / "wan"
    shutil.copytree(tiny_dir, local)
    model = build_tiny(tiny_dir, model_paths=None, tokenizer_path=str(local / "tokenizer"),
                       model_id_with_origin_paths="tiny/wan:dit_high_noise.safetensors,tiny/wan:dit_low_noise.safetensors,"
                                                  "tiny/wan:text_encoder.safetensors,tiny/wan:vae.safetensors")
    assert model.experts == ("dit", "dit2")


# --------------------------------------------------------------------------- TI2V and the Wan2.2 VAE


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    from rewardfl.demo.make_tiny import make_tiny

    out = str(tmp_path_factory.mktemp("wan_tiny_ti2v"))
    make_tiny(out, kind="ti2v")
    return out


def test_ti2v_injects_the_first_frame_and_matches_diffsynth(ti2v_dir):
    """Against diffsynth's TI2V unit (WanVideoUnit_ImageEmbedderFused) and model_fn_wan_video."""
    from diffsynth.pipelines.wan_video import WanVideoUnit_ImageEmbedderFused, model_fn_wan_video
    from PIL import Image

    model = build_tiny(ti2v_dir, trainable_models="dit", lora_base_model="dit")
    assert model.experts == ("dit",) and model.arch.conditioning == "ti2v"
    first, x = _inputs(model, size=32, seed=6)
    img = Image.fromarray(((first[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
    pixels = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
    cond = model.encode(["p"], pixels[None], 5)
    assert cond.y is None
    mask, latent = model.injection(cond)
    pipe = types.SimpleNamespace(vae=model.vae, dit=types.SimpleNamespace(fuse_vae_embedding_in_latents=True),
                                 device="cpu", load_models_to_device=lambda names: None,
                                 preprocess_image=lambda im: pixels[None])
    ref = WanVideoUnit_ImageEmbedderFused().process(pipe, img, x.clone(), 32, 32, False, None, None)
    torch.testing.assert_close(latent[:, :, :1], ref["first_frame_latents"], rtol=1e-5, atol=1e-5)
    assert torch.equal(mask[0, 0, 0], torch.ones(4, 4)) and mask[:, :, 1:].abs().sum() == 0
    x_in = ref["latents"]  # frame 0 replaced by the first-frame latent, as the sampler's injection does
    t = torch.tensor([800.0])
    v = model.denoise("dit", x_in, t, cond)
    with torch.no_grad():
        v_ref = model_fn_wan_video(dit=model.dits["dit"], latents=x_in, timestep=t, context=cond.context,
                                   fuse_vae_embedding_in_latents=True)
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
    # the sampler's update takes the injection as given: frame 0 stays the first-frame latent
    from rewardfl import registry
    from rewardfl.config import config_from_dict

    from rewardfl.sampling.policy import plan_steps

    cfg = config_from_dict({})
    sampler = registry.create("sampler", "flow_match_euler", cfg, {})
    step = plan_steps(cfg, sampler, model.experts, model.trainable_experts(), model.options.boundary)[0]
    x_next = sampler.step(x_in, v, step, inject_mask=mask, inject_latent=latent)
    torch.testing.assert_close(x_next[:, :, :1], latent[:, :, :1], rtol=0, atol=1e-6)
    torch.testing.assert_close(x_next[:, :, 1:], x_in[:, :, 1:] + step.dt * v[:, :, 1:], rtol=1e-5, atol=1e-5)


def test_wan22_vae_decode_matches_diffsynth():
    """decode_latents on a small random Wan2.2-style VAE (VideoVAE38_) == diffsynth's own decode."""
    from diffsynth.models.wan_video_vae import VideoVAE38_, WanVideoVAE38

    from rewardfl.models.wan.vae_decode import decode_latents

    torch.manual_seed(0)
    vae = WanVideoVAE38.__new__(WanVideoVAE38)
    torch.nn.Module.__init__(vae)
    vae.model = VideoVAE38_(dim=8, z_dim=8, dec_dim=8).eval()
    vae.mean, vae.std = torch.randn(8) * 0.1, torch.rand(8) + 0.5
    vae.scale, vae.upsampling_factor, vae.z_dim = [vae.mean, 1 / vae.std], 16, 8
    z = torch.randn(1, 8, 3, 2, 2)
    with torch.no_grad():
        ref = vae.model.decode(z, vae.scale)
    out = decode_latents(vae, z, clamp="none")
    assert out.shape == ref.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_pth_checkpoints_load_weights_only(tiny_dir, tmp_path):
    """The reference implementation's wan22_paths.json: a list [high, low, umT5 .pth, VAE .pth]."""
    from safetensors.torch import load_file

    spec = _spec(tiny_dir)
    for role, name in (("text_encoder", "models_t5_umt5-xxl-enc-bf16.pth"), ("vae", "Wan2.1_VAE.pth")):
        torch.save(load_file(spec[role]), str(tmp_path / name))
        spec[role] = str(tmp_path / name)
    listed = [spec["high_noise_model"], spec["low_noise_model"], spec["text_encoder"], spec["vae"]]
    model = build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), listed, "wan22_paths.json"),
                       tokenizer_path=spec["tokenizer"])
    ref = build_tiny(tiny_dir)
    first, x = _inputs(model)
    a, b = model.encode(["p"], first, 5), ref.encode(["p"], first, 5)
    assert torch.equal(a.context, b.context) and torch.equal(a.y, b.y)
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"model_paths\['vae'\].*Wan2.1_VAE.pth.*weights-only torch checkpoint"):
        build_tiny(tiny_dir, model_paths=write_paths(str(tmp_path), spec))


def test_identity_vae_keeps_a_real_face_detectable_at_128px(tiny_dir, face_assets):
    """The demo's premise: a face survives the tiny VAE's round trip at 128x128 (8x8 colour blocks
    at 64x64 do not keep it: use >= 128 px frames with wan2_2_tiny and a face reward)."""
    import cv2

    model = build_tiny(tiny_dir)
    img = cv2.imread(face_assets.photo("person_a_1"))
    h, w = img.shape[:2]
    s = min(h, w)
    img = cv2.resize(img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s], (128, 128),
                     interpolation=cv2.INTER_AREA)
    rgb = torch.tensor(img[:, :, ::-1].copy()).permute(2, 0, 1).float() / 127.5 - 1
    with torch.no_grad():
        latent = model.vae.model.encode(rgb[None, :, None], model.vae.scale)
        decoded = model.decode(latent)[0, :, 0]
    out = np.ascontiguousarray(((decoded.permute(1, 2, 0).numpy()[:, :, ::-1] + 1) * 127.5).clip(0, 255)
                               .astype(np.uint8))
    detector = cv2.FaceDetectorYN.create(os.path.join(face_assets.yunet_sface, "face_detection_yunet_2023mar.onnx"),
                                         "", (128, 128), 0.5)
    _, faces_in = detector.detect(img)
    _, faces_out = detector.detect(out)
    assert faces_in is not None and faces_out is not None and len(faces_out) == 1
    (x0, y0, bw, bh), (x1, y1, cw, ch) = faces_in[0, :4], faces_out[0, :4]
    assert abs(x0 - x1) < 0.15 * bw and abs(y0 - y1) < 0.15 * bh  # the same face, in the same place
