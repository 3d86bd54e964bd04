"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410).

Training: π = (x − b_dec) W_enc + b_enc as in TopK (with b_enc, as dictionary_learning; Bussmann has none);
keep the top k·N entries of the flattened (N, M) batch, then ReLU, so the number of active latents varies
per token and averages k. Loss, AuxK, decoder constraint and init: exactly :mod:`saekit.sae.topk`.

Inference: a token's code must not depend on its batch, so ``encode`` uses a threshold θ instead,
f = π · 1[π > θ] (θ ≥ 0, so this is ReLU(π) · 1[π > θ]). θ is a buffer estimated during training as an
exponential moving average of *the smallest positive activation the batch selection kept*: the first
estimate is that batch minimum itself, then θ ← (1 − r) θ + r · min with r = ``threshold_lr`` (Bussmann's
matryoshka code uses r = 0.01 per batch; dictionary_learning uses β = 0.999 from step 1000). θ is updated
only in ``train()`` mode and never through autograd. Until θ has been estimated (θ < 0, e.g. a fresh SAE)
``encode`` falls back to per-token top-k, which is also batch-independent. θ is in latent units, so
``fold_input_scale`` leaves it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register
from .common import batch_topk_relu, topk_code
from .topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_lr: float = 0.01
    """EMA rate r of the inference threshold θ: θ ← (1 − r)·θ + r·(smallest kept activation of the batch)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.threshold_lr <= 1:
            raise ValueError(f"threshold_lr must be in (0, 1], got {self.threshold_lr}")


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # inference θ (latent units); −1: not estimated

    def select(self, pre_NM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, cols, vals = batch_topk_relu(pre_NM, self.cfg.k)
        if self.training:
            self._update_threshold(vals.detach())
        return rows, cols, vals

    @torch.no_grad()
    def _update_threshold(self, vals: torch.Tensor) -> None:
        # Written with tensor ops only: no host sync per training step.
        smallest = torch.where(vals > 0, vals, torch.inf).min().float()
        r = self.cfg.threshold_lr
        ema = torch.where(self.threshold < 0, smallest, (1 - r) * self.threshold + r * smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), ema, self.threshold))

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        pre_NM = self.pre_acts(x_ND)
        if self.threshold.item() < 0:
            return topk_code(pre_NM, self.cfg.k)
        return pre_NM * (pre_NM > self.threshold.to(pre_NM.dtype))
