"""top-AFA SAE: the k* rule against brute force, a hand-computed forward and loss, gradients against finite
differences, AuxK wiring, decoder constraint, folding, validation, save/load, learning without choosing k."""

import math

import pytest
import torch
from synthetic_training import (
    assert_decoder_hooks_keep_unit_norm,
    assert_fold_input_scale_exact,
    perturb_,
    train_on_synthetic,
    with_dead_mask,
)
from torch.func import functional_call

from saekit.eval.synthetic import recovered_fraction, synthetic_activations
from saekit.sae import StepContext, get_architecture, load_sae, save_sae
from saekit.sae.common import auxk_loss
from saekit.sae.top_afa import TopAFAConfig, TopAFASAE, afa_select


def _hand_sae() -> TopAFASAE:
    """d = M = 3: W_enc = I, decoder rows e1, 2·e2, e3 (norms 1, 2, 1), b_dec = [1, -1, 0.5]."""
    sae = TopAFASAE(TopAFAConfig(d_in=3, width=3))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.W_dec.copy_(torch.diag(torch.tensor([1.0, 2.0, 1.0])))
        sae.b_dec.copy_(torch.tensor([1.0, -1.0, 0.5]))
    return sae


# x = x_c + b_dec; a = ReLU(x_c); c_i = (a_i ‖W_dec,i‖)²; T = ‖x_c‖
HAND_X = torch.tensor(
    [
        [4.0, 1.0, 0.5],  # x_c = [3, 2, 0]: c = [9, 16, 0], S = [4, 5], T = √13 = 3.61 -> k* = 1 (latent 1)
        [4.0, -0.5, 0.5],  # x_c = [3, .5, 0]: c = [9, 1, 0], S = [3, 3.162], T = √9.25 = 3.041 -> k* = 1
        [0.0, -3.0, -2.5],  # x_c = [-1, -2, -3]: a = 0, S = [0, 0], ties -> k* = 1, f = 0
        [5.0, 0.0, 1.5],  # x_c = [4, 1, 1]: c = [16, 4, 1], S = [4, 4.472], T = √18 = 4.243 -> k* = 2
    ]
)
HAND_F = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [4.0, 1.0, 0.0]])
HAND_X_HAT = torch.tensor([[1.0, 3.0, 0.5], [4.0, -1.0, 0.5], [1.0, -1.0, 0.5], [5.0, 1.0, 0.5]])


def test_registered():
    assert get_architecture("top_afa") is TopAFASAE


def test_forward_hand_computed():
    out = _hand_sae()(HAND_X)
    torch.testing.assert_close(out.f, HAND_F)
    torch.testing.assert_close(out.x_hat, HAND_X_HAT)
    # token 2 keeps only latent 0 although S_2 >= T: the rule is the closest S_k, not the first S_k >= T
    assert out.metrics["l0"] == pytest.approx(4 / 4)


def test_loss_hand_computed():
    sae = _hand_sae()
    out = sae(HAND_X)
    sq_err = [9 + 4 + 0, 0.25, 1 + 4 + 9, 0 + 1 + 1]
    assert out.losses["recon"].item() == pytest.approx(sum(sq_err) / 12)
    f_norms = [2.0, 3.0, 0.0, math.sqrt(17)]
    x_norms = [math.sqrt(17.25), math.sqrt(16.5), math.sqrt(15.25), math.sqrt(27.25)]
    afa = sum((f - x) ** 2 for f, x in zip(f_norms, x_norms, strict=True)) / 4 / 32
    assert out.losses["afa"].item() == pytest.approx(afa)
    assert out.losses["auxk"].item() == 0.0  # no dead mask given
    out.loss.backward()  # token 2 has f = 0: ‖f‖'s gradient there must not be NaN
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())


def test_centred_afa_target_uses_the_norm_k_star_matches():
    sae = _hand_sae()
    sae.cfg.afa_target = "centred"
    out = sae(HAND_X)
    f_norms = [2.0, 3.0, 0.0, math.sqrt(17)]
    xc_norms = [math.sqrt(13), math.sqrt(9.25), math.sqrt(14), math.sqrt(18)]  # ‖x − b_dec‖
    afa = sum((f - x) ** 2 for f, x in zip(f_norms, xc_norms, strict=True)) / 4 / 32
    assert out.losses["afa"].item() == pytest.approx(afa)


def test_select_excludes_k_equal_width_and_breaks_ties_low():
    a = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    keep = afa_select(a, torch.ones(3), torch.tensor([10.0, 1.0]))
    # token 0: S = [1, 1.41, (1.73)], T = 10: k = 3 would be closest but is excluded -> k* = 2, ties in c keep
    # index order; token 1: all S_k equal -> the smallest k
    assert keep.tolist() == [[True, True, False], [True, False, False]]


def test_selection_matches_brute_force():
    torch.manual_seed(0)
    m = 24
    sae = perturb_(TopAFASAE(TopAFAConfig(d_in=8, width=m)), 0.3)  # decoder norms no longer 1
    x = 2 * torch.randn(64, 8)
    f = sae.encode(x)
    with torch.no_grad():
        a = torch.relu((x - sae.b_dec) @ sae.W_enc)
        norms = sae.W_dec.norm(dim=1)
    for n in range(len(x)):
        c = [(a[n, i] * norms[i]).item() ** 2 for i in range(m)]
        order = sorted(range(m), key=lambda i: -c[i])
        target = (x[n] - sae.b_dec).norm().item()
        gaps = [abs(math.sqrt(sum(c[i] for i in order[:k])) - target) for k in range(1, m)]
        k_best = 1 + gaps.index(min(gaps))
        expected = torch.zeros(m)
        expected[order[:k_best]] = a[n, order[:k_best]]
        torch.testing.assert_close(f[n], expected, msg=f"token {n}")
    assert (f != 0).sum(1).unique().numel() > 3, "k* should vary across tokens"


def test_forward_matches_encode_decode_and_is_batch_independent():
    torch.manual_seed(1)
    sae = perturb_(TopAFASAE(TopAFAConfig(d_in=8, width=32)), 0.2)
    x = torch.randn(16, 8)
    out = sae(x)
    torch.testing.assert_close(out.f, sae.encode(x))
    torch.testing.assert_close(out.x_hat, sae.decode(out.f))
    torch.testing.assert_close(sae.encode(x[:3]), out.f[:3])


def test_gradients_match_finite_differences():
    """No custom autograd, but a selection inside: gradcheck recon + AFA in float64. Perturbations of 1e-6
    leave k* unchanged, so the loss is smooth where it is checked. (AuxK is left out: its residual target is
    detached on purpose, which test_auxk_wiring and tests/test_sae_common.py check.)"""
    torch.manual_seed(2)
    sae = perturb_(TopAFASAE(TopAFAConfig(d_in=5, width=12, aux_coeff=0.0)), 0.2).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    names = ["W_enc", "W_dec", "b_dec"]

    def loss(*params):
        out = functional_call(sae, dict(zip(names, params, strict=True)), (x,))
        assert out.losses["afa"] > 0
        return out.loss

    params = tuple(getattr(sae, n).detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5)


def test_only_kept_latents_get_reconstruction_gradient():
    torch.manual_seed(3)
    sae = TopAFASAE(TopAFAConfig(d_in=8, width=64, aux_coeff=0.0))
    x = torch.randn(4, 8)
    out = sae(x)
    assert set(out.losses) == {"recon", "afa"}
    g = torch.autograd.grad(out.loss, sae.W_enc)[0]
    never_kept = (out.f == 0).all(0)
    assert never_kept.any() and g[:, never_kept].abs().sum() == 0
    assert g[:, ~never_kept].abs().sum() > 0


def test_auxk_wiring():
    torch.manual_seed(4)
    sae = TopAFASAE(TopAFAConfig(d_in=8, width=32, k_aux=3))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[2, 5, 11, 30]] = True
    x = torch.randn(16, 8)
    out = sae(x, StepContext(dead_mask=dead))
    pre = (x - sae.b_dec) @ sae.W_enc
    torch.testing.assert_close(out.losses["auxk"], auxk_loss(pre, dead, x - out.x_hat, sae.W_dec, 3) / 32)
    assert out.losses["auxk"].item() > 0
    g = torch.autograd.grad(out.losses["auxk"], sae.W_enc)[0]
    assert g[:, dead].abs().sum() > 0 and g[:, ~dead].abs().sum() == 0


def test_constraint_hooks_keep_decoder_unit_norm():
    torch.manual_seed(5)
    assert_decoder_hooks_keep_unit_norm(TopAFASAE(TopAFAConfig(d_in=6, width=12)), torch.randn(5, 6), 2.0)


@pytest.mark.parametrize("s", [0.37, 4.0])
def test_fold_input_scale_is_exact(s):
    torch.manual_seed(6)
    sae = perturb_(TopAFASAE(TopAFAConfig(d_in=6, width=20)), 0.3)
    assert_fold_input_scale_exact(sae, torch.randn(7, 6), s)


def test_k_equal_width_is_never_chosen_at_any_input_scale():
    """With a weak positive encoder every S_k < T, so k* = width - 1 whatever the input scale. The
    reference's finite S_M = 1e4 would keep all latents for inputs with ‖x‖ ≈ 1e4 (raw activations of a
    folded SAE can be that large), so folding would change the code."""
    sae = TopAFASAE(TopAFAConfig(d_in=4, width=6))
    with torch.no_grad():
        sae.W_enc.copy_(0.01 * torch.rand(4, 6) + 0.001)
    x = torch.rand(5, 4) + 0.5  # positive inputs: every activation > 0
    for scale in (1.0, 1e4 / x.norm(dim=1).mean().item(), 1e7):
        assert ((sae.encode(scale * x) != 0).sum(1) == 5).all(), f"scale {scale}"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"width": 1}, "width >= 2"),
        ({"afa_coeff": -0.1}, "afa_coeff"),
        ({"aux_coeff": -1.0}, "aux_coeff"),
        ({"k_aux": 0}, "k_aux"),
        ({"afa_target": "mean"}, "afa_target"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        TopAFAConfig(**{"d_in": 4, "width": 8, **kw}).validate()


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(7)
    sae = perturb_(TopAFASAE(TopAFAConfig(d_in=6, width=16, afa_coeff=1 / 64, k_aux=7)), 0.3)
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert type(loaded) is TopAFASAE and loaded.cfg == sae.cfg
    want, got = sae.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    x = torch.randn(9, 6)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.decode(sae.encode(x)), sae.decode(sae.encode(x)), rtol=0, atol=0)


def test_learns_synthetic_features_without_choosing_k():
    """The paper's setting: quasi-orthogonal true features (32 directions in d = 64, 2 active per sample on
    average). Nothing sets k; top-AFA picks it per token from the norms. (In d = 16 with 24 features, where
    no dictionary is quasi-orthogonal, it learns a dense code instead: L0 ≈ 18 of 48, nothing recovered.)"""
    torch.manual_seed(0)
    x, dirs = synthetic_activations(20_000, 64, 32, avg_active=2, seed=0)
    x *= (64 / x.pow(2).sum(1).mean()).sqrt()  # the trainer's E‖x‖² = d
    sae = TopAFASAE(TopAFAConfig(d_in=64, width=64))
    train_on_synthetic(sae, x, 300, with_dead_mask)
    with torch.no_grad():
        l0 = (sae.encode(x[:4000]) != 0).sum(1).float()
    print(f"top-AFA on synthetic data: mean active {l0.mean():.2f}, median {l0.median():.0f} (true 2)")
    assert recovered_fraction(sae.W_dec, dirs) >= 0.9
    assert 1.0 <= l0.mean().item() <= 16.0
