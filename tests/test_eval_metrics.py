"""Each metric against a hand-computed case, and the accumulator against the plain functions."""

import math

import numpy as np
import pytest
import torch

from saekit.eval import metrics as M

# Two tokens in d = 2, hand-checkable:
#   x  = [[1, 0], [3, 4]]      x̂ = [[1, 1], [3, 0]]
#   errors: ‖(0,-1)‖² = 1, ‖(0,4)‖² = 16  → Σ = 17
#   x̄ = (2, 2); ‖x − x̄‖²: (1+4) + (1+4) = 10
X = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
XH = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
F = torch.tensor([[0.0, 2.0, 0.0], [-1.0, 0.5, 0.0]])


def test_mse_divides_by_n_times_d_only():
    assert M.mse(X, XH) == pytest.approx(17 / 4)
    # Duplicating the batch must not change the MSE (no division by the batch size).
    assert M.mse(torch.cat([X, X]), torch.cat([XH, XH])) == pytest.approx(17 / 4)


def test_fvu_and_explained_variance_hand_case():
    assert M.fvu(X, XH) == pytest.approx(17 / 10)
    assert M.explained_variance(X, XH) == pytest.approx(1 - 17 / 10)


def test_fvu_is_centred():
    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64)
    x_hat = x + 0.1 * torch.randn(64, 8, dtype=torch.float64)
    offset = 100.0 * torch.randn(8, dtype=torch.float64)
    assert M.fvu(x + offset, x_hat + offset) == pytest.approx(M.fvu(x, x_hat), rel=1e-9)
    # An uncentred definition would drop sharply with the offset; check the value is a real centred FVU.
    expected = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert M.fvu(x + offset, x_hat + offset) == pytest.approx(expected, rel=1e-9)


def test_ev_per_token_hand_case():
    # per token: 1 − 1/5 and 1 − 16/5, mean = (0.8 − 2.2)/2 = −0.7
    assert M.ev_per_token(X, XH) == pytest.approx(-0.7)
    # With an explicit centre (0, 0): 1 − 1/1 and 1 − 16/25 → mean 0.18
    assert M.ev_per_token(X, XH, center=torch.zeros(2)) == pytest.approx(0.18)


def test_nmse_cosine_l2_ratio_gamma_hand_case():
    assert M.nmse(X, XH) == pytest.approx((1 / 1 + 16 / 25) / 2)
    # cos: (1·1)/(1·√2) and (9)/(5·3)
    assert M.cosine(X, XH) == pytest.approx((1 / math.sqrt(2) + 9 / 15) / 2)
    assert M.l2_ratio(X, XH) == pytest.approx((math.sqrt(2) / 1 + 3 / 5) / 2)
    # γ = E‖x̂‖² / E⟨x,x̂⟩ = (2 + 9) / (1 + 9), a ratio of means, not a mean of ratios (2 and 1 → 1.5).
    assert M.gamma(X, XH) == pytest.approx(11 / 10)
    assert M.gamma(X, 0.5 * X) == pytest.approx(0.5)  # shrinkage shows as γ < 1


def test_sparsity_hand_case():
    assert M.l0(F) == pytest.approx(1.5)
    assert M.l1(F) == pytest.approx(3.5 / 2)
    np.testing.assert_allclose(M.firing_frequencies(F), [0.5, 1.0, 0.0])


def test_density_histogram_counts_dead_apart():
    h = M.density_histogram(np.array([0.0, 0.0, 1e-3, 1e-3, 0.5, 1.0, 1e-12]))
    assert h["n_dead"] == 2
    assert sum(h["counts"]) == 5  # 1e-12 is clipped into the first bin, 1.0 into the last
    assert h["counts"][0] == 1 and h["counts"][-1] == 1 and h["counts"][-2] == 1  # log10(0.5) ≈ −0.30


def test_accumulator_matches_hand_case_and_functions():
    st = M.ReconstructionStats()
    st.update(X, XH, F)
    r = st.result()
    assert r["n_tokens"] == 2
    assert r["mse"] == pytest.approx(17 / 4)
    assert r["fvu"] == pytest.approx(1.7)
    assert r["explained_variance"] == pytest.approx(-0.7)
    assert r["ev_per_token"] == pytest.approx(-0.7)
    assert r["nmse"] == pytest.approx(M.nmse(X, XH))
    assert r["cosine"] == pytest.approx(M.cosine(X, XH))
    assert r["l2_ratio"] == pytest.approx(M.l2_ratio(X, XH))
    assert r["relative_reconstruction_bias"] == pytest.approx(1.1)
    assert r["l0"] == pytest.approx(1.5) and r["l1"] == pytest.approx(1.75)
    assert r["dead_fraction"] == pytest.approx(1 / 3)
    assert r["dense_fraction"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(r["firing_frequencies"], [0.5, 1.0, 0.0])
    assert r["density_histogram"]["n_dead"] == 1


def _random_set(n=300, d=16, m=40, offset=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + offset
    x_hat = 0.9 * x + 0.3 * torch.randn(n, d, generator=g)
    f = torch.relu(torch.randn(n, m, generator=g) - 1.0)
    f[:, :3] = 0  # some dead latents
    return x, x_hat, f


SPLIT_INVARIANT_KEYS = (
    *("mse", "fvu", "ev_per_token", "nmse", "cosine", "l2_ratio"),
    *("relative_reconstruction_bias", "l0", "l1"),
)


@pytest.mark.parametrize("splits", [[300], [1, 299], [100, 100, 100], [7, 50, 3, 240]])
def test_accumulator_is_batch_split_invariant(splits):
    x, x_hat, f = _random_set()
    center = x.double().mean(0)
    ref = M.ReconstructionStats(center=center)
    ref.update(x, x_hat, f)
    want = ref.result()
    st = M.ReconstructionStats(center=center)
    start = 0
    for size in splits:
        st.update(x[start : start + size], x_hat[start : start + size], f[start : start + size])
        start += size
    got = st.result()
    for key in SPLIT_INVARIANT_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key
    assert got["dead_fraction"] == want["dead_fraction"] == pytest.approx(3 / 40)
    # And the one-shot accumulator agrees with the plain functions on the whole set.
    assert want["fvu"] == pytest.approx(M.fvu(x, x_hat), rel=1e-10)
    assert want["mse"] == pytest.approx(M.mse(x, x_hat), rel=1e-10)
    assert want["ev_per_token"] == pytest.approx(M.ev_per_token(x, x_hat), rel=1e-10)
    assert want["relative_reconstruction_bias"] == pytest.approx(M.gamma(x, x_hat), rel=1e-10)
    assert want["l0"] == pytest.approx(M.l0(f), rel=1e-12)


def test_accumulator_centred_variance_is_stable_under_large_offset():
    # float32 inputs with offset 1e4: Σ‖x‖² − N‖x̄‖² would lose most digits; Chan's merge must not.
    x, x_hat, _ = _random_set(offset=0.0)
    x_hat = x + 0.05 * torch.randn_like(x)
    want = M.fvu(x, x_hat)
    big = 1e4
    st = M.ReconstructionStats()
    for i in range(0, 300, 30):
        st.update(x[i : i + 30] + big, x_hat[i : i + 30] + big)
    assert st.result()["fvu"] == pytest.approx(want, rel=1e-3)
    assert st.result()["l0"] is None  # no latents given → no sparsity metrics


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same shape"):
        M.fvu(X, XH[:1])
    st = M.ReconstructionStats()
    with pytest.raises(ValueError, match="before any tokens"):
        st.result()
    st.update(X, XH, F)
    with pytest.raises(ValueError, match="width changed"):
        st.update(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tokens"):
        st.update(X, XH, F[:1])


def test_hierarchical_children_fire_only_with_their_parent():
    from saekit.eval.synthetic import hierarchical_activations

    # With fewer features than dimensions the directions are independent, so least squares reads each
    # feature's magnitude back from x exactly.
    x, dirs, parent = hierarchical_activations(4000, 32, 3, 4, parent_prob=0.3, child_prob=0.5, seed=0)
    assert dirs.shape == (15, 32) and parent.tolist() == [-1] * 3 + [0] * 4 + [1] * 4 + [2] * 4
    coef = torch.linalg.lstsq(dirs.T, x.T).solution.T  # (N, F) magnitudes
    fires = coef > 1e-4
    for child in range(3, 15):
        assert not (fires[:, child] & ~fires[:, parent[child]]).any()
    assert abs(fires[:, :3].float().mean().item() - 0.3) < 0.03
    assert abs(fires[:, 3:].float().mean().item() - 0.15) < 0.03
