"""The shared SAE pieces, each checked against its definition or plain dense autograd."""

import pytest
import torch

from saekit.sae import common
from saekit.sae.base import SAE, SAEConfig


def test_tied_init_unit_rows_and_transpose():
    torch.manual_seed(0)
    W_enc, W_dec = common.tied_init(5, 7)
    assert W_enc.shape == (5, 7) and W_dec.shape == (7, 5)
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(W_enc, W_dec.t())
    W_enc.add_(1.0)  # a copy, not a view: untied from here on
    assert not torch.allclose(W_enc, W_dec.t())


def test_decoder_constraint_removes_parallel_grad_and_renormalises():
    torch.manual_seed(0)
    W = torch.nn.Parameter(common.unit_rows(6, 4))
    W.grad = torch.randn(6, 4)
    tangential = W.grad - (W.grad * W.detach()).sum(1, keepdim=True) * W.detach()
    common.remove_parallel_grad_(W)
    torch.testing.assert_close((W.grad * W.detach()).sum(1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(W.grad, tangential)
    with torch.no_grad():
        W.mul_(torch.arange(1.0, 7.0)[:, None])
    common.normalize_rows_(W)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(6))


def test_parallel_grad_removal_uses_row_direction_not_raw_row():
    # Rows that are not (yet) unit norm: the component along the row's direction is what goes.
    W = torch.nn.Parameter(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    W.grad = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    common.remove_parallel_grad_(W)
    torch.testing.assert_close(W.grad, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_parallel_grad_removal_covers_every_block_of_rows():
    # more rows than one block of CONSTRAINT_ROWS, the last block partial; rows of different norms
    n = 2 * common.CONSTRAINT_ROWS + 77
    W = torch.nn.Parameter(torch.randn(n, 5, dtype=torch.float64) * torch.rand(n, 1, dtype=torch.float64))
    W.grad = torch.randn(n, 5, dtype=torch.float64)
    u = W.detach() / W.detach().norm(dim=1, keepdim=True)
    expected = W.grad - (W.grad * u).sum(1, keepdim=True) * u
    common.remove_parallel_grad_(W)
    torch.testing.assert_close(W.grad, expected)


def test_unit_norm_decoder_mixin_wires_the_base_hooks():
    class Tiny(common.UnitNormDecoder, SAE):
        def __init__(self):
            super().__init__(SAEConfig(d_in=3, width=4))
            self.W_dec = torch.nn.Parameter(torch.randn(4, 3) * 5)

    sae = Tiny()
    sae.W_dec.grad = torch.randn(4, 3)
    sae.before_optimizer_step()
    direction = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close((sae.W_dec.grad * direction).sum(1), torch.zeros(4), atol=1e-5, rtol=0)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(4))


def test_topk_relu_selects_per_token_then_relus():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-1.0, -2.0, -3.0, 0.1]])
    vals, idx = common.topk_relu(pre, 2)
    dense = torch.zeros_like(pre).scatter(-1, idx, vals)
    torch.testing.assert_close(dense, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.1]]))


def test_batch_topk_keeps_k_times_batch_entries_over_the_flattened_batch():
    torch.manual_seed(0)
    pre = torch.randn(8, 16).abs() + 0.01  # all positive: every selected entry is non-zero
    pre[0] += 10  # token 0 takes far more than k latents: selection is over the batch, not per token
    rows, cols, vals = common.batch_topk_relu(pre, 3)
    assert len(vals) == 24 and (vals > 0).all()
    assert (rows[1:] >= rows[:-1]).all(), "rows must come sorted for sparse_decode"
    dense = common.coo_to_dense(rows, cols, vals, (8, 16))
    threshold = pre.flatten().topk(24).values.min()
    torch.testing.assert_close(dense, pre * (pre >= threshold))
    assert (dense[0] > 0).sum() == 16


def test_sparse_decode_matches_dense_autograd():
    torch.manual_seed(0)
    pre = torch.randn(6, 10)
    W_dense = torch.randn(10, 4, requires_grad=True)
    W_sparse = W_dense.detach().clone().requires_grad_(True)
    for rows, cols, vals in (common.topk_to_coo(*common.topk_relu(pre, 3)), common.batch_topk_relu(pre, 2)):
        v_dense = vals.detach().clone().requires_grad_(True)
        v_sparse = vals.detach().clone().requires_grad_(True)
        out_dense = common.coo_to_dense(rows, cols, v_dense, (6, 10)) @ W_dense
        out_sparse = common.sparse_decode(rows, cols, v_sparse, 6, W_sparse)
        torch.testing.assert_close(out_sparse, out_dense)
        g = torch.randn(6, 4)
        (out_dense * g).sum().backward()
        (out_sparse * g).sum().backward()
        torch.testing.assert_close(v_sparse.grad, v_dense.grad)
        torch.testing.assert_close(W_sparse.grad, W_dense.grad)


def test_sparse_decode_gives_zero_for_tokens_without_entries():
    W = torch.randn(5, 3)
    out = common.sparse_decode(torch.tensor([1, 1]), torch.tensor([0, 4]), torch.tensor([1.0, 2.0]), 3, W)
    torch.testing.assert_close(out[0], torch.zeros(3))
    torch.testing.assert_close(out[2], torch.zeros(3))
    torch.testing.assert_close(out[1], W[0] + 2 * W[4])


def _auxk_setup():
    torch.manual_seed(0)
    pre = torch.randn(8, 12, requires_grad=True)
    W_dec = torch.randn(12, 5, requires_grad=True)
    residual = torch.randn(8, 5, requires_grad=True)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 4, 7, 9, 11]] = True
    return pre, W_dec, residual, dead


def test_auxk_value_matches_definition():
    pre, W_dec, residual, dead = _auxk_setup()
    loss = common.auxk_loss(pre, dead, residual, W_dec, k_aux=2)
    masked = torch.where(dead, pre.detach(), -torch.inf)
    vals, idx = masked.topk(2, dim=-1)
    f_aux = torch.zeros(8, 12).scatter(-1, idx, vals.relu())
    e = residual.detach()
    e_hat = f_aux @ W_dec.detach()
    expected = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(loss, expected)


def test_auxk_gradient_reaches_only_dead_latents_and_not_the_target():
    pre, W_dec, residual, dead = _auxk_setup()
    common.auxk_loss(pre, dead, residual, W_dec, k_aux=3).backward()
    assert residual.grad is None, "the residual target must be detached"
    assert pre.grad[:, ~dead].abs().sum() == 0 and pre.grad[:, dead].abs().sum() > 0
    assert W_dec.grad[~dead].abs().sum() == 0 and W_dec.grad[dead].abs().sum() > 0


def test_auxk_clamps_k_aux_to_dead_count_and_is_zero_without_dead():
    pre, W_dec, residual, dead = _auxk_setup()
    loss_big_k = common.auxk_loss(pre, dead, residual, W_dec, k_aux=1000)  # only 5 dead: uses 5
    loss_5 = common.auxk_loss(pre, dead, residual, W_dec, k_aux=5)
    torch.testing.assert_close(loss_big_k, loss_5)
    assert common.auxk_loss(pre, torch.zeros(12, dtype=torch.bool), residual, W_dec, 4).item() == 0.0
    constant = torch.ones(8, 5)  # zero variance over the batch: defined as 0, not nan
    assert common.auxk_loss(pre, dead, constant, W_dec, 4).item() == 0.0


def test_rectangle_kernel_is_open_interval():
    u = torch.tensor([-0.5, -0.49, 0.0, 0.49, 0.5, 2.0])
    torch.testing.assert_close(common.rectangle(u), torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))


def _ste_setup():
    torch.manual_seed(0)
    eps = 0.1
    log_theta = torch.log(torch.tensor([0.3, 0.5, 1.0])).requires_grad_(True)
    theta = log_theta.detach().exp()
    pre = (theta + eps * (torch.rand(50, 3) - 0.5) * 3).requires_grad_(True)  # many inside the window
    return eps, log_theta, theta, pre


def test_jumprelu_ste_matches_spec_including_log_theta_chain_rule():
    eps, log_theta, theta, pre = _ste_setup()
    f = common.jumprelu(pre, log_theta.exp(), eps)
    torch.testing.assert_close(f, pre.detach() * (pre.detach() > theta))
    g = torch.randn(50, 3)
    (f * g).sum().backward()
    torch.testing.assert_close(pre.grad, g * (pre.detach() > theta))
    in_window = ((pre.detach() - theta) / eps).abs() < 0.5
    d_theta = (-(theta / eps) * in_window * g).sum(0)
    assert in_window.any(0).all()
    torch.testing.assert_close(log_theta.grad, d_theta * theta)  # ×θ from θ = exp(log θ)


def test_step_ste_matches_spec_and_gives_pre_acts_no_gradient():
    eps, log_theta, theta, pre = _ste_setup()
    h = common.step(pre, log_theta.exp(), eps)
    torch.testing.assert_close(h, (pre.detach() > theta).float())
    g = torch.randn(50, 3)
    (h * g).sum().backward()
    assert pre.grad is None  # no gradient at all (not even an (N, M) tensor of zeros)
    in_window = ((pre.detach() - theta) / eps).abs() < 0.5
    torch.testing.assert_close(log_theta.grad, (-(1 / eps) * in_window * g).sum(0) * theta)


def test_ste_gradcheck_on_raw_theta_matches_manual_formula():
    # θ as a leaf (no log): the Function's θ-gradient alone, without the chain factor.
    eps, _, theta, pre = _ste_setup()
    theta = theta.clone().requires_grad_(True)
    common.jumprelu(pre.detach(), theta, eps).sum().backward()
    in_window = ((pre.detach() - theta.detach()) / eps).abs() < 0.5
    torch.testing.assert_close(theta.grad, (-(theta.detach() / eps) * in_window).sum(0))


@pytest.mark.parametrize("fn, expected", [(common.sse, 3.0), (common.mse, 1.5)])
def test_loss_scales(fn, expected):
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    x_hat = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert fn(x, x_hat).item() == pytest.approx(expected)
