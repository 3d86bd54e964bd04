"""The synthetic ground-truth generator and the recovery metrics the learning tests rely on."""

import math

import pytest
import torch

from saekit.eval.synthetic import firing_probabilities, mmcs, recovered_fraction, synthetic_activations


def test_shapes_unit_directions_and_determinism():
    x, dirs = synthetic_activations(500, 8, 20, seed=3)
    assert x.shape == (500, 8) and dirs.shape == (20, 8)
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(20))
    x2, dirs2 = synthetic_activations(500, 8, 20, seed=3)
    assert torch.equal(x, x2) and torch.equal(dirs, dirs2)
    assert not torch.equal(synthetic_activations(500, 8, 20, seed=4)[0], x)


def test_independent_of_global_rng_state():
    # Seeding torch the same way must not reproduce the true directions (that makes recovery trivial).
    torch.manual_seed(0)
    _, dirs = synthetic_activations(10, 8, 20, seed=0)
    torch.manual_seed(0)
    g = torch.randn(20, 8)
    assert mmcs(g, dirs) < 0.99


def test_firing_probabilities_power_law_and_mean_active():
    p = firing_probabilities(100, avg_active=5.0, exponent=1.0)
    assert p.sum().item() == pytest.approx(5.0, rel=1e-4)
    assert (p[1:] <= p[:-1]).all() and p.max() <= 1
    assert p[0] / p[9] == pytest.approx(10.0, rel=1e-4)
    clipped = firing_probabilities(10, avg_active=9.0, exponent=2.0)  # needs clipping at 1
    assert clipped.sum().item() == pytest.approx(9.0, rel=1e-4) and clipped.max() == 1.0


def test_samples_are_nonnegative_combinations_with_the_requested_sparsity():
    x, dirs = synthetic_activations(4000, 64, 32, avg_active=3.0, exponent=0.0, magnitude_range=(1.0, 1.0))
    # with d > n_features the directions are independent, so least squares recovers each sample's code exactly
    codes = torch.linalg.lstsq(dirs.t(), x.t()).solution.t()
    assert codes.min() > -1e-4
    active = codes > 0.5
    torch.testing.assert_close(codes[active], torch.ones(int(active.sum())), atol=1e-4, rtol=0)
    assert active.sum(1).float().mean().item() == pytest.approx(3.0, abs=0.1)


def test_noise_is_added():
    clean, _ = synthetic_activations(2000, 16, 8, seed=1)
    noisy, _ = synthetic_activations(2000, 16, 8, seed=1, noise_std=0.5)
    assert (noisy - clean).std().item() == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize(
    "kw", [{"avg_active": 0.0}, {"avg_active": 50.0}, {"magnitude_range": (-1.0, 1.0)}, {"noise_std": -1.0}]
)
def test_validation(kw):
    with pytest.raises(ValueError):
        synthetic_activations(10, 4, 8, **kw)


def test_recovery_metrics_on_known_cases():
    _, dirs = synthetic_activations(10, 8, 6, seed=0)
    perm = dirs[torch.randperm(6)] * 3.0  # order and scale of decoder rows do not matter
    assert mmcs(perm, dirs) == pytest.approx(1.0) and recovered_fraction(perm, dirs) == 1.0
    extra = torch.cat([dirs[:3], -dirs[3:]])  # sign matters: a flipped direction is not recovered
    assert recovered_fraction(extra, dirs) == pytest.approx(0.5)
    # rotate every direction by a known angle within a plane: cosine = cos(angle)
    e = torch.eye(2)
    angle = 0.3
    rotated = torch.tensor([[math.cos(angle), math.sin(angle)]])
    assert mmcs(rotated, e[:1]) == pytest.approx(math.cos(angle), rel=1e-6)
    assert recovered_fraction(rotated, e[:1], threshold=0.96) == 0.0
    assert recovered_fraction(rotated, e[:1], threshold=0.95) == 1.0
    with pytest.raises(ValueError, match="dim"):
        mmcs(torch.randn(4, 3), dirs)
