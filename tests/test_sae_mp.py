"""Matching-Pursuit SAE: hand-computed pursuits (orthogonal atoms recover coefficients exactly; non-orthogonal
atoms follow the greedy rule; the stopping rules), gradients through the residual against an explicit
formula and finite differences, batch independence, folding, save/load, validation, learning."""

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
from saekit.sae import load_sae, save_sae
from saekit.sae.mp import MPSAE, MPConfig


def _mp(atoms: list[list[float]], k: int, **kw) -> MPSAE:
    sae = MPSAE(MPConfig(d_in=len(atoms[0]), width=len(atoms), k=k, **kw))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(atoms))
    return sae


def test_orthogonal_atoms_recover_coefficients_exactly():
    sae = _mp([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], k=3)
    x = torch.tensor([[2.0, 0.5, 1.0], [2.0, -0.5, 1.0]])
    out = sae(x)
    # token 0: picks e1 (2), then e3 (1), then e2 (0.5): the code is x itself and x̂ = x.
    # token 1: e1 (2), e3 (1); then every correlation is ≤ 0 (ReLU: −0.5 → 0), so it stops: no negative codes.
    torch.testing.assert_close(out.f, torch.tensor([[2.0, 0.5, 1.0], [2.0, 0.0, 1.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[2.0, 0.5, 1.0], [2.0, 0.0, 1.0]]))
    assert out.losses["recon"].item() == pytest.approx(0.25 / 6)
    assert set(out.losses) == {"recon"} and out.metrics["l0"] == 2.5
    torch.testing.assert_close(sae.encode(x), out.f)
    # k bounds the support: with k = 2 token 0 keeps its two largest coefficients
    sae2 = _mp([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], k=2)
    torch.testing.assert_close(sae2.encode(x[:1]), torch.tensor([[2.0, 0.0, 1.0]]))


def test_non_orthogonal_atoms_follow_the_greedy_rule():
    sae = _mp([[1.0, 0.0], [0.6, 0.8]], k=3)
    # x = [1, 1]: ⟨x, u0⟩ = 1, ⟨x, u1⟩ = 1.4 -> u1 first (not the atom with the larger x coordinate).
    # r1 = [1, 1] − 1.4 [0.6, 0.8] = [0.16, −0.12];  ⟨r1, u0⟩ = 0.16, ⟨r1, u1⟩ = 0 -> u0 with 0.16.
    # r2 = [0, −0.12]: correlations 0 and −0.096 -> nothing positive, stop.
    out = sae(torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(out.f, torch.tensor([[0.16, 1.4]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[1.0, 1.12]]))


def test_stops_when_the_support_stops_changing():
    sae = _mp([[1.0, 0.0], [-0.6, -0.8]], k=5)
    # x = [1, −1]: correlations 1, 0.2 -> u0 (1); r1 = [0, −1]: 0, 0.8 -> u1 (0.8);
    # r2 = [0, −1] − 0.8 [−0.6, −0.8] = [0.48, −0.36]: 0.48, 0 -> u0 again (0.48 added), support unchanged:
    # stop, although k = 5 would allow a 4th step (plain MP would pick u1 again, with 0.288).
    out = sae(torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(out.f, torch.tensor([[1.48, 0.8]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[1.0, -0.64]]))
    # residual tolerance: ‖r1‖ = 1, ‖r2‖ = 0.6 < 0.7, so with ε = 0.7 it stops after two steps
    tol = _mp([[1.0, 0.0], [-0.6, -0.8]], k=5, residual_tol=0.7)
    torch.testing.assert_close(tol.encode(torch.tensor([[1.0, -1.0]])), torch.tensor([[1.0, 0.8]]))


def test_pre_encoder_bias_and_its_init():
    sae = _mp([[1.0, 0.0], [0.0, 1.0]], k=2, pre_enc_bias=True)
    sae.init_from_data(torch.zeros(4, 2), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(sae.b_dec.detach(), torch.tensor([1.0, -1.0]))
    out = sae(torch.tensor([[3.0, 0.0]]))  # x − b_dec = [2, 1]
    torch.testing.assert_close(out.f, torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[3.0, 0.0]]))
    plain = _mp([[1.0, 0.0], [0.0, 1.0]], k=2)
    plain.init_from_data(torch.zeros(4, 2), torch.tensor([1.0, -1.0]))  # no b_dec to set
    assert "b_dec" not in dict(plain.named_parameters())


def _fixed_order_x_hat(x: torch.Tensor, W: torch.Tensor, order: list[int], detach_values: bool):
    """x̂ = x − r for the pursuit with its choices fixed: r ← r − ⟨r, u_i⟩ u_i for i in ``order``."""
    U = W / W.norm(dim=1, keepdim=True)
    r = x
    for i in order:
        v = r @ U[i]
        r = r - (v.detach() if detach_values else v)[:, None] * U[i]
    return x - r


def test_gradient_flows_through_the_residual_as_the_explicit_formula():
    """Three steps: the gradient of every decoder row is that of the explicit formula with the choices fixed,
    the values v_t = ⟨r_{t−1}, u_{i_t}⟩ differentiated through the residual (nothing detached, as the
    reference). Detaching the values would give another gradient."""
    torch.manual_seed(0)
    sae = MPSAE(MPConfig(d_in=5, width=7, k=3)).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    order, r = [], x.clone()
    for _ in range(3):  # the greedy choices, replayed by hand
        corr = r @ sae.W_dec.detach().T
        order.append(int(corr.argmax()))
        r = r - corr.max() * sae.W_dec.detach()[order[-1]]
    assert len(set(order)) == 3
    out = sae(x)
    assert out.f[0].nonzero().flatten().tolist() == sorted(order)
    (g_mp,) = torch.autograd.grad(out.losses["recon"], sae.W_dec)
    W = sae.W_dec.detach().clone().requires_grad_(True)
    grads = {}
    for detach in (False, True):
        x_hat = _fixed_order_x_hat(x, W, order, detach)
        torch.testing.assert_close(x_hat, out.x_hat.detach())
        (grads[detach],) = torch.autograd.grad((x - x_hat).pow(2).mean(), W)
    torch.testing.assert_close(g_mp, grads[False])
    assert not torch.allclose(g_mp, grads[True])


def _reference_pursuit(x: torch.Tensor, W: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """The reference's loop (tree-sae ``MPSAE._matching_pursuit``) written densely, for unit rows W."""
    r, z = x.clone(), x.new_zeros(x.shape[0], W.shape[0])
    prev, done = torch.zeros_like(z, dtype=torch.bool), torch.zeros(x.shape[0], dtype=torch.bool)
    for _ in range(k):
        if done.all():
            break
        values, indices = torch.max(torch.relu(r @ W.T), dim=-1, keepdim=True)
        step = torch.zeros_like(z).scatter(-1, indices, values)
        z = torch.where(done[:, None], z, z + step)
        r = torch.where(done[:, None], r, r - step @ W)
        support = z != 0
        done = done | (support == prev).all(-1) | (r.norm(dim=-1) < eps)
        prev = support
    return z


def test_matches_the_reference_loop_in_values_and_tangent_gradients():
    """Codes, reconstructions and decoder gradients equal the reference's dense loop on a batch where
    tokens stop at different steps. The gradients agree up to each row's radial component, which the
    unit-norm constraint removes before every optimizer step (the reference does the same)."""
    torch.manual_seed(3)
    sae = MPSAE(MPConfig(d_in=5, width=12, k=6, residual_tol=0.3)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    out = sae(x)
    W = sae.W_dec.detach().clone().requires_grad_(True)
    z_ref = _reference_pursuit(x, W, 6, 0.3)
    x_hat_ref = z_ref @ W
    torch.testing.assert_close(out.f, z_ref)
    torch.testing.assert_close(out.x_hat, x_hat_ref)
    steps = (out.f > 0).sum(1)
    assert steps.min() < steps.max(), "tokens should stop at different steps"
    (g,) = torch.autograd.grad(out.losses["recon"], sae.W_dec)
    (g_ref,) = torch.autograd.grad((x - x_hat_ref).pow(2).mean(), W)
    radial = (g_ref * W).sum(1, keepdim=True) * W
    torch.testing.assert_close(g, g_ref - radial.detach())


def test_gradcheck_of_the_pursuit():
    """Finite differences of x̂ in x and W_dec (float64, away from ties of the argmax)."""
    torch.manual_seed(1)
    sae = MPSAE(MPConfig(d_in=4, width=6, k=3)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    W = sae.W_dec.detach().clone().requires_grad_(True)

    def x_hat(x_ND: torch.Tensor, W_MD: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(sae, {"W_dec": W_MD}, (x_ND,)).x_hat

    assert torch.autograd.gradcheck(x_hat, (x, W))


def test_encode_is_batch_independent_and_l0_at_most_k():
    torch.manual_seed(0)
    sae = perturb_(MPSAE(MPConfig(d_in=8, width=32, k=4)), 0.1)
    x = torch.randn(20, 8)
    f = sae.encode(x)
    torch.testing.assert_close(sae.encode(x[:3]), f[:3])
    torch.testing.assert_close(sae.encode(x[7:8]), f[7:8])
    assert ((f > 0).sum(1) <= 4).all() and (f >= 0).all()
    torch.testing.assert_close(sae(x).x_hat, sae.decode(f))


def test_constraint_hooks_keep_decoder_unit_norm():
    torch.manual_seed(0)
    sae = MPSAE(MPConfig(d_in=6, width=12, k=3))
    assert_decoder_hooks_keep_unit_norm(sae, torch.randn(5, 6), stretch=2.0)


@pytest.mark.parametrize("pre_enc_bias", [False, True])
def test_fold_input_scale_is_exact(pre_enc_bias):
    torch.manual_seed(0)
    sae = perturb_(MPSAE(MPConfig(d_in=6, width=20, k=5, residual_tol=0.3, pre_enc_bias=pre_enc_bias)), 0.3)
    assert_fold_input_scale_exact(sae, torch.randn(7, 6), 0.37)
    assert sae.residual_tol.item() == pytest.approx(0.3 / 0.37)


def test_fold_keeps_early_stopping_by_tolerance():
    sae = _mp([[1.0, 0.0], [-0.6, -0.8]], k=5, residual_tol=0.7)
    sae.fold_input_scale(4.0)  # raw inputs are 4× smaller than training inputs
    torch.testing.assert_close(sae.encode(torch.tensor([[0.25, -0.25]])), torch.tensor([[1.0, 0.8]]))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = perturb_(MPSAE(MPConfig(d_in=6, width=10, k=3, pre_enc_bias=True)), 0.3)
    sae.fold_input_scale(2.0)  # the buffer differs from its init
    loaded = load_sae(save_sae(sae, tmp_path / "mp"))
    assert loaded.cfg == sae.cfg and set(loaded.state_dict()) == {"W_dec", "b_dec", "residual_tol"}
    for name, t in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0)
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw, match", [({"k": 0}, "k"), ({"k": -2}, "k"), ({"residual_tol": -1.0}, "residual_tol")]
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        MPConfig(**{"d_in": 4, "width": 8, "k": 2, **kw}).validate()


def test_learns_synthetic_features():
    torch.manual_seed(0)
    x, dirs = synthetic_data()
    sae = MPSAE(MPConfig(d_in=16, width=48, k=3))
    out = train_on_synthetic(sae, x, 200, with_dead_mask)
    assert recovered_fraction(sae.W_dec, dirs) >= 0.9
    assert out.metrics["l0"] <= 3
