"""The sparse training path (saekit/sae/sparse.py) and the lean dense steps against plain dense autograd.

Every gradient (x, W_enc, b_enc, b_dec, W_dec, and each architecture's own parameters) of every fast
path is compared in float64 with the formula written the obvious way, one loss term at a time, so a term
whose gradient goes missing (sparsify's AuxK-to-encoder bug) fails on its own. Chunked encoding is run with
chunks of a few rows as well as in one piece.
"""

import pytest
import torch

from saekit.sae import common, sparse
from saekit.sae.base import SAEOutput, SparseCode, StepContext
from saekit.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saekit.sae.common import (
    auxk_loss,
    batch_topk_relu,
    coo_to_dense,
    encoder_preacts,
    jumprelu,
    sparse_decode,
    step,
    topk_code,
)
from saekit.sae.gated import GatedConfig, GatedSAE
from saekit.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saekit.sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from saekit.sae.multilayer import MultiLayerConfig, MultiLayerSAE, standardize
from saekit.sae.relu import ReLUConfig, ReLUSAE
from saekit.sae.soft_topk import SoftTopKConfig, SoftTopKSAE
from saekit.sae.topk import TopKConfig, TopKSAE

N, D, M = 40, 8, 24


def _randomize_(sae: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64 with every parameter random (biases non-zero, so their gradients are exercised)."""
    g = torch.Generator().manual_seed(seed)
    sae.double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return sae


def _inputs(seed: int = 1, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g, dtype=torch.float64) * 2).requires_grad_()


def _dead(seed: int = 2, n_dead: int = 9) -> torch.Tensor:
    dead = torch.zeros(M, dtype=torch.bool)
    dead[torch.randperm(M, generator=torch.Generator().manual_seed(seed))[:n_dead]] = True
    return dead


def _grads(term: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [k for k, t in tensors.items() if t.requires_grad]
    if not term.requires_grad:  # a constant term (e.g. AuxK with nothing dead): zero gradient
        return {k: torch.zeros_like(tensors[k]) for k in names}
    got = torch.autograd.grad(term, [tensors[k] for k in names], retain_graph=True, allow_unused=True)
    return {k: torch.zeros_like(tensors[k]) if g is None else g for k, g in zip(names, got, strict=True)}


def _assert_terms_match(
    fast: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]
) -> None:
    """Same loss terms, same values, and the same gradient of each term with respect to every tensor."""
    assert set(fast) == set(ref)
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], msg=f"value of {name}")
        g_fast, g_ref = _grads(fast[name], tensors), _grads(ref[name], tensors)
        for k in g_ref:
            torch.testing.assert_close(g_fast[k], g_ref[k], msg=f"d {name} / d {k}")


@pytest.fixture(params=[None, 3], ids=["one-chunk", "chunks-of-3-rows"])
def chunking(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", request.param * M)
    return request.param


@pytest.fixture(params=["aux-dense-block", "aux-sparse"])
def aux_path(request, monkeypatch):
    """AuxK on the dead latents' dense block, or selected inside the sparse encoder (forced both ways)."""
    monkeypatch.setattr(common, "AUX_DENSE_DENSITY", 0.0 if request.param == "aux-dense-block" else 2.0)
    return request.param


# -- the TopK family against dense autograd, AuxK included -------------------------------------------------
def _dense_topk_family(sae, x, dead, batch: bool) -> dict[str, torch.Tensor]:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = coo_to_dense(*batch_topk_relu(pre, sae.cfg.k), pre.shape) if batch else topk_code(pre, sae.cfg.k)
    x_hat = f @ sae.W_dec + sae.b_dec
    aux = auxk_loss(pre, dead, x - x_hat, sae.W_dec, sae.cfg.k_aux_resolved)
    return {"recon": (x - x_hat).pow(2).mean(), "auxk": sae.cfg.aux_coeff * aux}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [9, 2, 0])
def test_topk_family_every_gradient_matches_dense_autograd(arch, n_dead, chunking, aux_path):
    cls, cfg_cls = (TopKSAE, TopKConfig) if arch == "topk" else (BatchTopKSAE, BatchTopKConfig)
    sae = _randomize_(cls(cfg_cls(d_in=D, width=M, k=3, k_aux=4, aux_coeff=0.5)))
    x, dead = _inputs(), _dead(n_dead=n_dead)
    out = sae(x, StepContext(dead_mask=dead))
    ref = _dense_topk_family(sae, x, dead, batch=arch == "batchtopk")
    tensors = {"x": x, **dict(sae.named_parameters())}
    _assert_terms_match(out.losses, ref, tensors)
    torch.testing.assert_close(out.f, ref_f := (out.code.to_dense()))
    assert ref_f.shape == (N, M)


def test_auxk_trains_the_dead_latents_encoder_columns(chunking, aux_path):
    """The bug sparsify shipped: AuxK's gradient must reach W_enc and b_enc, on the dead latents only."""
    sae = _randomize_(TopKSAE(TopKConfig(d_in=D, width=M, k=3, k_aux=4)))
    x, dead = _inputs(), _dead()
    out = sae(x, StepContext(dead_mask=dead))
    g_W, g_b = torch.autograd.grad(out.losses["auxk"], [sae.W_enc, sae.b_enc])
    assert g_W[:, dead].abs().sum() > 0 and g_b[dead].abs().sum() > 0
    assert g_W[:, ~dead].abs().sum() == 0 and g_b[~dead].abs().sum() == 0
    want = torch.autograd.grad(_dense_topk_family(sae, x, dead, False)["auxk"], [sae.W_enc, sae.b_enc])
    torch.testing.assert_close(g_W, want[0])
    torch.testing.assert_close(g_b, want[1])


def test_batchtopk_threshold_update_is_unchanged_by_the_sparse_path():
    sae = _randomize_(BatchTopKSAE(BatchTopKConfig(d_in=D, width=M, k=3)))
    x = _inputs().detach()
    sae(x, StepContext())
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals = batch_topk_relu(pre.detach(), 3)[2]
    assert sae.threshold.item() == pytest.approx(vals[vals > 0].min().item())


def _dense_matryoshka(sae: MatryoshkaSAE, x, dead) -> dict[str, torch.Tensor]:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = coo_to_dense(*batch_topk_relu(pre, sae.cfg.k), pre.shape)
    mses = [(x - f[:, :m] @ sae.W_dec[:m] - sae.b_dec).pow(2).mean() for m in sae.cfg.group_ends]
    x_hat = f @ sae.W_dec + sae.b_dec
    aux = auxk_loss(pre, dead, x - x_hat, sae.W_dec, sae.cfg.k_aux_resolved)
    return {"recon": sum(mses) / len(mses), "auxk": sae.cfg.aux_coeff * aux}


def test_matryoshka_every_gradient_matches_dense_autograd(chunking, aux_path):
    cfg = MatryoshkaConfig(d_in=D, width=M, k=3, k_aux=4, aux_coeff=0.5, group_fractions=[0.25, 0.25, 0.5])
    sae = _randomize_(MatryoshkaSAE(cfg))
    x, dead = _inputs(), _dead()
    out = sae(x, StepContext(dead_mask=dead))
    _assert_terms_match(out.losses, _dense_matryoshka(sae, x, dead), {"x": x, **dict(sae.named_parameters())})


def test_multilayer_every_gradient_matches_dense_autograd(chunking, aux_path):
    sae = _randomize_(
        MultiLayerSAE(MultiLayerConfig(d_in=D, width=M, k=3, k_aux=4, aux_coeff=0.5, n_layers=2))
    )
    x, dead = _inputs(), _dead()
    out = sae(x, StepContext(dead_mask=dead))
    z, (mu, sigma) = standardize(x, sae.eps)
    pre = (z - sae.b_pre) @ sae.W_enc
    z_hat = topk_code(pre, 3) @ sae.W_dec + sae.b_pre
    x_hat = z_hat * sigma + mu
    fvu = [(xl - xh).pow(2).mean() / xl.var() for xl, xh in zip(x.chunk(2), x_hat.chunk(2), strict=True)]
    ref = {"recon": sum(fvu) / 2, "auxk": 0.5 * auxk_loss(pre, dead, z - z_hat, sae.W_dec, 4)}
    _assert_terms_match(out.losses, ref, {"x": x, **dict(sae.named_parameters())})


def test_soft_topk_hard_phase_matches_dense_autograd(chunking, aux_path):
    cfg = SoftTopKConfig(d_in=D, width=M, k=3, k_max=6, k_aux=4, aux_coeff=0.5, hard_start=0.5)
    sae = _randomize_(SoftTopKSAE(cfg))
    x, dead = _inputs(), _dead()
    out = sae(x, StepContext(dead_mask=dead, step=9, total_steps=10))
    assert out.metrics["hard"] == 1.0 and out.code is not None
    pre = sae.pre_acts(x)
    vals, idx = sae.hard_select(torch.relu(pre), sae.estimate_k(x).detach())
    x_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ sae.W_dec + sae.b_dec
    ref = {
        "recon": (x - x_hat).pow(2).sum(-1).mean(),
        "k_penalty": x.new_zeros(()),
        "auxk": 0.5 * auxk_loss(pre, dead, x - x_hat, sae.W_dec, 4),
    }
    _assert_terms_match(out.losses, ref, {"x": x, **dict(sae.named_parameters())})


def _saved_sizes(run) -> list[int]:
    """numel of every tensor autograd saves for backward while ``run()`` builds its graph."""
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        run()
    return sizes


def test_sparse_path_keeps_no_dense_matrix_for_backward():
    """Nothing of N × M entries is saved for backward by the sparse path (the dense reference is)."""
    n, m = 64, 48
    for sae in (
        TopKSAE(TopKConfig(d_in=D, width=m, k=3, k_aux=4)),
        MatryoshkaSAE(MatryoshkaConfig(d_in=D, width=m, k=3, group_fractions=[0.5, 0.5])),
    ):
        x, dead = torch.randn(n, D), torch.arange(m) % 3 == 0
        sizes = _saved_sizes(lambda: sae(x, StepContext(dead_mask=dead)).loss)  # noqa: B023
        assert max(sizes) < n * m, (type(sae).__name__, max(sizes))
        dense = _saved_sizes(lambda: sum(_dense_topk_family(sae, x, dead, batch=False).values()))  # noqa: B023
        assert max(dense) >= n * m  # the check sees a dense matrix when there is one


# -- the pieces -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("candidates", [1, 2, 4])
def test_batch_topk_select_equals_a_top_k_over_the_whole_batch(candidates, chunking):
    """Exact even when rows hold more than their candidates (candidates=1 forces the recompute)."""
    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        pre = torch.randn(N, M, generator=g, dtype=torch.float64)
        pre[trial] += 10.0  # a row whose entries all beat everyone else's
        eye = torch.eye(M, dtype=torch.float64)
        (coo,) = sparse.select_chunked(pre, eye, None, [sparse.BatchTopKSelect(3, candidates)])
        rows, cols, vals = batch_topk_relu(pre, 3)
        torch.testing.assert_close(coo[0], rows)
        torch.testing.assert_close(coo[1], cols)
        torch.testing.assert_close(coo[2].relu(), vals)


def test_dead_topk_select_reads_only_dead_latents():
    pre = torch.arange(2 * M, dtype=torch.float64).view(2, M)
    dead = _dead()
    (coo,) = sparse.select_chunked(
        pre, torch.eye(M, dtype=torch.float64), None, [sparse.DeadTopKSelect(dead, 4)]
    )
    want = dead.nonzero().flatten()[-4:]  # values grow with the index: the 4 highest dead latents
    assert coo[1].tolist() == want.tolist() * 2 and coo[0].tolist() == [0] * 4 + [1] * 4
    torch.testing.assert_close(coo[2], pre[coo[0], coo[1]])


@pytest.mark.parametrize("kernel", ["sampled_addmm", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_decode_matches_dense_autograd(kernel, dtype, monkeypatch):
    """Unsorted and repeated columns, a token with no entry; both ∂vals kernels."""
    if kernel == "gather":
        monkeypatch.setitem(
            sparse._KERNELS, "cpu", sparse.SparseKernels(sparse._bag_sum_torch, sparse._sampled_dot_gather)
        )
    rows = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3])
    cols = torch.tensor([5, 1, 3, 1, 0, 5, 2, 4])
    g = torch.Generator().manual_seed(4)
    vals = torch.randn(8, generator=g, dtype=dtype, requires_grad=True)
    W = torch.randn(6, 3, generator=g, dtype=dtype, requires_grad=True)
    out = sparse_decode(rows, cols, vals, 5, W)
    ref = coo_to_dense(rows, cols, vals, (5, 6)) @ W
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn(5, 3, generator=g, dtype=dtype)
    got = torch.autograd.grad(out, [vals, W], grad_out)
    want = torch.autograd.grad(ref, [vals, W], grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert out[1].abs().sum() == 0 and out[4].abs().sum() == 0


def test_kernels_are_chosen_at_call_time_from_the_device(monkeypatch, aux_path):
    """A backend registered after import is used by the next call (as a GPU kernel would be), and the
    gradients it gives equal the reference."""
    calls = {"bag_sum": 0, "sampled_dot": 0}

    def bag_sum(*a):
        calls["bag_sum"] += 1
        return sparse._bag_sum_torch(*a)

    def sampled_dot(*a):
        calls["sampled_dot"] += 1
        return sparse._sampled_dot_gather(*a)

    sae = _randomize_(TopKSAE(TopKConfig(d_in=D, width=M, k=3, k_aux=4, aux_coeff=0.5)))
    x, dead = _inputs(), _dead()
    assert sparse.kernels_for(x) is sparse.TORCH_KERNELS
    monkeypatch.setitem(sparse._KERNELS, "cpu", sparse.SparseKernels(bag_sum, sampled_dot))
    out = sae(x, StepContext(dead_mask=dead))
    _assert_terms_match(
        out.losses, _dense_topk_family(sae, x, dead, False), {"x": x, **dict(sae.named_parameters())}
    )
    assert calls["bag_sum"] > 0 and calls["sampled_dot"] > 0


def test_sparse_code_firing_equals_the_dense_statistics():
    code = SparseCode(
        torch.tensor([0, 0, 2, 2]), torch.tensor([1, 3, 1, 4]), torch.tensor([1.0, 0.0, 2.0, 3.0]), (3, 5)
    )
    dense = code.to_dense()
    sparse_out = SAEOutput(torch.zeros(3, 2), None, {}, code=code)
    dense_out = SAEOutput(torch.zeros(3, 2), dense, {})
    for fired, l0 in (sparse_out.firing(), dense_out.firing()):
        assert fired.tolist() == [False, True, False, False, True]
        assert l0.item() == pytest.approx(
            1.0
        )  # 3 non-zero entries over 3 tokens (a selected 0 does not fire)
    torch.testing.assert_close(sparse_out.f, dense)  # built lazily from the code
    with pytest.raises(ValueError, match="needs the code"):
        SAEOutput(torch.zeros(3, 2), None, {})


# -- dense architectures against plain autograd -----------------------------------------------------------
@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("biases", [(True, True), (False, True), (True, False)])
def test_encoder_preacts_matches_plain_autograd(need_x, biases):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=need_x)
    W = torch.randn(D, M, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(M, generator=g, dtype=torch.float64, requires_grad=True) if biases[0] else None
    b_dec = torch.randn(D, generator=g, dtype=torch.float64, requires_grad=True) if biases[1] else None
    out = encoder_preacts(x, W, b_enc, b_dec)
    ref = (x if b_dec is None else x - b_dec) @ W + (0 if b_enc is None else b_enc)
    torch.testing.assert_close(out, ref)
    tensors = [t for t in (x, W, b_enc, b_dec) if t is not None and t.requires_grad]
    grad_out = torch.randn(N, M, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(out, tensors, grad_out), torch.autograd.grad(ref, tensors, grad_out), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("decoder_norm", ["constrained", "weighted"])
@pytest.mark.parametrize("tied", [False, True])
def test_relu_matches_plain_autograd(decoder_norm, tied):
    sae = _randomize_(
        ReLUSAE(ReLUConfig(d_in=D, width=M, l1_coeff=0.3, decoder_norm=decoder_norm, tied=tied))
    )
    x = _inputs()
    out = sae(x, StepContext(sparsity_scale=0.5))
    W_enc = sae.enc_scale * sae.W_dec.t() if tied else sae.W_enc
    f = torch.relu((x - sae.b_dec) @ W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    weight = sae.W_dec.norm(dim=1) if decoder_norm == "weighted" else 1.0
    ref = {"recon": (x - x_hat).pow(2).sum(-1).mean(), "l1": 0.3 * 0.5 * (f * weight).sum(-1).mean()}
    _assert_terms_match(out.losses, ref, {"x": x, **dict(sae.named_parameters())})
    torch.testing.assert_close(out.f, f)


def test_gated_matches_plain_autograd():
    sae = _randomize_(GatedSAE(GatedConfig(d_in=D, width=M, l1_coeff=0.3)))
    x = _inputs()
    out = sae(x, StepContext(sparsity_scale=0.5))
    xc = x - sae.b_dec
    pi_gate = xc @ sae.W_enc + sae.b_gate
    pi_mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0).double() * torch.relu(pi_mag)
    x_hat = f @ sae.W_dec + sae.b_dec
    via = torch.relu(pi_gate)
    ref = {
        "recon": (x - x_hat).pow(2).sum(-1).mean(),
        "l1": 0.3 * 0.5 * via.sum(-1).mean(),
        "aux": (x - via @ sae.W_dec.detach() - sae.b_dec.detach()).pow(2).sum(-1).mean(),
    }
    _assert_terms_match(out.losses, ref, {"x": x, **dict(sae.named_parameters())})
    torch.testing.assert_close(out.f, f)
    torch.testing.assert_close(sae.encode(x), f)


@pytest.mark.parametrize("target_l0", [None, 5.0])
@pytest.mark.parametrize("pre_enc_bias", [False, True])
def test_jumprelu_matches_separate_straight_through_estimators(target_l0, pre_enc_bias):
    """f and the L0 in one node give what common.jumprelu and common.step (checked against the spec's
    formulas in test_sae_common.py) give as two."""
    cfg = JumpReLUConfig(
        d_in=D, width=M, l0_coeff=0.3, target_l0=target_l0, pre_enc_bias=pre_enc_bias, bandwidth=0.8
    )
    sae = _randomize_(JumpReLUSAE(cfg))
    x = _inputs()
    out = sae(x, StepContext(sparsity_scale=0.5))
    pre = ((x - sae.b_dec) if pre_enc_bias else x) @ sae.W_enc + sae.b_enc
    theta = sae.log_threshold.exp()
    x_hat = jumprelu(pre, theta, 0.8) @ sae.W_dec + sae.b_dec
    l0 = step(pre, theta, 0.8).sum(-1).mean()
    sparsity = l0 if target_l0 is None else D * (l0 / target_l0 - 1).pow(2)
    ref = {"recon": (x - x_hat).pow(2).sum(-1).mean(), "l0": 0.3 * 0.5 * sparsity}
    tensors = {"x": x, **dict(sae.named_parameters())}
    _assert_terms_match(out.losses, ref, tensors)
    assert _grads(out.losses["l0"], tensors)["log_threshold"].abs().sum() > 0  # the window caught some


# -- row_topk: torch.topk's entries, found among the best column groups -----------------------------------
def _assert_same_topk(x: torch.Tensor, k: int) -> None:
    vals, idx = sparse.row_topk(x, k)
    ref_vals, _ = x.topk(k, dim=-1, sorted=False)
    torch.testing.assert_close(vals.sort(dim=-1).values, ref_vals.sort(dim=-1).values, equal_nan=True)
    torch.testing.assert_close(x.gather(1, idx), vals, equal_nan=True)
    assert all(len(set(row.tolist())) == k for row in idx)  # k different latents per row


@pytest.mark.parametrize(("n", "m", "k"), [(7, 512, 4), (3, 4608, 32), (5, 524, 4), (4, 40, 3)])
def test_row_topk_selects_the_k_largest_entries(n, m, k):
    """Wide rows take the grouped path (512, 4608); 524 (not a multiple of 8 groups) and 40 (too few
    groups for k) fall back to topk itself."""
    torch.manual_seed(0)
    x = torch.randn(n, m)
    x[0, 3 * (m // 8) + 1 :: m // 8] = 5.0  # a row whose top entries crowd into one column group
    _assert_same_topk(x, k)


def test_row_topk_over_the_last_dimension_of_a_3d_tensor():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 512)
    vals, idx = sparse.row_topk(x, 4)
    torch.testing.assert_close(vals.sort(dim=-1).values, x.topk(4, dim=-1).values.sort(dim=-1).values)
    torch.testing.assert_close(x.gather(-1, idx), vals)


def test_row_topk_with_ties_and_nan():
    torch.manual_seed(0)
    x = torch.zeros(3, 512)  # a row of ties: any k different columns are its top k
    x[1] = torch.randn(512)
    x[1, 100] = float("nan")  # NaN counts as the largest, as in topk
    x[2] = torch.randn(512).round()
    _assert_same_topk(x, 4)
