"""``wan2_2_diffusers``: Wan2.2 from a diffusers folder is the same model as ``wan2_2`` on DiffSynth.

A tiny Wan2.2-I2V-A14B is written once with the libraries' own ``save_pretrained``
(``WanImageToVideoPipeline`` with two ``WanTransformer3DModel``s, an ``AutoencoderKLWan``, a
``UMT5EncoderModel`` and a byte-level tokenizer); its DiffSynth twin holds the same transformer
weights renamed by ``diffusers_keys`` and the same VAE weights in the original layout. References:
diffusers' own key converters and pipeline (``prepare_latents``, ``AutoencoderKLWan.decode``), and
the ``wan2_2`` model on diffsynth's networks.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from rewardfl.config import config_from_dict

DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=36, out_channels=16,
           text_dim=32, freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True, eps=1e-6)
FRAMES, H, W = 5, 32, 32
TOL = dict(rtol=1e-4, atol=1e-5)


def _seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random values in every parameter (fresh init zeroes some: RMSNorm gains, attention outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """(diffusers folder, DiffSynth model_paths.json) holding the same tiny Wan2.2-I2V weights."""
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, \
        WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from rewardfl.demo.make_tiny import write_byte_tokenizer
    from rewardfl.fileio import write_safetensors
    from rewardfl.models.wan.architectures import TINY_TEXT_ENCODER
    from rewardfl.models.wan.diffusers_keys import diffusers_to_wan_state_dict

    root = tmp_path_factory.mktemp("wan_diffusers")
    dfolder, sfolder = str(root / "diffusers"), str(root / "diffsynth")
    os.makedirs(sfolder)
    write_byte_tokenizer(os.path.join(sfolder, "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(sfolder, "tokenizer"))

    def dit(seed):
        m = _seeded(seed, lambda: WanTransformer3DModel(**DIT))
        _perturb(m, seed + 100)
        return m.eval()

    high, low = dit(1), dit(2)
    vae_s = _seeded(3, lambda: VideoVAE_(dim=8, z_dim=16)).eval()
    _perturb(vae_s, 103, 0.02)
    vae_d = AutoencoderKLWan(base_dim=8, z_dim=16)
    vae_d.load_state_dict(convert_wan_vae_to_diffusers(vae_s.state_dict()), strict=True)
    te = _seeded(4, lambda: UMT5EncoderModel(UMT5Config(
        vocab_size=259, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)))
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=te, vae=vae_d,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), image_processor=None,
                                   image_encoder=None, transformer=high, transformer_2=low, boundary_ratio=0.9)
    pipe.save_pretrained(dfolder)

    # the DiffSynth twin: the same DiT and VAE weights in the original layout; its own text encoder
    paths = {}
    for role, m in (("high_noise_model", high), ("low_noise_model", low)):
        name = f"{role}.safetensors"
        write_safetensors(os.path.join(sfolder, name),
                          {k: v.contiguous() for k, v in diffusers_to_wan_state_dict(m.state_dict()).items()})
        paths[role] = name
    write_safetensors(os.path.join(sfolder, "vae.safetensors"), vae_s.state_dict())
    te_s = _seeded(5, lambda: WanTextEncoder(**TINY_TEXT_ENCODER))
    write_safetensors(os.path.join(sfolder, "text_encoder.safetensors"), te_s.state_dict())
    paths.update(vae="vae.safetensors", text_encoder="text_encoder.safetensors", tokenizer="tokenizer")
    with open(os.path.join(sfolder, "model_paths.json"), "w", encoding="utf-8") as f:
        json.dump(paths, f)
    return dfolder, os.path.join(sfolder, "model_paths.json")


def _config(model_paths, **overrides):
    raw = {"model_name": "wan2_2_diffusers", "model_paths": model_paths, "lora_rank": 4, "mixed_precision": "fp32",
           "num_inference_steps": 4, "mid_timestep": 2, "final_timestep": 3}
    raw.update(overrides)
    return config_from_dict(raw)


def _options(cfg, **options):
    """The model's options: ``options`` with the config's top-level keys (``model_paths``, ...) routed in."""
    from rewardfl import registry

    cls = registry.load_plugin("model", cfg.model_name)
    return registry.build_options("model", cfg.model_name, cls, options, cfg.plugin_keys)


def _check(model_paths, **overrides):
    from rewardfl.models.wan.diffusers_model import Wan22DiffusersModel

    cfg = _config(model_paths, **overrides)
    return Wan22DiffusersModel.check(cfg, _options(cfg))


def _diffusers_model(folder, options=None, **overrides):
    from rewardfl.models.wan.diffusers_model import Wan22DiffusersModel

    cfg = _config(folder, **overrides)
    return Wan22DiffusersModel(cfg, _options(cfg, **{"text_len": 16, **(options or {})}), device=torch.device("cpu"))


def _diffsynth_model(paths_json, **overrides):
    from rewardfl.models.wan.model import Wan22TinyModel

    cfg = _config(paths_json, model_name="wan2_2_tiny", **overrides)
    return Wan22TinyModel(cfg, _options(cfg, text_len=16), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def models(tiny_folders):
    dfolder, sjson = tiny_folders
    return _diffusers_model(dfolder), _diffsynth_model(sjson)


def _first_frames(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W, generator=g) * 2 - 1


# --------------------------------------------------------------------------- key layout


def test_transformer_keys_invert_diffusers_own_converter():
    """diffusers -> Wan names (ours) then Wan -> diffusers (diffusers' converter) is the identity, and the
    Wan-named state dict loads strictly into diffsynth's WanModel of the same architecture."""
    from diffsynth.models.wan_video_dit import WanModel
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from rewardfl.models.wan.architectures import TINY_DITS
    from rewardfl.models.wan.diffusers_keys import diffusers_to_wan_key, diffusers_to_wan_state_dict

    state = WanTransformer3DModel(**DIT).state_dict()
    wan = diffusers_to_wan_state_dict(state)
    back = convert_wan_transformer_to_diffusers(dict(wan))
    assert set(back) == set(state) and all(back[k] is state[k] for k in state)
    missing, unexpected = WanModel(**TINY_DITS["tiny-i2v"]).load_state_dict(wan, strict=False)
    assert not missing and not unexpected
    # module names (what LoRA targets and checkpoints use) follow the same rules
    assert diffusers_to_wan_key("blocks.1.attn2.to_out.0") == "blocks.1.cross_attn.o"
    assert diffusers_to_wan_key("blocks.0.ffn.net.0.proj.lora_A.weight") == "blocks.0.ffn.0.lora_A.weight"


def test_one_name_table_names_state_dicts_and_lora_layers_alike():
    """``diffusers_keys``' table serves both of its users: the state-dict renamer (``diffusers_to_wan_key``,
    checkpoints and the diffusers plugin) and the diffusers-layout LoRA files (``lora_formats.diffusers_module``
    and ``wan_module``). Every Linear of a WanTransformer3DModel (a Wan2.1-I2V one: with the image
    embedder and the added key/value projections) that diffusers' LoRA loader converts is named the
    same way by both, there and back."""
    from diffusers import WanTransformer3DModel

    from rewardfl.models.wan.diffusers_keys import diffusers_to_wan_key, wan_to_diffusers_module
    from rewardfl.models.wan.lora_formats import BLOCK_MODULES, TOP_MODULES, diffusers_module, wan_module

    with torch.device("meta"):
        dit = WanTransformer3DModel(**dict(DIT, image_dim=16, added_kv_proj_dim=64))
    converted = set()
    for name, module in dit.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        wan = diffusers_to_wan_key(name)
        assert wan_to_diffusers_module(wan) == name
        if wan.split(".", 2)[-1] in BLOCK_MODULES or wan in TOP_MODULES:
            assert diffusers_module(wan) == name and wan_module(name) == wan
            converted.add(wan.split(".", 2)[-1] if wan.startswith("blocks.") else wan)
    assert converted == set(BLOCK_MODULES) | set(TOP_MODULES)  # every LoRA layer exists in the real model


# --------------------------------------------------------------------------- one model, two layouts


def test_conditioning_matches_diffusers_pipeline_and_diffsynth_path(tiny_folders, models):
    """encode's y (4-channel mask + VAE latent of [first frame, zeros]) equals what diffusers'
    WanImageToVideoPipeline.prepare_latents builds, and the DiffSynth path's y."""
    from diffusers import WanImageToVideoPipeline

    dmodel, smodel = models
    frames = _first_frames()
    cond = dmodel.encode(["a face", "two faces"], frames, FRAMES)
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_folders[0], local_files_only=True)
    # the pipeline conditions a batch on one image: one call per sample
    reference = torch.cat([pipe.prepare_latents(f[None], 1, 16, H, W, FRAMES, torch.float32, torch.device("cpu"),
                                                generator=torch.Generator().manual_seed(0))[1] for f in frames])
    assert cond.y.shape == reference.shape == (2, 20, 2, H // 8, W // 8)
    torch.testing.assert_close(cond.y, reference, **TOL)
    torch.testing.assert_close(cond.y, smodel.encode(["a face", "two faces"], frames, FRAMES).y, **TOL)
    assert cond.y[:, :4, 0].eq(1).all() and cond.y[:, :4, 1:].eq(0).all()


def test_prompt_embeddings_match_the_diffusers_pipeline(tiny_folders, models):
    """The prompt cache holds what WanImageToVideoPipeline.encode_prompt gives (zero past each prompt)."""
    from diffusers import WanImageToVideoPipeline

    dmodel, _ = models
    prompts = ["a face", "a much longer prompt about a face"]
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_folders[0], local_files_only=True)
    reference, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16,
                                      device=torch.device("cpu"))
    torch.testing.assert_close(dmodel.encode_prompts(prompts), reference, **TOL)
    assert reference[0, 8:].abs().sum() == 0 and reference[1, 8:].abs().sum() > 0


@pytest.mark.parametrize("expert", ["dit", "dit2"])
def test_velocity_equals_the_diffsynth_path(models, expert):
    """Same x, t and conditioning: the diffusers transformer's velocity equals the wan2_2 path's (diffsynth
    WanModel through dit_forward), fresh LoRA and with the diffusers model's LoRA weights loaded into the
    DiffSynth model through trainable_state_dict (the checkpoint keys are interchangeable)."""
    dmodel, smodel = models
    cond = dmodel.encode(["a face", "two faces"], _first_frames(), FRAMES)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 2, H // 8, W // 8, generator=g)
    t = torch.tensor([972.0, 417.0])
    with torch.no_grad():
        v_d = dmodel.denoise(expert, x, t, cond)
        v_s = smodel.denoise(expert, x, t, cond)
    assert v_d.abs().mean() > 0.05
    torch.testing.assert_close(v_d, v_s, **TOL)
    if expert != "dit2":
        return
    lora = dmodel.trainable_state_dict()
    assert set(lora) == set(smodel.trainable_state_dict())
    g = torch.Generator().manual_seed(8)
    try:
        dmodel.load_trainable_state_dict({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora.items()})
        smodel.load_trainable_state_dict(dmodel.trainable_state_dict())
        with torch.no_grad():
            v_d2, v_s2 = dmodel.denoise(expert, x, t, cond), smodel.denoise(expert, x, t, cond)
            base = dmodel.denoise(expert, x, t, cond, base=True)
        assert (v_d2 - v_d).abs().mean() > 1e-3  # the LoRA changes the velocity...
        torch.testing.assert_close(v_d2, v_s2, **TOL)  # ...the same way on both paths
        torch.testing.assert_close(base, v_d, **TOL)  # base=True: adapters off
    finally:
        dmodel.load_trainable_state_dict({k: torch.zeros_like(v) if ".lora_B." in k else v
                                          for k, v in dmodel.trainable_state_dict().items()})
        smodel.load_trainable_state_dict(dmodel.trainable_state_dict())


def test_full_fine_tuning_checkpoint_loads_into_the_diffsynth_path(tiny_folders):
    """Full fine-tuning of dit2: the checkpoint names every parameter in the Wan layout, loads strictly into
    wan2_2's full fine-tune, and the changed weights give the same velocity there."""
    dmodel = _diffusers_model(tiny_folders[0], lora_base_model="")
    smodel = _diffsynth_model(tiny_folders[1], lora_base_model="")
    assert dmodel.full_experts == smodel.full_experts == ["dit2"]
    _perturb(dmodel.dits["dit2"], 13, 0.02)
    smodel.load_trainable_state_dict(dmodel.trainable_state_dict())
    cond = dmodel.encode(["a face"], _first_frames(1), FRAMES)
    x = torch.randn(1, 16, 2, H // 8, W // 8, generator=torch.Generator().manual_seed(14))
    t = torch.tensor([500.0])
    with torch.no_grad():
        v_d, v_s = dmodel.denoise("dit2", x, t, cond), smodel.denoise("dit2", x, t, cond)
        v_base = dmodel.denoise("dit2", x, t, cond, base=True)  # the frozen copy: the weights as loaded
    assert (v_d - v_base).abs().mean() > 1e-3
    torch.testing.assert_close(v_d, v_s, **TOL)


def test_decode_equals_autoencoder_and_diffsynth_vae(models):
    """decode (rewardfl's per-frame loop over diffusers' decoder) equals AutoencoderKLWan.decode of the
    de-normalised latent, and the DiffSynth VAE's decode of the same weights."""
    dmodel, smodel = models
    g = torch.Generator().manual_seed(9)
    latents = torch.randn(1, 16, 2, H // 8, W // 8, generator=g)
    with torch.no_grad():
        video = dmodel.decode(latents)
        ae = dmodel.vae.model.autoencoder
        z = latents * dmodel.vae.std.view(1, -1, 1, 1, 1) + dmodel.vae.mean.view(1, -1, 1, 1, 1)
        reference = ae.decode(z).sample  # diffusers clamps to [-1, 1], as decode_clamp does in value
        diffsynth = smodel.decode(latents)
    assert video.shape == (1, 3, FRAMES, H, W)
    assert video.std() > 0.01
    torch.testing.assert_close(video, reference, **TOL)
    torch.testing.assert_close(video, diffsynth, **TOL)
    # spatial tiles (model.vae_tile / vae_tile_stride): the same blending on both paths
    for m in models:
        m.options.vae_tile, m.options.vae_tile_stride = [2, 2], [1, 1]
    try:
        with torch.no_grad():
            tiled_d, tiled_s = dmodel.decode(latents), smodel.decode(latents)
    finally:
        for m in models:
            m.options.vae_tile = m.options.vae_tile_stride = None
    assert (tiled_d - video).abs().max() > 1e-3  # tiles blend: not the whole-frame decode
    torch.testing.assert_close(tiled_d, tiled_s, **TOL)


# --------------------------------------------------------------------------- training


def test_rollout_and_one_training_step_change_only_the_lora(tiny_folders):
    """A rollout through the core's sampling code with the gradient window on dit2, a loss on the decoded
    video plus the regulariser, one AdamW step: every LoRA B of dit2 moves, nothing else does, and the
    regulariser (base=True = adapters off) is zero before the step and positive after it."""
    from rewardfl.samplers.flow_match_euler import FlowMatchEulerSampler
    from rewardfl.sampling.rollout import rollout
    from rewardfl.sampling.policy import plan_steps

    model = _diffusers_model(tiny_folders[0])
    cfg = model.config
    sampler = FlowMatchEulerSampler(cfg)
    plan = plan_steps(cfg, sampler, model.experts, model.trainable_experts(), model.expert_boundary(model.options, cfg))
    # shifted timesteps 1000, 937.5, 833.3, 625: the high-noise expert while t >= 0.9 * 1000
    assert [p.expert for p in plan] == ["dit", "dit", "dit2", "dit2"]
    assert [p.grad for p in plan] == [False, False, True, True]
    batch = {"prompt": ["a face"], "first_frame": _first_frames(1)}
    modules = {"dit": model.dits["dit"], "dit2": model.dits["dit2"], "vae": model.vae, "te": model.text_encoder}
    before = {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}
    trainable = [p for _, p in model.trainable_parameters()]
    assert trainable and all(p.requires_grad for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    videos, kl = rollout(model, sampler, plan, batch, num_frames=FRAMES, step=0, seeds=[0], kl_weight=1.0)
    assert videos.shape == (1, 3, FRAMES, H, W) and float(kl.detach()) == 0.0  # fresh LoRA: an identity
    loss = -videos.mean() + kl
    loss.backward()
    opt.step()
    opt.zero_grad()
    lora_names = {f"dit2.{n}" for n, _ in model.dits["dit2"].named_parameters() if ".lora_" in n}
    changed = {f"{k}.{n}" for k, m in modules.items() for n, p in m.named_parameters()
               if not torch.equal(p, before[f"{k}.{n}"])}
    assert changed and changed <= lora_names
    assert {n for n in lora_names if ".lora_B." in n} <= changed
    _, kl_after = rollout(model, sampler, plan, batch, num_frames=FRAMES, step=0, seeds=[0], kl_weight=1.0)
    assert float(kl_after.detach()) > 0


@pytest.mark.parametrize("top, checkpoint_fn", [({}, "checkpoint"),
                                                 ({"use_gradient_checkpointing_offload": True}, "offloaded")])
def test_gradient_is_the_same_with_each_checkpointing_mode(tiny_folders, top, checkpoint_fn):
    """Per-block checkpointing through diffusers' hook (torch's checkpoint, or block inputs parked on the
    host) changes memory, not the LoRA gradient: compared with no checkpointing, loss in float64."""
    grads = []
    for options, overrides in (({"gradient_checkpointing": True}, top), ({"gradient_checkpointing": False}, {})):
        model = _diffusers_model(tiny_folders[0], options, **overrides)
        dit2 = model.dits["dit2"]
        assert dit2.gradient_checkpointing == options["gradient_checkpointing"]
        if dit2.gradient_checkpointing:
            fn = dit2._gradient_checkpointing_func
            assert getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__", None)) == checkpoint_fn
        g = torch.Generator().manual_seed(11)
        for _, p in model.trainable_parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
        cond = model.encode(["a face"], _first_frames(1), FRAMES)
        x = torch.randn(1, 16, 2, H // 8, W // 8, generator=g)
        v = model.denoise("dit2", x, torch.tensor([600.0]), cond)
        (v.double() ** 2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in model.trainable_parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_exported_lora_files_are_wan2_2s(tiny_folders, tmp_path):
    """save_trainable writes Wan (DiffSynth) module names with B * alpha / rank in the diffsynth layout,
    and every layout reads back (wan2_2's read_exported) to the trainable_state_dict it came from."""
    from safetensors.torch import load_file

    model = _diffusers_model(tiny_folders[0], lora_alpha=8)
    g = torch.Generator().manual_seed(12)
    for _, p in model.trainable_parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = model.trainable_state_dict()
    (path,) = model.save_trainable(str(tmp_path / "lora.safetensors"), lora_format="diffsynth")
    saved = load_file(path)
    assert set(saved) == {k.split(".", 1)[1] for k in state}
    key = "blocks.0.self_attn.q.lora_B.weight"
    torch.testing.assert_close(saved[key], state[f"dit2.{key}"] * 2.0)  # alpha 8 / rank 4
    assert "blocks.1.ffn.2.lora_A.weight" in saved and "blocks.1.cross_attn.o.lora_A.weight" in saved
    for fmt in ("comfyui", "diffsynth", "diffusers"):
        files = model.save_trainable(str(tmp_path / fmt / "lora.safetensors"), lora_format=fmt)
        back = model.read_exported(files)
        assert set(back) == set(state)
        for k in state:
            torch.testing.assert_close(back[k], state[k])


# --------------------------------------------------------------------------- the folder and the config


def test_boundary_comes_from_model_index(tiny_folders, tmp_path):
    from rewardfl.models.wan.diffusers_model import Wan22DiffusersModel, find_diffusers_folder

    cfg = _config(tiny_folders[0])
    assert find_diffusers_folder(cfg, _options(cfg)).boundary_ratio == 0.9
    assert Wan22DiffusersModel.expert_boundary(_options(cfg), cfg) == 0.9
    assert Wan22DiffusersModel.expert_boundary(_options(cfg, boundary=0.8), cfg) == 0.8
    lines = Wan22DiffusersModel.check(cfg, _options(cfg))
    assert any(line.startswith("transformer_2 (low noise): ") for line in lines)
    assert "boundary: 0.9 (model_index.json boundary_ratio)" in lines

    # a folder whose boundary_ratio differs from I2V-A14B's: the core plans with the folder's ratio
    other = tmp_path / "t2v_like"
    other.mkdir()
    for name in os.listdir(tiny_folders[0]):
        if name != "model_index.json":
            os.symlink(os.path.join(tiny_folders[0], name), other / name)
    index = json.loads(open(os.path.join(tiny_folders[0], "model_index.json")).read())
    (other / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    cfg2 = _config(str(other))
    assert Wan22DiffusersModel.expert_boundary(_options(cfg2), cfg2) == 0.875
    assert "boundary: 0.875 (model_index.json boundary_ratio)" in Wan22DiffusersModel.check(cfg2, _options(cfg2))
    assert "boundary: 0.875 (model.boundary)" in Wan22DiffusersModel.check(cfg2, _options(cfg2, boundary=0.875))


def test_user_errors_name_the_key_and_path(tiny_folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_paths: folder not found: .*nowhere"):
        _check(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"model_paths: .*is a file; .*model_name: wan2_2"):
        _check(tiny_folders[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model_paths: .*empty has no model_index\.json"):
        _check(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_folders[0]):
        if name != "vae":
            os.symlink(os.path.join(tiny_folders[0], name), broken / name)
    with pytest.raises(FileNotFoundError, match=r"model_paths: .*lists 'vae' but .*broken/vae is missing"):
        _check(str(broken))
    with pytest.raises(ValueError, match=r"model_id_with_origin_paths: wan2_2_diffusers reads one local"):
        _check(tiny_folders[0], model_id_with_origin_paths="a/b:c")
    with pytest.raises(ValueError, match=r"lora_target_modules: 'nope' matches no linear layer"):
        _diffusers_model(tiny_folders[0], lora_target_modules="q,nope")
