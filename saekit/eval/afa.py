"""AFA evaluation of any SAE: the ZF plot and εLBO (Lee, Davies, Canby, Hockenmaier 2025, arXiv 2503.24277;
reference notebook ``visualization/zf-plot.ipynb``; spec §1.1 of algorithms.md).

For an input z (the SAE's input activation), its code f = encode(z) and the SAE's width h, the
decoder-scaled feature vector carries the decoder bias as one more atom:

    f̃ = [f_1 ‖W_dec,1‖, …, f_h ‖W_dec,h‖, ‖b_dec‖] ∈ R^{h+1},   so that  ẑ = f̃ · [Ŵ_dec ; b̂_dec]
    εLBO = |‖z‖² − ‖f̃‖²| / ((h − 1) ‖f̃‖²)                            (per token; the median is reported)

Why: if n unit atoms are ε-quasi-orthogonal (|⟨w_i, w_j⟩| ≤ ε for i ≠ j) and z = Σ f̃_i w_i, then
|‖z‖² − ‖f̃‖²| = |Σ_{i≠j} f̃_i f̃_j ⟨w_i, w_j⟩| ≤ ε ((Σ|f̃_i|)² − ‖f̃‖²) ≤ ε (n − 1) ‖f̃‖², so εLBO is the
smallest ε the pair (‖z‖, ‖f̃‖) allows: a lower bound on the dictionary's quasi-orthogonality. Like the
reference we take n − 1 = h − 1 with h the width, not counting the bias atom (strictly n = h + 1).
‖z‖ is the "linear AFA", the estimate of ‖f̃‖. The ZF plot scatters (‖z‖, ‖f̃‖) per token with
y = x and, for c = ε(h − 1) ∈ {0.25, 0.5, 1}, the band ‖z‖/√(1 + c) ≤ ‖f̃‖ ≤ ‖z‖/√(1 − c) (upper slope
drawn as 999 when c ≥ 1) that the inequality allows; a token lies inside band c exactly when
εLBO·(h − 1) ≤ c. Points above y = x have more feature norm than the input explains:
over-activated (the spec's reading, [I]).

Only the SAE interface is used: z is whatever ``encode`` takes (a saved SAE takes raw activations, its
normalisation folded in), b_dec = decode(0) and the decoder rows are decode(e_i) − decode(0), exact because
every saekit decoder is affine. ``sae.W_dec`` is used as a shortcut when it has shape (width, d_in) and a
few probed rows confirm it. Also reported: the normalised MSE ‖z − ẑ‖²/‖z‖² of the same tokens (the paper
plots it next to εLBO), the L0, and the decoder's coherence (max and mean off-diagonal cosine of the rows;
the reference logs the signed ``epsilon_max``/``epsilon_mean`` of W_dec W_decᵀ; the max |cos| is the ε of
the derivation, which εLBO bounds from below).

Use: ``afa_stats(sae, x_ND)`` for a set in memory; for a stream, ``AFATokens.cat([afa_tokens(sae, x) for x
in batches])`` then ``afa_summary(tokens) | {"decoder": decoder_coherence(sae)}``; then ``zf_plot(...)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

BAND_LEVELS = (0.25, 0.5, 1.0)
"""Values of c = ε(h − 1) whose bands the ZF plot draws and whose token shares ``afa_summary`` reports."""
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
UPPER_SLOPE_CAP = 999.0
"""Slope drawn for the upper band edge when c ≥ 1 (the bound is then infinite), as the reference."""


@dataclass
class AFATokens:
    """Per-token AFA quantities (float64, on the CPU), kept out of JSON: ``afa_summary`` reduces them."""

    z_norm: torch.Tensor
    """(N,) ‖z‖₂, the linear AFA."""
    f_tilde_norm: torch.Tensor
    """(N,) ‖f̃‖₂, bias entry included."""
    eps_lbo: torch.Tensor
    """(N,) εLBO; NaN where ‖f̃‖ = 0 (no active latent and no decoder bias)."""
    nmse: torch.Tensor
    """(N,) ‖z − ẑ‖² / ‖z‖²; NaN where z = 0."""
    l0: torch.Tensor
    """(N,) active latents."""
    width: int
    """h, the SAE's number of latents."""

    @staticmethod
    def cat(parts: list[AFATokens]) -> AFATokens:
        if not parts or len({p.width for p in parts}) != 1:
            raise ValueError("AFATokens.cat needs at least one part, all from SAEs of the same width")
        fields = ("z_norm", "f_tilde_norm", "eps_lbo", "nmse", "l0")
        return AFATokens(*(torch.cat([getattr(p, k) for p in parts]) for k in fields), width=parts[0].width)


def _width_and_param(sae: torch.nn.Module) -> tuple[int, torch.Tensor]:
    width = int(sae.cfg.width)  # type: ignore[union-attr]
    if width < 2:
        raise ValueError(f"εLBO divides by (width - 1); it needs width >= 2, got {width}")
    return width, next(sae.parameters())


@torch.no_grad()
def decoder_rows(sae: torch.nn.Module, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_MD, b_D)`` of the SAE's affine decoder, decode(f) = f W + b, read through ``decode``.

    ``sae.W_dec`` is returned when its shape is (width, d_in) and decode(e_i) − b equals its row i for a few
    probed i (cheap); otherwise every row is probed, ``chunk`` at a time (width² · d_in work)."""
    width, p = _width_and_param(sae)
    b_D = sae.decode(torch.zeros(1, width, device=p.device, dtype=p.dtype))[0]

    def probe(idx: torch.Tensor) -> torch.Tensor:
        onehot = torch.zeros(len(idx), width, device=p.device, dtype=p.dtype)
        onehot[torch.arange(len(idx)), idx] = 1
        return sae.decode(onehot)

    W = getattr(sae, "W_dec", None)
    if isinstance(W, torch.Tensor) and tuple(W.shape) == (width, b_D.shape[0]):
        W = W.detach()
        idx = torch.linspace(0, width - 1, min(width, 8), device=p.device).long()
        # compared with the bias added (not subtracted from the probe) so a large b_dec costs no precision
        scale = (W[idx].abs().max() + b_D.abs().max()).item()
        if torch.allclose(probe(idx), W[idx].to(b_D) + b_D, rtol=1e-4, atol=1e-5 * scale):
            return W, b_D
    rows = [
        probe(torch.arange(i, min(i + chunk, width), device=p.device)) - b_D for i in range(0, width, chunk)
    ]
    return torch.cat(rows), b_D


@torch.no_grad()
def afa_tokens(sae: torch.nn.Module, x_ND: torch.Tensor) -> AFATokens:
    """The per-token AFA quantities of ``sae`` on inputs ``x_ND`` (the activations ``encode`` takes)."""
    width, p = _width_and_param(sae)
    W_MD, b_D = decoder_rows(sae)
    z_ND = x_ND.to(device=p.device, dtype=p.dtype)
    f_NM = sae.encode(z_ND)
    z_hat_ND = sae.decode(f_NM)
    z_sq_N = z_ND.double().pow(2).sum(-1)
    scaled_NM = f_NM.double() * W_MD.double().norm(dim=1)
    f_tilde_sq_N = scaled_NM.pow(2).sum(-1) + b_D.double().pow(2).sum()
    nan = torch.tensor(math.nan, dtype=torch.float64, device=z_sq_N.device)
    eps_lbo_N = torch.where(
        f_tilde_sq_N > 0, (z_sq_N - f_tilde_sq_N).abs() / ((width - 1) * f_tilde_sq_N), nan
    )
    err_N = (z_ND.double() - z_hat_ND.double()).pow(2).sum(-1)
    nmse_N = torch.where(z_sq_N > 0, err_N / z_sq_N, nan)
    return AFATokens(
        z_sq_N.sqrt().cpu(),
        f_tilde_sq_N.sqrt().cpu(),
        eps_lbo_N.cpu(),
        nmse_N.cpu(),
        (f_NM != 0).sum(-1).double().cpu(),
        width,
    )


@torch.no_grad()
def decoder_coherence(sae: torch.nn.Module, chunk: int = 1024) -> dict[str, float]:
    """Off-diagonal cosines of the decoder rows: ``cos_max`` and ``cos_mean`` (signed, the reference's
    ``epsilon_max``/``epsilon_mean``) and ``cos_max_abs`` (the dictionary's ε). Chunked: no (M, M) matrix."""
    W_MD, _ = decoder_rows(sae)
    U_MD = W_MD.double() / W_MD.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    m = U_MD.shape[0]
    top, top_abs, total = -math.inf, 0.0, 0.0
    for i in range(0, m, chunk):
        G_CM = U_MD[i : i + chunk] @ U_MD.T
        rows = torch.arange(G_CM.shape[0], device=G_CM.device)
        diag_CM = torch.zeros_like(G_CM, dtype=torch.bool)
        diag_CM[rows, rows + i] = True
        off_CM = G_CM.masked_fill(diag_CM, 0.0)
        total += off_CM.sum().item()
        top_abs = max(top_abs, off_CM.abs().max().item())
        top = max(top, G_CM.masked_fill(diag_CM, -math.inf).max().item())
    return {"cos_max": top, "cos_mean": total / (m * (m - 1)), "cos_max_abs": top_abs}


def _finite_quantiles(v: torch.Tensor) -> dict[str, float | None]:
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return {str(q): None for q in QUANTILES}
    qs = torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype))
    return {str(q): qv.item() for q, qv in zip(QUANTILES, qs, strict=True)}


def _finite_mean(v: torch.Tensor) -> float | None:
    v = v[torch.isfinite(v)]
    return v.mean().item() if v.numel() else None


def afa_summary(tokens: AFATokens, max_points: int = 2000) -> dict[str, Any]:
    """JSON-able summary of per-token AFA quantities: the εLBO median (the paper's headline) and quantiles,
    norm summaries, the share of over-activated tokens (‖f̃‖ > ‖z‖) and of tokens inside each band c, the
    normalised MSE and L0, and ``zf_points``: at most ``max_points`` evenly spaced tokens for ``zf_plot``.
    Undefined values (εLBO where ‖f̃‖ = 0, NMSE where z = 0) are counted, left out of the statistics."""
    n, h = tokens.z_norm.numel(), tokens.width
    if n == 0:
        raise ValueError("afa_summary needs at least one token")
    eps = tokens.eps_lbo
    defined = torch.isfinite(eps)
    gap = eps[defined] * (h - 1)  # |‖z‖² − ‖f̃‖²| / ‖f̃‖² = εLBO·(h − 1), the band coordinate
    pick = torch.linspace(0, n - 1, min(n, max_points)).round().long().unique()
    return {
        "n_tokens": n,
        "width": h,
        "eps_lbo_median": _finite_quantiles(eps)["0.5"],
        "eps_lbo_quantiles": _finite_quantiles(eps),
        "eps_lbo_mean": _finite_mean(eps),
        "eps_lbo_undefined": int((~defined).sum()),
        "z_norm_median": tokens.z_norm.median().item(),
        "f_tilde_norm_median": tokens.f_tilde_norm.median().item(),
        "over_activated_fraction": (tokens.f_tilde_norm > tokens.z_norm).double().mean().item(),
        "band_fractions": {str(c): (gap <= c).double().sum().item() / n for c in BAND_LEVELS},
        "normalized_mse": _finite_mean(tokens.nmse),
        "normalized_mse_median": _finite_quantiles(tokens.nmse)["0.5"],
        "l0": tokens.l0.mean().item(),
        "zf_points": {
            "z_norm": tokens.z_norm[pick].tolist(),
            "f_tilde_norm": tokens.f_tilde_norm[pick].tolist(),
        },
    }


def afa_stats(
    sae: torch.nn.Module, x_ND: torch.Tensor, *, coherence: bool = True, max_points: int = 2000
) -> dict[str, Any]:
    """:func:`afa_summary` of ``sae`` on ``x_ND``, with the decoder's coherence under ``"decoder"`` (a
    width² · d_in computation; ``coherence=False`` skips it)."""
    stats = afa_summary(afa_tokens(sae, x_ND), max_points=max_points)
    if coherence:
        stats["decoder"] = decoder_coherence(sae)
    return stats


ZFSource = AFATokens | Mapping[str, Any]


def _points(source: ZFSource, max_points: int) -> tuple[list[float], list[float], int]:
    if isinstance(source, AFATokens):
        s = afa_summary(source, max_points=max_points)
    elif "zf_points" in source:
        s = source
    else:
        raise TypeError("zf_plot takes AFATokens, an afa_stats/afa_summary dict, or a mapping label -> those")
    return s["zf_points"]["z_norm"], s["zf_points"]["f_tilde_norm"], int(s["width"])


def zf_plot(
    source: ZFSource | Mapping[str, ZFSource], path: str | Path, *, title: str = "", max_points: int = 5000
) -> Path:
    """Draw the ZF plot (‖z‖ against ‖f̃‖ per token, y = x, and the bands c = ε(h − 1) ∈ ``BAND_LEVELS``)
    into the PNG ``path`` and return it. ``source`` is one :class:`AFATokens` or stats dict, or a mapping
    label → one of those (e.g. per layer), each drawn in its own colour (the title names the first one's h).
    Uses the Agg canvas directly, so the session's matplotlib backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    is_one = isinstance(source, AFATokens) or "zf_points" in source
    series = {"": source} if is_one else dict(source)
    if not series:
        raise ValueError("zf_plot needs at least one series")
    fig = Figure(figsize=(6.5, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    top, width = 0.0, None
    for label, src in series.items():
        xs, ys, h = _points(src, max_points)
        width = width or h
        ax.scatter(xs, ys, s=6, alpha=0.6, linewidths=0, label=label or None)
        top = max(top, max(xs, default=0.0), max(ys, default=0.0))
    top = 1.05 * top if top > 0 else 1.0
    line = np.array([0.0, top])
    for c, shade in zip(BAND_LEVELS, ("0.35", "0.55", "0.75"), strict=True):
        lower = math.sqrt(1 / (1 + c))
        upper = math.sqrt(1 / (1 - c)) if c < 1 else UPPER_SLOPE_CAP
        ax.fill_between(line, lower * line, upper * line, color=shade, alpha=0.15, lw=0)
        ax.plot(line, lower * line, color=shade, lw=0.9, ls=":", label=f"band ε(h−1) = {c:g}")
        ax.plot(line, upper * line, color=shade, lw=0.9, ls=":")
    ax.plot(line, line, color="tab:red", ls="--", lw=1, label="‖f̃‖ = ‖z‖")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("linear AFA ‖z‖₂")
    ax.set_ylabel("‖f̃‖₂")
    ax.set_title(title or f"ZF plot (h = {width}; bands ε(h−1) = {', '.join(f'{c:g}' for c in BAND_LEVELS)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.09, top=0.93)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
