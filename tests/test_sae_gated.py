"""Gated SAE: hand-computed forward and losses, which loss term trains which parameter (the frozen-decoder
aux term, no gradient through the Heaviside), decoder constraint, folding, validation, learning."""

import math

import pytest
import torch
from synthetic_training import (
    assert_decoder_hooks_keep_unit_norm,
    assert_fold_input_scale_exact,
    perturb_,
    sparsity_warmup,
    synthetic_data,
    train_on_synthetic,
)

from saekit.eval.synthetic import recovered_fraction
from saekit.sae import GatedConfig, GatedSAE, StepContext


def _hand_sae() -> GatedSAE:
    sae = GatedSAE(GatedConfig(d_in=2, width=2, l1_coeff=0.1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_gate.copy_(torch.tensor([0.0, -2.0]))
        sae.r_mag.copy_(torch.tensor([math.log(2.0), 0.0]))
        sae.b_mag.copy_(torch.tensor([-0.5, 0.0]))
        sae.W_dec.copy_(torch.eye(2))
    return sae


def test_forward_hand_computed():
    sae = _hand_sae()
    out = sae(torch.tensor([[1.0, 1.0]]))
    # π_gate = [1, -1] -> gate [1, 0]; π_mag = [2·1 - 0.5, 1] = [1.5, 1]; f = [1.5, 0]; x_hat = [1.5, 0]
    torch.testing.assert_close(out.f, torch.tensor([[1.5, 0.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[1.5, 0.0]]))
    assert set(out.losses) == {"recon", "l1", "aux"}
    assert out.losses["recon"].item() == pytest.approx(0.25 + 1.0)
    assert out.losses["l1"].item() == pytest.approx(0.1 * 1.0)  # ‖ReLU(π_gate)‖₁ = 1
    assert out.losses["aux"].item() == pytest.approx(0.0 + 1.0)  # ReLU(π_gate) W_dec = [1, 0]
    assert out.metrics["l0"] == 1
    torch.testing.assert_close(sae.encode(torch.tensor([[1.0, 1.0]])), out.f)


def test_sparsity_scale_multiplies_l1():
    sae = _hand_sae()
    out = sae(torch.tensor([[1.0, 1.0]]), StepContext(sparsity_scale=0.25))
    assert out.losses["l1"].item() == pytest.approx(0.025)


def _grads(sae: GatedSAE, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    names = [n for n, _ in sae.named_parameters()]
    grads = torch.autograd.grad(loss, list(sae.parameters()), retain_graph=True, allow_unused=True)
    return {n: (None if g is None or g.abs().sum() == 0 else g) for n, g in zip(names, grads, strict=True)}


def test_each_loss_term_trains_what_the_paper_says():
    torch.manual_seed(0)
    sae = GatedSAE(GatedConfig(d_in=6, width=10))
    perturb_(sae, 0.2)
    out = sae(torch.randn(32, 6))
    recon, l1, aux = (_grads(sae, out.losses[k]) for k in ("recon", "l1", "aux"))
    # aux decodes through a frozen decoder: W_dec gets nothing; b_dec only what reaches it as the encoder's
    # pre-bias (x_c = x - b_dec, not stopped in the paper's Fig. 17): exactly -W_gate @ dL/db_gate
    assert aux["W_dec"] is None
    torch.testing.assert_close(aux["b_dec"], -sae.W_enc.detach() @ aux["b_gate"])
    assert aux["W_enc"] is not None and aux["b_gate"] is not None
    assert aux["r_mag"] is None and aux["b_mag"] is None
    # the Heaviside passes no gradient: recon never trains b_gate; it trains the magnitude path and decoder
    assert recon["b_gate"] is None
    assert all(recon[n] is not None for n in ("W_enc", "r_mag", "b_mag", "W_dec", "b_dec"))
    # the L1 acts on the gate path only
    assert l1["W_enc"] is not None and l1["b_gate"] is not None
    assert l1["r_mag"] is None and l1["b_mag"] is None and l1["W_dec"] is None


def test_aux_gradient_equals_frozen_decoder_formula():
    torch.manual_seed(0)
    sae = GatedSAE(GatedConfig(d_in=4, width=6))
    x = torch.randn(8, 4)
    out = sae(x)
    g = torch.autograd.grad(out.losses["aux"], sae.b_gate)[0]
    b_gate = sae.b_gate.detach().clone().requires_grad_(True)
    pi_gate = (x - sae.b_dec.detach()) @ sae.W_enc.detach() + b_gate
    x_frozen = torch.relu(pi_gate) @ sae.W_dec.detach() + sae.b_dec.detach()
    expected = torch.autograd.grad((x - x_frozen).pow(2).sum(-1).mean(), b_gate)[0]
    torch.testing.assert_close(g, expected)


def test_constraint_hooks_keep_decoder_unit_norm():
    torch.manual_seed(0)
    sae = GatedSAE(GatedConfig(d_in=5, width=7))
    assert_decoder_hooks_keep_unit_norm(sae, torch.randn(6, 5), stretch=3.0)


def test_fold_input_scale_is_exact():
    torch.manual_seed(0)
    sae = GatedSAE(GatedConfig(d_in=6, width=12))
    perturb_(sae, 0.3)
    x, s = torch.randn(9, 6), 4.2
    assert_fold_input_scale_exact(sae, x, s)


def test_validation():
    with pytest.raises(ValueError, match="l1_coeff"):
        GatedConfig(d_in=4, width=8, l1_coeff=-1.0).validate()


def test_learns_synthetic_features():
    torch.manual_seed(0)
    x, dirs = synthetic_data()
    sae = GatedSAE(GatedConfig(d_in=16, width=48, l1_coeff=3.0))
    train_on_synthetic(sae, x, 500, sparsity_warmup)
    assert recovered_fraction(sae.W_dec, dirs) >= 0.8
