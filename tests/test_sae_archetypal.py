"""Archetypal SAE: hand-computed dictionary and forward passes (TopK and JumpReLU encoders), gradients of
W, Λ, m against the chain rule and finite differences, the projections (W row-stochastic and non-negative,
‖Λ_i‖ ≤ δ) after every training step, δ = 0 keeps atoms in conv(C), seeded k-means, latent permutation
through ``latent_axes``, folding, save/load, validation, learning."""

import math

import pytest
import torch
from synthetic_training import (
    assert_fold_input_scale_exact,
    perturb_,
    sparsity_warmup,
    synthetic_data,
    train_on_synthetic,
    with_dead_mask,
)

from saekit.eval.progressive import permute_latents
from saekit.eval.synthetic import recovered_fraction
from saekit.sae import StepContext, load_sae, save_sae
from saekit.sae.archetypal import ArchetypalConfig, ArchetypalSAE, kmeans
from saekit.sae.common import auxk_loss, jumprelu, step
from saekit.train.geometric_median import geometric_median

C_HAND = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])


def _hand_sae(**kw) -> ArchetypalSAE:
    """d = 2, three candidates, two atoms: D = (W C + Λ)·exp(m) = [[2, 3], [4, 4]] (worked out below)."""
    sae = ArchetypalSAE(ArchetypalConfig(d_in=2, width=2, n_candidates=3, **{"k": 1, **kw}))
    with torch.no_grad():
        sae.C.copy_(C_HAND)
        sae.W.copy_(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
        sae.Lambda.copy_(torch.tensor([[0.0, 0.5], [0.0, 0.0]]))
        sae.m.fill_(math.log(2.0))
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    return sae


X_HAND = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # x − b_dec = [1, 0], [0, 1]


def test_dictionary_hand_computed():
    sae = _hand_sae()
    # atom 0: (0.5·[2, 0] + 0.5·[0, 2] + [0, 0.5])·2 = [2, 3];  atom 1: [2, 2]·2 = [4, 4]
    D = torch.tensor([[2.0, 3.0], [4.0, 4.0]])
    torch.testing.assert_close(sae.W_dec, D)
    with torch.no_grad():
        torch.testing.assert_close(sae.W_dec, D)  # the cached path gives the same
    torch.testing.assert_close(sae.decode(torch.tensor([[1.0, 0.5]])), torch.tensor([[5.0, 5.0]]))  # + b_dec


def test_topk_forward_hand_computed():
    sae = _hand_sae()
    out = sae(X_HAND)
    # π = (x − b_dec) W_enc + b_enc = [1, 0.5], [0, 1.5] -> top-1: latent 0 (1), latent 1 (1.5)
    # x̂ = f D + b_dec = [2, 3] + [1, 0], 1.5·[4, 4] + [1, 0]; errors [−1, −3], [−6, −5]
    torch.testing.assert_close(out.f, torch.tensor([[1.0, 0.0], [0.0, 1.5]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[3.0, 3.0], [7.0, 6.0]]))
    mse = ((1.0 + 9.0) + (36.0 + 25.0)) / 4
    assert out.losses["recon"].item() == pytest.approx(mse)
    assert out.losses["auxk"].item() == 0.0 and out.metrics["l0"] == 1.0
    torch.testing.assert_close(sae.encode(X_HAND), out.f)


def test_topk_auxk_uses_the_archetypal_dictionary():
    torch.manual_seed(0)
    sae = perturb_(ArchetypalSAE(ArchetypalConfig(d_in=6, width=12, k=2, k_aux=3)), 0.2)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 4, 7, 9]] = True
    x = torch.randn(10, 6)
    out = sae(x, StepContext(dead_mask=dead))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = auxk_loss(pre, dead, x - out.x_hat, sae.W_dec, 3) / 32
    torch.testing.assert_close(out.losses["auxk"], expected)
    assert out.losses["auxk"].item() > 0


def test_jumprelu_forward_hand_computed_and_its_estimators():
    sae = _hand_sae(encoder="jumprelu", l0_coeff=0.5, bandwidth=0.4)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.tensor([0.8, 1.2]).log())
    x = X_HAND
    out = sae(x, StepContext(sparsity_scale=1.0))
    # π = [1, 0.5], [0, 1.5]; θ = [0.8, 1.2] -> f = [1, 0], [0, 1.5] (the same code as top-1 here)
    torch.testing.assert_close(out.f, torch.tensor([[1.0, 0.0], [0.0, 1.5]]))
    torch.testing.assert_close(out.x_hat, torch.tensor([[3.0, 3.0], [7.0, 6.0]]))
    # SSE: sum over dims, mean over batch
    assert out.losses["recon"].item() == pytest.approx((10.0 + 61.0) / 2)
    assert out.losses["l0"].item() == pytest.approx(0.5 * 1.0)  # λ · mean L0 = 0.5 · 1
    # every gradient is that of the shared straight-through estimators composed with D
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    theta = sae.log_threshold.exp()
    f = jumprelu(pre, theta, 0.4)
    ref = (x - f @ sae.W_dec - sae.b_dec).pow(2).sum(-1).mean() + 0.5 * step(pre, theta, 0.4).sum(-1).mean()
    params = [sae.W_enc, sae.b_enc, sae.b_dec, sae.log_threshold, sae.W, sae.Lambda, sae.m]
    for g, g_ref in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(g, g_ref)
    assert sae.encode(x).equal(out.f.detach())


def test_dictionary_gradients_follow_the_chain_rule():
    """∂L/∂W = e^m G Cᵀ, ∂L/∂Λ = e^m G, ∂L/∂m = Σ G ⊙ D, with G = ∂L/∂D."""
    torch.manual_seed(0)
    sae = perturb_(ArchetypalSAE(ArchetypalConfig(d_in=5, width=8, n_candidates=6, k=3)), 0.3).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    out = sae(x)
    gW, gL, gm = torch.autograd.grad(out.losses["recon"], [sae.W, sae.Lambda, sae.m])
    D = sae.W_dec.detach().clone().requires_grad_(True)
    x_hat = out.f.detach() @ D + sae.b_dec.detach()
    (G,) = torch.autograd.grad((x - x_hat).pow(2).mean(), D)
    e = sae.m.detach().exp()
    torch.testing.assert_close(gW, e * G @ sae.C.T)
    torch.testing.assert_close(gL, e * G)
    torch.testing.assert_close(gm, (G * D.detach()).sum())


def test_gradcheck_of_the_topk_forward():
    torch.manual_seed(2)
    sae = perturb_(ArchetypalSAE(ArchetypalConfig(d_in=4, width=6, n_candidates=5, k=2)), 0.3).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    names = ["W", "Lambda", "m", "W_enc", "b_enc", "b_dec"]
    params = tuple(dict(sae.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)

    def loss(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(sae, dict(zip(names, ps, strict=True)), (x,)).losses["recon"]

    assert torch.autograd.gradcheck(loss, params)


def test_projection_makes_w_row_stochastic_and_bounds_lambda():
    sae = ArchetypalSAE(ArchetypalConfig(d_in=2, width=3, n_candidates=3, delta=1.0, k=1))
    with torch.no_grad():
        sae.W.copy_(torch.tensor([[2.0, -1.0, 2.0], [-1.0, -2.0, -0.5], [0.2, 0.3, 0.5]]))
        sae.Lambda.copy_(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]))
    sae.after_optimizer_step()
    # ReLU then row sums: [2, 0, 2]/4; an all-negative row restarts uniform; a stochastic row is kept
    torch.testing.assert_close(sae.W.detach(), torch.tensor([[0.5, 0.0, 0.5], [1 / 3] * 3, [0.2, 0.3, 0.5]]))
    # ‖[3, 4]‖ = 5 > δ = 1 -> [0.6, 0.8]; ‖[0.3, 0.4]‖ = 0.5 ≤ 1 is kept
    torch.testing.assert_close(sae.Lambda.detach(), torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def _train_and_check_invariants(sae: ArchetypalSAE, x: torch.Tensor, steps: int) -> None:
    """Adam steps with the SAE's hooks; after every step W ≥ 0 with unit row sums and ‖Λ_i‖ ≤ δ."""
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for i in range(steps):
        batch = x[torch.randint(0, len(x), (64,))]
        loss = sae(batch).loss
        opt.zero_grad()
        loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        W = sae.W.detach()
        assert (W >= 0).all(), f"step {i}: negative W"
        torch.testing.assert_close(W.sum(1), torch.ones(W.shape[0]))
        assert (sae.Lambda.detach().norm(dim=1) <= sae.cfg.delta * (1 + 1e-6) + 1e-7).all()


def test_every_step_keeps_w_stochastic_and_lambda_bounded():
    torch.manual_seed(0)
    x = torch.randn(512, 6) * 3
    sae = ArchetypalSAE(ArchetypalConfig(d_in=6, width=16, n_candidates=10, k=3, delta=0.5))
    sae.init_from_data(x, None)
    _train_and_check_invariants(sae, x, 25)
    assert sae.Lambda.detach().norm(dim=1).max() > 0.25  # Λ did move (the bound is not trivially met)
    assert sae.m.item() != 0.0


def test_delta_zero_keeps_atoms_in_the_convex_hull_of_the_candidates():
    torch.manual_seed(0)
    x = torch.randn(512, 6) * 3
    sae = ArchetypalSAE(
        ArchetypalConfig(d_in=6, width=16, n_candidates=10, k=3, delta=0.0, learn_scale=False)
    )
    sae.init_from_data(x, None)
    _train_and_check_invariants(sae, x, 25)
    assert sae.W.detach().ne(torch.eye(16, 10)).any()  # W moved away from its start
    # every atom is Σ_j W_ij C_j with W_ij ≥ 0, Σ_j W_ij = 1, and Λ = 0: a point of conv(C)
    assert sae.Lambda.detach().abs().max() == 0 and sae.m.item() == 0.0
    torch.testing.assert_close(sae.W_dec.detach(), sae.W.detach() @ sae.C)
    # so no atom leaves the candidates' bounding box
    lo, hi = sae.C.min(0).values, sae.C.max(0).values
    assert ((sae.W_dec >= lo - 1e-5) & (sae.W_dec <= hi + 1e-5)).all()


def test_init_is_the_identity_mixture_and_the_tied_encoder():
    sae = ArchetypalSAE(ArchetypalConfig(d_in=3, width=5, n_candidates=2, k=1))
    torch.testing.assert_close(sae.W.detach(), torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1], [1, 0]]))
    assert sae.Lambda.abs().sum() == 0 and sae.m.item() == 0.0
    x = torch.randn(40, 3) + 5
    centre = torch.tensor([5.0, 4.0, 6.0])
    sae.init_from_data(x, centre)
    torch.testing.assert_close(sae.b_dec.detach(), centre)
    torch.testing.assert_close(sae.C, kmeans(x - centre, 2))  # centred data, default seed and iterations
    D = sae.W_dec.detach()
    torch.testing.assert_close(D, sae.C[[0, 1, 0, 1, 0]])  # atom i = candidate i mod n_c
    # tied encoder for non-unit atoms: x − b_dec = c·D_i codes as c on latent i
    torch.testing.assert_close(sae.W_enc.detach(), (D / D.pow(2).sum(dim=1, keepdim=True)).T)
    torch.testing.assert_close(sae.pre_acts(centre + 2.5 * D[1:2])[0, 1], torch.tensor(2.5))
    with pytest.raises(ValueError, match="at least 2 points"):
        sae.init_from_data(x[:1], None)


def test_kmeans_is_seeded_and_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [-10.0, -10.0, 0.0]])
    labels = torch.arange(4).repeat_interleave(50)
    x = centres[labels] + 0.5 * torch.randn(200, 3, generator=gen)
    x = x[torch.randperm(200, generator=gen)]
    for seed in range(5):
        C = kmeans(x, 4, seed=seed)
        match = torch.cdist(centres, C).argmin(1)  # nearest found centre of each true centre
        assert sorted(match.tolist()) == [0, 1, 2, 3], f"seed {seed}: a cluster was missed"
        # each found centre is the mean of its true cluster's points
        for true_c in range(4):
            members = x[torch.cdist(x, centres).argmin(1) == true_c]
            torch.testing.assert_close(C[match[true_c]], members.mean(0))
    assert kmeans(x, 4, seed=3).equal(kmeans(x, 4, seed=3))
    assert not kmeans(x, 4, seed=1).equal(kmeans(x, 4, seed=2))  # same clusters, other order
    with pytest.raises(ValueError, match="at least 5"):
        kmeans(x[:4], 5)


def test_cached_dictionary_follows_in_place_changes():
    sae = _hand_sae()
    with torch.no_grad():
        before = sae.W_dec.clone()
        sae.Lambda.add_(1.0)
        torch.testing.assert_close(sae.W_dec, before + 2.0)  # Λ + 1, times exp(m) = 2
        sae.fold_input_scale(2.0)
        torch.testing.assert_close(sae.W_dec, (before + 2.0) / 2)


@pytest.mark.parametrize("encoder", ["topk", "jumprelu"])
def test_latent_axes_let_generic_code_permute_the_latents(encoder):
    """With d_in = width = n_c no axis can be guessed from shapes: ``latent_axes`` names them, and the
    generic permutation then permutes the codes and leaves the reconstruction unchanged."""
    torch.manual_seed(0)
    sae = perturb_(ArchetypalSAE(ArchetypalConfig(d_in=7, width=7, k=2, encoder=encoder)), 0.2)
    assert set(ArchetypalSAE.latent_axes) - {"log_threshold"} <= set(sae.state_dict())
    x, perm = torch.randn(6, 7), torch.randperm(7)
    other = permute_latents(sae, perm)
    torch.testing.assert_close(other.W.detach(), sae.W.detach()[perm])
    torch.testing.assert_close(other.C, sae.C)  # candidates are not latents
    torch.testing.assert_close(other.encode(x), sae.encode(x)[:, perm])
    torch.testing.assert_close(other(x).x_hat, sae(x).x_hat)


@pytest.mark.parametrize("encoder", ["topk", "jumprelu"])
def test_fold_input_scale_is_exact(encoder):
    torch.manual_seed(0)
    sae = perturb_(
        ArchetypalSAE(ArchetypalConfig(d_in=6, width=20, n_candidates=9, k=4, encoder=encoder)), 0.3
    )
    with torch.no_grad():
        sae.b_enc.fill_(0.3)  # jumprelu: some latents fire
    assert_fold_input_scale_exact(sae, torch.randn(7, 6), 0.37)


@pytest.mark.parametrize(
    "kw", [{}, {"learn_scale": False}, {"encoder": "jumprelu", "delta": 0.0}, {"n_candidates": 4}]
)
def test_save_load_round_trip(tmp_path, kw):
    torch.manual_seed(0)
    sae = ArchetypalSAE(ArchetypalConfig(d_in=6, width=10, k=3, **kw))
    with torch.no_grad():
        for t in list(sae.parameters()) + list(sae.buffers()):
            t.add_(torch.rand_like(t))  # every tensor, buffers included, differs from its init
    loaded = load_sae(save_sae(sae, tmp_path / "a"))
    assert type(loaded) is ArchetypalSAE and loaded.cfg == sae.cfg
    assert set(loaded.state_dict()) == set(sae.state_dict())
    for name, t in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0)
    x = torch.randn(5, 6)
    sae.eval()
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"encoder": "gated"}, "encoder"),
        ({"n_candidates": 0}, "n_candidates"),
        ({"delta": -0.1}, "delta"),
        ({"kmeans_iters": 0}, "kmeans_iters"),
        ({"k": 0}, "k must"),
        ({"k": 9}, "k must"),
        ({"aux_coeff": -1.0}, "aux_coeff"),
        ({"k_aux": 0}, "k_aux"),
        ({"encoder": "jumprelu", "bandwidth": 0.0}, "bandwidth"),
        ({"encoder": "jumprelu", "init_threshold": -1.0}, "init_threshold"),
    ],
)
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        ArchetypalConfig(**{"d_in": 4, "width": 8, "k": 2, **kw}).validate()
    ArchetypalConfig(d_in=4, width=8, k=9, encoder="jumprelu").validate()  # k is a topk setting


@pytest.mark.parametrize("encoder", ["topk", "jumprelu"])
def test_learns_synthetic_features(encoder):
    torch.manual_seed(0)
    x, dirs = synthetic_data()
    sae = ArchetypalSAE(ArchetypalConfig(d_in=16, width=48, k=2, encoder=encoder))
    sae.init_from_data(x[:4096], geometric_median(x[:4096]))  # as the trainer does
    train_on_synthetic(sae, x, 250, with_dead_mask if encoder == "topk" else sparsity_warmup)
    assert recovered_fraction(sae.W_dec, dirs) >= 0.9
    assert (sae.W.detach() >= 0).all() and (sae.Lambda.detach().norm(dim=1) <= 1 + 1e-5).all()
