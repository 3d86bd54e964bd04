"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; OpenAI sparse_autoencoder).

    π = (x − b_dec) W_enc + b_enc,     f = ReLU(TopK_k(π)),     x̂ = f W_dec + b_dec
    L = ‖x − x̂‖² / d  (MSE: mean over batch and dims, Bussmann's scale)  +  α · AuxK

* Top-k of the pre-activations, then ReLU (Gao's order; same values as ReLU-then-top-k).
* AuxK (:func:`saekit.sae.common.auxk_loss`): the residual e = x − x̂ (detached) is reconstructed from the
  top-k_aux pre-activations among the latents the trainer reports dead in ``ctx.dead_mask``, normalised by
  the residual's variance over the batch (OpenAI). α = 1/32, k_aux = d/2 (Gao App. A.2, B.1). The
  normalised AuxK is ~1 at worst, like an FVU, so α keeps its meaning next to the MSE of inputs normalised
  to E‖x‖² = d (per-dim MSE ≈ FVU for centred inputs); with an SSE scale α would be d times weaker.
* Decoder rows unit-norm (constraint hooks); init W_enc = c · W_decᵀ with c = 1/√3 by default (Gao §2.2
  has c = 1; sparsify's ``nn.Linear`` encoder starts at 1/√3, Bussmann's BatchTopK at √(2d/M)). c = 1/√3
  gave lower FVU at every budget measured on SmolLM2, with no latent left unfired during training by 2·10⁵
  tokens (docs/performance.md). No sparsity coefficient, so ``ctx.sparsity_scale`` is unused.
* Training runs the sparse path (:mod:`saekit.sae.sparse`): the encoder GEMM is chunked over tokens and
  only the selected entries (top-k, and AuxK's top-k_aux among dead latents) are kept, with a sparse
  backward that sends both selections' gradients to W_enc, b_enc and b_dec; decoding reads only the
  selected decoder rows. Per token that is 2·d·M + O(k·d) FLOPs instead of a dense step's 12·d·M. The
  output carries the code as COO (``SAEOutput.code``); the dense ``f`` is built only if read.

:class:`saekit.sae.batchtopk.BatchTopKSAE` reuses this class and changes only the selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, SparseCode, StepContext, register
from .common import (
    AuxCode,
    UnitNormDecoder,
    auxk_selector,
    auxk_term,
    auxk_term_from_recon,
    decode_codes,
    mse,
    tied_init,
    topk_code,
    topk_relu,
    topk_to_coo,
    train_codes,
)
from .sparse import COO, Selector, TopKSelect


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    """Active latents per token (mean active latents per token for batchtopk)."""
    aux_coeff: float = 1 / 32
    """α, the AuxK coefficient (0 turns AuxK off)."""
    k_aux: int | None = None
    """Dead latents AuxK may use per token; default d_in // 2 (Gao et al. App. B.1)."""
    init_encoder_scale: float = 3**-0.5
    """W_enc starts as this times W_decᵀ: 1/√3, the scale of sparsify's ``nn.Linear`` rows (Gao et al. use 1).
    On SmolLM2 at 32× width it lowered held-out FVU from 0.61 to 0.52 at 10⁵ tokens and from 0.52 to 0.46 at
    2·10⁵, at the price of more latents silent early on: 15 % (1: 0 %) on held-out text of the training
    distribution at 10⁵ tokens, 6 % at 2·10⁵, as AuxK revives them (docs/performance.md)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.k <= self.width:
            raise ValueError(f"k must be in [1, width={self.width}], got k={self.k}")
        if self.aux_coeff < 0:
            raise ValueError(f"aux_coeff must be >= 0, got {self.aux_coeff}")
        if not self.init_encoder_scale > 0:
            raise ValueError(f"init_encoder_scale must be > 0, got {self.init_encoder_scale}")
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
        # latent-major W_enc: the sparse path's gradient layout; the encoder GEMM reads either layout as fast
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width, scale=cfg.init_encoder_scale, latent_major=True)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (x_ND - self.b_dec) @ self.W_enc + self.b_enc

    def select(
        self, pre_NM: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-time selection on a dense (N, M) matrix, as row-sorted COO (rows, cols, vals) after
        ReLU: the dense form of :meth:`selector` (the reference the sparse path is tested against)."""
        return topk_to_coo(*topk_relu(pre_NM, self.cfg.k))

    def selector(self, ctx: StepContext) -> Selector:
        """The training selection for :func:`~saekit.sae.sparse.sparse_encode`. BatchTopK overrides it."""
        return TopKSelect(self.cfg.k)

    def after_select(self, vals: torch.Tensor, ctx: StepContext) -> None:
        """Called with the selected values (after ReLU) of each training step. BatchTopK updates θ here."""

    def auxk(
        self, pre_NM: torch.Tensor, ctx: StepContext, residual_ND: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """AuxK's loss entry (:func:`~saekit.sae.common.auxk_term`) with this SAE's settings (dense form)."""
        cfg = self.cfg
        return auxk_term(cfg.aux_coeff, pre_NM, ctx.dead_mask, residual_ND, self.W_dec, cfg.k_aux_resolved)

    def encode_train(self, x_ND: torch.Tensor, ctx: StepContext) -> tuple[COO, AuxCode | None]:
        """The training code and AuxK's (both after ReLU; AuxK's None when it has nothing to do), from one
        chunked pass of the sparse encoder (:func:`~saekit.sae.common.train_codes`)."""
        cfg = self.cfg
        aux_sel = auxk_selector(cfg.aux_coeff, ctx.dead_mask, cfg.k_aux_resolved)
        code, aux = train_codes(x_ND, self.W_enc, self.b_enc, self.b_dec, self.selector(ctx), aux_sel)
        self.after_select(code[2], ctx)
        return code, aux

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        pre_NM = self.pre_acts(x_ND)
        return topk_code(pre_NM, self.cfg.k)

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return f_NM @ self.W_dec + self.b_dec

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        n = x_ND.shape[0]
        (rows, cols, vals), aux = self.encode_train(x_ND, ctx)
        x_hat_ND, e_hat_ND = decode_codes(n, self.W_dec, (rows, cols, vals), aux)
        x_hat_ND = x_hat_ND + self.b_dec
        losses = {
            "recon": mse(x_ND, x_hat_ND),
            **auxk_term_from_recon(self.cfg.aux_coeff, e_hat_ND, x_ND - x_hat_ND),
        }
        metrics = {"l0": (vals > 0).sum().detach() / n}
        code = SparseCode(rows, cols, vals, (n, self.width))
        return SAEOutput(x_hat_ND, None, losses, metrics, code=code)
