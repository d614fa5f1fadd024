"""rewardfl.kernels.sde_step: the stochastic flow step and its log-probability, against float64
Gaussians, an analytic flow whose marginals are known, and the Triton kernels against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from rewardfl.kernels import cps_coefficients, sde_coefficients, sde_step, sde_step_reference
from rewardfl.kernels._utils import interpreting

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, v, z


def test_coefficients_by_hand():
    # sigma 0.8 -> 0.6, a = 0.7: g^2 = 0.49 * 0.8 / 0.2 = 1.96, dt = -0.2
    c = sde_coefficients(0.8, 0.6, 0.7)
    assert c.c_x == pytest.approx(1 + 1.96 * -0.2 / 1.6)
    assert c.c_v == pytest.approx((1 + 1.96 * 0.2 / 1.6) * -0.2)
    assert c.s == pytest.approx(math.sqrt(1.96 * 0.2))
    # a = 0 is the ODE's Euler step
    assert sde_coefficients(0.8, 0.6, 0.0) == (1.0, pytest.approx(-0.2), 0.0)
    # sigma = 1 takes 1 - sigma at the cap
    capped = sde_coefficients(1.0, 0.9, 0.5, sigma_cap=0.9)
    assert capped.s == pytest.approx(math.sqrt(0.25 * 1.0 / 0.1 * 0.1))
    with pytest.raises(ValueError, match="sigma_cap"):
        sde_coefficients(1.0, 0.9, 0.5)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_coefficients(0.5, 0.6, 0.5)


def test_log_prob_is_the_float64_gaussian_density_per_element():
    x, v, _ = _inputs((3, 4, 5), torch.float64)
    coef = sde_coefficients(0.7, 0.55, 0.8)
    x_next = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, log_prob = sde_step(x, v, coef, x_next=x_next, backend="torch")
    mean = coef.c_x * x + coef.c_v * v
    expected = torch.distributions.Normal(mean, coef.s).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(log_prob, expected, rtol=1e-12, atol=1e-12)


def test_sampling_draws_mean_plus_s_noise_and_scores_it():
    x, v, z = _inputs((2, 3, 7), torch.float64)
    coef = sde_coefficients(0.5, 0.25, 1.0)
    x_next, log_prob = sde_step(x, v, coef, noise=z, backend="torch")
    torch.testing.assert_close(x_next, coef.c_x * x + coef.c_v * v + coef.s * z, rtol=1e-12, atol=1e-12)
    # the residual is s * z exactly: log N(s z; 0, s^2) = -z^2/2 - log s - log(2 pi)/2
    expected = (-0.5 * z * z - math.log(coef.s) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(log_prob, expected, rtol=1e-12, atol=1e-12)


def test_gradient_of_the_reference_in_float64():
    x, v, _ = _inputs((2, 6), torch.float64)
    x_next = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    coef = sde_coefficients(0.6, 0.3, 0.9)
    x.requires_grad_(True)
    v.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: sde_step(a, b, coef, x_next=x_next, backend="torch")[1], (x, v))


def _analytic_velocity(x, t, mu, tau):
    """v(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(mu, tau^2), x_t = (1 - t) x0 + t eps."""
    var = (1 - t) ** 2 * tau**2 + t**2
    centred = x - (1 - t) * mu
    return t / var * centred - (mu + (1 - t) * tau**2 / var * centred)


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_the_sde_keeps_the_flow_marginals(noise_level):
    """An analytic flow (Gaussian data): sampling down from t = 0.98 with the step, at noise 0 (the ODE)
    and 0.7, ends at the data distribution N(mu, tau^2); a wrong drift correction would not."""
    mu, tau, n, steps = 1.5, 0.5, 40000, 200
    g = torch.Generator().manual_seed(0)
    t0 = 0.98
    sd0 = math.sqrt((1 - t0) ** 2 * tau**2 + t0**2)
    x = ((1 - t0) * mu + sd0 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    ts = torch.linspace(t0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        coef = sde_coefficients(t, t_next, noise_level)
        v = _analytic_velocity(x, t, mu, tau)
        if coef.s == 0:
            x = coef.c_x * x + coef.c_v * v
        else:
            x, _ = sde_step(x, v, coef, noise=torch.randn(x.shape, generator=g, dtype=torch.float64), backend="torch")
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(tau, abs=0.02)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 9000), (3, 17)])
def test_triton_matches_the_reference(shape, dtype):
    x, v, z = _inputs(shape, dtype)
    coef = sde_coefficients(0.75, 0.5, 0.7)
    xn_t, lp_t = sde_step(x, v, coef, noise=z, backend="triton")
    xn_r, lp_r = sde_step(x, v, coef, noise=z, backend="torch")
    assert xn_t.dtype == dtype and lp_t.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(xn_t, xn_r, **tol)
    # scoring the stored sample again gives exactly the sampling pass's log-probability (ratio 1)
    _, lp_again = sde_step(x, v, coef, x_next=xn_t, backend="triton")
    assert torch.equal(lp_again, lp_t)
    _, lp_ref = sde_step(x, v, coef, x_next=xn_t, backend="torch")
    torch.testing.assert_close(lp_t, lp_ref.float(), rtol=1e-5, atol=1e-5)
    # against float64 (the stored sample's residual)
    _, lp64 = sde_step(x.double(), v.double(), coef, x_next=xn_t.double(), backend="torch")
    torch.testing.assert_close(lp_t.double(), lp64, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_backward_matches_float64():
    x, v, _ = _inputs((2, 3, 40))
    coef = sde_coefficients(0.6, 0.45, 0.8)
    x_next = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(9))
    weights = torch.tensor([0.3, -1.7])
    xt, vt = x.clone().requires_grad_(True), v.clone().requires_grad_(True)
    (sde_step(xt, vt, coef, x_next=x_next, backend="triton")[1] * weights).sum().backward()
    x64, v64 = x.double().requires_grad_(True), v.double().requires_grad_(True)
    (sde_step(x64, v64, coef, x_next=x_next.double(), backend="torch")[1] * weights.double()).sum().backward()
    torch.testing.assert_close(xt.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vt.grad.double(), v64.grad, rtol=1e-5, atol=1e-7)


def test_cps_coefficients_by_hand():
    # sigma 0.8 -> 0.6, a = 0.5: the predicted noise kept with 0.6 cos(pi/4), fresh noise 0.6 sin(pi/4)
    k = 0.6 * math.cos(math.pi / 4)
    c = cps_coefficients(0.8, 0.6, 0.5)
    # x_next = 0.4 (x - 0.8 v) + k (x + 0.2 v) + s z
    assert c.c_x == pytest.approx(0.4 + k, abs=1e-15)
    assert c.c_v == pytest.approx(-0.4 * 0.8 + k * 0.2, abs=1e-15)
    assert c.s == pytest.approx(0.6 * math.sin(math.pi / 4), abs=1e-15)
    # a = 0 is the Euler step; a = 1 keeps none of the predicted noise; into t = 0: deterministic
    assert cps_coefficients(0.8, 0.6, 0.0) == (pytest.approx(1.0), pytest.approx(-0.2), 0.0)
    assert cps_coefficients(0.8, 0.6, 1.0) == (pytest.approx(0.4), pytest.approx(-0.32), pytest.approx(0.6))
    assert cps_coefficients(0.625, 0.0, 0.7) == (1.0, pytest.approx(-0.625), 0.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        cps_coefficients(0.8, 0.6, 1.2)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        cps_coefficients(0.5, 0.6, 0.5)


_DEMO_WINDOW = [2.5 / 3.0, 0.625, 0.0]  # the demo's steps 2..3 of 4 at shift 5
_WAN_WINDOW = [5 * s / (1 + 4 * s) for s in (5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0)]  # steps 3..7 of 8, shift 5


@pytest.mark.parametrize("sigmas, noise_level, left", [(_DEMO_WINDOW, 0.3, 0.32), (_DEMO_WINDOW, 0.7, 0.88),
                                                       (_WAN_WINDOW, 0.7, 0.44)])
def test_cps_keeps_the_marginals_over_a_few_large_steps_where_the_sde_step_does_not(sigmas, noise_level, left):
    """Data at one point mu (the velocity then exact: v = eps - mu), over a few-step schedule's window.
    Coefficients-preserving steps land on the marginals N((1 - t) mu, t^2) at every step, the clean
    sample exactly; Flow-GRPO's Euler-Maruyama step, exact only as dt -> 0, leaves noise in the final
    sample whose standard deviation is ``left`` (the figures docs/algorithms.md and the examples quote)."""
    mu, n = 1.5, 100000
    finals = {}
    for kind, coefficients in (("cps", cps_coefficients), ("sde", sde_coefficients)):
        g = torch.Generator().manual_seed(0)
        x = (1 - sigmas[0]) * mu + sigmas[0] * torch.randn(n, 1, generator=g, dtype=torch.float64)
        for t, t_next in zip(sigmas[:-1], sigmas[1:]):
            coef = coefficients(t, t_next, noise_level)
            v = (x - (1 - t) * mu) / t - mu  # eps - x0, exact for point data
            x = coef.c_x * x + coef.c_v * v + coef.s * torch.randn(x.shape, generator=g, dtype=torch.float64)
            if kind == "cps":
                assert x.mean().item() == pytest.approx((1 - t_next) * mu, abs=0.01)
                assert x.std().item() == pytest.approx(t_next, abs=0.01)
        finals[kind] = x.std().item()
    assert finals["cps"] < 1e-12
    assert finals["sde"] == pytest.approx(left, abs=0.01)


def test_bad_inputs_are_named():
    x, v, z = _inputs((2, 3))
    coef = sde_coefficients(0.5, 0.25, 1.0)
    with pytest.raises(ValueError, match="exactly one of noise"):
        sde_step(x, v, coef)
    with pytest.raises(ValueError, match="exactly one of noise"):
        sde_step(x, v, coef, noise=z, x_next=z)
    with pytest.raises(ValueError, match="v has shape"):
        sde_step(x, v[:1], coef, noise=z)
    with pytest.raises(ValueError, match="standard deviation"):
        sde_step(x, v, sde_coefficients(0.5, 0.25, 0.0), noise=z)


def test_reference_is_exported_with_the_op():
    x, v, z = _inputs((1, 4), torch.float64)
    coef = sde_coefficients(0.5, 0.2, 0.5)
    a = sde_step_reference(x, v, coef, noise=z)
    b = sde_step(x, v, coef, noise=z, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
