"""Meta-SAE (Leask, Bussmann et al., ICLR 2025, "Sparse Autoencoders Do Not Find Canonical Units of
Analysis"; spec §7.2): a BatchTopK SAE (:mod:`saekit.sae.batchtopk`, spec §7.5) whose training rows are
another SAE's decoder directions.

For a base SAE with decoder rows W_dec,j (j = 1 … M_base), the data set is the unit directions
d_j = W_dec,j / ‖W_dec,j‖, and the meta-SAE writes each as a sparse non-negative combination of meta-latents:

    d̂_j = Σ_m a_jm V_m + b_dec,     a_j = BatchTopK_k((d_j − b_dec) W_enc + b_enc),   k = 4 on average

A base latent "decomposes into" the meta-latents active on its direction (the paper's example: "Einstein"
→ scientist + Germany + famous person). The summary metric (SAEBench ``meta_structure``) is the decoder
fraction of variance explained, 1 − Σ_j ‖d_j − d̂_j‖² / Σ_j ‖d_j − mean_j d_j‖², computed with the
inference encoder (the BatchTopK threshold, so one row's code does not depend on the others).

Defaults and choices:

* k = 4 (the authors' code and SAEBench), AuxK coefficient 1/16 (authors' ``aux_penalty``; their AuxK is
  not normalised by the residual's variance, saekit's is, so the two are not numerically the same term).
  Everything else (loss, AuxK, unit-norm decoder, inference threshold θ) is BatchTopK's.
* The rows are unit-normalised float32 ("input_unit_norm" off in the authors' code: the rows are already
  unit vectors). The trainer's E‖x‖² = d normalisation only rescales them all by √d and is folded back
  into the saved meta-SAE, which then takes unit rows.
* Settings that belong to the trainer, not to this config: width 0.25 × base width (SAEBench); lr 1e-4,
  Adam β = (0.9, 0.99), a latent dead after 100 batches, batches of 2^15 rows (authors), or 1,500 steps of
  1,024 rows at lr 5e-4 (SAEBench).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import saekit

from .base import SAE, register
from .batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class MetaConfig(BatchTopKConfig):
    k: int = 4
    """Mean active meta-latents per base decoder row (BatchTopK's k)."""
    aux_coeff: float = 1 / 16
    """α, the AuxK coefficient (the meta-SAE authors' 1/16)."""
    base_sae: str = ""
    """The SAE whose decoder rows are the training data: a saved SAE folder or a run folder holding sae/."""

    def validate(self) -> None:
        super().validate()
        if not self.base_sae:
            raise ValueError("base_sae is required: the SAE whose decoder rows the meta-SAE learns")


def decoder_rows(base: SAE | str | Path) -> torch.Tensor:
    """(M_base, d) float32: the base SAE's decoder rows scaled to unit norm (zero rows stay zero)."""
    if not isinstance(base, SAE):
        base = saekit.load(base)
    with torch.no_grad():
        rows_MD = base.W_dec.detach().float().cpu()
        return rows_MD / rows_MD.norm(dim=1, keepdim=True).clamp_min(1e-12)


@register("meta")
class MetaSAE(BatchTopKSAE):
    config_class = MetaConfig
    cfg: MetaConfig

    @classmethod
    def own_training_rows(cls, options: dict[str, Any]) -> torch.Tensor:
        """The unit decoder rows of ``options["base_sae"]`` (float32, (M_base, d))."""
        path = options.get("base_sae")
        if not path:
            raise ValueError("the meta architecture needs base_sae: the path of the SAE to decompose")
        rows_ND = decoder_rows(path)
        d_in = options.get("d_in")
        if d_in is not None and d_in != rows_ND.shape[1]:
            raise ValueError(f"d_in={d_in} but the base SAE {path} has rows of size {rows_ND.shape[1]}")
        return rows_ND

    def base_rows(self) -> torch.Tensor:
        """The unit decoder rows of ``cfg.base_sae`` (loaded again on each call)."""
        return decoder_rows(self.cfg.base_sae)


@torch.no_grad()
def decoder_fve(meta: MetaSAE, rows_ND: torch.Tensor | None = None, batch_size: int = 4096) -> float:
    """Decoder fraction of variance explained (SAEBench ``meta_structure``): 1 − Σ‖d − d̂‖² / Σ‖d − d̄‖²
    over the base decoder rows d (default: the unit rows of ``meta.cfg.base_sae``), d̂ = decode(encode(d))."""
    rows_ND = meta.base_rows() if rows_ND is None else rows_ND
    param = next(meta.parameters())
    rows_ND = rows_ND.to(param)
    mean_D = rows_ND.mean(dim=0)
    residual = total = 0.0
    for start in range(0, rows_ND.shape[0], batch_size):
        d_BD = rows_ND[start : start + batch_size]
        residual += (d_BD - meta.decode(meta.encode(d_BD))).pow(2).sum().item()
        total += (d_BD - mean_D).pow(2).sum().item()
    return 1.0 - residual / total if total > 0 else 0.0


@torch.no_grad()
def decomposition(meta: MetaSAE, latent: int, rows_ND: torch.Tensor | None = None) -> list[tuple[int, float]]:
    """The meta-latents that base latent ``latent`` decomposes into: ``(meta_latent, activation)`` for every
    meta-latent active on its unit decoder row, largest activation first."""
    rows_ND = meta.base_rows() if rows_ND is None else rows_ND
    if not 0 <= latent < rows_ND.shape[0]:
        raise IndexError(f"base latent {latent} out of range: the base SAE has {rows_ND.shape[0]} latents")
    a_M = meta.encode(rows_ND[latent : latent + 1].to(next(meta.parameters())))[0]
    active = a_M.nonzero().flatten()
    order = a_M[active].argsort(descending=True)
    return [(int(m), float(a_M[m])) for m in active[order]]
