"""JumpReLU SAE: hand-computed forward and losses, the straight-through gradients inside the model
(including the ×θ chain-rule factor for log θ), the target-L0 variant, folding, validation, learning."""

import math

import pytest
import torch
from synthetic_training import (
    assert_fold_input_scale_exact,
    perturb_,
    sparsity_warmup,
    synthetic_data,
    train_on_synthetic,
)

from saekit.eval.synthetic import recovered_fraction
from saekit.sae import JumpReLUConfig, JumpReLUSAE, StepContext


def _hand_sae(**kw) -> JumpReLUSAE:
    sae = JumpReLUSAE(JumpReLUConfig(d_in=2, width=3, l0_coeff=0.1, **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.log_threshold.copy_(torch.log(torch.tensor([0.5, 0.5, 2.0])))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.0, 0.1]))
    return sae


def test_forward_hand_computed():
    sae = _hand_sae()
    out = sae(torch.tensor([[1.0, 0.2]]))
    # pre = [1, 0.2, 1.2] (no pre-encoder bias by default); θ = [0.5, 0.5, 2] -> f = [1, 0, 0] (no shrinkage)
    torch.testing.assert_close(out.f, torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[1.0, 0.1]]))
    assert set(out.losses) == {"recon", "l0"}
    assert out.losses["recon"].item() == pytest.approx(0.01)
    assert out.losses["l0"].item() == pytest.approx(0.1 * 1)
    assert out.metrics["l0"] == 1.0
    torch.testing.assert_close(sae.encode(torch.tensor([[1.0, 0.2]])), out.f)


def test_pre_encoder_bias_option():
    sae = _hand_sae(pre_enc_bias=True)
    # x - b_dec = [1, 0.1]: pre = [1, 0.1, 1.1]
    torch.testing.assert_close(sae.pre_acts(torch.tensor([[1.0, 0.2]])), torch.tensor([[1.0, 0.1, 1.1]]))


def test_target_l0_variant_and_sparsity_scale():
    sae = _hand_sae(target_l0=2.0)
    out = sae(torch.tensor([[1.0, 0.2]]), StepContext(sparsity_scale=0.5))
    # λ · d · (L0/target − 1)² with d = 2 (dictionary_learning's loss in saekit's E‖x‖² = d units)
    assert out.losses["l0"].item() == pytest.approx(0.5 * 0.1 * 2 * (1 / 2 - 1) ** 2)


def test_l0_term_trains_only_threshold_with_rectangle_ste_times_theta():
    torch.manual_seed(0)
    eps = 0.2
    sae = JumpReLUSAE(JumpReLUConfig(d_in=4, width=6, l0_coeff=0.7, bandwidth=eps, init_threshold=0.5))
    x = torch.randn(64, 4)
    out = sae(x)
    params = dict(sae.named_parameters())
    raw = torch.autograd.grad(out.losses["l0"], list(params.values()), allow_unused=True)
    grads = dict(zip(params, raw, strict=True))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert grads[name] is None or grads[name].abs().sum() == 0, name
    with torch.no_grad():
        pre = sae.pre_acts(x)
        theta = sae.threshold
        window = ((pre - theta) / eps).abs() < 0.5
        # d(λ·mean_n Σ_i H)/dθ_i = λ/N · Σ_n −(1/ε)K; the parameter is log θ, so ×θ
        expected = 0.7 / 64 * (-(1 / eps) * window).sum(0) * theta
    assert window.any()
    torch.testing.assert_close(grads["log_threshold"], expected)


def test_recon_term_reaches_threshold_through_jumprelu_ste():
    torch.manual_seed(0)
    eps = 0.3
    sae = JumpReLUSAE(JumpReLUConfig(d_in=4, width=6, bandwidth=eps, init_threshold=0.4))
    x = torch.randn(32, 4)
    out = sae(x)
    g_log_theta = torch.autograd.grad(out.losses["recon"], sae.log_threshold)[0]
    with torch.no_grad():
        pre = sae.pre_acts(x)
        theta = sae.threshold
        g_f = 2 * (out.x_hat - x) @ sae.W_dec.t() / 32  # dL/df for L = mean_n Σ_d (x̂ − x)²
        window = (((pre - theta) / eps).abs() < 0.5).float()
        expected = (-(theta / eps) * window * g_f).sum(0) * theta
    torch.testing.assert_close(g_log_theta, expected)


def test_init_and_threshold_parameterisation():
    sae = JumpReLUSAE(JumpReLUConfig(d_in=4, width=6, init_threshold=0.25))
    torch.testing.assert_close(sae.threshold, torch.full((6,), 0.25))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("pre_enc_bias", [False, True])
def test_fold_input_scale_is_exact(pre_enc_bias):
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUConfig(d_in=6, width=12, pre_enc_bias=pre_enc_bias, init_threshold=0.3))
    perturb_(sae, 0.3)
    x, s = torch.randn(9, 6), 1.9
    theta = sae.threshold.detach().clone()
    assert_fold_input_scale_exact(sae, x, s)
    torch.testing.assert_close(sae.threshold, theta)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"l0_coeff": -1.0}, "l0_coeff"),
        ({"target_l0": 0.0}, "target_l0"),
        ({"target_l0": 100.0}, "target_l0"),
        ({"bandwidth": 0.0}, "bandwidth"),
        ({"init_threshold": -0.1}, "init_threshold"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        JumpReLUConfig(**{"d_in": 4, "width": 8, **kw}).validate()


def test_default_threshold_is_log_parameterised():
    sae = JumpReLUSAE(JumpReLUConfig(d_in=4, width=8))
    assert sae.log_threshold[0].item() == pytest.approx(math.log(sae.cfg.init_threshold))


def test_learns_synthetic_features():
    torch.manual_seed(0)
    x, dirs = synthetic_data()
    sae = JumpReLUSAE(JumpReLUConfig(d_in=16, width=48))
    out = train_on_synthetic(sae, x, 600, sparsity_warmup)
    assert recovered_fraction(sae.W_dec, dirs) >= 0.8
    assert out.metrics["l0"] < 5  # the data's true L0 is 2


def test_target_l0_initialises_thresholds_at_the_target_firing_rate():
    """With target_l0, θ_i starts where latent i fires target/width of the time on the sample."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUConfig(d_in=16, width=64, target_l0=8))
    x = torch.randn(4096, 16)
    sae.init_from_data(x, torch.zeros(16))
    l0 = (sae.encode(x) != 0).sum(1).float().mean().item()
    assert abs(l0 - 8) < 0.5
    untouched = JumpReLUSAE(JumpReLUConfig(d_in=16, width=64, target_l0=8, init_threshold_from_data=False))
    untouched.init_from_data(x, torch.zeros(16))
    assert torch.allclose(untouched.threshold, torch.full((64,), 0.5))
