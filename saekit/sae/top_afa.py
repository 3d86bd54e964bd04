"""top-AFA SAE (Lee, Davies, Canby, Hockenmaier 2025, "Evaluating and Designing Sparse Autoencoders by
Approximating Quasi-Orthogonality", arXiv 2503.24277; reference code SewoongLee/top-afa-sae, spec §1.2–1.4).

A TopK SAE whose k is chosen per token: keep the largest activations until the norm of the (decoder-scaled)
code best matches the norm of the input, its "approximate feature activation" (AFA). If the decoder rows are
ε-quasi-orthogonal, ‖Σ f̃_i w_i‖ ≈ ‖f̃‖, so a code that reconstructs x_c must have ‖f̃‖ ≈ ‖x_c‖:

    x_c = x − b_dec,    a = ReLU(x_c W_enc)                          (no b_enc, as the reference)
    T = ‖x_c‖₂,    c_i = (a_i ‖W_dec,i‖₂)²,    π sorts c descending,    S_k = sqrt(Σ_{j≤k} c_π(j))
    k*(x) = argmin_{1 ≤ k < M} |S_k − T|    (ties: the smallest k)
    f = a on π(1), …, π(k*), 0 elsewhere,    x̂ = f W_dec + b_dec
    L = ‖x − x̂‖²/d  +  λ_AFA (‖f‖₂ − ‖x‖₂)²  +  α · AuxK             (each term a mean over the batch)

No gradient flows through k* (a selection, like TopK's); gradients reach the kept activations. The AFA term
uses ‖x‖ (not ‖x_c‖) and f unscaled by decoder norms, as the reference's ``get_loss_dict``; decoder rows are
unit-norm during training, so ‖f‖ is ‖f̃‖ without its bias entry. Its l1_coeff is 0 and is left out.

saekit's choices where the reference differs or is silent:

* No per-token standardisation (the reference's ``input_unit_norm``, x ← (x − mean_d x)/(std_d x + 1e-5),
  undone on the output): it would make the decoder depend on the input token, and saekit's ``decode(f)`` is
  affine in f. The trainer's dataset-level normalisation (E‖x‖² = d) puts ‖x‖ on the same scale (per-token
  standardisation gives ‖x‖² ≈ d), so λ_AFA keeps its meaning, but the per-token mean is not removed.
* ``afa_target='centred'`` (an option; the default is the reference's ‖x‖): k* makes ‖f‖ ≈ ‖x_c‖, so when
  ‖b_dec‖ is a sizeable part of ‖x‖ the reference's term (‖f‖ − ‖x‖)² can never close, and its gradient
  keeps raising the kept activations, which lowers k*. On SmolLM2's residual stream (a large mean) this drove
  L0 from 94 to 8 in 59 steps with FVU → 1; the reference's per-token standardised GPT-2 inputs have a
  small mean. With 'centred' the term targets the norm the selection matches.
* k = M is excluded (S_M = +∞). The reference overwrites the last squared cumulative sum with 1e8
  (S_M = 1e4) so that "all latents" never wins; on its inputs (‖x‖ ≈ √d) that is the same rule, and +∞
  keeps it exact at any input scale, which is what makes ``fold_input_scale`` exact (the base one: S_k and T
  both scale by 1/s, so k* is unchanged).
* c_i multiplies by ‖W_dec,i‖ as the reference does; it is 1 during training, and after folding it is 1/s.
* AuxK is saekit's normalised one (:func:`saekit.sae.common.auxk_loss`, as TopK), with the reference's
  α = 1/32 and k_aux = 512; the reference's unnormalised mean((ê − e)²) on standardised inputs and its
  "dead = 5 batches without firing" become the normalised loss and the trainer's ``dead_tokens``.
* Init: unit-norm Gaussian decoder rows and W_enc = W_decᵀ (:func:`saekit.sae.common.tied_init`); the
  reference draws W_enc Kaiming-uniform and sets W_dec = its transpose, row-normalised (same directions,
  encoder columns of norm ≈ 0.35 instead of 1).
* Training stays dense (f W_dec, and the encoder's backward as GEMMs): k* is per token and typically
  large (the paper's best runs keep ~2,000 of 12,288 latents, 1/6 of them), and the gather-based sparse
  kernels of :mod:`saekit.sae.sparse` run at ≈ 3 GFLOP/s against a GEMM's 60–150 on 2 CPU cores, so they
  win only below a density of about 1/30. b_dec's gradient through the encoder is a matrix-vector
  product (:func:`~saekit.sae.common.encoder_preacts`), not an (N, M) × (M, d) GEMM.

Defaults are the paper's GPT-2 sweep: λ_AFA ∈ {1/128, 1/64, 1/32, 1/24, 1/16}; 1/32 gave the lowest
normalised MSE on layer 6 (1.6e-4 at L0 ≈ 2,037 of 12,288 latents); 1/128 gave L0 ≈ 315 (NMSE 0.13), so
λ_AFA is the knob that sets the L0. The reference trains with Adam lr 3e-4, β = (0.9, 0.99), batch 4096.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, StepContext, register
from .common import UnitNormDecoder, auxk_term, dense_decode, encoder_preacts, mse, tied_init


@dataclass
class TopAFAConfig(SAEConfig):
    afa_coeff: float = 1 / 32
    """λ_AFA, weight of the norm-matching term (‖f‖ − ‖x‖)²; it sets the L0 (the paper sweeps 1/128–1/16)."""
    aux_coeff: float = 1 / 32
    """α, the AuxK coefficient (0 turns AuxK off)."""
    k_aux: int = 512
    """Dead latents AuxK may use per token (the reference's top_k_aux)."""
    afa_target: str = "input"
    """Norm the AFA term pulls ‖f‖ towards: 'input' ‖x‖ (the reference's loss) or 'centred' ‖x − b_dec‖ (the
    norm k* matches; differs from 'input' when the data mean is large, see the module docstring)."""

    def validate(self) -> None:
        super().validate()
        if self.width < 2:
            raise ValueError(f"top_afa needs width >= 2 (k* ranges over 1..width-1), got width={self.width}")
        if self.afa_coeff < 0:
            raise ValueError(f"afa_coeff must be >= 0, got {self.afa_coeff}")
        if self.aux_coeff < 0:
            raise ValueError(f"aux_coeff must be >= 0, got {self.aux_coeff}")
        if self.k_aux <= 0:
            raise ValueError(f"k_aux must be positive, got {self.k_aux}")
        if self.afa_target not in ("input", "centred"):
            raise ValueError(f"afa_target must be 'input' or 'centred', got {self.afa_target!r}")


@torch.no_grad()
def afa_select(a_NM: torch.Tensor, dec_norms_M: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    """(N, M) bool mask of the latents top-AFA keeps: the k* largest decoder-scaled activations, with k* the
    k < M minimising |S_k − target| (first minimum on ties). Sorting is stable, so equal c_i keep index order.
    Computed in float32 at least: a bf16 cumulative sum over thousands of latents would lose the match."""
    dtype = torch.promote_types(a_NM.dtype, torch.float32)
    c_NM = (a_NM.to(dtype) * dec_norms_M.to(dtype)).pow(2)
    c_sorted_NM, order_NM = c_NM.sort(dim=-1, descending=True, stable=True)
    S_NM = c_sorted_NM.cumsum(dim=-1).sqrt()
    S_NM[:, -1] = torch.inf  # k = M is never chosen
    k_N = (S_NM - target_N.to(dtype)[:, None]).abs().argmin(dim=-1) + 1
    keep_sorted_NM = torch.arange(a_NM.shape[1], device=a_NM.device)[None, :] < k_N[:, None]
    return torch.zeros_like(keep_sorted_NM).scatter(-1, order_NM, keep_sorted_NM)


@register("top_afa")
class TopAFASAE(UnitNormDecoder, SAE):
    config_class = TopAFAConfig
    cfg: TopAFAConfig

    def __init__(self, cfg: TopAFAConfig):
        super().__init__(cfg)
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width)
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return encoder_preacts(x_ND, self.W_enc, None, self.b_dec)

    def _select(self, x_ND: torch.Tensor, pre_NM: torch.Tensor) -> torch.Tensor:
        a_NM = F.relu(pre_NM)
        target_N = (x_ND - self.b_dec).detach().norm(dim=-1)
        keep_NM = afa_select(a_NM.detach(), self.W_dec.detach().norm(dim=1), target_N)
        return a_NM * keep_NM

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self._select(x_ND, self.pre_acts(x_ND))

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return dense_decode(f_NM, self.W_dec, self.b_dec)

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        pre_NM = self.pre_acts(x_ND)
        f_NM = self._select(x_ND, pre_NM)
        x_hat_ND = self.decode(f_NM)
        cfg = self.cfg
        target_ND = x_ND if cfg.afa_target == "input" else (x_ND - self.b_dec).detach()
        norm_gap_N = f_NM.norm(dim=-1) - target_ND.norm(dim=-1)
        losses = {
            "recon": mse(x_ND, x_hat_ND),
            "afa": cfg.afa_coeff * norm_gap_N.pow(2).mean(),
            **auxk_term(cfg.aux_coeff, pre_NM, ctx.dead_mask, x_ND - x_hat_ND, self.W_dec, cfg.k_aux),
        }
        metrics = {"l0": (f_NM != 0).sum(dim=-1).float().mean().detach()}
        return SAEOutput(x_hat_ND, f_NM, losses, metrics)
