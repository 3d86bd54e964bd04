"""ReLU SAE with an L1 penalty (Bricken et al. 2023 "Towards Monosemanticity"; Cunningham et al. 2023).

    f = ReLU((x − b_dec) W_enc + b_enc),    x̂ = f W_dec + b_dec
    L = ‖x − x̂‖²  (summed over dims, mean over the batch: the Anthropic / dictionary_learning scale)
        + λ · Σ_i |f_i|                     with decoder_norm = "constrained"
        + λ · Σ_i |f_i| ‖W_dec,i‖           with decoder_norm = "weighted"

* ``constrained``: decoder rows are held at unit norm (parallel gradient removed before each optimizer
  step, rows renormalised after it), so the plain L1 cannot be gamed by shrinking f and growing W_dec.
* ``weighted`` (Anthropic, "Circuits Updates, April 2024"): the decoder is free and the L1 of each latent is
  weighted by its decoder norm, which removes the same degeneracy without a constraint. Anthropic start
  from small decoder norms; here rows start at unit norm like every other architecture.
* ``tied``: the encoder is ``enc_scale · W_decᵀ`` with ``enc_scale`` a scalar buffer (1 while training).
  It exists so that :meth:`fold_input_scale` stays exact: folding s divides W_dec by s, so the encoder needs
  an extra factor s² that no shared matrix can hold.

λ is multiplied by ``ctx.sparsity_scale`` (the trainer's warm-up). Its default is 1, not dictionary_learning's
0.1: on SmolLM2-135M layer-6 residuals normalised to E‖x‖² = d (width 2304, 1,500 Adam steps at lr 1e-3,
batch 256) λ = 0.1 left L0 ≈ 790 (a dense code), λ = 1 gave L0 ≈ 78 (FVU 0.14), λ = 3 L0 ≈ 15 (FVU 0.23).
Sweep it to pick an L0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, StepContext, register
from .common import dense_decode, encoder_preacts, l0, normalize_rows_, remove_parallel_grad_, sse, tied_init


@dataclass
class ReLUConfig(SAEConfig):
    l1_coeff: float = 1.0
    """λ, the L1 coefficient (loss = SSE + λ·L1 on inputs normalised to E‖x‖² = d)."""
    decoder_norm: Literal["constrained", "weighted"] = "constrained"
    """'constrained': unit-norm decoder rows, plain L1. 'weighted': free decoder, L1 weighted by ‖W_dec,i‖."""
    tied: bool = False
    """Tie the encoder to the decoder's transpose (fewer parameters; usually worse reconstructions)."""

    def validate(self) -> None:
        super().validate()
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}")
        if self.decoder_norm not in ("constrained", "weighted"):
            raise ValueError(f"decoder_norm must be 'constrained' or 'weighted', got {self.decoder_norm!r}")


@register("relu")
class ReLUSAE(SAE):
    config_class = ReLUConfig
    cfg: ReLUConfig

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width)
        self.W_dec = nn.Parameter(W_dec)
        if cfg.tied:
            self.register_buffer("enc_scale", torch.ones(()))
        else:
            self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def __getattr__(self, name: str):
        # A tied SAE still answers ``sae.W_enc`` (read-only, derived): analysis code treats every SAE alike.
        if name == "W_enc" and self.cfg.tied:
            return self.enc_scale * self.W_dec.t()
        return super().__getattr__(name)

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        W_enc_DM = self.enc_scale * self.W_dec.t() if self.cfg.tied else self.W_enc
        return encoder_preacts(x_ND, W_enc_DM, self.b_enc, self.b_dec)

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.pre_acts(x_ND).relu_()  # in place: encoder_preacts' output is fresh and not saved

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return dense_decode(f_NM, self.W_dec, self.b_dec)

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        f_NM = self.encode(x_ND)
        x_hat_ND = self.decode(f_NM)
        if self.cfg.decoder_norm == "weighted":
            l1_N = f_NM @ self.W_dec.norm(dim=1)  # a matrix-vector product: no (N, M) temporary
        else:
            l1_N = f_NM.sum(dim=-1)  # f >= 0, so Σ|f| = Σf
        losses = {"recon": sse(x_ND, x_hat_ND), "l1": self.cfg.l1_coeff * ctx.sparsity_scale * l1_N.mean()}
        return SAEOutput(x_hat_ND, f_NM, losses, {"l0": l0(f_NM)})

    def before_optimizer_step(self) -> None:
        if self.cfg.decoder_norm == "constrained":
            remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        if self.cfg.decoder_norm == "constrained":
            normalize_rows_(self.W_dec)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        if not self.cfg.tied:
            return super().fold_input_scale(scale)
        # encoder = enc_scale·W_decᵀ; W_dec → W_dec/s must leave encode(x) = old encode(s·x): enc_scale·s².
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        self.enc_scale.mul_(scale * scale)
