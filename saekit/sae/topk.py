"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; OpenAI sparse_autoencoder).

    π = (x − b_dec) W_enc + b_enc,     f = ReLU(TopK_k(π)),     x̂ = f W_dec + b_dec
    L = ‖x − x̂‖² / d  (MSE: mean over batch and dims, Bussmann's scale)  +  α · AuxK

* Top-k of the pre-activations, then ReLU (Gao's order; same values as ReLU-then-top-k).
* AuxK (:func:`saekit.sae.common.auxk_loss`): the residual e = x − x̂ (detached) is reconstructed from the
  top-k_aux pre-activations among the latents the trainer reports dead in ``ctx.dead_mask``, normalised by
  the residual's variance over the batch (OpenAI). α = 1/32, k_aux = d/2 (Gao App. A.2, B.1). The
  normalised AuxK is ~1 at worst, like an FVU, so α keeps its meaning next to the MSE of inputs normalised
  to E‖x‖² = d (per-dim MSE ≈ FVU for centred inputs); with an SSE scale α would be d times weaker.
* Decoder rows unit-norm (constraint hooks); init W_enc = W_decᵀ (Gao §2.2). No sparsity coefficient, so
  ``ctx.sparsity_scale`` is unused.
* Decoding in ``forward`` reads only the k selected decoder rows (``embedding_bag``).

:class:`saekit.sae.batchtopk.BatchTopKSAE` reuses this class and changes only the selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, StepContext, register
from .common import (
    UnitNormDecoder,
    auxk_term,
    coo_to_dense,
    mse,
    sparse_decode,
    tied_init,
    topk_code,
    topk_relu,
    topk_to_coo,
)


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    """Active latents per token (mean active latents per token for batchtopk)."""
    aux_coeff: float = 1 / 32
    """α, the AuxK coefficient (0 turns AuxK off)."""
    k_aux: int | None = None
    """Dead latents AuxK may use per token; default d_in // 2 (Gao et al. App. B.1)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.k <= self.width:
            raise ValueError(f"k must be in [1, width={self.width}], got k={self.k}")
        if self.aux_coeff < 0:
            raise ValueError(f"aux_coeff must be >= 0, got {self.aux_coeff}")
        if self.k_aux is not None and self.k_aux <= 0:
            raise ValueError(f"k_aux must be positive (or None for d_in // 2), got {self.k_aux}")

    @property
    def k_aux_resolved(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)


@register("topk")
class TopKSAE(UnitNormDecoder, SAE):
    config_class = TopKConfig
    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (x_ND - self.b_dec) @ self.W_enc + self.b_enc

    def select(
        self, pre_NM: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-time selection as row-sorted COO (rows, cols, vals). BatchTopK overrides this."""
        return topk_to_coo(*topk_relu(pre_NM, self.cfg.k))

    def auxk(
        self, pre_NM: torch.Tensor, ctx: StepContext, residual_ND: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """AuxK's loss entry (:func:`~saekit.sae.common.auxk_term`) with this SAE's settings."""
        cfg = self.cfg
        return auxk_term(cfg.aux_coeff, pre_NM, ctx.dead_mask, residual_ND, self.W_dec, cfg.k_aux_resolved)

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        pre_NM = self.pre_acts(x_ND)
        return topk_code(pre_NM, self.cfg.k)

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return f_NM @ self.W_dec + self.b_dec

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        pre_NM = self.pre_acts(x_ND)
        rows, cols, vals = self.select(pre_NM, ctx)
        x_hat_ND = sparse_decode(rows, cols, vals, x_ND.shape[0], self.W_dec) + self.b_dec
        f_NM = coo_to_dense(rows, cols, vals, pre_NM.shape)
        losses = {
            "recon": mse(x_ND, x_hat_ND),
            **self.auxk(pre_NM, ctx, x_ND - x_hat_ND),
        }
        metrics = {"l0": (vals > 0).sum().item() / x_ND.shape[0]}
        return SAEOutput(x_hat_ND, f_NM, losses, metrics)
