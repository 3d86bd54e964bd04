"""Pieces several architectures share, written once and tested once (tests/test_sae_common.py).

* Initialisation: random unit-norm decoder rows with the encoder set to their transpose (Gao et al.,
  Gemma Scope, dictionary_learning all start this way).
* The unit-norm decoder constraint: before the optimizer step, remove from each decoder row's gradient
  its component along the row; after the step, renormalise the rows. :class:`UnitNormDecoder` wires
  both into the base hooks.
* Top-k selection on a dense (N, M) matrix (per token and over the whole batch), for inference and the
  dense references; training selects inside the sparse encoder (:mod:`saekit.sae.sparse`, which also
  holds :func:`sparse_decode`, re-exported here).
* AuxK (Gao et al. 2024, App. A.2): reconstruct the main model's residual from the top-k_aux *dead*
  latents, normalised by the residual's variance as in OpenAI's code; dense and sparse-path forms.
* :func:`encoder_preacts`, the dense encoder (x − b_dec) W_enc + b_enc with a backward that skips the
  (N, d) input gradient autograd would compute only to reduce it into b_dec's.
* Straight-through estimators of JumpReLU and the Heaviside step with a rectangle kernel
  (Rajamanoharan et al. 2024, spec §2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sparse import (
    COO,
    DeadTopKSelect,
    DenseColumns,
    Selector,
    row_topk,
    sparse_decode_with_block,
    sparse_encode,
)
from .sparse import sparse_decode as sparse_decode  # re-exported: it lives with the sparse path


# -- initialisation ------------------------------------------------------------------------------------
def unit_rows(n_rows: int, n_cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_rows, n_cols) with rows drawn uniformly on the unit sphere (normalised Gaussians)."""
    w = torch.randn(n_rows, n_cols, generator=generator)
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def tied_init(
    d_in: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    scale: float = 1.0,
    latent_major: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_enc_DM, W_dec_MD)``: unit-norm decoder rows and an encoder initialised to ``scale`` times (a
    copy of) their transpose. Starting with encoder ∝ decoder transpose keeps early latents from being dead
    (Gao et al.). ``latent_major`` stores W_enc as the transpose of an (M, d) tensor, the layout in which
    the sparse backward builds its gradient (no transposing copy per step; the trainer gives Adam the
    contiguous alias); otherwise W_enc is a contiguous (d, M) tensor."""
    W_dec_MD = unit_rows(width, d_in, generator)
    W_enc_MD = W_dec_MD.mul(scale)
    return (W_enc_MD.t() if latent_major else W_enc_MD.t().contiguous()), W_dec_MD


# -- unit-norm decoder constraint ------------------------------------------------------------------------
CONSTRAINT_ROWS = 512
"""Decoder rows the gradient projection handles at once (512 × d floats stay in a core's cache)."""


@torch.no_grad()
def remove_parallel_grad_(W_dec_MD: torch.Tensor) -> None:
    """Remove from each row's gradient its component along the row, so that a (small) step moves the
    row tangentially to the unit sphere instead of changing its norm (then undone by renormalising)."""
    if W_dec_MD.grad is None:
        return
    # g − (g·u) u with u = w/‖w‖, written as g − ((g·w)/‖w‖²) w, a block of rows at a time so that the
    # block's w and g are read from cache by the norm, the dot and the update (8.6 against 12.7 ms at
    # 18432 × 576 on 2 CPU cores; vector_norm reads w without the temporary of w.pow(2))
    rows = CONSTRAINT_ROWS
    for w_RD, g_RD in zip(W_dec_MD.split(rows), W_dec_MD.grad.split(rows), strict=True):
        norm_R = torch.linalg.vector_norm(w_RD, dim=1)
        coef_R = torch.linalg.vecdot(g_RD, w_RD) / norm_R.square_().clamp_min_(1e-24)
        g_RD.addcmul_(w_RD, coef_R[:, None], value=-1)


@torch.no_grad()
def normalize_rows_(W_MD: torch.Tensor) -> None:
    """Rescale every row to unit L2 norm in place."""
    W_MD.div_(torch.linalg.vector_norm(W_MD, dim=1, keepdim=True).clamp_min_(1e-12))


class UnitNormDecoder:
    """Mixin for SAEs whose ``W_dec`` rows are kept at unit norm (DESIGN.md's constraint convention).
    List it before :class:`SAE` in the bases so its hooks override the base's no-ops."""

    W_dec: torch.nn.Parameter

    def before_optimizer_step(self) -> None:
        remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        normalize_rows_(self.W_dec)


# -- dense encoder ----------------------------------------------------------------------------------------
class _EncoderPreacts(torch.autograd.Function):
    """π = (x − b_dec) W_enc + b_enc as one ``addmm``. Autograd would get b_dec's gradient by computing
    ∂(x − b_dec) = ∂π W_encᵀ, an (N, M) × (M, d) GEMM (a sixth of a dense step), and summing it over the
    batch; here ∂b_dec = −W_enc Σ_n ∂π_n, a matrix-vector product, and ∂x is computed only when x needs it."""

    @staticmethod
    def forward(ctx, x_ND, W_enc_DM, b_enc_M, b_dec_D):  # noqa: D102 (autograd API)
        xc_ND = x_ND if b_dec_D is None else x_ND - b_dec_D
        ctx.save_for_backward(xc_ND, W_enc_DM)
        return xc_ND @ W_enc_DM if b_enc_M is None else torch.addmm(b_enc_M, xc_ND, W_enc_DM)

    @staticmethod
    def backward(ctx, grad_NM):  # noqa: D102
        xc_ND, W_enc_DM = ctx.saved_tensors
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad
        grad_M = grad_NM.sum(dim=0) if (need_b_enc or need_b_dec) else None
        return (
            grad_NM @ W_enc_DM.t() if need_x else None,
            xc_ND.t() @ grad_NM if need_W else None,
            grad_M if need_b_enc else None,
            -(W_enc_DM @ grad_M) if need_b_dec else None,  # type: ignore[operator]
        )


def encoder_preacts(
    x_ND: torch.Tensor, W_enc_DM: torch.Tensor, b_enc_M: torch.Tensor | None, b_dec_D: torch.Tensor | None
) -> torch.Tensor:
    """(N, M) pre-activations (x − b_dec) W_enc + b_enc (either bias may be None) with a lean backward.
    The output is fresh and not saved for backward, so callers may apply an in-place ReLU to it."""
    return _EncoderPreacts.apply(x_ND, W_enc_DM, b_enc_M, b_dec_D)


def dense_decode(f_NM: torch.Tensor, W_dec_MD: torch.Tensor, b_dec_D: torch.Tensor) -> torch.Tensor:
    """f W_dec + b_dec, as one ``addmm`` (bias fused into the GEMM) for a 2-D batch."""
    return torch.addmm(b_dec_D, f_NM, W_dec_MD) if f_NM.dim() == 2 else f_NM @ W_dec_MD + b_dec_D


# -- top-k selection ------------------------------------------------------------------
def topk_relu(pre_NM: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token top-k of the pre-activations, then ReLU (Gao et al.'s order). Returns ``(vals_NK,
    idx_NK)``; a selected pre-activation ≤ 0 gives a value of 0 (selected but inactive)."""
    vals_NK, idx_NK = row_topk(pre_NM, k)
    return F.relu(vals_NK), idx_NK


def topk_code(pre_NM: torch.Tensor, k: int) -> torch.Tensor:
    """The dense (N, M) code of :func:`topk_relu`: the per-token top-k after ReLU, zeros elsewhere."""
    vals_NK, idx_NK = topk_relu(pre_NM, k)
    return torch.zeros_like(pre_NM).scatter(-1, idx_NK, vals_NK)


def batch_topk_relu(pre_NM: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK selection (Bussmann et al.): the top ``k * N`` entries of the flattened (N, M) matrix,
    then ReLU. Returns COO ``(rows, cols, vals)`` sorted by row, ready for :func:`sparse_decode`."""
    n, m = pre_NM.shape
    vals, flat = pre_NM.flatten().topk(min(k * n, n * m), sorted=False)
    flat, order = flat.sort()
    return flat // m, flat % m, F.relu(vals[order])


def coo_to_dense(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """Scatter COO entries into a dense (N, M) tensor (differentiable with respect to ``vals``)."""
    out = vals.new_zeros(shape[0] * shape[1])
    return out.index_put((rows * shape[1] + cols,), vals).view(shape)


def topk_to_coo(
    vals_NK: torch.Tensor, idx_NK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token top-k output as row-sorted COO ``(rows, cols, vals)``."""
    n, k = idx_NK.shape
    rows = torch.arange(n, device=idx_NK.device).repeat_interleave(k)
    return rows, idx_NK.flatten(), vals_NK.flatten()


# -- AuxK ----------------------------------------------------------------------------------------------
def auxk_loss(
    pre_NM: torch.Tensor, dead_M: torch.Tensor, residual_ND: torch.Tensor, W_dec_MD: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """Normalised AuxK loss ‖e − ê‖² / ‖e − mean_batch(e)‖² (sums over batch and dims; OpenAI's
    ``normalized_mse``), with e the main reconstruction's residual and ê the decode of the top-``k_aux``
    pre-activations *among dead latents*, after ReLU.

    Stop-gradients as in OpenAI's code: the residual target is detached here, so the loss trains only
    what builds ê: the dead latents' encoder columns and biases (through ``pre_NM``, which must keep its
    graph: that is exactly what sparsify's fused encoder lost) and their decoder rows. Unlike OpenAI, ê
    has no ``b_dec`` (as in dictionary_learning), so AuxK touches nothing but dead latents. Returns 0
    when no latent is dead or the residual has zero variance over the batch. This is the dense form (the
    reference the sparse path is tested against); :func:`auxk_loss_from_code` takes the selection made by
    :class:`saekit.sae.sparse.DeadTopKSelect` inside the sparse encoder.
    """
    n_dead = int(dead_M.sum())
    if n_dead == 0 or k_aux <= 0:
        return pre_NM.new_zeros(())
    masked_NM = torch.where(dead_M.to(pre_NM.device)[None, :], pre_NM, torch.finfo(pre_NM.dtype).min)
    vals_NK, idx_NK = topk_relu(masked_NM, min(k_aux, n_dead))
    return auxk_loss_from_code(topk_to_coo(vals_NK, idx_NK), residual_ND, W_dec_MD)


def normalized_residual_error(residual_ND: torch.Tensor, e_hat_ND: torch.Tensor) -> torch.Tensor:
    """‖e − ê‖² / ‖e − mean_batch(e)‖² with e detached (AuxK's loss given its reconstruction ê of the
    residual); 0 when the residual has no variance over the batch."""
    e_ND = residual_ND.detach()
    num = (e_ND - e_hat_ND).pow(2).sum()
    den = (e_ND - e_ND.mean(dim=0, keepdim=True)).pow(2).sum()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num.new_zeros(()))


AUX_DENSE_DENSITY = 1 / 16
"""AuxK selects k_aux = d/2 latents per token among the dead ones (288 at d = 576): when that is at least
this fraction of the dead latents, it runs as dense GEMMs over the dead latents' block (:class:`DeadBlock`)
instead of through the gather kernels. Measured on 2 CPU cores, N = 4096, d = 576, M = 18432 with 5% dead:
the sparse AuxK (1.2M entries) cost more than the main top-k path."""


@dataclass
class DeadBlock:
    """AuxK over the (N, n_dead) block of dead latents' pre-activations, read from the sparse encoder's
    chunks (:class:`~saekit.sae.sparse.DenseColumns`; its gradient is two small GEMMs over the block): per
    token the top ``k`` of the block after ReLU."""

    dead_idx: torch.Tensor
    """(n_dead,) the dead latents."""
    k: int


@dataclass
class DenseAuxCode:
    """AuxK's code on the dead block: ``f_NB[:, j]`` is latent ``dead_idx[j]`` (zeros where not selected)."""

    dead_idx: torch.Tensor
    f_NB: torch.Tensor


AuxCode = COO | DenseAuxCode
"""AuxK's code after ReLU: COO from :class:`~saekit.sae.sparse.DeadTopKSelect`, or dense on the dead block."""


def decode_codes(
    n: int, W_dec_MD: torch.Tensor, code: COO | None, aux_code: AuxCode | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(x̂, ê)``: the main code decoded (no bias; None without ``code``) and AuxK's (None without
    ``aux_code``), as one sparse-decode step so W_dec's gradient from both lands in one tensor. A sparse
    AuxK code is decoded as rows n … 2n − 1 of the same bag-sum, a dense one as the step's block."""
    rows, cols, vals = code if code is not None else (_empty_coo(W_dec_MD))
    main_rows = n if code is not None else 0
    if isinstance(aux_code, DenseAuxCode):
        x_hat, e_hat = sparse_decode_with_block(
            rows, cols, vals, main_rows, W_dec_MD, aux_code.dead_idx.to(W_dec_MD.device), aux_code.f_NB
        )
        return (x_hat if code is not None else None), e_hat
    if aux_code is None:
        return sparse_decode(rows, cols, vals, n, W_dec_MD), None
    a_rows, a_cols, a_vals = aux_code
    both = sparse_decode(
        torch.cat([rows, a_rows + main_rows]),
        torch.cat([cols, a_cols]),
        torch.cat([vals.to(W_dec_MD.dtype), a_vals.to(W_dec_MD.dtype)]),
        main_rows + n,
        W_dec_MD,
    )
    return (both[:n] if code is not None else None), both[main_rows:]


def _empty_coo(like: torch.Tensor) -> COO:
    idx = torch.empty(0, dtype=torch.long, device=like.device)
    return idx, idx, like.new_empty(0)


def auxk_loss_from_code(aux_code: AuxCode, residual_ND: torch.Tensor, W_dec_MD: torch.Tensor) -> torch.Tensor:
    """The normalised AuxK loss of :func:`auxk_loss` given its code, the dead latents' selected entries
    *after* ReLU (COO with rows ascending, or a :class:`DenseAuxCode`)."""
    e_hat_ND = decode_codes(residual_ND.shape[0], W_dec_MD, None, aux_code)[1]
    return normalized_residual_error(residual_ND, e_hat_ND)  # type: ignore[arg-type]


def auxk_term(
    coeff: float,
    pre_NM: torch.Tensor,
    dead_M: torch.Tensor | None,
    residual_ND: torch.Tensor,
    W_dec_MD: torch.Tensor,
    k_aux: int,
) -> dict[str, torch.Tensor]:
    """The loss entry ``{"auxk": coeff · auxk_loss(...)}`` of an architecture with AuxK: empty when
    ``coeff`` is 0, and zero until the trainer reports dead latents (``dead_M`` None)."""
    if coeff <= 0:
        return {}
    if dead_M is None:
        return {"auxk": pre_NM.new_zeros(())}
    return {"auxk": coeff * auxk_loss(pre_NM, dead_M, residual_ND, W_dec_MD, k_aux)}


def auxk_selector(coeff: float, dead_M: torch.Tensor | None, k_aux: int) -> DeadTopKSelect | DeadBlock | None:
    """How AuxK selects this step: None when it contributes nothing (off, no dead-latent report yet, no
    latent dead); a :class:`DeadBlock` when it keeps at least :data:`AUX_DENSE_DENSITY` of the dead
    latents per token; else a :class:`~saekit.sae.sparse.DeadTopKSelect` for the sparse encoder."""
    if coeff <= 0 or k_aux <= 0 or dead_M is None:
        return None
    n_dead = int(dead_M.sum())
    if n_dead == 0:
        return None
    if min(k_aux, n_dead) >= AUX_DENSE_DENSITY * n_dead:
        return DeadBlock(dead_M.nonzero().flatten(), min(k_aux, n_dead))
    return DeadTopKSelect(dead_M, k_aux)


def train_codes(
    x_ND: torch.Tensor,
    W_enc_DM: torch.Tensor,
    b_enc_M: torch.Tensor | None,
    b_dec_D: torch.Tensor | None,
    selector: Selector,
    aux: DeadTopKSelect | DeadBlock | None,
) -> tuple[COO, AuxCode | None]:
    """The codes of a TopK-family training step, after ReLU: the main one and AuxK's (None without
    ``aux``), both from one chunked pass of the sparse encoder (AuxK's selected there, or read there as
    the dead block), whose gradients reach the encoder through one backward."""
    aux_sel = DenseColumns(aux.dead_idx) if isinstance(aux, DeadBlock) else aux
    results = sparse_encode(x_ND, W_enc_DM, b_enc_M, b_dec_D, [selector] + ([aux_sel] if aux_sel else []))
    main = results[0]
    assert isinstance(main, tuple)
    code = (main[0], main[1], F.relu(main[2]))
    if aux is None:
        return code, None
    if isinstance(aux, DeadTopKSelect):
        a_rows, a_cols, a_vals = results[1]  # type: ignore[misc]
        return code, (a_rows, a_cols, F.relu(a_vals))
    pre_NB = results[1]
    assert isinstance(pre_NB, torch.Tensor)
    if aux.k < pre_NB.shape[1]:
        vals_NK, local_NK = pre_NB.topk(aux.k, dim=-1, sorted=False)
        f_NB = torch.zeros_like(pre_NB).scatter(-1, local_NK, F.relu(vals_NK))
        return code, DenseAuxCode(aux.dead_idx, f_NB)
    return code, DenseAuxCode(aux.dead_idx, F.relu(pre_NB))


def auxk_term_from_recon(
    coeff: float, e_hat_ND: torch.Tensor | None, residual_ND: torch.Tensor
) -> dict[str, torch.Tensor]:
    """:func:`auxk_term` for the sparse path, given AuxK's reconstruction ê of the residual from
    :func:`decode_codes` (None: the term is 0, or absent when ``coeff`` is 0)."""
    if coeff <= 0:
        return {}
    if e_hat_ND is None:
        return {"auxk": residual_ND.new_zeros(())}
    return {"auxk": coeff * normalized_residual_error(residual_ND, e_hat_ND)}


def auxk_term_from_code(
    coeff: float, aux_code: AuxCode | None, residual_ND: torch.Tensor, W_dec_MD: torch.Tensor
) -> dict[str, torch.Tensor]:
    """:func:`auxk_term_from_recon` decoding ``aux_code`` on its own (for an SAE whose main decode is its
    own, like Matryoshka's prefixes)."""
    e_hat = None if aux_code is None else decode_codes(residual_ND.shape[0], W_dec_MD, None, aux_code)[1]
    return auxk_term_from_recon(coeff, e_hat, residual_ND)


# -- straight-through estimators (JumpReLU, spec §2.3) -------------------------------------------------
def rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1[-1/2 < u < 1/2] (as ``u``'s dtype)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to a parameter's shape (θ is (M,), the batch is (..., M))."""
    return grad.sum_to_size(shape) if grad.shape != shape else grad


def _window(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """K((π − θ)/ε) as a bool mask, computed with one temporary (|u| < ½ ⇔ −½ < u < ½, exactly)."""
    return ((pre - theta) / eps).abs_() < 0.5


class JumpReLUFunction(torch.autograd.Function):
    """f = π · H(π − θ). Backward: ∂f/∂π = H(π − θ); ∂f/∂θ := −(θ/ε) K((π − θ)/ε), summed over the batch.

    Takes θ itself (not log θ): pass ``log_theta.exp()`` and autograd supplies the chain-rule factor θ
    for log θ (the factor Bussmann's port drops)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return torch.where(pre > theta, pre, 0.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_pre = torch.where(pre > theta, grad_out, 0.0)
        if ctx.needs_input_grad[1]:
            grad_theta = _sum_to(torch.where(_window(pre, theta, eps), grad_out, 0.0), theta.shape)
            grad_theta = grad_theta * (-theta / eps)
        return grad_pre, grad_theta, None


class StepFunction(torch.autograd.Function):
    """H(π − θ). Backward: ∂H/∂π := 0; ∂H/∂θ := −(1/ε) K((π − θ)/ε), summed over the batch. Used for the
    L0 penalty, which therefore trains only θ."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre, theta = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _sum_to(torch.where(_window(pre, theta, ctx.bandwidth), grad_out, 0.0), theta.shape)
            grad_theta = grad_theta * (-1.0 / ctx.bandwidth)
        return None, grad_theta, None  # ∂H/∂π = 0: None spares an (N, M) tensor of zeros


class JumpReLUWithL0(torch.autograd.Function):
    """``(π · H(π − θ), Σ_i H(π_i − θ_i))`` in one node: the outputs and gradients of
    :class:`JumpReLUFunction` and of :class:`StepFunction` summed over latents, with the kernel window
    computed once. ∂θ = −(1/ε) Σ_n K_n ⊙ (θ ∂f_n + ∂count_n); π gets gradient from f only."""

    @staticmethod
    def forward(ctx, pre_NM: torch.Tensor, theta_M: torch.Tensor, bandwidth: float):  # noqa: D102
        ctx.save_for_backward(pre_NM, theta_M)
        ctx.bandwidth = bandwidth
        ctx.set_materialize_grads(False)  # an unused output passes None, not an (N, M) tensor of zeros
        on_NM = pre_NM > theta_M
        return torch.where(on_NM, pre_NM, 0.0), on_NM.sum(dim=-1).to(pre_NM.dtype)

    @staticmethod
    def backward(ctx, grad_f_NM: torch.Tensor | None, grad_count_N: torch.Tensor | None):  # noqa: D102
        pre_NM, theta_M = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_theta = None
        if ctx.needs_input_grad[0] and grad_f_NM is not None:
            grad_pre = torch.where(pre_NM > theta_M, grad_f_NM, 0.0)
        if ctx.needs_input_grad[1]:
            window_NM = _window(pre_NM, theta_M, eps)
            acc_M = theta_M.new_zeros(theta_M.shape)
            if grad_f_NM is not None:
                acc_M = acc_M + torch.where(window_NM, grad_f_NM, 0.0).sum(dim=0) * theta_M
            if grad_count_N is not None:
                acc_M = acc_M + grad_count_N @ window_NM.to(grad_count_N.dtype)
            grad_theta = acc_M * (-1.0 / eps)
        return grad_pre, grad_theta, None


def jumprelu_with_l0(
    pre_NM: torch.Tensor, theta_M: torch.Tensor, bandwidth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f_NM, count_N)``: JumpReLU and the per-token L0 with their straight-through gradients (for (N, M)
    pre-activations and (M,) thresholds)."""
    f_NM, count_N = JumpReLUWithL0.apply(pre_NM, theta_M, bandwidth)
    return f_NM, count_N


def jumprelu(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return JumpReLUFunction.apply(pre, theta, bandwidth)


def step(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return StepFunction.apply(pre, theta, bandwidth)


# -- small shared helpers -----------------------------------------------------------------------------
def sse(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dims, averaged over the batch (the GDM / dictionary_learning scale)."""
    return (x_ND - x_hat_ND).pow(2).sum(dim=-1).mean()


def mse(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over batch and dims (Bussmann's / the TopK family's scale)."""
    return (x_ND - x_hat_ND).pow(2).mean()


def l0(f_NM: torch.Tensor) -> float:
    """Mean number of non-zero latents per token (a logging metric)."""
    return (f_NM != 0).sum(dim=-1).float().mean().item()
