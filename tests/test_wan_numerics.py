"""Where rewardfl's Wan numerics follow official Wan rather than a plain bf16 cast.

* The time embedding (sinusoid, ``time_embedding``, ``time_projection``) runs in fp32 in a bf16
  model, as official Wan does under ``autocast(float32)``; reference: diffsynth's own modules and
  sinusoid in float64 on the same (bf16-valued) weights.
* The clamp after VAE decode: its two derivatives against a hand computation, and the model
  option that picks one, against diffsynth's unclamped decoder with the mask applied by hand.
"""

from __future__ import annotations

import pytest
import torch
from wan_fixtures import build_tiny, tiny_dir  # noqa: F401  (session fixture)

torch.set_num_threads(min(2, torch.get_num_threads()))

# the 8-step shift-5 schedule's timesteps (docs/design.md section 2), most of them not exact in bf16
SCHEDULE = [1000.0, 972.2222, 937.5, 892.8571, 833.3333, 750.0, 625.0, 416.6667]


@pytest.fixture(scope="module")
def bf16_dit():
    """A tiny I2V Wan22Model in bf16 (random weights), its 'dit', and plain diffsynth copies of the
    same weights: float64 (the reference) and bf16 (every layer in bf16, as before)."""
    from diffsynth.models.wan_video_dit import WanModel

    from rewardfl.config import config_from_dict
    from rewardfl.models.wan.architectures import TINY_DITS
    from rewardfl.models.wan.model import Wan22Model

    model = Wan22Model.with_random_weights(config_from_dict({"mixed_precision": "bf16"}), dit="tiny-i2v",
                                           vae_dim=8, device="cpu", seed=0)
    state = model.dits["dit"].state_dict()

    def plain(dtype):
        d = WanModel(**TINY_DITS["tiny-i2v"])
        d.load_state_dict(state)
        return d.to(dtype).eval()

    assert all(v.dtype == torch.bfloat16 for v in state.values())  # the weights stay bf16
    return model, plain(torch.float64), plain(torch.bfloat16)


def _agreement(got: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float]:
    """(fraction of elements equal to the float64 value rounded to bf16, largest error in bf16 ulps)."""
    rounded = ref64.to(torch.bfloat16)
    _, k = torch.frexp(ref64.abs().clamp_min(1e-30))  # |ref| in [2^(k-1), 2^k): bf16 spacing 2^(k-8)
    err = (got.double() - ref64).abs() / torch.pow(2.0, k.double() - 8)
    return float((got == rounded).double().mean()), float(err.max())


def test_time_embedding_of_a_bf16_model_is_the_exact_value_rounded_once(bf16_dit):
    from diffsynth.models.wan_video_dit import sinusoidal_embedding_1d

    from rewardfl.models.wan.dit_forward import embed_timesteps

    model, ref, plain16 = bf16_dit
    dit = model.dits["dit"]
    ts = torch.tensor(SCHEDULE)
    with torch.no_grad():
        t, t_mod = embed_timesteps(dit, ts, torch.bfloat16)
        sin64 = sinusoidal_embedding_1d(dit.freq_dim, ts.double())
        t64 = ref.time_embedding(sin64)
        t_mod64 = ref.time_projection(t64).unflatten(1, (6, dit.dim))
        # every layer in bf16 (rewardfl before; diffsynth in bf16 rounds t itself too)
        t16 = plain16.time_embedding(sin64.float().bfloat16())
        t_mod16 = plain16.time_projection(t16).unflatten(1, (6, dit.dim))
    assert t.dtype == t_mod.dtype == torch.bfloat16 and t_mod.shape == (8, 6, dit.dim)
    for got, old, exact in ((t, t16, t64), (t_mod, t_mod16, t_mod64)):
        same, ulps = _agreement(got, exact)
        old_same, old_ulps = _agreement(old, exact)
        # fp32 arithmetic then one rounding: the float64 value rounded to bf16, bar a rare tie
        assert same >= 0.99 and ulps <= 1.0, (same, ulps)
        # the test can tell: bf16 layers leave about half the elements off by one ulp or more
        assert old_same < 0.8 and old_ulps >= 1.0, (old_same, old_ulps)


def test_bf16_velocity_stays_within_bf16_error_of_float64(bf16_dit):
    """The fp32 time embedding composes with the bf16 blocks (dtypes meet) and the velocity is as
    close to float64 as a bf16 forward gets (measured 0.57-0.60% relative)."""
    from diffsynth.pipelines.wan_video import model_fn_wan_video

    from rewardfl.models.wan.model import WanCondition

    model, ref, _ = bf16_dit
    g = torch.Generator().manual_seed(1)
    B, T, h, w = 2, 3, 8, 8
    x = torch.randn(B, 16, T, h, w, generator=g).bfloat16()
    y = torch.randn(B, 20, T, h, w, generator=g).bfloat16()
    context = torch.randn(B, 16, 32, generator=g).bfloat16()
    cond = WanCondition(context, y, None, None, (4 * T - 3, 8 * h, 8 * w))
    t = torch.tensor([SCHEDULE[1], SCHEDULE[7]])
    with torch.no_grad():
        v = model.denoise("dit", x.float(), t, cond)
        v64 = model_fn_wan_video(dit=ref, latents=x.double(), timestep=t.double(), context=context.double(),
                                 y=y.double())
    assert v.shape == v64.shape == (B, 16, T, h, w)
    rel = float((v.double() - v64).norm() / v64.norm())
    assert rel < 0.01, rel


def test_ti2v_per_token_time_embedding_matches_per_token_reference():
    """TI2V embeds (0, t) once per sample and indexes them per token: the same values as running
    the MLPs over every token's own timestep (diffsynth's way), in float64."""
    from diffsynth.models.wan_video_dit import WanModel, sinusoidal_embedding_1d

    from rewardfl.models.wan.architectures import TINY_DITS
    from rewardfl.models.wan.dit_forward import dit_forward

    torch.manual_seed(2)
    dit = WanModel(**TINY_DITS["tiny-ti2v"]).double().eval()
    seen = []
    handle = dit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[2]))  # t_mod
    g = torch.Generator().manual_seed(3)
    B, T, h, w = 2, 3, 4, 4
    ts = torch.tensor([972.2222, 416.6667], dtype=torch.float64)
    with torch.no_grad():
        dit_forward(dit, torch.randn(B, 16, T, h, w, generator=g, dtype=torch.float64), ts,
                    torch.randn(B, 8, 32, generator=g, dtype=torch.float64), clean_first_frame=True)
        L, frame = T * (h // 2) * (w // 2), (h // 2) * (w // 2)
        tok = ts[:, None].repeat(1, L)
        tok[:, :frame] = 0
        want = dit.time_projection(dit.time_embedding(sinusoidal_embedding_1d(dit.freq_dim, tok.flatten())))
    handle.remove()
    torch.testing.assert_close(seen[0], want.view(B, L, 6, dit.dim), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- decode clamp

PIXELS = [-2.5, -1.25, -0.6, 0.0, 0.3, 0.95, 1.05, 3.0]  # none exactly at +-1 (the kink)


@pytest.mark.parametrize("mode,values,slope", [
    # by hand: clamp(p) = min(max(p, -1), 1); d/dp = 1 inside (-1, 1), 0 outside
    ("hard", [-1, -1, -0.6, 0.0, 0.3, 0.95, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]),
    ("straight_through", [-1, -1, -0.6, 0.0, 0.3, 0.95, 1, 1], [1] * 8),
    ("none", PIXELS, [1] * 8),
])
def test_clamp_values_and_derivative_match_a_hand_computation(mode, values, slope):
    from rewardfl.models.wan.vae_decode import clamp_decoded

    px = torch.tensor(PIXELS, dtype=torch.float64, requires_grad=True)
    weight = torch.arange(1.0, 9.0, dtype=torch.float64)  # d loss / d clamped pixel
    out = clamp_decoded(px, mode)
    (grad,) = torch.autograd.grad((out * weight).sum(), px)
    assert out.tolist() == pytest.approx(values, abs=0)
    assert grad.tolist() == pytest.approx((weight * torch.tensor(slope, dtype=torch.float64)).tolist(), abs=0)


def test_unknown_clamp_is_an_error():
    from rewardfl.models.wan.vae_decode import clamp_decoded

    with pytest.raises(ValueError, match="decode_clamp: must be one of straight_through, hard, none, got 'clip'"):
        clamp_decoded(torch.zeros(2), "clip")


def test_hard_decode_clamp_option_zeroes_the_gradient_of_saturated_pixels(tiny_dir):  # noqa: F811
    """``decode_clamp: hard``: the decode gradient = diffsynth's unclamped decoder's vector-Jacobian
    product with the reward's gradient zeroed by hand on every decoded pixel outside [-1, 1].
    (The straight-through default against the unmasked product: test_wan_model.py.)"""
    model = build_tiny(tiny_dir, options={"decode_clamp": "hard"})
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(1, 16, 2, 4, 4, generator=g) * 3).requires_grad_(True)  # many pixels saturate
    weight = torch.randn(1, 3, 5, 32, 32, generator=g)  # d reward / d clamped pixel
    (got,) = torch.autograd.grad((model.decode(x) * weight).sum(), x)

    raw = model.vae.model.decode(x, model.vae.scale)  # diffsynth's decoder, no clamp
    outside = raw.detach().abs() > 1
    assert 0.05 < float(outside.double().mean()) < 0.95  # both kinds of pixel are there
    (want,) = torch.autograd.grad(raw, x, weight.masked_fill(outside, 0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
