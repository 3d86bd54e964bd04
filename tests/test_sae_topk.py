"""TopK SAE: hand-computed forward, AuxK wiring (gradients reach the encoder, only dead latents), folding,
validation, learning."""

import pytest
import torch

from saekit.eval.synthetic import recovered_fraction, synthetic_activations
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
    sae(torch.randn(5, 6)).loss.backward()
    sae.before_optimizer_step()
    torch.testing.assert_close(
        (sae.W_dec.grad * sae.W_dec.detach()).sum(1), torch.zeros(12), atol=1e-6, rtol=0
    )
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(12))


def test_fold_input_scale_is_exact():
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=6, width=20, k=4))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, s = torch.randn(7, 6), 0.37
    f_before = sae.encode(s * x)
    dec_before = sae.decode(f_before)
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae.encode(x), f_before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f_before) * s, dec_before, rtol=1e-5, atol=1e-5)


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
    x, dirs = synthetic_activations(20_000, 16, 24, avg_active=2, seed=0)
    x *= (16 / x.pow(2).sum(1).mean()).sqrt()  # the trainer's normalisation: E‖x‖² = d
    sae = TopKSAE(TopKConfig(d_in=16, width=48, k=2))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    tokens_since_fired = torch.zeros(48)
    for step in range(400):
        batch = x[torch.randint(0, len(x), (256,))]
        out = sae(batch, StepContext(step=step, dead_mask=tokens_since_fired > 2_000))
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        tokens_since_fired += len(batch)
        tokens_since_fired[(out.f > 0).any(0)] = 0
    assert recovered_fraction(sae.W_dec, dirs) >= 0.8
