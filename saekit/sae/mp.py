"""Matching-Pursuit SAE (Costa et al. 2025, "From Flat to Hierarchical: Extracting Sparse Representations
with Matching Pursuit"; reference code tue147/tree-sae ``models/mp.py``; spec §6.3).

There is no encoder: the code of x is found by greedy matching pursuit over the decoder atoms, the unit
directions u_i = W_dec,i / ‖W_dec,i‖. Starting from r⁰ = x − b_dec·[pre_enc_bias] and z = 0, for t = 1 … k:

    i_t = argmax_i ReLU(⟨rᵗ⁻¹, u_i⟩),   v_t = ReLU(⟨rᵗ⁻¹, u_{i_t}⟩)
    z_{i_t} += v_t / ‖W_dec,i_t‖,       rᵗ = rᵗ⁻¹ − v_t · u_{i_t}

and a token stops (its later steps change nothing) once a step leaves its support unchanged (the atom
picked was already active, or v_t = 0) or ‖rᵗ‖ < ε. Then x̂ = z W_dec + b_dec·[pre_enc_bias] = x − rᵏ, and
L = ‖x − x̂‖² / d (MSE, mean over batch and dims). A token's code never depends on the rest of its batch,
so ``encode`` is the pursuit itself. L0 is adaptive: at most k, fewer when the pursuit stops early.

Gradients, as in the reference: nothing is detached. The argmax choices carry no gradient, but every v_t
is differentiated through the residual rᵗ⁻¹, which depends on all earlier atoms and values, so an atom
picked at step t also learns from the error it leaves for later steps.

saekit's choices where the reference differs or is silent:

* Unit-norm atoms by saekit's constraint hooks (parallel gradient removed before the optimizer step, rows
  renormalised after it). The reference renormalises after backward, so its forward sees rows slightly off
  the sphere; here every forward sees exactly unit rows. The pursuit divides by the row norms inside the
  graph; at unit norm that only removes the radial gradient component, which the constraint removes anyway.
  The division is there for ``fold_input_scale``, which leaves rows of norm 1/s: with it, the pursuit on
  raw x picks the same atoms as before on s·x, with the same latent values.
* The loss is the MSE. The reference divides it by Var(x) (≈ 1 after its per-token standardisation); with
  no other loss term that constant only rescales the gradient, which Adam ignores.
* ε = 5e-3 (the reference's value, for standardised tokens with ‖x‖² ≈ d, as saekit's E‖x‖² = d) is kept
  as the buffer ``residual_tol`` so that folding can rescale it to raw units.
* b_dec is off by default, as in the paper and the reference (``use_pre_encoder_bias``); with
  ``pre_enc_bias`` the pursuit runs on x − b_dec, and b_dec starts at the trainer's centre. Without it an
  input offset costs atoms: on the offset data of tests/test_train.py (30 trainer steps, width 24, k = 4)
  the FVU was 0.6–1.3 without it (over inits) and 0.24 with it (TopK: 0.48).
* The (N, M) correlations that choose the atoms are computed without a graph, and v_t is recomputed as
  ⟨r, u_i⟩ (the same value and gradient as the reference's max of ReLU): memory grows with N·k·d, not
  N·k·M (checked against the reference's dense loop in the tests).
* No AuxK: the reference trains MP without one (a dead atom can still be picked once others explain less).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, StepContext, register
from .common import UnitNormDecoder, l0, mse, unit_rows


@dataclass
class MPConfig(SAEConfig):
    k: int = 32
    """Pursuit steps: the most latents a token can use (fewer when the pursuit converges early)."""
    residual_tol: float = 5e-3
    """ε: a token stops once its residual norm is below this (training input units, E‖x‖² = d)."""
    pre_enc_bias: bool = False
    """Pursue x − b_dec and add b_dec back (off in the paper and the reference code)."""

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise ValueError(f"k (pursuit steps) must be at least 1, got k={self.k}")
        if self.residual_tol < 0:
            raise ValueError(f"residual_tol must be >= 0, got {self.residual_tol}")


@register("mp")
class MPSAE(UnitNormDecoder, SAE):
    config_class = MPConfig
    cfg: MPConfig

    def __init__(self, cfg: MPConfig):
        super().__init__(cfg)
        self.W_dec = nn.Parameter(unit_rows(cfg.width, cfg.d_in))
        if cfg.pre_enc_bias:
            self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("residual_tol", torch.tensor(float(cfg.residual_tol)))

    @property
    def bias(self) -> torch.Tensor | float:
        """b_dec with ``pre_enc_bias``, else 0 (no such parameter)."""
        return self.b_dec if self.cfg.pre_enc_bias else 0.0

    def pursuit(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_NM, r_ND)``: the greedy codes of x − b_dec·[pre_enc_bias] and the final residual, so that
        x̂ = x − r (differentiable as the module docstring says)."""
        norms_M = self.W_dec.norm(dim=1).clamp_min(1e-12)
        U_MD = self.W_dec / norms_M[:, None]
        r_ND = x_ND - self.bias
        done_N = torch.zeros(x_ND.shape[0], dtype=torch.bool, device=x_ND.device)
        picks: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for _ in range(self.cfg.k):
            with torch.no_grad():
                i_N = (r_ND @ U_MD.T).argmax(dim=1)
            u_ND = U_MD[i_N]
            v_N = torch.where(done_N, 0.0, F.relu((r_ND * u_ND).sum(dim=1)))
            # The support stays the same when nothing is added or the atom is already active.
            seen_N = (torch.stack(picks, dim=1) == i_N[:, None]).any(1) if picks else torch.zeros_like(done_N)
            unchanged_N = (v_N == 0) | seen_N
            picks.append(i_N)
            values.append(v_N / norms_M[i_N])
            r_ND = r_ND - v_N[:, None] * u_ND
            done_N = done_N | unchanged_N | (r_ND.norm(dim=1) < self.residual_tol)
            if bool(done_N.all()):
                break
        z_NM = r_ND.new_zeros(x_ND.shape[0], self.width)
        return z_NM.scatter_add(1, torch.stack(picks, dim=1), torch.stack(values, dim=1)), r_ND

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.pursuit(x_ND)[0]

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return f_NM @ self.W_dec + self.bias

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        f_NM, r_ND = self.pursuit(x_ND)
        x_hat_ND = x_ND - r_ND  # = decode(f_NM), without the (N, M) × (M, d) product
        return SAEOutput(x_hat_ND, f_NM, {"recon": mse(x_ND, x_hat_ND)}, {"l0": l0(f_NM)})

    def fold_input_scale(self, scale: float) -> None:
        """Rows of norm 1/s: the pursuit on raw x then picks the atoms it picked on s·x, with the same
        values (see :meth:`pursuit`); ε and b_dec move to raw units."""
        with torch.no_grad():
            self.W_dec.div_(scale)
            self.residual_tol.div_(scale)
            if self.cfg.pre_enc_bias:
                self.b_dec.div_(scale)
