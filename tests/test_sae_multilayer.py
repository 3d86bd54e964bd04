"""Multi-layer SAE: hand-computed forward (standardisation, top-k, per-layer FVU), invariance to each token's
scale and offset, AuxK wiring, decode's statistics, folding, save/load, validation, learning across layers."""

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
from saekit.sae import StepContext, load_sae, save_sae
from saekit.sae.common import auxk_loss
from saekit.sae.multilayer import MultiLayerConfig, MultiLayerSAE, standardize


def _hand_sae() -> MultiLayerSAE:
    sae = MultiLayerSAE(MultiLayerConfig(d_in=4, width=3, k=1, n_layers=2))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_pre.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
        sae.eps.zero_()  # exact arithmetic below; ε is covered by the folding and invariance tests
    return sae


def test_forward_hand_computed():
    sae = _hand_sae()
    # one row per layer: block 0 = layer 0, block 1 = layer 1
    out = sae(torch.tensor([[0.0, 0.0, 0.0, 4.0], [10.0, 2.0, 2.0, 2.0]]))
    # row 0: μ = 1, unbiased σ = 2, z = [-.5, -.5, -.5, 1.5]; z − b_pre = [-.5, -.5, -.5, 1];
    #   π = [1, -.5, -.5] → latent 0 = 1; ẑ = [0, 0, 0, 1] + b_pre = [0, 0, 0, 1.5]; x̂ = 2ẑ + 1 = [1, 1, 1, 4]
    # row 1: μ = 4, σ = 4, z = [1.5, -.5, -.5, -.5]; z − b_pre = [1.5, -.5, -.5, -1];
    #   π = [-1, 1.5, -.5] → latent 1 = 1.5; ẑ = [1.5, 0, 0, .5]; x̂ = 4ẑ + 4 = [10, 4, 4, 6]
    torch.testing.assert_close(out.f, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.5, 0.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[1.0, 1.0, 1.0, 4.0], [10.0, 4.0, 4.0, 6.0]]))
    # FVU_0 = mean([1, 1, 1, 0]) / var([0, 0, 0, 4]) = 0.75 / 4; FVU_1 = mean([0, 4, 4, 16]) / 16 = 6 / 16
    assert out.metrics["fvu_layer0"] == pytest.approx(0.1875)
    assert out.metrics["fvu_layer1"] == pytest.approx(0.375)
    assert out.losses["recon"].item() == pytest.approx((0.1875 + 0.375) / 2)  # not the pooled FVU, 0.3029
    assert out.losses["auxk"].item() == 0.0 and out.metrics["l0"] == 1.0  # no dead mask given


def test_layer_fvu_is_each_blocks_mse_over_its_variance():
    torch.manual_seed(0)
    sae = perturb_(MultiLayerSAE(MultiLayerConfig(d_in=6, width=12, k=2, n_layers=3)), 0.2)
    x = torch.randn(15, 6) * torch.tensor([1.0, 5.0, 0.2]).repeat_interleave(5)[:, None]
    out = sae(x)
    for layer in range(3):
        rows = slice(5 * layer, 5 * layer + 5)
        fvu = (x[rows] - out.x_hat[rows]).pow(2).mean() / x[rows].flatten().var()
        assert out.metrics[f"fvu_layer{layer}"] == pytest.approx(fvu.item(), rel=1e-5)
    assert out.losses["recon"].item() == pytest.approx(
        sum(out.metrics[f"fvu_layer{i}"] for i in range(3)) / 3
    )


def test_codes_ignore_each_tokens_scale_and_offset():
    torch.manual_seed(0)
    sae = perturb_(MultiLayerSAE(MultiLayerConfig(d_in=8, width=16, k=3)), 0.2)
    x = torch.randn(6, 8)
    a, c = torch.tensor([[0.5], [2.0], [10.0], [1.0], [3.0], [7.0]]), torch.randn(6, 1)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    torch.testing.assert_close(sae.encode(a * x + c), f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.decode(f), a * x_hat + c, rtol=1e-4, atol=1e-4)  # stats of a·x + c


def test_forward_matches_encode_decode_and_dense_gradients():
    torch.manual_seed(0)
    sae = perturb_(MultiLayerSAE(MultiLayerConfig(d_in=8, width=32, k=4, n_layers=2)), 0.1)
    x = torch.randn(10, 8) * 3 + 1
    out = sae(x)
    torch.testing.assert_close(out.f, sae.encode(x))
    torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x)))
    # the sparse decode's gradients equal those of the dense formula, written out here
    z, (mu, sigma) = standardize(x, sae.eps)
    f = sae.encode(x)
    x_hat = (f @ sae.W_dec + sae.b_pre) * sigma + mu
    fvu = [(x[i : i + 5] - x_hat[i : i + 5]).pow(2).mean() / x[i : i + 5].var() for i in (0, 5)]
    params = [sae.W_enc, sae.W_dec, sae.b_pre]
    g_dense = torch.autograd.grad(sum(fvu) / 2, params)
    g_sparse = torch.autograd.grad(out.losses["recon"], params)
    for a, b in zip(g_sparse, g_dense, strict=True):
        torch.testing.assert_close(a, b)


def test_auxk_is_shared_auxk_in_standardised_space_and_trains_only_dead_latents():
    torch.manual_seed(0)
    sae = perturb_(MultiLayerSAE(MultiLayerConfig(d_in=8, width=32, k=4, k_aux=3)), 0.1)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 5, 8, 13, 21, 30]] = True
    x = torch.randn(16, 8) * 4 - 2
    out = sae(x, StepContext(dead_mask=dead))
    z, (mu, sigma) = standardize(x, sae.eps)
    pre = (z - sae.b_pre) @ sae.W_enc
    z_hat = (out.x_hat - mu) / sigma
    torch.testing.assert_close(out.losses["auxk"], auxk_loss(pre, dead, z - z_hat, sae.W_dec, 3) / 32)
    assert out.losses["auxk"].item() > 0
    g_W_enc, g_W_dec = torch.autograd.grad(out.losses["auxk"], [sae.W_enc, sae.W_dec])
    assert g_W_enc[:, dead].abs().sum() > 0 and g_W_enc[:, ~dead].abs().sum() == 0
    assert g_W_dec[dead].abs().sum() > 0 and g_W_dec[~dead].abs().sum() == 0


def test_decode_needs_the_encoded_tokens_statistics():
    sae = MultiLayerSAE(MultiLayerConfig(d_in=4, width=8, k=2))
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    f = sae.encode(torch.randn(3, 4))
    with pytest.raises(ValueError, match="call encode"):
        sae.decode(f[:1])  # codes of 1 row after encoding 3
    f = sae.encode(x)
    _, stats = standardize(x, sae.eps)
    torch.testing.assert_close(sae.decode(f, stats), sae.decode(f))
    torch.testing.assert_close(MultiLayerSAE(sae.cfg).decode(torch.zeros(1, 8), stats), stats[0].expand(1, 4))


def test_init_puts_the_trainers_centre_in_standardised_space():
    sae = MultiLayerSAE(MultiLayerConfig(d_in=4, width=8, k=2))
    sae.init_from_data(torch.randn(5, 4), torch.tensor([0.0, 0.0, 0.0, 4.0]))
    torch.testing.assert_close(
        sae.b_pre.detach(), torch.tensor([-0.5, -0.5, -0.5, 1.5]), rtol=1e-4, atol=1e-4
    )
    sae.init_from_data(torch.randn(5, 4), torch.zeros(4))
    assert torch.equal(sae.b_pre.detach(), torch.zeros(4))


def test_constraint_hooks_keep_decoder_unit_norm():
    torch.manual_seed(0)
    sae = MultiLayerSAE(MultiLayerConfig(d_in=6, width=12, k=3))
    assert_decoder_hooks_keep_unit_norm(sae, torch.randn(5, 6), stretch=2.0)


def test_fold_input_scale_is_exact():
    torch.manual_seed(0)
    sae = perturb_(MultiLayerSAE(MultiLayerConfig(d_in=6, width=20, k=4)), 0.3)
    x = torch.randn(7, 6) * 1e-3  # σ ≈ ε: folding must scale ε too
    assert_fold_input_scale_exact(sae, x, 0.37)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = perturb_(MultiLayerSAE(MultiLayerConfig(d_in=6, width=12, k=3, n_layers=2)), 0.3)
    sae.fold_input_scale(4.0)
    sae.metadata = {"hooks": ["layers.0.resid_post", "layers.1.resid_post"]}
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert loaded.cfg == sae.cfg and loaded.metadata == sae.metadata
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.eps.item() == pytest.approx(1e-5 / 4)
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"k": 0}, "k must"),
        ({"k": 9}, "k must"),
        ({"n_layers": 0}, "n_layers"),
        ({"d_in": 1}, "d_in must be >= 2"),
        ({"k_aux": 0}, "k_aux"),
        ({"aux_coeff": -1.0}, "aux_coeff"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MultiLayerConfig(**{"d_in": 4, "width": 8, "k": 2, **kw}).validate()


def test_batch_must_hold_whole_layer_blocks():
    sae = MultiLayerSAE(MultiLayerConfig(d_in=4, width=8, k=2, n_layers=3))
    with pytest.raises(ValueError, match="3 equal per-layer blocks"):
        sae(torch.randn(7, 4))


def test_learns_features_shared_across_layers():
    """Two 'layers' carry the same features at different scales and offsets; standardisation makes them
    one dataset. The code sees each token minus its mean, so the truth is the directions' centred part."""
    torch.manual_seed(0)
    x, dirs = synthetic_data()
    layers = torch.cat([x[:10_000], 3 * x[10_000:] + 2])
    sae = MultiLayerSAE(MultiLayerConfig(d_in=16, width=48, k=2, n_layers=2))
    train_on_synthetic(sae, layers, 300, with_dead_mask)
    assert recovered_fraction(sae.W_dec, dirs - dirs.mean(dim=1, keepdim=True)) >= 0.9
    with torch.no_grad():
        out = sae(torch.cat([layers[:2000], layers[10_000:12_000]]))
    assert out.metrics["fvu_layer0"] < 0.25 and out.metrics["fvu_layer1"] < 0.25
