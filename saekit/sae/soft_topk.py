"""SoftSAE: a learned, per-input number of active latents, trained through LapSum soft top-k
(Stępień, Mazur, Tabor, Spurek 2026, arXiv 2605.06610; reference code St0pien/SoftSAE; spec §6.2).

    z = ReLU((x − b_dec) W_enc + b_enc)                                      (N, M) candidate activations
    k̂(x) = clamp(k_max · σ(w_kᵀ ReLU((x − b_dec) W_k + b_k) + c_k), 1, M)     how many latents x needs
    training:  f = z ⊙ m,  m = LapSum top-k̂(z; α)                            soft mask, Σ_j m_j = k̂
    end of training and inference:  f = z on the top-⌊k̂(x)⌋ entries of z, 0 elsewhere
    x̂ = f W_dec + b_dec
    L = ‖x − x̂‖² (SSE)  +  w_k · softplus_β(mean_batch k̂ − k_t)  +  (1/32) · AuxK

LapSum (Struski et al. 2025, the ``lapsum`` package the reference uses): with F the standard Laplace
CDF, the mask is m_j = F((z_j − b)/α), where the threshold b solves Σ_j F((z_j − b)/α) = k̂. The sum is
strictly decreasing in b; with s the row sorted descending and i entries above b (s_{i−1} > b ≥ s_i)
it reads i − ½ a q + ½ r / q with q = exp((b − s_i)/α) and a, r sums of exponentials of gaps to s_i,
so b is the root of a quadratic in q: one sort, two log-cumsum-exps and a closed form, batched over
rows (:func:`lapsum_threshold`). As α → 0 the mask tends to 1 on the top ⌊k̂⌋ entries, k̂ − ⌊k̂⌋ on the
next one and 0 elsewhere (the hard top-k mask for integer k̂). The gradient comes from the implicit
function theorem (:class:`LapSumTopK`): with p_j = Laplace pdf((z_j − b)/α)/α,

    ∂m_i/∂z_j = p_i δ_ij − p_i p_j / Σp,      ∂m_i/∂k̂ = p_i / Σp.

Schedules, all driven by ``ctx.progress`` (the fraction of the run done; the reference counts steps):
α goes linearly from ``alpha_start`` (1) to ``alpha_final`` (1e-4) over the first ``alpha_anneal_fraction``
of the run; the target k_t goes linearly from d_in to ``k`` over the first ``k_anneal_fraction`` (1%);
from ``hard_start`` on, training uses the hard top-⌊k̂⌋ with k̂ under no_grad and no k penalty.

saekit's choices where the spec is silent or where saekit differs from the reference:
* Schedule lengths as fractions of the run. The reference's LLM settings (α over 2,500 steps, hard for the
  last 10,000, of 500M tokens / 2,048 ≈ 244k steps) give the defaults 0.01 and ``hard_start`` = 0.96.
* k_t stays a float (the reference truncates it to an int) and starts at max(d_in, k).
* ``k_max`` must be > k (else mean k̂ cannot reach k) and < M (so the soft top-k has a finite threshold);
  the clamp to M therefore never binds.
* SSE, w_k = 1 and the 1/32 AuxK weight as in the reference, whose inputs are normalised to E‖x‖² = d like
  saekit's. ``ctx.sparsity_scale`` is unused (the k_t annealing plays the warm-up's role).
* Encoder, decoder, unit-norm decoder constraint, AuxK (k_aux = d/2 over dead latents) and init
  (W_enc = W_decᵀ, b_enc = 0) are :mod:`saekit.sae.topk`'s; W_k starts as a copy of W_enc, b_k = 0, and the
  output layer (w_k, c_k) as PyTorch's ``nn.Linear`` default, as in the reference.
* ``forward`` without a context is the start of a run (soft, α = ``alpha_start``); ``encode`` is always hard.
* The soft phase decodes the dense f; the hard phase runs the sparse path of :mod:`saekit.sae.sparse`
  (chunked encoder, selected entries only, sparse backward, AuxK inside the encoder). While soft,
  every z > 0 has m > 0 (until it underflows), so the trainer's l0 and dead-latent counts see every
  positive latent as firing, as the reference's ``did_fire`` does; the metric ``k_hat_mean`` is the
  code's real size then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .base import SAEOutput, SparseCode, StepContext, register
from .common import auxk_selector, auxk_term, auxk_term_from_recon, decode_codes, sse, train_codes
from .sparse import COO
from .topk import TopKConfig, TopKSAE


# -- LapSum soft top-k -----------------------------------------------------------------------------------
@torch.no_grad()
def lapsum_threshold(z_NM: torch.Tensor, k_N: torch.Tensor, alpha: float) -> torch.Tensor:
    """The b (N,) with Σ_j F((z_nj − b_n)/α) = k_n for each row, F the standard Laplace CDF; 0 < k_n < M.

    With s the row sorted descending, count the knots whose sum S(s_i) ≤ k: that is the number i of
    entries above b. Write a = Σ_{j<i} e^{(s_i − s_j)/α} and r = Σ_{j≥i} e^{(s_j − s_i)/α}: each is in
    [0, M], so nothing overflows, and both are kept as logs, so no underflow gives a wrong root. For b in
    [s_i, s_{i−1}] with q = e^{(b − s_i)/α}: S = i − ½ a q + ½ r / q, and S = k is a q² + 2 c q − r = 0
    with c = k − i. Its positive root is written in the form without cancellation for each sign of c.
    If every entry is above b (i = M), S = M − ½ (1 + a_{M−1}) e^{(b − s_{M−1})/α}.
    """
    n, m = z_NM.shape
    s_NM = z_NM.sort(dim=-1, descending=True).values
    u_NM = (s_NM - s_NM[:, :1]) / alpha  # shifted by the row max: only differences matter
    log_a_NM = torch.cat([u_NM.new_full((n, 1), -math.inf), torch.logcumsumexp(-u_NM, -1)[:, :-1]], -1) + u_NM
    log_r_NM = torch.logcumsumexp(u_NM.flip(-1), -1).flip(-1) - u_NM
    i_M = torch.arange(m, device=z_NM.device, dtype=z_NM.dtype)
    sum_at_knots_NM = i_M - 0.5 * log_a_NM.exp() + 0.5 * log_r_NM.exp()  # S(s_i), non-decreasing in i
    k_N1 = k_N.to(z_NM.dtype)[:, None]
    above_N1 = (sum_at_knots_NM <= k_N1).sum(-1, keepdim=True)  # entries above b
    at = above_N1.clamp(max=m - 1)
    s_i, log_a, log_r = s_NM.gather(1, at), log_a_NM.gather(1, at), log_r_NM.gather(1, at)
    c = k_N1 - above_N1.to(z_NM.dtype)
    # h = log(|c| + √(c² + a r)) from logs: a r can underflow where |c| does not matter (and vice versa)
    log_c, log_sqrt_ar = c.abs().log(), 0.5 * (log_a + log_r)
    top = torch.maximum(log_c, log_sqrt_ar)
    c_, sqrt_ar_ = (log_c - top).exp(), (log_sqrt_ar - top).exp()
    h = top + (c_ + (c_.square() + sqrt_ar_.square()).sqrt()).log()
    log_q = torch.where(c > 0, log_r - h, h - log_a)
    b_inside = s_i + alpha * log_q
    log_a_last = log_a_NM[:, -1:]
    b_below_all = s_NM[:, -1:] + alpha * ((2 * (m - k_N1)).log() - F.softplus(log_a_last))
    return torch.where(above_N1 == m, b_below_all, b_inside).squeeze(1)


def laplace_cdf(u: torch.Tensor) -> torch.Tensor:
    """Standard Laplace CDF: ½ e^u for u ≤ 0, 1 − ½ e^{−u} for u > 0."""
    half_tail = 0.5 * torch.exp(-u.abs())
    return torch.where(u > 0, 1 - half_tail, half_tail)


class LapSumTopK(torch.autograd.Function):
    """m = F((z − b(z, k))/α) with Σ_j m_j = k; backward by the implicit function theorem (module doc).

    Σp can underflow for tiny α, so the weights p_j / Σp are a softmax of −|z_j − b|/α, which is exact."""

    @staticmethod
    def forward(ctx, z_NM: torch.Tensor, k_N: torch.Tensor, alpha: float) -> torch.Tensor:
        b_N = lapsum_threshold(z_NM, k_N, alpha)
        ctx.save_for_backward(z_NM, b_N)
        ctx.alpha = alpha
        return laplace_cdf((z_NM - b_N[:, None]) / alpha)

    @staticmethod
    @once_differentiable  # b(z, k) is not differentiated again: a second derivative would be wrong
    def backward(ctx, grad_m_NM: torch.Tensor):
        z_NM, b_N = ctx.saved_tensors
        alpha = ctx.alpha
        log_p_NM = -(z_NM - b_N[:, None]).abs() / alpha  # log of the pdf, up to log(2α)
        grad_k_N = (grad_m_NM * log_p_NM.softmax(-1)).sum(-1)  # Σ_i g_i p_i / Σp
        grad_z_NM = log_p_NM.exp() / (2 * alpha) * (grad_m_NM - grad_k_N[:, None])
        return grad_z_NM, grad_k_N, None


def lapsum_topk(z_NM: torch.Tensor, k_N: torch.Tensor, alpha: float) -> torch.Tensor:
    """Soft top-k mask (N, M) in [0, 1] whose rows sum to k_N (0 < k_n < M; α > 0, smaller is harder).

    Half precision is solved in float32, as the reference does. In float32 the row sums are as exact as
    the resolution of z/α allows: ~1e-5 at α = 1, ~1e-2 at α = 1e-4 for z of order 1 (tests measure it)."""
    dtype = z_NM.dtype
    solve_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return LapSumTopK.apply(z_NM.to(solve_dtype), k_N.to(solve_dtype), alpha).to(dtype)


def linear_schedule(progress: float, fraction: float, start: float, end: float) -> float:
    """``start`` → ``end`` linearly over the first ``fraction`` of the run, then ``end``."""
    r = 1.0 if fraction <= 0 else min(1.0, progress / fraction)
    return (1 - r) * start + r * end


class RankedTopKSelect:
    """The hard phase's selection for the sparse encoder: each token's ⌊k̂⌋ largest pre-activations
    (⌊k̂⌋ ≤ K = k_max), i.e. the entries :meth:`SoftTopKSAE.hard_select` keeps non-zero."""

    def __init__(self, k_max: int, keep_N: torch.Tensor):
        self.k_max, self.keep_N = k_max, keep_N

    def chunk(self, pre_nM: torch.Tensor, row0: int) -> COO:
        vals_nK, idx_nK = pre_nM.topk(self.k_max, dim=-1)  # sorted: position = rank
        rank_K = torch.arange(self.k_max, device=pre_nM.device)
        keep_nK = rank_K < self.keep_N[row0 : row0 + pre_nM.shape[0], None].to(pre_nM.device)
        rows_nK = torch.arange(row0, row0 + pre_nM.shape[0], device=pre_nM.device)[:, None].expand_as(idx_nK)
        return rows_nK[keep_nK], idx_nK[keep_nK], vals_nK[keep_nK]

    def finish(self, parts, pre_rows) -> COO:
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


# -- the SAE ---------------------------------------------------------------------------------------------
@dataclass
class SoftTopKConfig(TopKConfig):
    k: int = 32
    """Target mean k̂: the k penalty holds the batch mean of k̂(x) at (or below) this."""
    init_encoder_scale: float = 1.0
    """W_enc starts as this times W_decᵀ (the reference's 1, not TopK's 1/√3)."""
    k_max: int | None = None
    """Ceiling of k̂ (k̂ = k_max·σ(...)); default 2k. Must be > k and < width."""
    k_coeff: float = 1.0
    """w_k, the coefficient of the k penalty softplus_β(mean k̂ − k_t)."""
    k_beta: float = 5.0
    """β, the sharpness of the k penalty's softplus."""
    k_anneal_fraction: float = 0.01
    """Fraction of the run over which the target k_t goes linearly from d_in down to k (0: k throughout)."""
    alpha_start: float = 1.0
    """LapSum temperature α (a scale in latent units) at the start of the run."""
    alpha_final: float = 1e-4
    """α after annealing."""
    alpha_anneal_fraction: float = 0.01
    """Fraction of the run over which α goes linearly from alpha_start to alpha_final (0: alpha_final)."""
    hard_start: float = 0.96
    """Progress (fraction of the run) from which training uses the hard top-⌊k̂⌋ (1: never)."""

    def validate(self) -> None:
        super().validate()
        if not self.k < self.k_max_resolved < self.width:
            raise ValueError(
                f"k_max must satisfy k={self.k} < k_max < width={self.width}, got k_max={self.k_max_resolved}"
                + (" (the default 2k)" if self.k_max is None else "")
            )
        for name in ("k_anneal_fraction", "alpha_anneal_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.hard_start <= 1:
            raise ValueError(f"hard_start must be in (0, 1] (1 = never hard), got {self.hard_start}")
        if self.alpha_start <= 0 or self.alpha_final <= 0:
            raise ValueError(
                f"alpha_start and alpha_final must be > 0, got {self.alpha_start}, {self.alpha_final}"
            )
        if self.k_coeff < 0 or self.k_beta <= 0:
            raise ValueError(f"k_coeff must be >= 0 and k_beta > 0, got {self.k_coeff}, {self.k_beta}")

    @property
    def k_max_resolved(self) -> int:
        return self.k_max if self.k_max is not None else 2 * self.k


@register("soft_topk")
class SoftTopKSAE(TopKSAE):
    """The algorithm is in the module docstring. From :class:`TopKSAE` it keeps the parameters W_enc,
    b_enc, W_dec, b_dec with their init, ``pre_acts``, ``decode`` and the unit-norm decoder hooks; the
    k estimator adds W_k (d, M), b_k (M,), w_k (M,) and c_k ()."""

    config_class = SoftTopKConfig
    cfg: SoftTopKConfig

    def __init__(self, cfg: SoftTopKConfig):
        super().__init__(cfg)
        out = nn.Linear(cfg.width, 1)  # the reference's output layer, with PyTorch's default init
        self.W_k = nn.Parameter(self.W_enc.detach().clone())
        self.b_k = nn.Parameter(torch.zeros(cfg.width))
        self.w_k = nn.Parameter(out.weight.detach()[0].clone())
        self.c_k = nn.Parameter(out.bias.detach()[0].clone())

    # -- schedules -----------------------------------------------------------------------------------------
    def alpha(self, progress: float) -> float:
        c = self.cfg
        return linear_schedule(progress, c.alpha_anneal_fraction, c.alpha_start, c.alpha_final)

    def k_target(self, progress: float) -> float:
        c = self.cfg
        return linear_schedule(progress, c.k_anneal_fraction, float(max(c.d_in, c.k)), float(c.k))

    def is_hard(self, progress: float) -> bool:
        return progress >= self.cfg.hard_start

    # -- encoder pieces ------------------------------------------------------------------------------------
    def estimate_k(self, x_ND: torch.Tensor) -> torch.Tensor:
        """k̂(x) (N,), in [1, k_max]."""
        h_NM = F.relu((x_ND - self.b_dec) @ self.W_k + self.b_k)
        return (self.cfg.k_max_resolved * torch.sigmoid(h_NM @ self.w_k + self.c_k)).clamp(1, self.cfg.width)

    def hard_select(self, z_NM: torch.Tensor, k_hat_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row top-⌊k̂⌋ of z as ``(vals_NK, idx_NK)`` with K = k_max; ranks ≥ ⌊k̂⌋ hold value 0."""
        vals_NK, idx_NK = z_NM.topk(self.cfg.k_max_resolved, dim=-1)  # sorted, so rank = position
        rank_K = torch.arange(vals_NK.shape[1], device=z_NM.device)
        return vals_NK * (rank_K < k_hat_N.detach().floor()[:, None]), idx_NK

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        z_NM = F.relu(self.pre_acts(x_ND))
        vals_NK, idx_NK = self.hard_select(z_NM, self.estimate_k(x_ND))
        return torch.zeros_like(z_NM).scatter(-1, idx_NK, vals_NK)

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        cfg, n = self.cfg, x_ND.shape[0]
        hard, alpha, k_t = self.is_hard(ctx.progress), self.alpha(ctx.progress), self.k_target(ctx.progress)
        code = f_NM = None
        if hard:  # the sparse path: no (N, M) tensor is kept, AuxK selects inside the encoder
            with torch.no_grad():
                k_hat_N = self.estimate_k(x_ND)
            aux_sel = auxk_selector(cfg.aux_coeff, ctx.dead_mask, cfg.k_aux_resolved)
            selector = RankedTopKSelect(cfg.k_max_resolved, k_hat_N.floor().long())
            (rows, cols, vals), aux_code = train_codes(
                x_ND, self.W_enc, self.b_enc, self.b_dec, selector, aux_sel
            )
            x_hat_ND, e_hat_ND = decode_codes(n, self.W_dec, (rows, cols, vals), aux_code)
            x_hat_ND = x_hat_ND + self.b_dec
            code = SparseCode(rows, cols, vals, (n, self.width))
            k_loss = x_hat_ND.new_zeros(())
            aux = auxk_term_from_recon(cfg.aux_coeff, e_hat_ND, x_ND - x_hat_ND)
        else:
            pre_NM = self.pre_acts(x_ND)
            z_NM = F.relu(pre_NM)
            k_hat_N = self.estimate_k(x_ND)
            f_NM = z_NM * lapsum_topk(z_NM, k_hat_N, alpha)
            x_hat_ND = self.decode(f_NM)
            k_loss = cfg.k_coeff * F.softplus(k_hat_N.mean() - k_t, beta=cfg.k_beta)
            aux = auxk_term(
                cfg.aux_coeff, pre_NM, ctx.dead_mask, x_ND - x_hat_ND, self.W_dec, cfg.k_aux_resolved
            )
        losses = {"recon": sse(x_ND, x_hat_ND), "k_penalty": k_loss, **aux}
        k_hat = k_hat_N.detach()
        metrics = {
            "k_hat_mean": k_hat.mean(),
            "k_hat_min": k_hat.min(),
            "k_hat_max": k_hat.max(),
            "k_target": k_t,
            "alpha": alpha,
            "hard": float(hard),
        }
        return SAEOutput(x_hat_ND, f_NM, losses, metrics, code=code)

    def fold_input_scale(self, scale: float) -> None:
        """The k estimator reads x − b_dec through W_k, as the encoder does through W_enc."""
        super().fold_input_scale(scale)
        with torch.no_grad():
            self.W_k.mul_(scale)
