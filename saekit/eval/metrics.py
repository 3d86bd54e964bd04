"""Reconstruction and sparsity metrics, as defined in the project's metric spec (docs: metrics).

Two ways to use them:

* plain functions (:func:`fvu`, :func:`l0`, :func:`gamma`, ...) for one batch held in memory;
* :class:`ReconstructionStats`, an accumulator fed batch by batch, for an evaluation set that does not fit
  in memory. It keeps float64 sums only, so its result does not depend on how the set was split into
  batches, and it agrees with the plain functions applied to the concatenated set.

Definitions worth repeating because peers get them wrong:

* MSE is divided by N·d and by nothing else (not by the number of batches, not by the batch size).
* FVU is centred: the denominator is Σ‖x − x̄‖² with x̄ the mean over the whole eval set, so a constant
  offset that the reconstruction also carries does not change it.
* γ (relative reconstruction bias) is a ratio of set means, E‖x̂‖² / E⟨x, x̂⟩, not a mean of per-token ratios.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens is counted as dense."""

DEFAULT_HIST_EDGES = np.arange(-8.0, 0.0 + 1e-9, 0.25)
"""log10 firing-frequency bin edges; frequencies below 1e-8 fall in the first bin, dead latents are apart."""

_TINY = 1e-30  # guards divisions by a zero norm; real activations never get near it


def _flat_pair(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and return (N, d) float64 views of x and x̂ (leading dims flattened)."""
    if x.shape != x_hat.shape:
        raise ValueError(
            f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (feature) dimension, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    return x.detach().reshape(-1, d).double(), x_hat.detach().reshape(-1, d).double()


def _flat_latents(f: torch.Tensor) -> torch.Tensor:
    if f.ndim < 1 or f.shape[-1] == 0:
        raise ValueError(f"f must have a non-empty last (latent) dimension, got shape {tuple(f.shape)}")
    return f.detach().reshape(-1, f.shape[-1])


# -- single-batch functions ------------------------------------------------------------------------------
def l0(f: torch.Tensor) -> float:
    """Mean number of non-zero latents per token."""
    f_NM = _flat_latents(f)
    return float((f_NM != 0).sum(dtype=torch.float64) / f_NM.shape[0])


def l1(f: torch.Tensor) -> float:
    """Mean L1 norm of the latent vector per token."""
    f_NM = _flat_latents(f)
    return float(f_NM.double().abs().sum() / f_NM.shape[0])


def firing_frequencies(f: torch.Tensor) -> np.ndarray:
    """p_i: the fraction of tokens on which latent i is non-zero, shape (M,)."""
    f_NM = _flat_latents(f)
    return ((f_NM != 0).sum(0, dtype=torch.float64) / f_NM.shape[0]).cpu().numpy()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """(1/(N d)) Σ ‖x − x̂‖²: mean squared error per element."""
    x_ND, xh_ND = _flat_pair(x, x_hat)
    return float((x_ND - xh_ND).pow(2).sum() / x_ND.numel())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖², centred on the mean of this set."""
    x_ND, xh_ND = _flat_pair(x, x_hat)
    total = (x_ND - x_ND.mean(0)).pow(2).sum()
    return float((x_ND - xh_ND).pow(2).sum() / total.clamp_min(_TINY))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 − FVU."""
    return 1.0 - fvu(x, x_hat)


def ev_per_token(x: torch.Tensor, x_hat: torch.Tensor, center: torch.Tensor | None = None) -> float:
    """mean_n [1 − ‖x_n − x̂_n‖² / ‖x_n − c‖²], the per-token form older papers report.

    ``c`` is ``center`` if given, else the mean of ``x``. Not the same number as :func:`explained_variance`:
    tokens close to the mean get huge weight here. Reported only for comparison.
    """
    x_ND, xh_ND = _flat_pair(x, x_hat)
    c_D = x_ND.mean(0) if center is None else center.detach().double().to(x_ND.device)
    err_N = (x_ND - xh_ND).pow(2).sum(-1)
    var_N = (x_ND - c_D).pow(2).sum(-1).clamp_min(_TINY)
    return float((1.0 - err_N / var_N).mean())


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Normalized MSE of the top-AFA paper: mean_n ‖x_n − x̂_n‖² / ‖x_n‖²."""
    x_ND, xh_ND = _flat_pair(x, x_hat)
    return float(((x_ND - xh_ND).pow(2).sum(-1) / x_ND.pow(2).sum(-1).clamp_min(_TINY)).mean())


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """mean_n cos(x_n, x̂_n) (a zero vector has cosine 0 with anything)."""
    x_ND, xh_ND = _flat_pair(x, x_hat)
    return float(_cos_N(x_ND, xh_ND).mean())


def l2_ratio(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """mean_n ‖x̂_n‖ / ‖x_n‖."""
    x_ND, xh_ND = _flat_pair(x, x_hat)
    return float((xh_ND.norm(dim=-1) / x_ND.norm(dim=-1).clamp_min(_TINY)).mean())


def gamma(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Relative reconstruction bias γ = E‖x̂‖² / E⟨x, x̂⟩ (Gated SAE paper). γ < 1 means shrinkage."""
    x_ND, xh_ND = _flat_pair(x, x_hat)
    return float(xh_ND.pow(2).sum() / (x_ND * xh_ND).sum())


relative_reconstruction_bias = gamma


def _cos_N(x_ND: torch.Tensor, xh_ND: torch.Tensor) -> torch.Tensor:
    denom = (x_ND.norm(dim=-1) * xh_ND.norm(dim=-1)).clamp_min(_TINY)
    return (x_ND * xh_ND).sum(-1) / denom


def density_histogram(freqs: np.ndarray, edges: np.ndarray = DEFAULT_HIST_EDGES) -> dict[str, Any]:
    """Histogram of log10 firing frequency over live latents; dead latents (p = 0) are counted apart.

    Frequencies below the first edge are put in the first bin so that every live latent is counted.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    live = freqs[freqs > 0]
    log_p = np.clip(np.log10(live), edges[0], edges[-1])
    counts, _ = np.histogram(log_p, bins=edges)
    return {
        "log10_bin_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "n_dead": int((freqs == 0).sum()),
    }


# -- streaming accumulator -------------------------------------------------------------------------------
class ReconstructionStats:
    """Accumulates the reconstruction and sparsity metrics over many batches in float64.

    ``update(x, x_hat, f)`` takes (N, d) activations, their reconstructions and (N, M) latents (``f`` may
    be None when the reconstruction does not come from an SAE; sparsity metrics are then None).
    ``result()`` returns the metrics of everything seen so far.

    The centred variance behind FVU is merged batch by batch with Chan's parallel formula (mean and sum of
    squared deviations), not as Σ‖x‖² − N‖x̄‖², which cancels catastrophically when activations carry a
    large common offset.

    ``ev_per_token`` needs a centre before the mean of the whole set is known: pass ``center`` (e.g. the
    mean of the training activations) for an exact, split-independent value; otherwise the mean of the
    first batch is used, which is exact only when everything arrives in one batch. Every other metric is
    independent of how the set is split.
    """

    def __init__(self, center: torch.Tensor | None = None, hist_edges: np.ndarray = DEFAULT_HIST_EDGES):
        self.center = None if center is None else center.detach().double().flatten()
        self.hist_edges = hist_edges
        self.n = 0
        self.d: int | None = None
        self.mean_D: torch.Tensor | None = None
        self.m2 = 0.0  # Σ ‖x − mean‖² over tokens seen
        self.sums: dict[str, float] = dict.fromkeys(
            ["sq_err", "sq_x", "sq_xhat", "dot", "cos", "l2_ratio", "ev_tok", "nmse", "l0", "l1"], 0.0
        )
        self.fire_counts_M: torch.Tensor | None = None
        self.n_latent_tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor | None = None) -> None:
        x_ND, xh_ND = _flat_pair(x, x_hat)
        n_b, d = x_ND.shape
        if self.d is not None and d != self.d:
            raise ValueError(f"activation width changed between batches: {self.d} then {d}")
        if f is not None and _flat_latents(f).shape[0] != n_b:
            raise ValueError(f"f has {_flat_latents(f).shape[0]} tokens but x has {n_b}")
        if n_b == 0:
            return
        self.d = d
        if self.center is None:
            self.center = x_ND.mean(0)
        if self.center.numel() != d:
            raise ValueError(f"center has {self.center.numel()} elements, activations have width {d}")
        center_D = self.center.to(x_ND.device)

        # Chan et al. merge of (n, mean, M2).
        mean_b = x_ND.mean(0)
        m2_b = float((x_ND - mean_b).pow(2).sum())
        if self.mean_D is None:
            self.mean_D, self.m2 = mean_b, m2_b
        else:
            delta = mean_b - self.mean_D.to(x_ND.device)
            n_tot = self.n + n_b
            self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * n_b / n_tot
            self.mean_D = self.mean_D.to(x_ND.device) + delta * (n_b / n_tot)
        self.n += n_b

        err_N = (x_ND - xh_ND).pow(2).sum(-1)
        sq_x_N = x_ND.pow(2).sum(-1)
        s = self.sums
        s["sq_err"] += float(err_N.sum())
        s["sq_x"] += float(sq_x_N.sum())
        s["sq_xhat"] += float(xh_ND.pow(2).sum())
        s["dot"] += float((x_ND * xh_ND).sum())
        s["cos"] += float(_cos_N(x_ND, xh_ND).sum())
        s["l2_ratio"] += float((xh_ND.norm(dim=-1) / sq_x_N.sqrt().clamp_min(_TINY)).sum())
        s["nmse"] += float((err_N / sq_x_N.clamp_min(_TINY)).sum())
        s["ev_tok"] += float((1.0 - err_N / (x_ND - center_D).pow(2).sum(-1).clamp_min(_TINY)).sum())

        if f is not None:
            f_NM = _flat_latents(f)
            active = f_NM != 0
            s["l0"] += float(active.sum(dtype=torch.float64))
            s["l1"] += float(f_NM.double().abs().sum())
            counts = active.sum(0, dtype=torch.int64).cpu()
            if self.fire_counts_M is None:
                self.fire_counts_M = counts
            elif counts.shape != self.fire_counts_M.shape:
                raise ValueError(f"latent width changed: {self.fire_counts_M.numel()} then {counts.numel()}")
            else:
                self.fire_counts_M += counts
            self.n_latent_tokens += n_b

    def result(self) -> dict[str, Any]:
        """All metrics over the tokens seen so far (see the module docstring for definitions)."""
        if self.n == 0:
            raise ValueError("ReconstructionStats.result() called before any tokens were added")
        n, s = self.n, self.sums
        fvu_ = s["sq_err"] / max(self.m2, _TINY)
        out: dict[str, Any] = {
            "n_tokens": n,
            "mse": s["sq_err"] / (n * self.d),
            "fvu": fvu_,
            "explained_variance": 1.0 - fvu_,
            "ev_per_token": s["ev_tok"] / n,
            "nmse": s["nmse"] / n,
            "cosine": s["cos"] / n,
            "l2_ratio": s["l2_ratio"] / n,
            "relative_reconstruction_bias": s["sq_xhat"] / s["dot"] if s["dot"] != 0 else float("nan"),
            "mean_sq_norm": s["sq_x"] / n,
            "l0": None,
            "l1": None,
            "dead_fraction": None,
            "dense_fraction": None,
            "firing_frequencies": None,
            "density_histogram": None,
        }
        if self.fire_counts_M is not None:
            n_f = self.n_latent_tokens
            freqs = self.fire_counts_M.double().numpy() / n_f
            out.update(
                l0=s["l0"] / n_f,
                l1=s["l1"] / n_f,
                dead_fraction=float((freqs == 0).mean()),
                dense_fraction=float((freqs > DENSE_THRESHOLD).mean()),
                firing_frequencies=freqs,
                density_histogram=density_histogram(freqs, self.hist_edges),
            )
        return out


@torch.no_grad()
def sae_reconstruction(
    sae: Any, x_ND: torch.Tensor, *, batch_size: int = 4096, center: torch.Tensor | None = None
) -> dict[str, Any]:
    """:meth:`ReconstructionStats.result` of ``sae`` (its ``encode``/``decode``) on in-memory rows, encoded
    ``batch_size`` rows at a time (the result does not depend on the split)."""
    stats = ReconstructionStats(center=center)
    for xb_ND in x_ND.split(batch_size):
        f_NM = sae.encode(xb_ND)
        stats.update(xb_ND, sae.decode(f_NM), f_NM)
    return stats.result()
