"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope, arXiv 2408.05147; spec §2).

    π = (x − b_dec·[pre_enc_bias]) W_enc + b_enc,   θ = exp(log θ) (per latent)
    f = π · H(π − θ),   x̂ = f W_dec + b_dec
    L = ‖x − x̂‖²  (summed over dims, mean over the batch: GDM's scale)  +  λ · Σ_i H(π_i − θ_i)
    or, with ``target_l0`` set (dictionary_learning's variant):  λ · d · (L0 / target_l0 − 1)²

The factor d in the target-L0 term carries dictionary_learning's λ (set for inputs with E‖x‖² = 1) over to
saekit's inputs (E‖x‖² = d), whose squared error is d times larger. Without it, λ = 1 is negligible next
to the reconstruction: on SmolLM2 layer 15 (width 4608, 780 steps) a run aimed at L0 32 ended at L0 158.

log θ learns ``threshold_lr_scale`` = 10 times faster than the other parameters (saekit's choice; the
papers use one rate). Adam moves log θ by about lr per step, i.e. θ by 0.1% at lr 1e-3, while a
pre-activation moves by up to lr·‖x‖₁ through W_enc and b_enc: in short runs the encoder outruns the
thresholds, and the L0 drifts away from its target whatever λ is. Same run with the d factor: L0 125 for
target 32 at scale 1, L0 30.4 at scale 10 (held-out). Set it to 1 for the papers' single rate.

Gradients through H and the jump come from the straight-through estimators in
:mod:`saekit.sae.common` (rectangle kernel of bandwidth ε; f and the L0 share one autograd node,
:func:`~saekit.sae.common.jumprelu_with_l0`, so the kernel window is computed once): the L0 term trains
only θ, and θ gets reconstruction gradient only through the JumpReLU pseudo-derivative. The parameter
is log θ; θ is passed to the estimators as ``log_threshold.exp()`` so autograd applies the chain-rule
factor θ.

Defaults, in the units of inputs normalised to E‖x‖² = d (the trainer's convention), where a unit-norm
encoder column gives pre-activations of order 1 at init. GDM's ε = θ₀ = 0.001 were set for inputs with
E‖x‖² = 1, where pre-activations are ~√d times smaller. Taken over unchanged, almost no token falls in the
ε-window around θ, θ gets almost no gradient and the L0 penalty does nothing: on synthetic data (d = 32,
64 true features, true L0 = 3, 1,200 Adam steps at lr 3e-3) the SAE stayed dense (L0 65 of 128 latents,
no feature recovered). ε = 0.05 (SAELens' value for this normalisation; ≈ 0.001·√d for d ≈ 2,300) works,
and results barely changed over ε = 0.01–0.2. θ₀ matters more, because Adam moves log θ by about lr per
step whatever θ is: from θ₀ = 0.01 (SAELens) θ needs thousands of steps to reach the O(1) scale of the
pre-activations (same run: 61% of features recovered, L0 4.6), from θ₀ = 0.5 it starts there (95%, L0 3.0;
θ₀ = 1: 89%). Hence θ₀ = 0.5 (about 30% of latents fire at init). λ = 1 makes a latent worth firing when it
removes more than one unit of squared error (λ = 0.3: L0 7.3; λ = 3: L0 2.4 on the same data). On SmolLM2-135M
layer-6 residuals (width 2304, 1,500 Adam steps at lr 1e-3) these defaults gave L0 ≈ 31 at FVU 0.16, next to
TopK k = 32 at FVU 0.15. Sweep λ, or set ``target_l0`` (then θ starts at per-latent quantiles of the
pre-activations on the trainer's init sample; see ``init_from_data``).
Decoder rows are unit-norm (constraint hooks, as Gemma Scope); init W_enc = W_decᵀ, b_enc = b_dec = 0.
The base ``fold_input_scale`` is exact with or without the pre-encoder bias, and θ is in latent units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, StepContext, register
from .common import UnitNormDecoder, dense_decode, encoder_preacts, jumprelu_with_l0, sse, tied_init


@dataclass
class JumpReLUConfig(SAEConfig):
    l0_coeff: float = 1.0
    """λ, the coefficient of the L0 penalty (or of d·(L0/target_l0 − 1)² when target_l0 is set)."""
    target_l0: float | None = None
    """If set, penalise λ·d·(L0/target_l0 − 1)² instead of λ·L0 (dictionary_learning's loss, in saekit's
    input units), to aim at an L0."""
    bandwidth: float = 0.05
    """ε, the width of the rectangle kernel of the straight-through estimators (input units, E‖x‖² = d)."""
    init_threshold: float = 0.5
    """θ₀, every latent's initial threshold (input units, E‖x‖² = d)."""
    pre_enc_bias: bool = False
    """Subtract b_dec before the encoder (GDM's JumpReLU does not; SAELens' apply_b_dec_to_input)."""
    threshold_lr_scale: float = 10.0
    """Learning rate of log θ relative to the other parameters (saekit's choice; see the module docstring)."""
    init_threshold_from_data: bool = True
    """With target_l0 set: start each θ_i at the quantile of latent i's pre-activations (on the trainer's
    init sample) above which it fires target_l0/width of the time, so training starts at the target L0."""

    def validate(self) -> None:
        super().validate()
        if self.l0_coeff < 0:
            raise ValueError(f"l0_coeff must be >= 0, got {self.l0_coeff}")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.width:
            raise ValueError(f"target_l0 must be in (0, width={self.width}], got {self.target_l0}")
        if self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")
        if self.threshold_lr_scale <= 0:
            raise ValueError(f"threshold_lr_scale must be positive, got {self.threshold_lr_scale}")
        if self.init_threshold <= 0:
            raise ValueError(
                f"init_threshold must be positive (the parameter is log θ), got {self.init_threshold}"
            )


@register("jumprelu")
class JumpReLUSAE(UnitNormDecoder, SAE):
    config_class = JumpReLUConfig
    latent_axes: ClassVar[dict[str, int | None]] = {"log_threshold": 0}
    """Per-latent tensors (for saekit.eval.progressive.permute_latents when d_in == width)."""
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.log_threshold = nn.Parameter(torch.full((cfg.width,), math.log(cfg.init_threshold)))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, b_dec_init: torch.Tensor | None) -> None:
        """b_dec from the trainer's centre; with ``target_l0``, θ from the sample (saekit's choice, not the
        paper's: Adam moves log θ by about lr per step, so a short run cannot travel from one θ₀ for every
        latent to thresholds giving the target L0; starting there leaves the L0 loss to hold it)."""
        super().init_from_data(sample, b_dec_init)
        if self.cfg.target_l0 is None or not self.cfg.init_threshold_from_data:
            return
        pre_NM = self.pre_acts(sample[:4096].to(self.W_enc))
        n = pre_NM.shape[0]
        fire_count = max(1, round(n * self.cfg.target_l0 / self.cfg.width))
        theta_M = pre_NM.kthvalue(n - fire_count + 1, dim=0).values  # fire_count-th largest per latent
        self.log_threshold.copy_(theta_M.clamp_min(1e-3).log())

    def param_groups(self) -> list[dict]:
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [
            {"params": rest, "lr_scale": 1.0},
            {"params": [self.log_threshold], "lr_scale": self.cfg.threshold_lr_scale},
        ]

    @property
    def threshold(self) -> torch.Tensor:
        """θ = exp(log θ), (M,)."""
        return self.log_threshold.exp()

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return encoder_preacts(x_ND, self.W_enc, self.b_enc, self.b_dec if self.cfg.pre_enc_bias else None)

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        pre_NM = self.pre_acts(x_ND)
        return pre_NM * (pre_NM > self.threshold)

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return dense_decode(f_NM, self.W_dec, self.b_dec)

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        pre_NM = self.pre_acts(x_ND)
        f_NM, count_N = jumprelu_with_l0(pre_NM, self.threshold, self.cfg.bandwidth)  # one node, one window
        x_hat_ND = self.decode(f_NM)
        l0_mean = count_N.mean()
        if self.cfg.target_l0 is None:
            sparsity = l0_mean
        else:
            sparsity = self.cfg.d_in * (l0_mean / self.cfg.target_l0 - 1).pow(2)
        losses = {"recon": sse(x_ND, x_hat_ND), "l0": self.cfg.l0_coeff * ctx.sparsity_scale * sparsity}
        return SAEOutput(x_hat_ND, f_NM, losses, {"l0": l0_mean.detach()})
