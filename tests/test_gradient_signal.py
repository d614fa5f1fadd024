"""benchmarks/gradient_signal.py's statistics against vectors of a known signal-to-noise ratio."""

import importlib.util
import math
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gradient_signal.py")
_spec = importlib.util.spec_from_file_location("gradient_signal", _PATH)
gradient_signal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gradient_signal)


@pytest.mark.parametrize("rho", [0.02, 0.2, 2.0])
def test_split_half_recovers_the_signal_to_noise_ratio_of_one_group(rho):
    # one group's gradient: a fixed direction of norm 1 plus isotropic noise of total variance 1 / rho
    d, groups = 200_000, 16
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(d, generator=g, dtype=torch.float64)
    signal /= signal.norm()
    grads = [signal + torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d * rho) for _ in range(groups)]
    out = gradient_signal.split_half(grads)
    # by hand: each half averages 8 groups, so |signal|^2 / (|signal|^2 + noise / 8) = 8 rho / (1 + 8 rho)
    assert out["split_half"] == pytest.approx(8 * rho / (1 + 8 * rho), abs=0.01)
    assert out["rho"] == pytest.approx(rho, rel=0.1)
    assert out["groups_for_0.5"] == pytest.approx(1 / (3 * rho), rel=0.1)


def test_no_shared_direction_reads_as_no_signal():
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(100_000, generator=g, dtype=torch.float64) for _ in range(8)]
    out = gradient_signal.split_half(grads)
    assert abs(out["split_half"]) < 0.02
    assert out["rho"] < 0.005
    assert out["groups_for_0.5"] > 60


def test_flat_gradient_reads_and_clears_the_gradients():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))
    (a.sum() * 2 + (b * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
    c = torch.nn.Parameter(torch.ones(1))  # no gradient reached it
    flat = gradient_signal.flat_gradient([a, b, c])
    assert flat.tolist() == [2.0, 2.0, 2.0, 2.0, 1.0, 2.0, 3.0, 0.0]
    assert a.grad is None and b.grad is None
