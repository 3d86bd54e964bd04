"""Multi-layer SAE, MLSAE (Lawson et al. 2024, "Residual stream analysis with multi-layer SAEs", arXiv
2409.04185; reference code tim-lawson/mlsae; spec §7.3).

One TopK SAE reads the residual stream of every layer; each layer's vector of a token is a separate example.
For one row x ∈ R^d (from any layer):

    μ = mean_i x_i,   σ = std_i x_i (unbiased),   z = (x − μ) / (σ + ε)        per-token standardisation
    π = (z − b_pre) W_enc                                                     no encoder bias
    f = ReLU(TopK_k(π)),   ẑ = f W_dec + b_pre,   x̂ = σ ẑ + μ
    L = (1/L) Σ_l FVU_l  +  α · AuxK,     FVU_l = mean_{rows of layer l, dims} (x − x̂)² / Var_l

Var_l is the variance of all entries of layer l's rows in the batch (the reference's ``torch.var`` over
(batch, pos, d): one scalar mean, unbiased), so FVU_l is the reference's per-batch normalised MSE.
Defaults are the reference's: k = 32, α = 1/32, k_aux = 256, ε = 1e-5. Decoder rows unit-norm with the
parallel gradient removed (constraint hooks); init W_enc = W_decᵀ.

saekit's choices where the spec is silent or the interface asks for something:

* **Layers.** A batch holds ``n_layers`` equal blocks of rows, block l from layer l (``saekit train`` feeds
  the same tokens in every block: the reference's (layer, batch, pos, d) tensor, flattened). The config
  holds only their number; the hook points themselves are provenance, in ``sae.metadata["hooks"]``, where
  ``saekit eval`` finds where to splice. The class declares ``multi_hook = True`` so the train job caches
  and mixes several hook points without knowing this architecture.
* **decode(f) needs each token's μ and σ**, which the interface's ``decode(f)`` does not carry. ``encode``
  remembers the statistics of the rows it standardised and ``decode`` uses them (or explicit ``stats``);
  decoding codes of other rows is an error. Evaluation and interventions always decode the rows they just
  encoded. The reference's ``decode(topk, stats)`` is the same function with the statistics passed.
* **AuxK** is saekit's shared, normalised AuxK (:func:`saekit.sae.common.auxk_loss`) in the standardised
  space the latents decode into: the residual z − ẑ (detached) is reconstructed from the top-k_aux dead
  latents. The reference instead compares the raw-space error (not detached) with a standardised-space
  dead-latent decode that includes b_pre, and centres its denominator per token.
* **b_pre init**: the trainer's centre (geometric median by default) standardised like any row, since
  b_pre lives in standardised space (the reference puts the raw geometric median there).
* **ε is in input units**, a buffer: ``fold_input_scale(s)`` divides it by s, and that is all folding
  changes (z does not depend on the input scale, and x̂ scales with μ and σ).
* Dead latents are the trainer's (no firing within ``dead_tokens`` rows); the reference counts a latent as
  firing only above 1e-3 and counts tokens, not rows. The optional tuned-lens transform is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import SAE, SAEOutput, SparseCode, StepContext, register
from .common import (
    UnitNormDecoder,
    auxk_selector,
    auxk_term_from_recon,
    decode_codes,
    tied_init,
    topk_code,
    train_codes,
)
from .sparse import TopKSelect
from .topk import TopKConfig

STD_EPS = 1e-5
"""ε added to each token's standard deviation (the reference's value), in training-input units."""

Stats = tuple[torch.Tensor, torch.Tensor]
"""(μ, σ), each (..., 1): one token's mean and standard deviation over its d entries."""


def standardize(x_ND: torch.Tensor, eps: float | torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """``(z, (μ, σ))`` with z = (x − μ) / (σ + ε) per row; σ is the unbiased std, as in the reference."""
    mu_N1 = x_ND.mean(dim=-1, keepdim=True)
    sigma_N1 = x_ND.std(dim=-1, keepdim=True)
    return (x_ND - mu_N1) / (sigma_N1 + eps), (mu_N1, sigma_N1)


@dataclass
class MultiLayerConfig(TopKConfig):
    k_aux: int | None = 256
    """Dead latents AuxK may use per row (the reference's 256; None = d_in // 2)."""
    init_encoder_scale: float = 1.0
    """W_enc starts as this times W_decᵀ (the reference's 1, not TopK's 1/√3)."""
    n_layers: int = 1
    """Layers (hook points) pooled in a batch: the trainer's batch is this many equal blocks, one per layer,
    and the loss averages their FVUs. Set by `saekit train` from the hook points."""

    def validate(self) -> None:
        super().validate()
        if self.d_in < 2:
            raise ValueError(f"d_in must be >= 2 to standardise a token over its entries, got {self.d_in}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")


@register("multilayer")
class MultiLayerSAE(UnitNormDecoder, SAE):
    config_class = MultiLayerConfig
    cfg: MultiLayerConfig
    multi_hook = True

    def __init__(self, cfg: MultiLayerConfig):
        super().__init__(cfg)
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width, scale=cfg.init_encoder_scale)
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("eps", torch.tensor(STD_EPS))
        self._stats: Stats | None = None  # of the rows last given to encode(), for decode()

    def pre_acts(self, z_ND: torch.Tensor) -> torch.Tensor:
        return (z_ND - self.b_pre) @ self.W_enc

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        z_ND, stats = standardize(x_ND, self.eps)
        self._stats = (stats[0].detach(), stats[1].detach())
        pre_NM = self.pre_acts(z_ND)
        return topk_code(pre_NM, self.cfg.k)

    def decode(self, f_NM: torch.Tensor, stats: Stats | None = None) -> torch.Tensor:
        """x̂ = σ (f W_dec + b_pre) + μ, with (μ, σ) = ``stats`` or those of the rows last encoded."""
        stats = stats if stats is not None else self._stats
        if stats is None or stats[0].shape[:-1] != f_NM.shape[:-1]:
            raise ValueError(
                "a multilayer SAE decodes in the units of the tokens it encoded: call encode(x) on the same "
                "rows first, or pass stats=(mean, std)"
            )
        mu_N1, sigma_N1 = stats
        return (f_NM @ self.W_dec + self.b_pre) * sigma_N1 + mu_N1

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        ctx = ctx or StepContext()
        n_rows, n_layers = x_ND.shape[0], self.cfg.n_layers
        if n_rows % n_layers:
            raise ValueError(f"a batch of {n_rows} rows cannot hold {n_layers} equal per-layer blocks")
        z_ND, (mu_N1, sigma_N1) = standardize(x_ND, self.eps)
        cfg = self.cfg
        aux_sel = auxk_selector(cfg.aux_coeff, ctx.dead_mask, cfg.k_aux_resolved)
        (rows, cols, vals), aux_code = train_codes(
            z_ND, self.W_enc, None, self.b_pre, TopKSelect(cfg.k), aux_sel
        )
        z_hat_ND, e_hat_ND = decode_codes(n_rows, self.W_dec, (rows, cols, vals), aux_code)
        z_hat_ND = z_hat_ND + self.b_pre
        x_hat_ND = z_hat_ND * sigma_N1 + mu_N1

        x_LnD, x_hat_LnD = x_ND.reshape(n_layers, -1, self.d_in), x_hat_ND.reshape(n_layers, -1, self.d_in)
        mse_L = (x_LnD - x_hat_LnD).pow(2).mean(dim=(1, 2))
        fvu_L = mse_L / x_LnD.flatten(1).var(dim=1).clamp_min(torch.finfo(x_ND.dtype).tiny)
        aux = auxk_term_from_recon(cfg.aux_coeff, e_hat_ND, z_ND - z_hat_ND)
        losses = {"recon": fvu_L.mean(), **aux}
        metrics = {"l0": (vals > 0).sum().detach() / n_rows}
        if n_layers > 1:
            metrics |= {f"fvu_layer{i}": v for i, v in enumerate(fvu_L.detach().tolist())}
        code = SparseCode(rows, cols, vals, (n_rows, self.width))
        return SAEOutput(x_hat_ND, None, losses, metrics, code=code)

    def init_from_data(self, sample: torch.Tensor, b_dec_init: torch.Tensor | None) -> None:
        """b_pre = the trainer's centre, standardised (b_pre lives in standardised space)."""
        if b_dec_init is not None:
            with torch.no_grad():
                self.b_pre.copy_(standardize(b_dec_init.to(self.b_pre), self.eps)[0])

    def fold_input_scale(self, scale: float) -> None:
        """standardize(s·x) with ε equals standardize(x) with ε/s, and x̂ carries the input's μ and σ."""
        with torch.no_grad():
            self.eps.div_(scale)
