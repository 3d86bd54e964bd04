"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen, Nanda, ICML 2025, arXiv 2503.17547; spec §4).

A BatchTopK SAE (:mod:`saekit.sae.batchtopk`) whose latents must be useful in order: the first m_1
latents reconstruct x on their own, so do the first m_2 > m_1, ..., up to all M, through one shared
decoder. With prefix ends m_1 < … < m_L = M:

    π = (x − b_dec) W_enc + b_enc,   f = BatchTopK_k(π)   (top k·N of the whole batch, then ReLU)
    x̂_ℓ = b_dec + Σ_{i < m_ℓ} f_i W_dec,i                 (x̂_L, all latents, is the SAE's output)
    L = Σ_ℓ w_ℓ ‖x − x̂_ℓ‖² / d  +  α · AuxK(x − x̂_L),      Σ_ℓ w_ℓ = 1

An early latent is paid for whatever it explains on its own, so general features (a parent) settle in
the first groups and specific ones (its children) in later groups, instead of children absorbing the
parent as a flat loss rewards.

* Prefix ends (``prefixes="groups"``): cumulative group fractions, rounded as cumulative sums so the sizes
  add up to M and each is within one of f·M; default 1/16, 1/16, 1/8, 1/4, 1/2 (Bussmann's ``main.py``).
  ``prefixes="random"`` is Nabeshima's variant (spec §4.3): fresh each step, n − 1 distinct ends drawn
  without replacement with P(m) ∝ (m − m₀ + 1)^p − (m − m₀)^p on m₀ ≤ m < M (p = ``pareto_power``,
  m₀ = ``min_prefix_length``; short prefixes are drawn most), plus M.
* Weights: ``uniform`` w_ℓ = 1/L, or ``inverse`` w_ℓ ∝ 1/ℓ (earlier levels weigh more), normalised to sum
  to 1 so the reconstruction term keeps the scale of one MSE and α = 1/32 means what it means for
  BatchTopK. That is Bussmann's mean over levels; dictionary_learning's (1/L²)·Σ SSE and SAELens's sum
  differ from it by a constant factor. ``bias_level`` adds Bussmann's x̂_0 = b_dec as the first level
  (then ℓ = 1 is x̂_0 in ``inverse``).
* A prefix's code is the full code restricted to the prefix (selection over all M latents first, as both
  reference codes): nothing is re-selected. The same holds at inference: ``encode(x, width=G)`` zeroes
  latents ≥ G after the selection, for any 0 ≤ G ≤ M (not only group ends); once θ is estimated the
  selection is per latent, so only W_enc's first G columns are used. ``decode(f, width=G)`` reads only
  W_dec's first G rows.
* The L reconstructions come from one ``embedding_bag`` over the selected entries, bagged by (block between
  two ends, token), and a cumulative sum over blocks: no dense (N, M) decode and no L separate decodes.
* AuxK on the full residual, the inference threshold θ, the unit-norm decoder and the init are BatchTopK's.

saekit's choices where the references differ or are silent: b_enc is used (dictionary_learning; Bussmann
declares but never uses it); squared error as MSE (Bussmann); the weights above. Nabeshima also re-sorts
latents by an EMA of E[f²] every step, permuting Adam's moments with them; an SAE does not own its
optimizer, so that is not done here: sort after training with :func:`saekit.eval.progressive.permute_latents`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .base import SAEOutput, SparseCode, StepContext, register
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .common import auxk_term_from_code, sparse_decode
from .sparse import stable_argsort


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    group_fractions: list[float] = field(default_factory=lambda: [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2])
    """Share of the latents in each nested group, in order, summing to 1 (used with prefixes='groups')."""
    level_weighting: Literal["uniform", "inverse"] = "uniform"
    """Weights of the levels' MSEs (normalised to sum 1): 'uniform', or 'inverse' (∝ 1, 1/2, 1/3, …)."""
    bias_level: bool = False
    """Add the b_dec-only reconstruction as the loss's first level (Bussmann's reference code does)."""
    prefixes: Literal["groups", "random"] = "groups"
    """'groups': prefixes end at the group boundaries. 'random': Nabeshima's prefixes, redrawn every step."""
    n_random_prefixes: int = 10
    """prefixes='random': prefixes per step, the full width included (Nabeshima's toy setting: 10)."""
    pareto_power: float = 0.5
    """prefixes='random': p in P(end m) ∝ (m − m₀ + 1)^p − (m − m₀)^p (smaller p: more short prefixes)."""
    min_prefix_length: int = 1
    """prefixes='random': m₀, the shortest prefix that may be drawn."""

    def validate(self) -> None:
        super().validate()
        if self.prefixes == "random":
            self._validate_random_prefixes()
        else:
            self._validate_groups()
        if self.level_weighting not in ("uniform", "inverse"):
            raise ValueError(f"level_weighting must be 'uniform' or 'inverse', got {self.level_weighting!r}")

    def _validate_groups(self) -> None:
        if self.prefixes != "groups":
            raise ValueError(f"prefixes must be 'groups' or 'random', got {self.prefixes!r}")
        fr = self.group_fractions
        if not fr or any(not f > 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise ValueError(f"group_fractions must be positive and sum to 1, got {fr} (sum {sum(fr):.6g})")
        ends = self.group_ends
        sizes = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        if min(sizes) < 1:
            raise ValueError(
                f"width={self.width} is too small for group_fractions={fr}: group sizes would be {sizes}"
            )

    def _validate_random_prefixes(self) -> None:
        if self.pareto_power <= 0:
            raise ValueError(f"pareto_power must be positive, got {self.pareto_power}")
        if not 1 <= self.min_prefix_length < self.width:
            raise ValueError(
                f"min_prefix_length must be in [1, width={self.width}), got {self.min_prefix_length}"
            )
        n_ends = self.width - self.min_prefix_length  # ends m₀ … M−1 to draw n − 1 distinct ones from
        if not 1 <= self.n_random_prefixes <= n_ends + 1:
            raise ValueError(
                f"n_random_prefixes must be in [1, {n_ends + 1}] (distinct ends in [min_prefix_length="
                f"{self.min_prefix_length}, width={self.width}), plus the full width), "
                f"got {self.n_random_prefixes}"
            )

    @property
    def group_ends(self) -> list[int]:
        """m_1 < … < m_L = width: the rounded cumulative fractions (each group gets f·M ± 1 latents)."""
        cum = 0.0
        ends = []
        for f in self.group_fractions[:-1]:
            cum += f
            ends.append(math.floor(cum * self.width + 0.5))
        return [*ends, self.width]


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig
    ordered_latents = True

    def __init__(self, cfg: MatryoshkaConfig):
        super().__init__(cfg)
        if cfg.prefixes == "random":
            m0, p = cfg.min_prefix_length, cfg.pareto_power
            offsets = torch.arange(cfg.width - m0, dtype=torch.float64)  # m − m₀ for m = m₀ … M−1
            self._end_weights = (offsets + 1).pow(p) - offsets.pow(p)  # unnormalised P(end m); not state

    # -- prefixes ------------------------------------------------------------------------------------------
    def prefix_ends(self) -> torch.Tensor:
        """(L,) int64 ascending ends m_ℓ of this step's prefixes, the last = width. Random prefixes use the
        global torch RNG (CPU), so ``torch.manual_seed`` makes a run reproducible on any device."""
        if self.cfg.prefixes == "groups":
            return torch.tensor(self.cfg.group_ends)
        n_drawn = self.cfg.n_random_prefixes - 1
        drawn = torch.multinomial(self._end_weights, n_drawn) if n_drawn else torch.empty(0, dtype=torch.long)
        return torch.cat([drawn.sort().values + self.cfg.min_prefix_length, torch.tensor([self.width])])

    def level_weights(self, n_levels: int) -> torch.Tensor:
        """(n_levels,) loss weights w_ℓ summing to 1."""
        if self.cfg.level_weighting == "uniform":
            w = torch.ones(n_levels)
        else:
            w = 1.0 / torch.arange(1, n_levels + 1, dtype=torch.float32)
        return w / w.sum()

    def prefix_reconstructions(
        self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_tokens: int, ends_L: torch.Tensor
    ) -> torch.Tensor:
        """(L, N, d): x̂_ℓ = b_dec + Σ_{i < m_ℓ} f_i W_dec,i from the row-sorted COO code.

        Entry (token n, latent i) falls in block b = #{ℓ : m_ℓ ≤ i}; one embedding_bag over bags b·N + n
        gives every block's contribution, and the cumulative sum over blocks turns blocks into prefixes."""
        ends_L = ends_L.to(cols.device)
        block = torch.bucketize(cols, ends_L, right=True)
        bag = block * n_tokens + rows
        order = stable_argsort(bag)  # stable: columns stay ascending within a bag
        bag = bag[order]
        blocks_LND = sparse_decode(bag, cols[order], vals[order], len(ends_L) * n_tokens, self.W_dec)
        return blocks_LND.view(len(ends_L), n_tokens, -1).cumsum(0) + self.b_dec

    # -- inference at any width --------------------------------------------------------------------------
    def _check_width(self, width: int | None) -> int:
        if width is None:
            return self.width
        if not 0 <= width <= self.width:
            raise ValueError(f"prefix width must be in [0, {self.width}], got {width}")
        return int(width)

    def encode(self, x_ND: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """(N, M) code of the first ``width`` latents (the rest zero), selected as by the full SAE."""
        g = self._check_width(width)
        if g == self.width or self.threshold.item() < 0:  # top-k fallback: select over all, then truncate
            f_NM = super().encode(x_ND)
            return f_NM if g == self.width else F.pad(f_NM[:, :g], (0, self.width - g))
        pre_NG = (x_ND - self.b_dec) @ self.W_enc[:, :g] + self.b_enc[:g]
        return F.pad(pre_NG * (pre_NG > self.threshold.to(pre_NG.dtype)), (0, self.width - g))

    def decode(self, f_NM: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Reconstruction from the first ``width`` latents of ``f`` (which may have only those columns)."""
        g = self._check_width(width)
        return f_NM[:, :g] @ self.W_dec[:g] + self.b_dec

    # -- training ----------------------------------------------------------------------------------------
    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        n = x_ND.shape[0]
        (rows, cols, vals), aux = self.encode_train(x_ND, ctx)  # BatchTopK over all latents; updates θ
        ends_L = self.prefix_ends()
        x_hat_LND = self.prefix_reconstructions(rows, cols, vals, n, ends_L)
        mse_L = (x_hat_LND - x_ND).pow(2).mean(dim=(1, 2))
        if self.cfg.bias_level:
            mse_L = torch.cat([(x_ND - self.b_dec).pow(2).mean()[None], mse_L])
        x_hat_ND = x_hat_LND[-1]
        recon = (self.level_weights(len(mse_L)).to(mse_L) * mse_L).sum()
        losses = {
            "recon": recon,
            **auxk_term_from_code(self.cfg.aux_coeff, aux, x_ND - x_hat_ND, self.W_dec),
        }
        metrics: dict = {"l0": (vals > 0).sum().detach() / n}
        if self.cfg.prefixes == "groups":  # fixed names only: the trainer averages metrics by name
            per_prefix = zip(ends_L.tolist(), mse_L[-len(ends_L) :].detach(), strict=True)
            metrics.update({f"mse_w{m}": e for m, e in per_prefix})
        code = SparseCode(rows, cols, vals, (n, self.width))
        return SAEOutput(x_hat_ND, None, losses, metrics, code=code)
