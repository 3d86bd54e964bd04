"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410).

Training: π = (x − b_dec) W_enc + b_enc as in TopK (with b_enc, as dictionary_learning; Bussmann has none);
keep the top k·N entries of the flattened (N, M) batch, then ReLU, so the number of active latents varies
per token and averages k. Loss, AuxK, decoder constraint and init: exactly :mod:`saekit.sae.topk`.

Inference: a token's code must not depend on its batch, so ``encode`` uses a threshold θ instead,
f = π · 1[π > θ] (θ ≥ 0, so this is ReLU(π) · 1[π > θ]). θ is a buffer estimated during training as an
exponential moving average of *the smallest positive activation the batch selection kept*: the first
estimate is that batch minimum itself, then θ ← (1 − r) θ + r · min with r = ``threshold_lr`` (Bussmann's
matryoshka code uses r = 0.01 per batch; dictionary_learning uses β = 0.999 from step 1000). The paper
defines θ = E_X[min kept activation] for the *final* model, and an EMA over a short run still carries its
early estimates ((0.99)^100 = 37 % after 100 steps; measured on SmolLM2 it left held-out L0 at 16–24 for
k = 16–64), so over the last ``threshold_final_fraction`` of the run (known from ``ctx.total_steps``) θ
restarts as the plain running mean of the batch minima, on weights the decaying learning rate barely
moves any more. Both rules need no extra state (the position in the window comes from ``ctx.step``), so a
resumed run continues them exactly. θ is updated only in ``train()`` mode and never through autograd.
Until θ has been estimated (θ < 0, e.g. a fresh SAE) ``encode`` falls back to per-token top-k, which is
also batch-independent. θ is in latent units, so ``fold_input_scale`` leaves it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import StepContext, register
from .common import batch_topk_relu, topk_code
from .sparse import BatchTopKSelect, Selector
from .topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_lr: float = 0.01
    """EMA rate r of the inference threshold θ: θ ← (1 − r)·θ + r·(smallest kept activation of the batch)."""
    threshold_final_fraction: float = 0.1
    """Final fraction of the run over which θ is re-estimated as the plain mean of the batch minima (the
    paper's θ on nearly final weights) instead of the EMA; 0 keeps the EMA to the end."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.threshold_lr <= 1:
            raise ValueError(f"threshold_lr must be in (0, 1], got {self.threshold_lr}")
        if not 0 <= self.threshold_final_fraction <= 1:
            raise ValueError(
                f"threshold_final_fraction must be in [0, 1], got {self.threshold_final_fraction}"
            )


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # inference θ (latent units); −1: not estimated

    def select(
        self, pre_NM: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch_topk_relu(pre_NM, self.cfg.k)

    def selector(self, ctx: StepContext) -> Selector:
        return BatchTopKSelect(self.cfg.k)

    def after_select(self, vals: torch.Tensor, ctx: StepContext) -> None:
        if self.training:
            self._update_threshold(vals.detach(), self.threshold_rate(ctx))

    def threshold_rate(self, ctx: StepContext) -> float:
        """r for this step: ``threshold_lr``, or 1/(n+1) at the n-th step of the final window (n = 0
        resets θ to the batch minimum, later steps make θ the window's running mean)."""
        window = round(self.cfg.threshold_final_fraction * ctx.total_steps)
        start = ctx.total_steps - window
        if window > 0 and ctx.step >= start:
            return 1.0 / (ctx.step - start + 1)
        return self.cfg.threshold_lr

    @torch.no_grad()
    def _update_threshold(self, vals: torch.Tensor, r: float) -> None:
        # Written with tensor ops only: no host sync per training step.
        smallest = torch.where(vals > 0, vals, torch.inf).min().float()
        ema = torch.where(self.threshold < 0, smallest, (1 - r) * self.threshold + r * smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), ema, self.threshold))

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        pre_NM = self.pre_acts(x_ND)
        if self.threshold.item() < 0:
            return topk_code(pre_NM, self.cfg.k)
        return pre_NM * (pre_NM > self.threshold.to(pre_NM.dtype))
