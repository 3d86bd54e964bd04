"""BatchTopK SAE: batch-level selection (exactly k·B non-zeros), the inference threshold θ and its EMA,
batch-independent encode, AuxK wiring, folding, validation, learning."""

import pytest
import torch
from synthetic_training import (
    assert_fold_input_scale_exact,
    perturb_,
    synthetic_data,
    train_on_synthetic,
    with_dead_mask,
)

from saekit.eval.synthetic import recovered_fraction
from saekit.sae import BatchTopKConfig, BatchTopKSAE, StepContext, TopKSAE


def _identity_sae(k: int, threshold_lr: float = 0.01) -> BatchTopKSAE:
    sae = BatchTopKSAE(BatchTopKConfig(d_in=3, width=3, k=k, threshold_lr=threshold_lr))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.W_dec.copy_(torch.eye(3))
    return sae


def test_shares_topk_code():
    assert issubclass(BatchTopKSAE, TopKSAE)


def test_selection_is_over_the_batch_and_sets_threshold():
    sae = _identity_sae(k=2)
    x = torch.tensor([[3.0, 2.0, 1.0], [0.5, 0.1, 0.2]])
    out = sae(x)
    # top 2·2 = 4 of the flattened batch: 3, 2, 1 (token 0) and 0.5 (token 1)
    torch.testing.assert_close(out.f, torch.tensor([[3.0, 2.0, 1.0], [0.5, 0.0, 0.0]]))
    torch.testing.assert_close(out.x_hat, out.f)
    assert out.metrics["l0"] == 2.0
    assert sae.threshold.item() == pytest.approx(0.5)  # first estimate: the batch's smallest kept activation
    # EMA afterwards: θ <- 0.99 θ + 0.01 min
    sae(torch.tensor([[4.0, 3.0, 2.0], [1.5, 0.0, 0.0]]))
    assert sae.threshold.item() == pytest.approx(0.99 * 0.5 + 0.01 * 1.5)


def test_threshold_is_the_plain_mean_of_batch_minima_over_the_final_window():
    sae = _identity_sae(k=1, threshold_lr=0.5)  # window: last 0.1 · 20 = 2 steps (18 and 19)
    mins = [4.0, 1.0, 2.0, 3.0]  # each batch's smallest kept activation (one token, k = 1)
    steps = [0, 1, 18, 19]
    for m, step in zip(mins, steps, strict=True):
        sae(torch.tensor([[m, 0.0, 0.0]]), StepContext(step=step, total_steps=20))
        if step == 1:
            assert sae.threshold.item() == pytest.approx(0.5 * 4.0 + 0.5 * 1.0)  # EMA before the window
    assert sae.threshold.item() == pytest.approx((2.0 + 3.0) / 2)  # the window forgets what came before
    assert sae.threshold_rate(StepContext(step=19, total_steps=0)) == 0.5  # unknown run length: EMA only


def test_threshold_not_updated_in_eval_mode_or_from_empty_selection():
    sae = _identity_sae(k=1)
    sae.eval()
    sae(torch.tensor([[3.0, 2.0, 1.0]]))
    assert sae.threshold.item() == -1.0
    sae.train()
    sae(-torch.ones(2, 3))  # nothing positive selected: θ keeps its value
    assert sae.threshold.item() == -1.0


def test_keeps_exactly_k_times_batch_nonzeros():
    torch.manual_seed(0)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=8, width=64, k=5))
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive, so every kept entry is non-zero
    x = torch.randn(16, 8)
    out = sae(x)
    assert (out.f != 0).sum().item() == 5 * 16
    per_token = (out.f != 0).sum(1)
    assert per_token.min() != per_token.max(), "per-token L0 should vary under batch selection"
    torch.testing.assert_close(out.x_hat, sae.decode(out.f))


def test_encode_uses_threshold_and_is_batch_independent():
    torch.manual_seed(0)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=8, width=32, k=4))
    x = torch.randn(20, 8)
    # before θ is estimated: per-token top-k fallback
    assert ((sae.encode(x) != 0).sum(1) <= 4).all()
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    f = sae.encode(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(f, pre * (pre > 0.3))
    torch.testing.assert_close(sae.encode(x[:3]), f[:3])  # a token's code does not depend on its batch


def test_auxk_reaches_dead_encoder_columns_only():
    torch.manual_seed(0)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=8, width=32, k=4))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[0, 7, 19]] = True
    out = sae(torch.randn(16, 8), StepContext(dead_mask=dead))
    g = torch.autograd.grad(out.losses["auxk"], sae.W_enc)[0]
    assert g[:, dead].abs().sum() > 0 and g[:, ~dead].abs().sum() == 0


def test_fold_input_scale_is_exact_and_keeps_threshold():
    torch.manual_seed(0)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=6, width=20, k=4))
    perturb_(sae, 0.3)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    x, s = torch.randn(7, 6), 2.5
    assert_fold_input_scale_exact(sae, x, s)
    assert sae.threshold.item() == pytest.approx(0.2)


@pytest.mark.parametrize(
    "kw", [{"threshold_lr": 0.0}, {"threshold_lr": 1.5}, {"k": 100}, {"threshold_final_fraction": 1.5}]
)
def test_validation(kw):
    with pytest.raises(ValueError):
        BatchTopKConfig(**{"d_in": 4, "width": 8, "k": 2, **kw}).validate()


def test_learns_synthetic_features():
    torch.manual_seed(0)
    x, dirs = synthetic_data()
    sae = BatchTopKSAE(BatchTopKConfig(d_in=16, width=48, k=2))
    train_on_synthetic(sae, x, 400, with_dead_mask)
    assert recovered_fraction(sae.W_dec, dirs) >= 0.8
    # the inference threshold reproduces the training sparsity on held-out data
    sae.eval()
    with torch.no_grad():
        l0_inference = (sae.encode(x[:4000]) > 0).sum(1).float().mean().item()
    assert 1.0 <= l0_inference <= 4.0
