"""Archetypal SAE, A-SAE and RA-SAE (Fel, Lubana et al., ICML 2025, arXiv 2502.12892; reference code
KempnerInstitute/overcomplete ``sae/archetypal_dictionary.py``, ``sae/rasae.py``; spec §7.4).

Only the dictionary changes: its atoms are tied to the data's geometry,

    D = (W C + Λ) · exp(m),      x̂ = f D + b_dec

* C (n_c, d): fixed candidate points, the k-means centroids of the trainer's initial sample
  (``init_from_data``; a buffer, never trained).
* W (M, n_c): row-stochastic. After every optimizer step W ← ReLU(W), then each row is divided by its sum,
  so every atom's W C lies in the convex hull of C.
* Λ (M, d): relaxation. After every step each row is scaled back to ‖Λ_i‖ ≤ δ. δ = 0 is A-SAE (atoms in
  conv(C)); δ > 0 is RA-SAE (default δ = 1, the reference's).
* m: a learnable scalar, 0 at init (optional), so the atoms live in the cone of the hull rather than the
  hull itself.

The encoder is an ordinary one (the paper pairs the dictionary with TopK or JumpReLU),
π = (x − b_dec) W_enc + b_enc:

* ``encoder = "topk"``: f = ReLU(TopK_k(π)), L = ‖x − x̂‖²/d (MSE) + α·AuxK, as :mod:`saekit.sae.topk`;
* ``encoder = "jumprelu"``: f = π·H(π − θ), L = ‖x − x̂‖² (SSE) + λ·Σ_i H(π_i − θ_i), as
  :mod:`saekit.sae.jumprelu`, with its straight-through estimators, defaults and faster log θ rate.

saekit's choices where the paper and reference are silent or differ:

* A decoder bias, as every saekit SAE (the reference has none), and so the candidates are centroids of the
  data as the dictionary sees it: C = k-means of (x − b_dec₀), b_dec₀ the trainer's centre (geometric
  median). Language-model activations have a large common offset; without the bias every atom carries it
  and every latent correlates with every token. On the offset data of tests/test_train.py (30 trainer
  steps, width 24, k = 4) the FVU was 0.16 with the bias started at the geometric median and 1.18 with it
  started at 0 (TopK: 0.48 and 1.09). The atoms are archetypes of the centred cloud, a translate of the
  data, so conv(C) keeps its meaning.
* n_c = width by default, and W starts as the identity (atom i = candidate i, as the reference's
  ``torch.eye``); when n_c ≠ width atom i starts at candidate i mod n_c (the reference leaves the extra
  rows at zero, i.e. atoms at the origin).
* The encoder starts tied to the atoms, W_enc,:i = D_i / ‖D_i‖² and b_enc = 0, so that x − b_dec = c·D_i
  codes as c on latent i (the tied start of the other architectures, for atoms that are not unit vectors);
  the reference's encoder has its own random start. Unit columns D_i/‖D_i‖ instead (and no bias) gave an
  FVU of 346 in the run above: codes ‖D_i‖ times too large.
* k-means: k-means++ seeding then Lloyd iterations (``kmeans_iters``, stopping early once no assignment
  changes), seeded by ``kmeans_seed``; an empty cluster keeps its centre. Before ``init_from_data`` the
  candidates are random unit vectors, so a fresh SAE still works.
* A row of W that ReLU zeroes entirely restarts at the uniform mixture (the barycentre of C), so W stays
  row-stochastic; the reference divides by its sum + 1e-8 and leaves it at zero.
* C, Λ and δ are in training input units (E‖x‖² = d); ``fold_input_scale`` divides C, Λ and b_dec by s and
  multiplies W_enc by s, which keeps it exact (D / s) with W, m and thresholds unchanged (δ stays in
  training units).
* ``W_dec`` is the fused dictionary D, a property; under ``torch.no_grad`` it is cached until W, C, Λ or m
  change, since computing it costs an (M, n_c) × (n_c, d) product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, StepContext, register
from .common import (
    auxk_term,
    coo_to_dense,
    jumprelu,
    mse,
    sparse_decode,
    sse,
    step,
    topk_code,
    topk_relu,
    topk_to_coo,
    unit_rows,
)


@dataclass
class ArchetypalConfig(SAEConfig):
    encoder: Literal["topk", "jumprelu"] = "topk"
    """The encoder the archetypal dictionary is paired with (its selection, loss and defaults)."""
    n_candidates: int | None = None
    """n_c, the number of k-means centroids C the atoms are mixtures of (default: width)."""
    delta: float = 1.0
    """δ, the bound on each relaxation ‖Λ_i‖ (0: A-SAE, atoms in the convex hull of C; training units)."""
    learn_scale: bool = True
    """Learn the scalar m of D = (W C + Λ)·exp(m) (otherwise m = 0)."""
    kmeans_iters: int = 20
    """Most Lloyd iterations of the k-means that computes C from the trainer's initial sample."""
    kmeans_seed: int = 0
    """Seed of the k-means++ initialisation."""
    k: int = 32
    """topk: active latents per token."""
    aux_coeff: float = 1 / 32
    """topk: α, the AuxK coefficient (0 turns AuxK off)."""
    k_aux: int | None = None
    """topk: dead latents AuxK may use per token; default d_in // 2."""
    l0_coeff: float = 1.0
    """jumprelu: λ, the coefficient of the L0 penalty."""
    bandwidth: float = 0.05
    """jumprelu: ε, the straight-through estimators' kernel width (training input units)."""
    init_threshold: float = 0.5
    """jumprelu: θ₀, every latent's initial threshold."""
    threshold_lr_scale: float = 10.0
    """jumprelu: learning rate of log θ relative to the other parameters."""

    def validate(self) -> None:
        super().validate()
        if self.encoder not in ("topk", "jumprelu"):
            raise ValueError(f"encoder must be 'topk' or 'jumprelu', got {self.encoder!r}")
        if self.n_candidates is not None and self.n_candidates < 1:
            raise ValueError(f"n_candidates must be positive (or None for width), got {self.n_candidates}")
        if self.delta < 0:
            raise ValueError(f"delta (the bound on ‖Λ_i‖) must be >= 0, got {self.delta}")
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be at least 1, got {self.kmeans_iters}")
        if self.encoder == "topk" and not 0 < self.k <= self.width:
            raise ValueError(f"k must be in [1, width={self.width}], got k={self.k}")
        if self.aux_coeff < 0 or self.l0_coeff < 0:
            raise ValueError(f"aux_coeff and l0_coeff must be >= 0, got {self.aux_coeff}, {self.l0_coeff}")
        if self.k_aux is not None and self.k_aux <= 0:
            raise ValueError(f"k_aux must be positive (or None for d_in // 2), got {self.k_aux}")
        for name in ("bandwidth", "init_threshold", "threshold_lr_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def n_candidates_resolved(self) -> int:
        return self.n_candidates if self.n_candidates is not None else self.width


@torch.no_grad()
def kmeans(x_ND: torch.Tensor, n_clusters: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """(n_clusters, d) centres: k-means++ seeding (each new centre a data point drawn with probability ∝
    its squared distance to the nearest centre so far), then Lloyd iterations until no point changes
    cluster or ``iters`` is reached. Seeded; an empty cluster keeps its centre."""
    n, d = x_ND.shape
    if n < n_clusters:
        raise ValueError(f"k-means needs at least {n_clusters} points (one per candidate), got {n}")
    x_ND = x_ND.float()
    gen = torch.Generator(device=x_ND.device).manual_seed(seed)
    C_KD = x_ND.new_empty(n_clusters, d)
    C_KD[0] = x_ND[torch.randint(n, (1,), generator=gen, device=x_ND.device)[0]]
    d2_N = (x_ND - C_KD[0]).pow(2).sum(1)
    for j in range(1, n_clusters):
        weights_N = d2_N if bool(d2_N.sum() > 0) else torch.ones_like(d2_N)  # all points already centres
        C_KD[j] = x_ND[torch.multinomial(weights_N, 1, generator=gen)[0]]
        d2_N = torch.minimum(d2_N, (x_ND - C_KD[j]).pow(2).sum(1))
    assign_N = None
    for _ in range(iters):
        new_N = _nearest(x_ND, C_KD)
        if assign_N is not None and torch.equal(new_N, assign_N):
            break
        assign_N = new_N
        sums_KD = torch.zeros_like(C_KD).index_add_(0, assign_N, x_ND)
        counts_K = torch.bincount(assign_N, minlength=n_clusters)
        filled_K = counts_K > 0
        C_KD[filled_K] = sums_KD[filled_K] / counts_K[filled_K, None].to(C_KD.dtype)
    return C_KD


def _nearest(x_ND: torch.Tensor, C_KD: torch.Tensor, max_entries: int = 1 << 24) -> torch.Tensor:
    """(N,) index of each point's nearest centre, in chunks of at most ``max_entries`` distances."""
    sq_K = C_KD.pow(2).sum(1)
    chunk = max(1, max_entries // C_KD.shape[0])
    return torch.cat(
        [(sq_K - 2 * x_ND[i : i + chunk] @ C_KD.T).argmin(1) for i in range(0, x_ND.shape[0], chunk)]
    )


@register("archetypal")
class ArchetypalSAE(SAE):
    config_class = ArchetypalConfig
    cfg: ArchetypalConfig
    latent_axes: ClassVar[dict[str, int | None]] = {"W": 0, "Lambda": 0, "log_threshold": 0, "C": None}

    def __init__(self, cfg: ArchetypalConfig):
        super().__init__(cfg)
        n_c = cfg.n_candidates_resolved
        self.register_buffer("C", unit_rows(n_c, cfg.d_in))
        W_MC = torch.zeros(cfg.width, n_c)
        W_MC[torch.arange(cfg.width), torch.arange(cfg.width) % n_c] = 1.0
        self.W = nn.Parameter(W_MC)
        self.Lambda = nn.Parameter(torch.zeros(cfg.width, cfg.d_in))
        if cfg.learn_scale:
            self.m = nn.Parameter(torch.tensor(0.0))
        else:
            self.register_buffer("m", torch.tensor(0.0))
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.width))
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.encoder == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.width,), math.log(cfg.init_threshold)))
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._tie_encoder()

    # -- the dictionary ------------------------------------------------------------------------------
    @property
    def W_dec(self) -> torch.Tensor:
        """(M, d) the fused dictionary D = (W C + Λ)·exp(m)."""
        if torch.is_grad_enabled():
            return (self.W @ self.C + self.Lambda) * self.m.exp()
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in (self.W, self.C, self.Lambda, self.m))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, (self.W @ self.C + self.Lambda) * self.m.exp())
        return self._cache[1]

    @torch.no_grad()
    def _tie_encoder(self) -> None:
        D_MD = self.W_dec
        self.W_enc.copy_((D_MD / D_MD.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)).T)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Project W onto row-stochastic matrices and each Λ_i onto the ball ‖Λ_i‖ ≤ δ."""
        W_MC = self.W.clamp_min_(0)
        sums_M1 = W_MC.sum(dim=1, keepdim=True)
        W_MC.div_(sums_M1.clamp_min(1e-30))
        W_MC[sums_M1[:, 0] == 0] = 1.0 / W_MC.shape[1]
        norms_M1 = self.Lambda.norm(dim=1, keepdim=True)
        self.Lambda.mul_((self.cfg.delta / norms_M1.clamp_min(1e-30)).clamp(max=1.0))

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, b_dec_init: torch.Tensor | None) -> None:
        """b_dec = the trainer's centre, C = k-means centroids of the centred sample (training units), and
        the encoder re-tied to the new atoms."""
        super().init_from_data(sample, b_dec_init)
        centred_ND = sample - self.b_dec.to(sample)
        self.C.copy_(kmeans(centred_ND, self.C.shape[0], self.cfg.kmeans_iters, self.cfg.kmeans_seed))
        self._tie_encoder()

    def fold_input_scale(self, scale: float) -> None:
        with torch.no_grad():
            self.W_enc.mul_(scale)
            self.b_dec.div_(scale)
            self.C.div_(scale)
            self.Lambda.div_(scale)

    def param_groups(self) -> list[dict]:
        if self.cfg.encoder != "jumprelu":
            return super().param_groups()
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [
            {"params": rest, "lr_scale": 1.0},
            {"params": [self.log_threshold], "lr_scale": self.cfg.threshold_lr_scale},
        ]

    # -- encode / decode / train ---------------------------------------------------------------------
    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (x_ND - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        pre_NM = self.pre_acts(x_ND)
        if self.cfg.encoder == "jumprelu":
            return pre_NM * (pre_NM > self.log_threshold.exp())
        return topk_code(pre_NM, self.cfg.k)

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return f_NM @ self.W_dec + self.b_dec

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        pre_NM = self.pre_acts(x_ND)
        D_MD = self.W_dec
        if self.cfg.encoder == "jumprelu":
            theta_M, eps = self.log_threshold.exp(), self.cfg.bandwidth
            f_NM = jumprelu(pre_NM, theta_M, eps)
            x_hat_ND = f_NM @ D_MD + self.b_dec
            l0_mean = step(pre_NM, theta_M, eps).sum(dim=-1).mean()
            losses = {"recon": sse(x_ND, x_hat_ND), "l0": self.cfg.l0_coeff * ctx.sparsity_scale * l0_mean}
            return SAEOutput(x_hat_ND, f_NM, losses, {"l0": l0_mean.item()})
        rows, cols, vals = topk_to_coo(*topk_relu(pre_NM, self.cfg.k))
        x_hat_ND = sparse_decode(rows, cols, vals, x_ND.shape[0], D_MD) + self.b_dec
        k_aux = self.cfg.k_aux if self.cfg.k_aux is not None else max(1, self.cfg.d_in // 2)
        aux = auxk_term(self.cfg.aux_coeff, pre_NM, ctx.dead_mask, x_ND - x_hat_ND, D_MD, k_aux)
        losses = {"recon": mse(x_ND, x_hat_ND), **aux}
        f_NM = coo_to_dense(rows, cols, vals, pre_NM.shape)
        return SAEOutput(x_hat_ND, f_NM, losses, {"l0": (vals > 0).sum().item() / x_ND.shape[0]})
