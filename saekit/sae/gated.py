"""Gated SAE (Rajamanoharan, Conmy et al. 2024, arXiv 2404.16014; App. G pseudo-code, spec §3).

    x_c = x − b_dec
    π_gate = x_c W_gate + b_gate                      f_gate = 1[π_gate > 0]
    π_mag  = x_c W_mag + b_mag,  W_mag = W_gate · diag(exp(r_mag))   (weight sharing, Eq. 7)
    f = f_gate ⊙ ReLU(π_mag),    x̂ = f W_dec + b_dec
    L = ‖x − x̂‖² + λ ‖ReLU(π_gate)‖₁ + ‖x − (ReLU(π_gate) sg(W_dec) + sg(b_dec))‖²

Squared errors are summed over dims and averaged over the batch (the paper's L2 / dictionary_learning's
scale). The Heaviside passes no gradient, so the gate path (W_gate, b_gate) learns only from the L1 and
the auxiliary term, which decodes through a frozen (stop-gradient) decoder: the aux term's decode leaves
W_dec and b_dec untouched (the paper's §5.1 ablation found unfreezing them hurts; SAELens does not freeze).
b_dec still gets aux and L1 gradient as the encoder's pre-bias (x_c = x − b_dec), as in Fig. 17.
Decoder rows are kept at unit norm, so the L1 needs no decoder-norm weighting. λ (× ``ctx.sparsity_scale``)
defaults to 3, not dictionary_learning's 0.1: on SmolLM2-135M layer-6 residuals normalised to E‖x‖² = d
(width 2304, 1,500 Adam steps at lr 1e-3, batch 256) λ = 0.1 / 1 / 3 gave L0 ≈ 900 / 195 / 39 (FVU 0.025 /
0.081 / 0.147); TopK with k = 32 reached FVU 0.146 in the same run. Sweep it to pick an L0.

Both paths share one encoder GEMM, x_c W_gate (b_dec's gradient through it is a matrix-vector product,
:func:`~saekit.sae.common.encoder_preacts`), and the gate/magnitude element-wise work is one autograd node
(:class:`GatedCode`). The two decodes cannot share a GEMM: they multiply different codes, and only the
first one's gradient reaches W_dec.

``W_gate`` is stored as ``W_enc`` so code that reads an SAE's encoder (and the base class's
``fold_input_scale``, exact here because W_mag scales with it) treats Gated like the rest.
Init (dictionary_learning): unit-norm W_dec rows, W_gate = W_decᵀ, r_mag = b_gate = b_mag = b_dec = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, StepContext, register
from .common import UnitNormDecoder, dense_decode, encoder_preacts, l0, sse, tied_init


@dataclass
class GatedConfig(SAEConfig):
    l1_coeff: float = 3.0
    """λ, the coefficient of the L1 penalty on ReLU(π_gate) (loss = SSE + λ·L1 + aux SSE)."""

    def validate(self) -> None:
        super().validate()
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}")


@register("gated")
class GatedSAE(UnitNormDecoder, SAE):
    config_class = GatedConfig
    latent_axes: ClassVar[dict[str, int | None]] = {"b_gate": 0, "r_mag": 0, "b_mag": 0}
    """Per-latent tensors (for saekit.eval.progressive.permute_latents when d_in == width)."""
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width)
        self.W_enc = nn.Parameter(W_enc)  # W_gate
        self.b_gate = nn.Parameter(torch.zeros(cfg.width))
        self.r_mag = nn.Parameter(torch.zeros(cfg.width))
        self.b_mag = nn.Parameter(torch.zeros(cfg.width))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def gate_and_magnitude(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(π_gate, π_mag)``, both (N, M). x_c W_mag = (x_c W_gate) ⊙ exp(r_mag): one matmul serves both."""
        proj_NM = encoder_preacts(x_ND, self.W_enc, None, self.b_dec)
        return proj_NM + self.b_gate, proj_NM * self.r_mag.exp() + self.b_mag

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        proj_NM = encoder_preacts(x_ND, self.W_enc, None, self.b_dec)
        return GatedCode.apply(proj_NM, self.b_gate, self.r_mag, self.b_mag)[0]

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return dense_decode(f_NM, self.W_dec, self.b_dec)

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        proj_NM = encoder_preacts(x_ND, self.W_enc, None, self.b_dec)  # the one encoder GEMM of both paths
        f_NM, via_gate_NM = GatedCode.apply(proj_NM, self.b_gate, self.r_mag, self.b_mag)
        x_hat_ND = self.decode(f_NM)
        x_hat_frozen_ND = dense_decode(via_gate_NM, self.W_dec.detach(), self.b_dec.detach())
        losses = {
            "recon": sse(x_ND, x_hat_ND),
            "l1": self.cfg.l1_coeff * ctx.sparsity_scale * via_gate_NM.sum(dim=-1).mean(),
            "aux": sse(x_ND, x_hat_frozen_ND),
        }
        return SAEOutput(x_hat_ND, f_NM, losses, {"l0": l0(f_NM)})


class GatedCode(torch.autograd.Function):
    """From proj = x_c W_gate (N, M): ``(f, ReLU(π_gate))`` with f = 1[π_gate > 0] ⊙ ReLU(π_mag),
    π_gate = proj + b_gate, π_mag = proj ⊙ exp(r_mag) + b_mag, in one node. Autograd over those five
    element-wise ops keeps about twice the (N, M) tensors; here the backward reads only proj and the two
    outputs, whose signs are the masks: f > 0 ⇔ the gate is open and π_mag > 0, ReLU(π_gate) > 0 ⇔ the
    gate is open. The Heaviside passes no gradient (the paper's gate path learns from L1 and aux only)."""

    @staticmethod
    def forward(ctx, proj_NM, b_gate_M, r_mag_M, b_mag_M):  # noqa: D102 (autograd API)
        scale_M = r_mag_M.exp()
        via_gate_NM = (proj_NM + b_gate_M).relu_()
        f_NM = torch.addcmul(b_mag_M, proj_NM, scale_M).relu_().mul_(via_gate_NM > 0)
        ctx.save_for_backward(proj_NM, scale_M, f_NM, via_gate_NM)
        return f_NM, via_gate_NM

    @staticmethod
    def backward(ctx, grad_f_NM, grad_via_NM):  # noqa: D102
        proj_NM, scale_M, f_NM, via_gate_NM = ctx.saved_tensors
        grad_mag_NM = torch.where(f_NM > 0, grad_f_NM, 0.0)  # ∂π_mag
        grad_gate_NM = torch.where(via_gate_NM > 0, grad_via_NM, 0.0)  # ∂π_gate
        grad_b_mag = grad_mag_NM.sum(dim=0)
        grad_r_mag = torch.einsum("nm,nm->m", grad_mag_NM, proj_NM) * scale_M
        grad_b_gate = grad_gate_NM.sum(dim=0)
        grad_proj_NM = grad_gate_NM.addcmul_(grad_mag_NM, scale_M)
        return grad_proj_NM, grad_b_gate, grad_r_mag, grad_b_mag
