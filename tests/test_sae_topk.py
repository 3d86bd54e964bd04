"""TopK SAE: hand-computed forward, AuxK wiring (gradients reach the encoder, only dead latents), folding,
validation, learning."""

import pytest
import torch
from synthetic_training import (
    assert_decoder_hooks_keep_unit_norm,
    assert_fold_input_scale_exact,
    perturb_,
    synthetic_data,
    train_on_synthetic,
    with_dead_mask,
)

from saekit.eval.synthetic import recovered_fraction
from saekit.sae import StepContext, TopKConfig, TopKSAE
from saekit.sae.common import auxk_loss


def _hand_sae(k: int = 1) -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=2, width=3, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    return sae


def test_forward_hand_computed():
    sae = _hand_sae(k=1)
    out = sae(torch.tensor([[2.0, 1.0], [1.0, -1.0]]))
    # token 0: x - b_dec = [1, 1], pre = [1, 0.5, 0] -> top-1 = latent 0 (1.0); x_hat = [1, 0] + [1, 0]
    # token 1: x - b_dec = [0, -1], pre = [0, -1.5, 1] -> top-1 = latent 2 (1.0); x_hat = [0.6, 0.8] + [1, 0]
    torch.testing.assert_close(out.f, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[2.0, 0.0], [1.6, 0.8]]))
    expected_mse = ((0.0**2 + 1.0**2) + (0.6**2 + 1.8**2)) / 4
    assert out.losses["recon"].item() == pytest.approx(expected_mse)
    assert set(out.losses) == {"recon", "auxk"} and out.losses["auxk"].item() == 0.0  # no dead mask given
    assert out.metrics["l0"] == 1.0


def test_negative_selected_preacts_are_inactive():
    sae = _hand_sae(k=2)
    f = sae.encode(torch.tensor([[1.0, -1.0]]))  # pre = [0, -1.5, 1]: second-best is 0 -> ReLU -> 0
    torch.testing.assert_close(f, torch.tensor([[0.0, 0.0, 1.0]]))


def test_sparse_forward_matches_dense_encode_decode():
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=8, width=32, k=4))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(10, 8)
    out = sae(x)
    torch.testing.assert_close(out.f, sae.encode(x))
    torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x)))
    # gradients of the sparse path equal those of the dense formula
    dense_loss = (x - sae.decode(sae.encode(x))).pow(2).mean()
    g_dense = torch.autograd.grad(dense_loss, [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    g_sparse = torch.autograd.grad(out.losses["recon"], [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec])
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b)


def test_auxk_reaches_encoder_and_only_dead_latents():
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=8, width=32, k=4, k_aux=3))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 5, 8, 13, 21, 30]] = True
    x = torch.randn(16, 8)
    out = sae(x, StepContext(dead_mask=dead))
    # value: α · auxk_loss on this batch's pre-activations and detached residual
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = auxk_loss(pre, dead, x - out.x_hat, sae.W_dec, 3) / 32
    torch.testing.assert_close(out.losses["auxk"], expected)
    assert out.losses["auxk"].item() > 0
    grads = torch.autograd.grad(
        out.losses["auxk"], [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], allow_unused=True
    )
    g_W_enc, g_b_enc, g_W_dec, g_b_dec = grads
    assert g_W_enc[:, dead].abs().sum() > 0, "AuxK must train the dead latents' encoder columns"
    assert g_b_enc[dead].abs().sum() > 0
    assert g_W_enc[:, ~dead].abs().sum() == 0 and g_b_enc[~dead].abs().sum() == 0
    assert g_W_dec[dead].abs().sum() > 0 and g_W_dec[~dead].abs().sum() == 0
    # b_dec reaches AuxK only as the encoder's pre-bias of the dead latents (as in OpenAI's code): its
    # gradient is exactly -W_enc @ g_b_enc. A non-detached residual target would add a path through x_hat.
    torch.testing.assert_close(g_b_dec, -sae.W_enc.detach() @ g_b_enc)


def test_aux_coeff_zero_drops_the_term():
    sae = TopKSAE(TopKConfig(d_in=4, width=8, k=2, aux_coeff=0.0))
    out = sae(torch.randn(3, 4), StepContext(dead_mask=torch.ones(8, dtype=torch.bool)))
    assert set(out.losses) == {"recon"}


def test_constraint_hooks_keep_decoder_unit_norm():
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=6, width=12, k=3))
    assert_decoder_hooks_keep_unit_norm(sae, torch.randn(5, 6), stretch=2.0)


def test_fold_input_scale_is_exact():
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=6, width=20, k=4))
    perturb_(sae, 0.3)
    x, s = torch.randn(7, 6), 0.37
    assert_fold_input_scale_exact(sae, x, s)


@pytest.mark.parametrize(
    "kw, match",
    [({"k": 0}, "k must"), ({"k": 9}, "k must"), ({"aux_coeff": -0.1}, "aux_coeff"), ({"k_aux": 0}, "k_aux")],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        TopKConfig(**{"d_in": 4, "width": 8, "k": 2, **kw}).validate()
    assert TopKConfig(d_in=10, width=8, k=2).k_aux_resolved == 5


def test_learns_synthetic_features():
    torch.manual_seed(0)
    x, dirs = synthetic_data()
    sae = TopKSAE(TopKConfig(d_in=16, width=48, k=2))
    train_on_synthetic(sae, x, 400, with_dead_mask)
    assert recovered_fraction(sae.W_dec, dirs) >= 0.8


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_encoder_starts_as_scaled_decoder_transpose(scale):
    sae = TopKSAE(TopKConfig(d_in=6, width=10, k=2, init_encoder_scale=scale))
    torch.testing.assert_close(sae.W_enc.detach(), scale * sae.W_dec.detach().t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10))
    assert sae.W_enc.stride() == (1, 6)  # latent-major: the sparse backward's gradient layout


def test_encoder_starts_at_sparsifys_scale_by_default():
    sae = TopKSAE(TopKConfig(d_in=6, width=10, k=2))
    torch.testing.assert_close(sae.W_enc.detach().norm(dim=0), torch.full((10,), 3**-0.5))


def test_init_encoder_scale_must_be_positive():
    with pytest.raises(ValueError, match="init_encoder_scale"):
        TopKSAE(TopKConfig(d_in=6, width=10, k=2, init_encoder_scale=0.0))
