"""Switch SAE: hand-computed router, code and load-balancing loss; sparse dispatch against the dense masked
computation (forward and every gradient, float64); the grouped encoder's backward against its definition;
block structure of the codes; init, folding, save/load, validation, learning."""

import math

import pytest
import torch
from synthetic_training import (
    assert_decoder_hooks_keep_unit_norm,
    assert_fold_input_scale_exact,
    perturb_,
    synthetic_data,
    train_on_synthetic,
)

from saekit.eval.synthetic import recovered_fraction
from saekit.sae import StepContext, get_architecture, load_sae, save_sae
from saekit.sae.switch import ExpertEncode, SwitchConfig, SwitchSAE

L3 = math.log(3.0)  # a logit gap of ln 3 makes a two-way softmax (3/4, 1/4)


def _hand_sae(heaviside: bool = False) -> SwitchSAE:
    """d = 2, two experts of two latents, k = 1. Router logits = ln3 · (x − [0, 1])."""
    sae = SwitchSAE(SwitchConfig(d_in=2, width=4, n_experts=2, k=1, heaviside=heaviside))
    with torch.no_grad():
        sae.W_router.copy_(L3 * torch.eye(2))
        sae.b_router.copy_(torch.tensor([0.0, 1.0]))
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    return sae


X_HAND = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 2.0]])


def test_forward_router_and_load_balance_hand_computed():
    sae = _hand_sae()
    out = sae(X_HAND)
    # router logits ln3·[1, 0], ln3·[0, 1], ln3·[2, 1]: p = [3/4, 1/4], [1/4, 3/4], [3/4, 1/4]
    # -> experts 0, 1, 0, each with gate 3/4.
    # x − b_dec = [0, 1], [−1, 2], [1, 2]; block pre-activations [0, 1], [−1, 2] (latents 2, 3), [1, 2].
    # Token 1's dense pre-activations are [−1, 2, −1, 2]: latent 1 ties latent 3 but lies outside its block.
    torch.testing.assert_close(
        out.f, torch.tensor([[0.0, 0.75, 0.0, 0.0], [0.0, 0.0, 0.0, 1.5], [0.0, 1.5, 0.0, 0.0]])
    )
    # x̂ = f W_dec + b_dec = [1, 0.75], [2.2, 0.9], [1, 1.5]
    torch.testing.assert_close(out.x_hat, torch.tensor([[1.0, 0.75], [2.2, 0.9], [1.0, 1.5]]))
    sse = ((0.0**2 + 0.25**2) + (2.2**2 + 1.1**2) + (1.0**2 + 0.5**2)) / 3
    assert out.losses["recon"].item() == pytest.approx(sse)
    # F = [2/3, 1/3], P = [7/12, 5/12]: L_lb = 2 (14/36 + 5/36) = 19/18; term = α d L_lb = 3 · 2 · 19/18
    assert out.metrics["l_lb"] == pytest.approx(19 / 18)
    assert out.losses["load_balance"].item() == pytest.approx(19 / 3)
    assert out.metrics["l0"] == 1.0
    torch.testing.assert_close(sae.encode(X_HAND), out.f)


def test_heaviside_gates_by_one():
    f = _hand_sae(heaviside=True).encode(X_HAND)
    torch.testing.assert_close(
        f, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 2.0, 0.0, 0.0]])
    )


def test_load_balance_is_one_when_balanced_and_gets_gradient_only_through_p():
    sae = SwitchSAE(SwitchConfig(d_in=2, width=4, n_experts=2, k=1, lb_alpha=0.0))
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]], requires_grad=True)
    l_lb = sae.load_balance(p, torch.tensor([0, 1]))
    assert l_lb.item() == pytest.approx(1.0)  # F = [1/2, 1/2], P = [0.55, 0.45]
    (g,) = torch.autograd.grad(l_lb, p)
    torch.testing.assert_close(g, torch.full((2, 2), 0.5))  # ∂/∂p_ni = E · F_i / B = 2 · (1/2) / 2
    assert set(sae(X_HAND).losses) == {"recon"}  # α = 0 drops the term
    # Not a lower bound (the reference calls 1 its minimum): F = [1/3, 2/3], P = [0.6, 0.4] -> 2 · 7/15
    p = torch.tensor([[1.0, 0.0], [0.4, 0.6], [0.4, 0.6]])
    assert sae.load_balance(p, torch.tensor([0, 1, 1])).item() == pytest.approx(14 / 15)


def _dense_masked_loss(sae: SwitchSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's dense computation: full encoder, mask to the chosen block scaled by p, top-k over
    the whole width, dense decode. Returns (f, x̂, loss)."""
    cfg = sae.cfg
    z = torch.relu((x - sae.b_dec) @ sae.W_enc)
    p = torch.softmax((x - sae.b_router) @ sae.W_router, dim=-1)
    top_p, top_i = p.max(dim=-1)
    mask = torch.zeros_like(p).scatter(-1, top_i[:, None], top_p[:, None])
    a = z * mask.repeat_interleave(cfg.expert_width, dim=1)
    vals, idx = a.topk(cfg.k, dim=-1)
    f = torch.zeros_like(a).scatter(-1, idx, vals)
    x_hat = f @ sae.W_dec + sae.b_dec
    frac = torch.nn.functional.one_hot(top_i, cfg.n_experts).to(x.dtype).mean(0)
    l_lb = cfg.n_experts * (frac * p.mean(0)).sum()
    loss = (x - x_hat).pow(2).sum(-1).mean() + cfg.lb_alpha * cfg.d_in * l_lb
    return f, x_hat, loss


def test_sparse_dispatch_equals_dense_masked_computation_float64():
    torch.manual_seed(0)
    sae = SwitchSAE(SwitchConfig(d_in=6, width=40, n_experts=5, k=3)).double()
    perturb_(sae, 0.3)
    x = torch.randn(64, 6, dtype=torch.float64)
    assert torch.bincount(sae.route(x)[2], minlength=5).min() > 0, "every expert should get tokens"
    out = sae(x)
    f, x_hat, loss = _dense_masked_loss(sae, x)
    torch.testing.assert_close(out.f, f)
    torch.testing.assert_close(out.x_hat, x_hat)
    torch.testing.assert_close(out.loss, loss)
    params = dict(sae.named_parameters())
    g_sparse = torch.autograd.grad(out.loss, list(params.values()))
    g_dense = torch.autograd.grad(loss, list(params.values()))
    for name, a, b in zip(params, g_sparse, g_dense, strict=True):
        assert b.abs().sum() > 0, f"{name} gets no gradient: the comparison would be vacuous"
        torch.testing.assert_close(a, b, msg=f"gradient of {name}")


def test_expert_encode_gradcheck():
    torch.manual_seed(0)
    xs = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    counts = [3, 0, 4, 0]  # four experts of two columns; experts 1 and 3 get no token
    torch.autograd.gradcheck(lambda a, b: ExpertEncode.apply(a, b, counts, 2), (xs, W))
    pre = ExpertEncode.apply(xs, W, counts, 2)
    torch.testing.assert_close(pre[:3], xs[:3] @ W[:, 0:2])
    torch.testing.assert_close(pre[3:], xs[3:] @ W[:, 4:6])
    (g_W,) = torch.autograd.grad(pre.sum(), W)
    assert g_W[:, [2, 3, 6, 7]].abs().sum() == 0  # unused experts' columns get exactly zero


def test_codes_stay_in_the_expert_block_with_at_most_k_active():
    torch.manual_seed(0)
    sae = perturb_(SwitchSAE(SwitchConfig(d_in=8, width=64, n_experts=4, k=5)), 0.2)
    x = torch.randn(200, 8)
    f = sae.encode(x)
    expert = sae.route(x)[2]
    block = torch.arange(64)[None, :] // 16 == expert[:, None]
    assert (f[~block] == 0).all()
    active = (f != 0).sum(1)
    assert active.max() == 5 and (active <= 5).all()
    assert len(expert.unique()) == 4
    torch.testing.assert_close(sae.encode(x[:5]), f[:5])  # batch-independent
    out = sae(x)
    torch.testing.assert_close(out.f, f)
    torch.testing.assert_close(out.x_hat, sae.decode(f))


def test_init_from_data_centres_both_biases():
    sae = SwitchSAE(SwitchConfig(d_in=3, width=8, n_experts=2, k=2))
    centre = torch.tensor([0.5, -1.0, 2.0])
    sae.init_from_data(torch.randn(10, 3), centre)
    torch.testing.assert_close(sae.b_dec.detach(), centre)
    torch.testing.assert_close(sae.b_router.detach(), centre)
    torch.testing.assert_close(sae.W_enc.t(), sae.W_dec)  # tied init with unit rows
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(8))


def test_constraint_hooks_keep_decoder_unit_norm():
    torch.manual_seed(0)
    sae = SwitchSAE(SwitchConfig(d_in=6, width=24, n_experts=3, k=2))
    assert_decoder_hooks_keep_unit_norm(sae, torch.randn(16, 6), stretch=2.0)


def test_fold_input_scale_is_exact():
    torch.manual_seed(0)
    sae = perturb_(SwitchSAE(SwitchConfig(d_in=6, width=24, n_experts=3, k=3)), 0.3)
    x, s = torch.randn(30, 6), 0.37
    experts_before = sae.route(s * x)[2]
    assert_fold_input_scale_exact(sae, x, s)
    assert torch.equal(sae.route(x)[2], experts_before)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = perturb_(SwitchSAE(SwitchConfig(d_in=6, width=24, n_experts=3, k=2, lb_alpha=0.5)), 0.3)
    loaded = load_sae(save_sae(sae, tmp_path / "sae"))
    assert isinstance(loaded, SwitchSAE) and loaded.cfg == sae.cfg
    assert get_architecture("switch") is SwitchSAE
    state, state_loaded = sae.state_dict(), loaded.state_dict()
    assert state.keys() == state_loaded.keys()
    for name in state:
        assert torch.equal(state[name], state_loaded[name]), name
    x = torch.randn(9, 6)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    out, out_loaded = sae(x, StepContext()), loaded(x, StepContext())
    assert torch.equal(out_loaded.x_hat, out.x_hat) and torch.equal(out_loaded.loss, out.loss)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_experts": 0}, "n_experts must"),
        ({"n_experts": 3}, "multiple of n_experts"),
        ({"k": 5}, r"k must be in \[1, width / n_experts = 4\]"),
        ({"k": 0}, "k must"),
        ({"lb_alpha": -1.0}, "lb_alpha"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SwitchConfig(**{"d_in": 4, "width": 8, "n_experts": 2, "k": 2, **kw}).validate()
    SwitchConfig(d_in=4, width=8, n_experts=1, k=8).validate()  # one expert: a TopK SAE without bias


def test_learns_synthetic_features_with_balanced_experts():
    x, dirs = synthetic_data()
    shares, l_lbs = {}, {}
    for alpha in (3.0, 0.0):  # without the load-balancing loss, routing collapses (the control)
        torch.manual_seed(0)
        sae = SwitchSAE(SwitchConfig(d_in=16, width=96, n_experts=4, k=2, lb_alpha=alpha))
        out = train_on_synthetic(sae, x, 400, lambda step, dead: StepContext(step=step))
        with torch.no_grad():
            shares[alpha] = torch.bincount(sae.route(x[:4000])[2], minlength=4) / 4000
        l_lbs[alpha] = out.metrics["l_lb"]
        if alpha > 0:
            assert recovered_fraction(sae.W_dec, dirs) >= 0.8
    assert shares[3.0].max() < 0.4, f"routing unbalanced with α = 3: {shares[3.0].tolist()}"
    assert l_lbs[3.0] < 1.2 < 2.0 < l_lbs[0.0]
    assert shares[0.0].max() > 0.6
