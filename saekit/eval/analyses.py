"""The optional analyses of ``saekit eval``, run on the held-out tokens the evaluation already read.

* ``--afa`` (Lee et al. 2025): εLBO per token, its median, the ZF-plot statistics and the decoder's
  coherence (:mod:`saekit.eval.afa`), and the ZF plot as ``zf_plot.png``.
* ``--progressive`` (Peter & Søgaard 2025): the SAE truncated to its first G latents for a geometric grid
  of G (:mod:`saekit.eval.progressive`): FVU and L0 on every evaluated token, CE loss recovered on the
  first ``ce_tokens`` of them (each width costs three model forwards per batch), and ``progressive.png``.
  Latents are ranked by E[f²] unless the SAE was trained with ordered latents (Matryoshka prefixes:
  ``SAE.ordered_latents``), which are read in index order.

The evaluation hands its batches to a :class:`HeldOut` collector (``evaluate_sae(on_batch=...)``), so the
analyses see exactly the positions the headline metrics were computed on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

ProgressiveOrder = Literal["auto", "energy", "frequency", "index"]


@dataclass
class HeldOut:
    """Collects the evaluation's token batches and the activations it evaluated (on the CPU)."""

    token_batches: list[torch.Tensor] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, ids_BT: torch.Tensor, x_KD: torch.Tensor) -> None:
        self.token_batches.append(ids_BT.detach().cpu())
        self.rows.append(x_KD.detach().float().cpu())

    def activations(self) -> torch.Tensor:
        if not self.rows:
            raise ValueError("the evaluation evaluated no tokens, so there is nothing to analyse")
        return torch.cat(self.rows)

    def first_tokens(self, n_tokens: int) -> list[torch.Tensor]:
        """Whole batches from the start, at least ``n_tokens`` tokens (or all)."""
        out, seen = [], 0
        for ids in self.token_batches:
            if seen >= n_tokens:
                break
            out.append(ids)
            seen += ids.numel()
        return out


@torch.no_grad()
def afa_analysis(sae, held: HeldOut, plot_path: str | Path, *, title: str = "") -> dict[str, Any]:
    """AFA statistics of ``sae`` on the held-out activations, and the ZF plot at ``plot_path``."""
    from saekit.eval.afa import afa_stats, zf_plot

    stats = afa_stats(sae, held.activations().to(next(sae.parameters())))
    zf_plot(stats, plot_path, title=title)
    return stats | {"plot": str(plot_path)}


@torch.no_grad()
def progressive_analysis(
    sae,
    held: HeldOut,
    model: torch.nn.Module,
    hook: str,
    plot_path: str | Path,
    *,
    n_widths: int = 6,
    order_by: ProgressiveOrder = "auto",
    ce_tokens: int = 2_048,
    special_ids=(),
) -> dict[str, Any]:
    """Progressive-coding curve of ``sae``: one row per width G with FVU, L0 and CE loss recovered."""
    from saekit.eval.progressive import (
        geometric_widths,
        latent_order,
        progressive_curve,
        progressive_fidelity,
    )

    if order_by == "auto":
        order_by = "index" if getattr(type(sae), "ordered_latents", False) else "energy"
    x_ND = held.activations().to(next(sae.parameters()))
    widths = geometric_widths(sae.width, n_widths)
    order = latent_order(sae, x_ND, order_by)
    curve = progressive_curve(sae, x_ND, widths, order=order)
    fidelity = progressive_fidelity(
        sae, model, hook, held.first_tokens(ce_tokens), widths, order, special_ids=special_ids
    )
    for row, fid in zip(curve, fidelity, strict=True):
        row["ce_loss_recovered"] = fid["ce_loss_recovered"]
    plot_progressive(curve, plot_path, title=f"{getattr(sae, 'arch', '')} latents ranked by {order_by}")
    return {
        "order": order_by,
        "ce_tokens": sum(b.numel() for b in held.first_tokens(ce_tokens)),
        "rows": curve,
    }


def plot_progressive(rows: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """FVU and CE loss recovered against the number of latents kept (log scale), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    widths = [r["width"] for r in rows]
    for ax, key, label in zip(
        fig.subplots(1, 2), ("fvu", "ce_loss_recovered"), ("FVU", "CE loss recovered"), strict=True
    ):
        ax.plot(widths, [r.get(key) for r in rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latents kept (G)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "progressive coding")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def format_analyses(extra: dict[str, Any]) -> str:
    """Readable lines for the analyses in ``EvalResult.extra``."""
    lines = []
    if "afa" in extra:
        a = extra["afa"]
        lines += ["", f"AFA: median εLBO {_num(a.get('eps_lbo_median'))}; ZF plot {a['plot']}"]
    if "progressive" in extra:
        p = extra["progressive"]
        lines += ["", f"progressive coding (latents ranked by {p['order']}; CE on {p['ce_tokens']:,} tokens)"]
        lines += [f"{'G':>8} {'L0':>8} {'FVU':>8} {'CE rec.':>8}"]
        lines += [
            f"{r['width']:>8} {_num(r['l0']):>8} {_num(r['fvu']):>8} {_num(r['ce_loss_recovered']):>8}"
            for r in p["rows"]
        ]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"
