"""PNG versions of the report's plots: the latent-density histogram, density against maximum activation,
and per latent its activation histogram and logit effects.

The report draws per-latent plots in the page itself (thousands of PNGs would take minutes to render);
these functions give the same plots as files, for papers and notebooks (``saekit report --latent-pngs N``).
Like :mod:`saekit.train.plots`, they use matplotlib's object API on an Agg canvas and never touch the
global backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

DENSITY_COLOR, ACT_COLOR, UP_COLOR, DOWN_COLOR = "#4c72b0", "#dd8452", "#55a868", "#c44e52"


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # token text in scripts the font lacks: boxes, and no warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(path, dpi=100)
    return path


def plot_density_histogram(density: np.ndarray, n_tokens: int, path: str | Path) -> Path:
    """Histogram of log10(firing density) over latents; latents that never fired are counted in the title
    (their log density is -inf)."""
    fig, ax = _figure(7, 4)
    alive = density[density > 0]
    dead = int((density <= 0).sum())
    if alive.size:
        lo = min(np.log10(alive).min(), -1)
        ax.hist(np.log10(alive), bins=np.arange(np.floor(lo * 4) / 4, 0.25, 0.25), color=DENSITY_COLOR)
    ax.axvline(np.log10(1 / max(n_tokens, 1)), color="grey", ls=":", lw=1, label="one firing")
    ax.set_xlabel("log10 firing density (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(f"{density.size:,} latents on {n_tokens:,} tokens; {dead:,} never fired")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.14, top=0.9)
    return _save(fig, path)


def plot_density_vs_max(density: np.ndarray, max_act: np.ndarray, path: str | Path) -> Path:
    """Each latent that fired as a point: log10 density against its maximum activation."""
    fig, ax = _figure(7, 4)
    alive = density > 0
    ax.scatter(np.log10(density[alive]), max_act[alive], s=4, alpha=0.5, color=DENSITY_COLOR, lw=0)
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("max activation")
    ax.set_yscale("log")
    ax.set_title("density against maximum activation (latents that fired)")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.14, top=0.9)
    return _save(fig, path)


def _display(text: str) -> str:
    """Token text for a plot label: visible whitespace, and no '$' that matplotlib would read as math."""
    return repr(text)[1:-1].replace("$", r"\$") or "''"


def _draw_histogram(ax, record: Mapping[str, Any]) -> None:
    hist = record["hist"]
    counts, edges = np.asarray(hist["counts"]), np.asarray(hist["edges"])
    used = np.flatnonzero(counts)
    if used.size:
        lo, hi = used[0], used[-1] + 1
        ax.stairs(counts[lo:hi], edges[lo : hi + 1], fill=True, color=ACT_COLOR)
        ax.set_xscale("log")
    ax.set_xlabel("activation")
    ax.set_ylabel("firings")
    ax.set_title(f"activations (density {record['density']:.2e}, {record['fires']:,} firings)", fontsize=10)
    ax.grid(alpha=0.3)


def _draw_logits(ax, record: Mapping[str, Any], vocab: Mapping[int, str]) -> None:
    up, down = record["logits"]["up"], record["logits"]["down"]
    rows = [(_display(vocab.get(t, f"<{t}>")), v) for t, v in up] + [
        (_display(vocab.get(t, f"<{t}>")), v) for t, v in reversed(down)
    ]
    if not rows:
        ax.text(0.5, 0.5, "no logit effects recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    labels, values = zip(*rows, strict=True)
    y = np.arange(len(rows))[::-1]
    ax.barh(y, values, color=[UP_COLOR if v > 0 else DOWN_COLOR for v in values])
    ax.set_yticks(y, labels, fontsize=7, family="monospace")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("logit change per unit activation")
    ax.set_title("logit effects (promoted / suppressed)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")


def plot_activation_histogram(record: Mapping[str, Any], path: str | Path) -> Path:
    """One latent's activation histogram (log-spaced bins) from its record (``FeatureRecords.latent``)."""
    fig, ax = _figure(6, 3.5)
    _draw_histogram(ax, record)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.88)
    return _save(fig, path)


def plot_logit_effects(record: Mapping[str, Any], vocab: Mapping[int, str], path: str | Path) -> Path:
    """One latent's most promoted and suppressed tokens as horizontal bars."""
    fig, ax = _figure(6, 4.5)
    _draw_logits(ax, record, vocab)
    fig.subplots_adjust(left=0.25, right=0.97, bottom=0.12, top=0.92)
    return _save(fig, path)


def plot_latent(record: Mapping[str, Any], vocab: Mapping[int, str], path: str | Path) -> Path:
    """A latent's activation histogram and logit effects side by side (what its report page plots)."""
    fig, (ax_h, ax_l) = _figure(12, 4.5, ncols=2)
    _draw_histogram(ax_h, record)
    _draw_logits(ax_l, record, vocab)
    fig.suptitle(f"latent {record['latent']}  (max activation {record['max_act']:.3g})")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.86, wspace=0.35)
    return _save(fig, path)
