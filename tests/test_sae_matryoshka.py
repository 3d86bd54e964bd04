"""Matryoshka SAE: group rounding, the hand-computed nested loss (weightings, bias level), the sparse prefix
decode against dense autograd, Nabeshima's random prefixes, prefix truncation at inference, AuxK on the
full residual, the batch-independent threshold, save/load, folding, validation, and learning a hierarchy
(parents in the first group, children in the later one)."""

import pytest
import torch
from synthetic_training import (
    assert_decoder_hooks_keep_unit_norm,
    assert_fold_input_scale_exact,
    perturb_,
    train_on_synthetic,
    with_dead_mask,
)

from saekit.eval.synthetic import hierarchical_activations, mmcs
from saekit.sae import BatchTopKSAE, StepContext, get_architecture, load_sae, save_sae
from saekit.sae.common import auxk_loss
from saekit.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE


def _sae(**kw) -> MatryoshkaSAE:
    return MatryoshkaSAE(MatryoshkaConfig(**{"d_in": 6, "width": 20, "k": 3, **kw}))


def _hand_sae(**kw) -> MatryoshkaSAE:
    """d = 2, width 4 in groups [1, 1, 2] (prefix ends 1, 2, 4), k = 2."""
    sae = MatryoshkaSAE(MatryoshkaConfig(d_in=2, width=4, k=2, group_fractions=[0.25, 0.25, 0.5], **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, -1.0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    return sae


HAND_X = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
# x − b_dec = [2, 1] and [0, 2]  ->  pre = [2, 1, 3, −1] and [0, 2, 2, −2].
# BatchTopK keeps the top k·N = 4 of the 8 pre-activations: 3, 2 (token 0) and 2, 2 (token 1); the next is 1.
HAND_F = torch.tensor([[2.0, 0.0, 3.0, 0.0], [0.0, 2.0, 2.0, 0.0]])
# prefix 1 (latent 0):    x̂ = [3, 0], [1, 0]          squared errors 1, 4        MSE 5/4
# prefix 2 (latents 0-1): x̂ = [3, 0], [1, 2]          squared errors 1, 0        MSE 1/4
# prefix 4 (all):         x̂ = [4.8, 2.4], [2.2, 3.6]  squared errors 5.2, 4      MSE 9.2/4
# bias level (b_dec only): squared errors 5, 4                                    MSE 9/4
HAND_MSE = [5 / 4, 1 / 4, 9.2 / 4]
HAND_MSE_BIAS = 9 / 4


def test_registered_and_built_on_batchtopk():
    assert get_architecture("matryoshka") is MatryoshkaSAE
    assert issubclass(MatryoshkaSAE, BatchTopKSAE)


def test_group_ends_are_rounded_cumulative_fractions():
    # default fractions 1/16, 1/16, 1/8, 1/4, 1/2 of 36: cumulative 2.25, 4.5, 9, 18, 36 -> 2, 5, 9, 18, 36
    assert MatryoshkaConfig(d_in=4, width=36).group_ends == [2, 5, 9, 18, 36]
    assert MatryoshkaConfig(d_in=4, width=4, k=2, group_fractions=[0.25, 0.25, 0.5]).group_ends == [1, 2, 4]
    ends = MatryoshkaConfig(d_in=4, width=1000, group_fractions=[0.3, 0.3, 0.4]).group_ends
    assert ends == [300, 600, 1000]


def test_nested_loss_hand_computed():
    sae = _hand_sae()
    out = sae(HAND_X)
    torch.testing.assert_close(out.f, HAND_F)
    torch.testing.assert_close(out.x_hat, torch.tensor([[4.8, 2.4], [2.2, 3.6]]))
    assert out.losses["recon"].item() == pytest.approx(sum(HAND_MSE) / 3)
    assert {k: round(float(v), 6) for k, v in out.metrics.items() if k.startswith("mse")} == {
        "mse_w1": 1.25,
        "mse_w2": 0.25,
        "mse_w4": 2.3,
    }
    assert float(out.metrics["l0"]) == 2.0
    assert sae.threshold.item() == pytest.approx(2.0)  # the smallest kept activation (BatchTopK's θ)
    assert out.losses["auxk"].item() == 0.0  # no dead mask given


def test_level_weighting_and_bias_level_hand_computed():
    inverse = _hand_sae(level_weighting="inverse")(HAND_X).losses["recon"].item()
    w = [1, 1 / 2, 1 / 3]
    assert inverse == pytest.approx(sum(wi * m for wi, m in zip(w, HAND_MSE, strict=True)) / sum(w))
    with_bias = _hand_sae(bias_level=True)(HAND_X).losses["recon"].item()
    assert with_bias == pytest.approx((HAND_MSE_BIAS + sum(HAND_MSE)) / 4)
    both = _hand_sae(bias_level=True, level_weighting="inverse")(HAND_X).losses["recon"].item()
    w = [1, 1 / 2, 1 / 3, 1 / 4]
    mses = [HAND_MSE_BIAS, *HAND_MSE]
    assert both == pytest.approx(sum(wi * m for wi, m in zip(w, mses, strict=True)) / sum(w))


def _dense_recon(sae: MatryoshkaSAE, x: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """The loss written plainly: a dense decode of each prefix of the selected code."""
    pre = sae.pre_acts(x)
    vals, flat = pre.flatten().topk(sae.cfg.k * x.shape[0])
    f = torch.zeros_like(pre).flatten().scatter(0, flat, torch.relu(vals)).view_as(pre)
    mses = [(x - (f[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).mean() for m in ends]
    if sae.cfg.bias_level:
        mses = [(x - sae.b_dec).pow(2).mean(), *mses]
    w = sae.level_weights(len(mses))
    return sum(wi * m for wi, m in zip(w, mses, strict=True))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"level_weighting": "inverse", "bias_level": True},
        {"prefixes": "random", "n_random_prefixes": 5},
    ],
)
def test_sparse_prefix_decode_matches_dense_autograd(kw):
    torch.manual_seed(0)
    sae = perturb_(_sae(group_fractions=[0.1, 0.15, 0.25, 0.5], **kw), 0.3)
    x = torch.randn(12, 6)
    torch.manual_seed(7)
    ends = sae.prefix_ends().tolist()
    torch.manual_seed(7)  # the forward draws the same random prefixes
    out = sae(x)
    dense = _dense_recon(sae, x, ends)
    torch.testing.assert_close(out.losses["recon"], dense)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    for a, b in zip(
        torch.autograd.grad(out.losses["recon"], params), torch.autograd.grad(dense, params), strict=True
    ):
        torch.testing.assert_close(a, b)


def test_random_prefix_ends_follow_nabeshimas_distribution():
    sae = _sae(width=11, prefixes="random", n_random_prefixes=2, min_prefix_length=3)
    torch.manual_seed(0)
    n = 5_000
    counts = torch.zeros(11)
    for _ in range(n):
        ends = sae.prefix_ends()
        assert len(ends) == 2 and ends[-1] == 11
        counts[ends[0]] += 1
    # P(m) = ((m − 2)^p − (m − 3)^p) / 8^p on m₀ = 3 ≤ m ≤ 10, p = 0.5; M = 11 is always added
    m = torch.arange(3, 11, dtype=torch.float64)
    want = ((m - 2).sqrt() - (m - 3).sqrt()) / 8**0.5
    assert counts[:3].sum() == 0
    torch.testing.assert_close(counts[3:].double() / n, want, atol=0.02, rtol=0)


def test_random_prefix_ends_are_distinct_sorted_and_respect_min_length():
    sae = _sae(width=30, prefixes="random", n_random_prefixes=8, min_prefix_length=4)
    torch.manual_seed(0)
    for _ in range(200):
        ends = sae.prefix_ends().tolist()
        assert len(ends) == 8 and ends[-1] == 30
        assert ends == sorted(set(ends)) and ends[0] >= 4 and ends[-2] < 30
    # n_random_prefixes = 1: only the full width (a plain BatchTopK loss)
    assert _sae(prefixes="random", n_random_prefixes=1).prefix_ends().tolist() == [20]


def test_random_prefixes_report_no_per_prefix_metrics():
    torch.manual_seed(0)
    out = _sae(prefixes="random", n_random_prefixes=4)(torch.randn(8, 6))
    assert set(out.metrics) == {"l0"}  # names would change every step


def test_prefix_reads_only_its_latents():
    torch.manual_seed(0)
    sae = perturb_(_sae(group_fractions=[0.25, 0.25, 0.5]), 0.3)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    x = torch.randn(9, 6)
    g = 7  # not a group end (5, 10, 20)
    f_g, x_hat_g = sae.encode(x, width=g), sae.decode(sae.encode(x, width=g), width=g)
    assert (f_g[:, g:] == 0).all() and (f_g[:, :g] != 0).any()
    torch.testing.assert_close(f_g[:, :g], sae.encode(x)[:, :g])  # the full code, truncated
    with torch.no_grad():  # latents >= g change completely
        sae.W_dec[g:] = torch.randn(20 - g, 6)
        sae.W_enc[:, g:] = torch.randn(6, 20 - g)
        sae.b_enc[g:] = 5.0
    torch.testing.assert_close(sae.encode(x, width=g), f_g)
    torch.testing.assert_close(sae.decode(f_g, width=g), x_hat_g)
    torch.testing.assert_close(sae.decode(f_g[:, :g], width=g), x_hat_g)  # a (N, g) code is accepted
    torch.testing.assert_close(sae.decode(sae.encode(x, width=0), width=0), sae.b_dec.expand(9, 6))
    with pytest.raises(ValueError, match="prefix width"):
        sae.encode(x, width=21)


def test_truncation_before_threshold_zeroes_after_topk_selection():
    torch.manual_seed(0)
    sae = perturb_(_sae(k=4), 0.3)
    assert sae.threshold.item() < 0  # not estimated: encode selects the per-token top-k of all latents
    x = torch.randn(9, 6)
    f = sae.encode(x)
    f_g = sae.encode(x, width=10)
    torch.testing.assert_close(f_g, torch.cat([f[:, :10], torch.zeros(9, 10)], dim=1))
    assert (f_g != 0).sum() < (f != 0).sum()  # nothing re-selected among the first 10


def test_threshold_makes_encode_batch_independent():
    torch.manual_seed(0)
    sae = perturb_(_sae(), 0.3)
    sae(torch.randn(64, 6))  # a training forward estimates θ
    assert sae.threshold.item() > 0
    x = torch.randn(16, 6)
    f = sae.encode(x)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(f, pre * (pre > sae.threshold))
    torch.testing.assert_close(sae.encode(x[:3]), f[:3])
    torch.testing.assert_close(sae.encode(x[5:6], width=9), sae.encode(x, width=9)[5:6])


def test_auxk_uses_full_residual_and_reaches_dead_latents():
    torch.manual_seed(0)
    sae = perturb_(_sae(k_aux=4), 0.3)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[1, 6, 17]] = True
    x = torch.randn(10, 6)
    out = sae(x, StepContext(dead_mask=dead))
    want = auxk_loss(sae.pre_acts(x), dead, x - out.x_hat, sae.W_dec, 4) / 32
    torch.testing.assert_close(out.losses["auxk"], want)
    assert out.losses["auxk"].item() > 0
    g = torch.autograd.grad(out.losses["auxk"], sae.W_enc)[0]
    assert g[:, dead].abs().sum() > 0 and g[:, ~dead].abs().sum() == 0


def test_constraint_hooks_keep_decoder_unit_norm():
    torch.manual_seed(0)
    assert_decoder_hooks_keep_unit_norm(_sae(), torch.randn(5, 6), stretch=2.0)


def test_fold_input_scale_is_exact_at_every_width():
    torch.manual_seed(0)
    sae = perturb_(_sae(), 0.3)
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    x, s = torch.randn(7, 6), 2.5
    f_before = sae.encode(s * x, width=8)
    dec_before = sae.decode(f_before, width=8)
    assert_fold_input_scale_exact(sae, x, s)
    torch.testing.assert_close(sae.encode(x, width=8), f_before)
    torch.testing.assert_close(sae.decode(f_before, width=8) * s, dec_before)
    assert sae.threshold.item() == pytest.approx(0.25)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = perturb_(_sae(group_fractions=[0.2, 0.3, 0.5], level_weighting="inverse", bias_level=True), 0.3)
    sae(torch.randn(32, 6))  # sets θ
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert isinstance(loaded, MatryoshkaSAE) and loaded.cfg == sae.cfg
    assert loaded.threshold.item() == sae.threshold.item() > 0
    sae.eval()
    x = torch.randn(11, 6)
    for width in (None, 4, 13):
        assert torch.equal(loaded.encode(x, width=width), sae.encode(x, width=width))
        f = sae.encode(x, width=width)
        assert torch.equal(loaded.decode(f, width=width), sae.decode(f, width=width))
    assert torch.equal(loaded(x).losses["recon"], sae(x).losses["recon"])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"group_fractions": [0.5, 0.4]}, "sum to 1"),
        ({"group_fractions": [1.2, -0.2]}, "positive"),
        ({"group_fractions": []}, "group_fractions"),
        ({"width": 8, "group_fractions": [0.05, 0.95]}, "too small"),
        ({"level_weighting": "linear"}, "level_weighting"),
        ({"prefixes": "all"}, "prefixes"),
        ({"prefixes": "random", "n_random_prefixes": 21}, "n_random_prefixes"),
        ({"prefixes": "random", "n_random_prefixes": 0}, "n_random_prefixes"),
        ({"prefixes": "random", "min_prefix_length": 20}, "min_prefix_length"),
        ({"prefixes": "random", "pareto_power": 0.0}, "pareto_power"),
        ({"k": 0}, "k must"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MatryoshkaConfig(**{"d_in": 6, "width": 20, "k": 3, **kw}).validate()


def test_random_prefix_options_are_ignored_with_fixed_groups():
    MatryoshkaConfig(d_in=2, width=4, k=1, group_fractions=[0.5, 0.5], n_random_prefixes=50).validate()


def test_learns_parents_in_first_group_and_children_later():
    """4 parents with 3 children each (a child fires only with its parent). With a first group of 4
    latents, those latents must reconstruct alone, so they take the parents; the children go to the later
    group. (A child's latent there is the child minus the share of it that its parent's latent absorbed.)"""
    n_parents, d = 4, 16
    x, dirs, parent = hierarchical_activations(20_000, d, n_parents, 3, parent_prob=0.25, child_prob=0.2)
    x *= (d / x.pow(2).sum(1).mean()).sqrt()
    parents, children = dirs[parent < 0], dirs[parent >= 0]
    torch.manual_seed(0)
    sae = MatryoshkaSAE(MatryoshkaConfig(d_in=d, width=32, k=2, group_fractions=[1 / 8, 7 / 8]))
    train_on_synthetic(sae, x, 400, with_dead_mask)
    first, later = sae.W_dec[:n_parents], sae.W_dec[n_parents:]
    assert mmcs(first, parents) >= 0.9
    assert mmcs(later, children) >= 0.8
    assert mmcs(first, children) <= 0.5
    cos_MF = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ parents.t()
    assert (cos_MF.argmax(0) < n_parents).all(), "every parent's best latent is in the first group"
