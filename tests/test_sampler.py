"""flow_match_euler: schedule, expert switch, gradient window, noise, and sampling loops with known answers."""

import os
from fractions import Fraction

import pytest
import torch

from rewardfl import registry
from rewardfl.config import ConfigError, config_from_dict, training_timestep_range
from rewardfl.samplers.flow_match_euler import FlowMatchEulerSampler
from rewardfl.sampling.policy import gradient_steps, plan_steps

HAS_TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
WAN = ("dit", "dit2")


def make(options=None, **config):
    return registry.create("sampler", "flow_match_euler", config_from_dict(config), options or {})


def plan(sampler, experts, trainable, boundary=0.9):
    """The core's plan for this sampler's schedule (Wan2.2 I2V's boundary 0.9 by default)."""
    return plan_steps(sampler.config, sampler, experts, trainable, boundary)


def shifted(i, n, k):
    """Sigma i of n, exactly: s = 1 - i/n, k*s / (1 + (k-1)*s)."""
    s = 1 - Fraction(i, n)
    return k * s / (1 + (k - 1) * s)


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("n,k", [(8, 5), (4, 5), (50, 3), (1, 5), (8, 1)])
def test_schedule_matches_exact_fractions(n, k):
    sampler = make({"shift": k}, num_inference_steps=n, mid_timestep=0, final_timestep=n - 1)
    exact = [float(shifted(i, n, Fraction(k))) for i in range(n + 1)]
    assert sampler.sigmas.dtype == torch.float64 and sampler.sigmas.shape == (n + 1,)
    torch.testing.assert_close(sampler.sigmas, torch.tensor(exact, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(sampler.timesteps, 1000 * torch.tensor(exact[:n], dtype=torch.float64))
    assert sampler.sigmas[0] == 1 and sampler.sigmas[-1] == 0


def test_wan_eight_step_timesteps_as_published():
    # docs/design.md section 2: N=8, shift 5 gives about 1000, 972, 938, 893, 833, 750, 625, 417
    assert [round(float(t)) for t in make().timesteps] == [1000, 972, 938, 893, 833, 750, 625, 417]


@pytest.mark.parametrize("n,k", [(8, 5.0), (4, 5.0), (30, 3.0)])
def test_schedule_matches_diffsynth(n, k):
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    ours = make({"shift": k}, num_inference_steps=n, mid_timestep=0, final_timestep=n - 1)
    theirs = FlowMatchScheduler("Wan")
    theirs.set_timesteps(n, shift=k)
    # diffsynth drops the final sigma 0: N entries, where ours has N + 1
    assert theirs.sigmas.shape == (n,)
    torch.testing.assert_close(theirs.sigmas.double(), ours.sigmas[:n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs.timesteps.double(), ours.timesteps, rtol=1e-6, atol=1e-4)
    # its step with to_final=True equals our last step's jump to 0; its other steps our steps
    x, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    for p in plan(ours, ["dit"], ["dit"]):
        expected = theirs.step(v, theirs.timesteps[p.index], x, to_final=p.last)
        torch.testing.assert_close(ours.step(x, v, p), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- experts and the gradient window


def test_wan_default_plan():
    steps = plan(make(), WAN, ["dit2"])
    # t >= 900 -> dit: 1000, 972, 938; then dit2 from 893
    assert [p.expert for p in steps] == ["dit"] * 3 + ["dit2"] * 5
    assert [p.index for p in steps if p.grad] == [4, 5, 6, 7]
    assert [p.last for p in steps] == [False] * 7 + [True]
    assert steps[-1].sigma_next == 0.0
    for p in steps[:-1]:
        assert p.sigma_next == pytest.approx(float(shifted(p.index + 1, 8, 5)), abs=1e-15)
        assert p.timestep == pytest.approx(1000 * p.sigma, abs=1e-12)


def test_the_models_boundary_moves_the_expert_switch():
    steps = plan(make(), WAN, ["dit2"], boundary=0.875)  # T2V-A14B: 893 >= 875 still runs dit
    assert [p.expert for p in steps] == ["dit"] * 4 + ["dit2"] * 4
    assert {p.expert for p in plan(make(), ["only"], ["only"], boundary=None)} == {"only"}


def test_final_timestep_jumps_to_the_end():
    steps = plan(make(num_inference_steps=8, mid_timestep=2, final_timestep=5), WAN, ["dit", "dit2"])
    assert len(steps) == 6 and steps[-1].last and steps[-1].sigma_next == 0.0
    assert steps[-1].dt == pytest.approx(-float(shifted(5, 8, 5)))
    assert [p.index for p in steps if p.grad] == [2, 3, 4, 5]


@pytest.mark.parametrize("config,grad_steps", [
    (dict(), [4, 5, 6, 7]),
    # the user's config: the boundaries are DiffSynth training-schedule keys and leave the window
    # mid..final as the reference implementation runs it (an earlier reading gave [7] here)
    (dict(min_timestep_boundary=0.9, max_timestep_boundary=1.0), [4, 5, 6, 7]),
    (dict(mid_timestep=2, min_timestep_boundary=0.5, max_timestep_boundary=0.75), [2, 3, 4, 5, 6, 7]),
    (dict(mid_timestep=7), [7]),
    (dict(num_inference_steps=100, mid_timestep=50, final_timestep=60, min_timestep_boundary=0.57), list(range(50, 61))),
])
def test_gradient_window(config, grad_steps):
    sampler = make(**config)
    assert gradient_steps(sampler.config) == grad_steps
    assert [p.index for p in plan(sampler, WAN, ["dit", "dit2"]) if p.grad] == grad_steps


def test_training_timestep_range_by_hand():
    # DiffSynth's Wan training schedule: t_j = 1000 * 5 s / (1 + 4 s), s = 1 - j/1000, j drawn in
    # [int(min*1000), int(max*1000)). [0.9, 1.0]: j = 900 -> s = 0.1 -> 500/1.4; j = 999 -> s = 0.001
    lo, hi = training_timestep_range(0.9, 1.0)
    assert hi == pytest.approx(1000 * 0.5 / 1.4) and lo == pytest.approx(1000 * 0.005 / 1.004)
    assert 4.9 < lo < 5.0 and 357 < hi < 358
    # none of the 8 sampling timesteps (lowest 416.7) lies in it
    assert float(make().timesteps.min()) > hi
    lo, hi = training_timestep_range(0.0, 1.0)
    assert hi == pytest.approx(1000.0)


def test_gradient_steps_only_on_a_frozen_expert_are_rejected():
    with pytest.raises(ValueError, match="trainable_models.*dit2") as err:
        plan(make(), WAN, ["dit"])  # window 4..7 runs dit2 only
    assert "model.boundary" in str(err.value)
    # a window that reaches the high-noise expert is fine with dit trainable
    assert any(p.grad and p.expert == "dit" for p in plan(make(mid_timestep=1), WAN, ["dit"]))
    with pytest.raises(ValueError, match="at most 2 experts"):
        plan(make(), ["a", "b", "c"], ["c"])


@pytest.mark.parametrize("options,key", [
    ({"shift": -1}, "sampler.shift"), ({"guidance_scale": float("nan")}, "sampler.guidance_scale: must be a finite"),
    ({"latent_dtype": "fp8"}, "sampler.latent_dtype"), ({"kernels": "cuda"}, "sampler.kernels"),
    ({"shfit": 3}, "did you mean 'shift'"),
])
def test_options_errors_name_the_key(options, key):
    with pytest.raises(ConfigError, match=key):
        make(options)


def test_registry_builds_the_default_sampler():
    assert "flow_match_euler" in [p.name for p in registry.list_plugins("sampler")]
    cfg = config_from_dict({"sampler": {"name": "flow_match_euler", "shift": 3.0}})
    sampler = registry.create("sampler", cfg.sampler.name, cfg, cfg.sampler.options, device="cpu")
    assert isinstance(sampler, FlowMatchEulerSampler) and sampler.options.shift == 3.0
    assert float(sampler.sigmas[1]) == pytest.approx(float(shifted(1, 8, 3)))


# --------------------------------------------------------------------------- noise


def test_noise_is_per_sample_per_step_and_reproducible():
    sampler = make(seed=7)
    shape = (4, 3, 8, 8)
    a = sampler.initial_noise(shape, sample_seeds=[1, 2], step=0)
    assert a.shape == (2, *shape) and a.dtype == torch.float32
    assert torch.equal(a, sampler.initial_noise(shape, sample_seeds=[1, 2], step=0))
    assert not torch.equal(a[0], a[1])  # samples differ
    assert not torch.equal(a, sampler.initial_noise(shape, sample_seeds=[1, 2], step=1))  # steps differ
    # a sample's noise does not depend on what it is batched with
    assert torch.equal(a[1], sampler.initial_noise(shape, sample_seeds=[2], step=0)[0])
    assert not torch.equal(a, make(seed=8).initial_noise(shape, sample_seeds=[1, 2], step=0))
    half = sampler.initial_noise(shape, sample_seeds=[1], step=0, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half[0], a[0].to(torch.bfloat16))


def test_fixed_noise_ignores_the_step():
    sampler = make(fixed_noise=True)
    a = sampler.initial_noise((2, 3), sample_seeds=[5], step=0)
    assert torch.equal(a, sampler.initial_noise((2, 3), sample_seeds=[5], step=123))
    assert not torch.equal(a, sampler.initial_noise((2, 3), sample_seeds=[6], step=0))


def test_noise_is_standard_normal():
    x = make().initial_noise((64, 1024), sample_seeds=[0], step=3).double()
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02


# --------------------------------------------------------------------------- sampling loops with known answers


def run(sampler, x, velocity, experts=("dit",), **step_kwargs):
    for p in plan(sampler, experts, experts):
        x = sampler.step(x, *velocity(x, p), p, **step_kwargs)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_steps_linear_velocity_land_on_the_euler_product(backend):
    # v(x) = a x, N = 4, shift 5: sigmas 1, 15/16, 5/6, 5/8, 0, so x_4 = x_0 * prod(1 + a * dt_i)
    a = 0.7
    sampler = make({"kernels": backend}, num_inference_steps=4, mid_timestep=0, final_timestep=3)
    dts = [Fraction(15, 16) - 1, Fraction(5, 6) - Fraction(15, 16), Fraction(5, 8) - Fraction(5, 6), -Fraction(5, 8)]
    assert [p.dt for p in plan(sampler, ["dit"], ["dit"])] == pytest.approx([float(d) for d in dts], abs=1e-15)
    factor = 1.0
    for d in dts:
        factor *= 1 + a * float(d)
    x0 = torch.randn(2, 4, 3, 5, 7, device=DEVICE)
    out = run(sampler, x0, lambda x, p: (a * x,))
    torch.testing.assert_close(out.double(), x0.double() * factor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("final", [3, 1])
def test_straight_path_velocity_lands_exactly_on_the_data(backend, final):
    # on x = sigma * noise + (1 - sigma) * data the exact velocity is (x - data) / sigma, constant along the
    # path: Euler is exact for any schedule, the jump to sigma 0 included
    data = torch.randn(1, 4, 3, 6, 5, device=DEVICE)
    sampler = make({"kernels": backend}, num_inference_steps=4, mid_timestep=0, final_timestep=final)
    x0 = make().initial_noise(data.shape[1:], sample_seeds=[3], step=0, device=DEVICE)
    out = run(sampler, x0, lambda x, p: ((x - data) / p.sigma,))
    torch.testing.assert_close(out, data, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_and_injection_in_a_loop(backend):
    # constant fields: x_end = x_0 + sum(dt) * (vu + g (vc - vu)), sum(dt) = -1; frame 0 ends as the latent
    g = 4.0
    sampler = make({"kernels": backend, "guidance_scale": g, "latent_dtype": "float32"},
                   num_inference_steps=4, mid_timestep=0, final_timestep=3)
    assert sampler.uses_guidance
    shape = (2, 3, 5, 4, 6)
    x0, vc, vu = (torch.randn(*shape, device=DEVICE) for _ in range(3))
    mask = torch.zeros(1, 1, 5, 1, 1, dtype=torch.bool, device=DEVICE)
    mask[:, :, 0] = True
    latent = torch.randn(2, 3, 1, 4, 6, device=DEVICE)
    out = run(sampler, x0, lambda x, p: (vc,), v_uncond=vu, inject_mask=mask, inject_latent=latent)
    expected = x0.double() - (vu.double() + g * (vc.double() - vu.double()))
    torch.testing.assert_close(out[:, :, 1:].double(), expected[:, :, 1:], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :, :1], latent)
    with pytest.raises(ValueError, match="sampler.guidance_scale"):
        sampler.step(x0, vc, plan(sampler, ["dit"], ["dit"])[0])


def test_latent_dtype_and_gradient_through_the_window():
    sampler = make({"latent_dtype": "bfloat16"}, num_inference_steps=4, mid_timestep=2, final_timestep=3)
    w = torch.tensor(0.5, requires_grad=True)
    x = sampler.initial_noise((2, 3, 4), sample_seeds=[0], step=0)
    for p in plan(sampler, ["dit"], ["dit"]):
        if p.index == 2:
            x2 = x.detach().double()
        with torch.set_grad_enabled(p.grad):
            x = sampler.step(x, w * x, p)
    assert x.dtype == torch.bfloat16 and x.requires_grad
    # x_end = x_2 (1 + w dt_2)(1 + w dt_3); steps 0, 1 run without gradient, so x_2 is a constant
    dt2, dt3 = float(shifted(3, 4, 5) - shifted(2, 4, 5)), -float(shifted(3, 4, 5))
    (grad,) = torch.autograd.grad(x.float().sum(), w)
    expected = x2.sum() * (dt2 * (1 + 0.5 * dt3) + dt3 * (1 + 0.5 * dt2))
    assert float(grad) == pytest.approx(float(expected), rel=2e-2)


def test_regularizer_is_the_velocity_kl():
    sampler = make()
    p = plan(sampler, WAN, ["dit2"])[5]
    v = torch.randn(2, 3, 4, 5, requires_grad=True)
    v_ref = torch.randn(2, 3, 4, 5)
    kl = sampler.regularizer(v, v_ref, p)
    expected = ((v.double() - v_ref.double()) ** 2).mean() / (2 * p.sigma ** 2)
    assert kl.dtype == torch.float32 and kl.dim() == 0
    torch.testing.assert_close(kl.double(), expected, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(kl, v)
    torch.testing.assert_close(grad.double(), (v.double() - v_ref.double()) / (v.numel() * p.sigma ** 2),
                               rtol=1e-6, atol=1e-9)
