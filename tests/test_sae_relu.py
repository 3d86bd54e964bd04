"""ReLU + L1 SAE: hand-computed forward and losses, decoder-norm modes, tying, folding, learning."""

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
from saekit.sae import ReLUConfig, ReLUSAE, SAEConfig, StepContext


def _hand_sae(**kw) -> ReLUSAE:
    sae = ReLUSAE(ReLUConfig(d_in=2, width=3, l1_coeff=0.1, **kw))
    with torch.no_grad():
        if not sae.cfg.tied:
            sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    return sae


def test_forward_hand_computed_constrained():
    sae = _hand_sae()
    x = torch.tensor([[2.0, 1.0]])
    out = sae(x)
    # x - b_dec = [1, 1]; pre = [1, 0.5, 0]; f = [1, 0.5, 0]; x_hat = [2, 0.5] + [1, 0] = [3, 0.5]
    torch.testing.assert_close(out.f, torch.tensor([[1.0, 0.5, 0.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[3.0, 0.5]]))
    assert set(out.losses) == {"recon", "l1"}
    assert out.losses["recon"].item() == pytest.approx(1.0 + 0.25)
    assert out.losses["l1"].item() == pytest.approx(0.1 * 1.5)
    assert out.metrics["l0"] == 2
    torch.testing.assert_close(out.loss, out.losses["recon"] + out.losses["l1"])


def test_weighted_l1_uses_decoder_norms_and_sparsity_scale():
    sae = _hand_sae(decoder_norm="weighted")
    out = sae(torch.tensor([[2.0, 1.0]]), StepContext(sparsity_scale=0.5))
    # f·‖W_dec,i‖ = 1·2 + 0.5·1 + 0·1 = 2.5
    assert out.losses["l1"].item() == pytest.approx(0.5 * 0.1 * 2.5)


def test_constraint_hooks_only_in_constrained_mode():
    for mode, expect_unit in (("constrained", True), ("weighted", False)):
        sae = _hand_sae(decoder_norm=mode)
        sae(torch.randn(4, 2)).loss.backward()
        sae.before_optimizer_step()
        sae.after_optimizer_step()
        is_unit = torch.allclose(sae.W_dec.norm(dim=1), torch.ones(3))
        assert is_unit == expect_unit


def test_tied_encoder_is_decoder_transpose_and_has_no_W_enc_parameter():
    sae = _hand_sae(tied=True)
    names = {n for n, _ in sae.named_parameters()}
    assert "W_enc" not in names and "enc_scale" in dict(sae.named_buffers())
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    x = torch.randn(5, 2)
    torch.testing.assert_close(sae.encode(x), torch.relu((x - sae.b_dec) @ sae.W_dec.t() + sae.b_enc))


@pytest.mark.parametrize("kw", [{}, {"tied": True}, {"decoder_norm": "weighted"}])
def test_fold_input_scale_is_exact(kw):
    torch.manual_seed(0)
    sae = ReLUSAE(ReLUConfig(d_in=6, width=10, **kw))
    perturb_(sae, 0.3)
    x, s = torch.randn(7, 6), 3.7
    assert_fold_input_scale_exact(sae, x, s)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"l1_coeff": -1.0}, "l1_coeff"),
        ({"decoder_norm": "free"}, "decoder_norm"),
        ({"width": 0}, "width"),
    ],
)
def test_validation(kw, match):
    base = {"d_in": 4, "width": 8}
    with pytest.raises(ValueError, match=match):
        ReLUConfig(**{**base, **kw}).validate()


def test_config_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="l1_cof"):
        ReLUConfig.from_dict({"d_in": 4, "width": 8, "l1_cof": 1.0})
    with pytest.raises(ValueError, match="width"):
        ReLUConfig.from_dict({"d_in": 4})
    assert isinstance(ReLUConfig.from_dict({"d_in": 4, "width": 8}), SAEConfig)


def test_learns_synthetic_features():
    torch.manual_seed(0)
    x, dirs = synthetic_data()
    sae = ReLUSAE(ReLUConfig(d_in=16, width=48, l1_coeff=1.0))
    out = train_on_synthetic(sae, x, 400, sparsity_warmup)
    assert recovered_fraction(sae.W_dec, dirs) >= 0.8
    assert out.metrics["l0"] < 10  # sparse: the data's true L0 is 2 (of 24 features, 48 latents)
