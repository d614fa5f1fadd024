"""Training the high-noise expert, the low-noise one, or both (``trainable_models: dit,dit2``), on the tiny twin.

References: the expert each step runs by the A14B rule computed by hand (t >= 900: dit), the plain
DiffSynth DiT in each expert's own file (diffsynth's ``model_fn_wan_video``) as the regulariser's
base, diffsynth's LoRA loader for the exported pair, and the checkpoint's tensors.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from train_fixtures import make_config, small_dataset  # noqa: F401  (fixtures)
from wan_fixtures import build_tiny, perturb_lora, tiny_dir  # noqa: F401

from rewardfl import registry, run
from rewardfl.config import config_from_dict
from rewardfl.sampling.rollout import sample_latents
from rewardfl.sampling.policy import plan_steps

torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"dit": "dit_high_noise.safetensors", "dit2": "dit_low_noise.safetensors"}
BOTH = dict(trainable_models="dit,dit2", lora_base_model="dit,dit2")
# N=4, shift 5: t = 1000, 937.5, 833.3, 625; boundary 0.9 -> steps 0, 1 on dit; window 1..3 spans it
WINDOW = dict(num_inference_steps=4, mid_timestep=1, final_timestep=3)


def _plain_v(tiny_dir, expert, x, t, cond):  # noqa: F811
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    from rewardfl.models.wan.architectures import TINY_DITS

    dit = WanModel(**TINY_DITS["tiny-i2v"])
    dit.load_state_dict(load_file(os.path.join(tiny_dir, FILES[expert])))
    with torch.no_grad():
        return model_fn_wan_video(dit=dit.eval(), latents=x, timestep=t, context=cond.context, y=cond.y)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"first_frame": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a face"], "index": [0]}


def _window(model):
    cfg = config_from_dict(WINDOW)
    sampler = registry.create("sampler", "flow_match_euler", cfg, {})
    plan = plan_steps(cfg, sampler, model.experts, model.trainable_experts(), model.options.boundary)
    return sampler, plan


@pytest.mark.parametrize("trained,overrides", [
    (("dit", "dit2"), BOTH),
    (("dit",), dict(trainable_models="dit", lora_base_model="dit")),
    (("dit2",), dict(trainable_models="dit2", lora_base_model="dit2")),
])
def test_gradient_window_across_the_boundary_reaches_exactly_the_trained_experts(tiny_dir, trained, overrides):  # noqa: F811
    model = build_tiny(tiny_dir, **overrides)
    assert model.trainable_experts() == trained and tuple(model.lora_experts) == trained
    perturb_lora(model, seed=1)  # B != 0, so A receives gradient too
    sampler, plan = _window(model)
    # the A14B rule by hand: t >= 900 runs dit; gradient on steps 1..3
    assert [(p.index, p.expert, p.grad) for p in plan] == [(0, "dit", False), (1, "dit", True), (2, "dit2", True),
                                                         (3, "dit2", True)]
    latents, kl = sample_latents(model, sampler, plan, _batch(), num_frames=5, step=0, seeds=[0], kl_weight=1.0)
    (latents.square().mean() + kl).backward()
    trainable = dict(model.trainable_parameters())
    assert {n.split(".", 1)[0] for n in trainable} == set(trained)
    for r, dit in model.dits.items():
        for n, p in dit.named_parameters():
            if f"{r}.{n}" in trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{r}.{n}"
            else:
                assert p.grad is None, f"{r}.{n}"


def test_the_regulariser_compares_each_expert_with_its_own_base(tiny_dir):  # noqa: F811
    model = build_tiny(tiny_dir, **BOTH)
    perturb_lora(model, seed=2)
    sampler, plan = _window(model)
    batch = _batch(seed=3)
    _, kl = sample_latents(model, sampler, plan, batch, num_frames=5, step=0, seeds=[0], kl_weight=1.0)
    # the same rollout by hand, each step's reference velocity from the plain DiT in that expert's file
    cond = model.encode(batch["prompt"], batch["first_frame"], 5)
    x = sampler.initial_noise(model.latent_shape(5, 32, 32), sample_seeds=[0], step=0, device=model.device,
                              dtype=model.dtype)
    terms = []
    with torch.no_grad():
        for p in plan:
            t = torch.full((1,), p.timestep)
            v = model.denoise(p.expert, x, t, cond)
            ref = _plain_v(tiny_dir, p.expert, x, t, cond)
            torch.testing.assert_close(model.denoise(p.expert, x, t, cond, base=True), ref, rtol=1e-5, atol=1e-5)
            other = _plain_v(tiny_dir, "dit2" if p.expert == "dit" else "dit", x, t, cond)
            assert (ref - other).abs().max() > 1e-3  # the experts differ, so a wrong base would show
            if p.grad:
                terms.append(sampler.regularizer(v, ref, p))
            x = sampler.step(x, v, p)
    assert len(terms) == 3
    torch.testing.assert_close(kl.detach(), torch.stack(terms).mean(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("trained,name", [("dit", "trainable_high_noise.safetensors"),
                                          ("dit2", "trainable_low_noise.safetensors")])
def test_export_of_one_expert_names_the_expert(tiny_dir, tmp_path, trained, name):  # noqa: F811
    """One trained expert of the two-expert model: its file still says which expert it fits."""
    model = build_tiny(tiny_dir, trainable_models=trained, lora_base_model=trained)
    files = model.save_trainable(str(tmp_path / "trainable.safetensors"))
    assert [os.path.basename(f) for f in files] == [name]
    with safe_open(files[0], "pt") as f:
        assert f.metadata()["expert"] == trained


def test_export_of_both_experts_is_a_high_low_pair_each_loading_into_its_own_expert(tiny_dir, tmp_path):  # noqa: F811
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.pipelines.wan_video import model_fn_wan_video
    from diffsynth.utils.lora.general import GeneralLoRALoader

    from rewardfl.models.wan.architectures import TINY_DITS

    model = build_tiny(tiny_dir, **BOTH)
    perturb_lora(model, seed=4)
    files = model.save_trainable(str(tmp_path / "trainable.safetensors"))
    assert [os.path.basename(f) for f in files] == ["trainable_high_noise.safetensors", "trainable_low_noise.safetensors"]
    g = torch.Generator().manual_seed(5)
    first = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    x = torch.randn(1, *model.latent_shape(5, 32, 32), generator=g)
    cond = model.encode(["p"], first, 5)
    for path, expert in zip(files, ("dit", "dit2")):
        with safe_open(path, "pt") as f:
            assert f.metadata()["expert"] == expert
        dit = WanModel(**TINY_DITS["tiny-i2v"])
        dit.load_state_dict(load_file(os.path.join(tiny_dir, FILES[expert])))
        GeneralLoRALoader().fuse_lora_to_base_model(dit, load_file(path))
        t = torch.tensor([950.0 if expert == "dit" else 300.0])
        with torch.no_grad():
            ref = model_fn_wan_video(dit=dit.eval(), latents=x, timestep=t, context=cond.context, y=cond.y)
        torch.testing.assert_close(model.denoise(expert, x, t, cond), ref, rtol=1e-5, atol=1e-5)


def test_training_both_experts_checkpoints_exports_and_resumes_both(make_config, tmp_path):  # noqa: F811
    from rewardfl.checkpoints import latest_checkpoint, load_checkpoint

    cfg = make_config(max_steps=2, save_steps=1, **BOTH, **WINDOW)
    assert run.main([cfg]) == 0
    out = tmp_path / "out"
    weights, state = load_checkpoint(latest_checkpoint(str(out / "checkpoints")))
    assert state["step"] == 2
    for expert in ("dit", "dit2"):  # both experts' LoRA, and both trained (B starts at 0)
        bs = [v for k, v in weights.items() if k.startswith(f"{expert}.") and ".lora_B." in k]
        assert len(bs) == 2 * 10 and max(float(b.abs().max()) for b in bs) > 0, expert
    final = sorted(os.listdir(out / "final"))
    assert final == ["trainable_high_noise.safetensors", "trainable_low_noise.safetensors"]
    for name, expert in zip(final, ("dit", "dit2")):
        lora = load_file(str(out / "final" / name))
        for k, v in weights.items():  # the export is the checkpoint's LoRA (comfyui: B as trained + alpha)
            if k.startswith(f"{expert}."):
                assert torch.equal(lora["diffusion_model." + k[len(expert) + 1:]], v), k
    # resume: the next run starts from checkpoint-2's weights of both experts and takes step 3
    raw = yaml.safe_load(open(cfg))
    raw.update(max_steps=3, resume_from_checkpoint=True)
    resumed = tmp_path / "resume.yaml"
    resumed.write_text(yaml.safe_dump(raw))
    assert run.main([str(resumed)]) == 0
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3]
    after, state3 = load_checkpoint(latest_checkpoint(str(out / "checkpoints")))
    assert state3["step"] == 3 and sorted(after) == sorted(weights)
    assert all(not torch.equal(after[k], weights[k]) for k in after if ".lora_B." in k and k.startswith("dit."))


@pytest.mark.parametrize("recipe,plan_line", [
    ("train_high_noise.yaml", "plan     8 steps, gradient at 2:dit, 3:dit2, 4:dit2, 5:dit2, 6:dit2, 7:dit2"),
    ("train_both_experts.yaml", "plan     8 steps, gradient at 2:dit, 3:dit2, 4:dit2, 5:dit2, 6:dit2, 7:dit2"),
    ("grpo_wan22.yaml", "plan     8 steps, gradient at 3:dit2, 4:dit2, 5:dit2, 6:dit2, 7:dit2"),
    ("hybrid_wan22.yaml", "plan     8 steps, gradient at 3:dit2, 4:dit2, 5:dit2, 6:dit2, 7:dit2"),
])
def test_recipes_pass_check(recipe, plan_line, tiny_dir, tmp_path, capsys, face_assets):  # noqa: F811
    raw = yaml.safe_load(open(os.path.join(ROOT, "examples", recipe), encoding="utf-8"))
    raw.update(model_paths=os.path.join(tiny_dir, "model_paths.json"), tokenizer_path=os.path.join(tiny_dir, "tokenizer"),
               reward_model_path=face_assets.scrfd_sface, output_dir=str(tmp_path / "out"))
    raw["data"]["metadata_path"] = None
    path = tmp_path / recipe
    path.write_text(yaml.safe_dump(raw))
    assert run.main([str(path), "--check"]) == 0, capsys.readouterr().err
    assert plan_line in capsys.readouterr().out
