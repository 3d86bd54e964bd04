"""Training curves as one PNG: loss terms, L0, FVU, dead fraction and learning rate against tokens.

Uses matplotlib's object API with the Agg canvas directly, so it never touches the global backend of a
user's session (``matplotlib.use`` would) and works on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(r.get("tokens", r.get("step", 0)))
            ys.append(float(value))
    return xs, ys


def plot_training_curves(records: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Draw the training records (``kind == "train"``) of metrics.jsonl into ``path`` and return it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind", "train") == "train"]
    loss_keys = sorted({k for r in train for k in r if k.startswith("loss/")})
    panels = [
        ("loss", ["loss", *loss_keys], True),
        ("L0", ["l0"], False),
        ("FVU (batch)", ["fvu"], True),
        ("dead fraction", ["dead_fraction"], False),
        ("learning rate", ["lr"], False),
    ]
    fig = Figure(figsize=(12, 6.5))  # fixed margins: constrained layout costs seconds per figure
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    for ax, (name, keys, log_y) in zip(axes, panels, strict=False):
        for key in keys:
            xs, ys = _series(train, key)
            if xs:
                ax.plot(xs, ys, label=key, lw=1.2)
        if log_y and any(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        if name == "dead fraction":  # a flat 0 would otherwise get a meaningless symmetric range
            top = max((max(line.get_ydata(), default=0.0) for line in ax.get_lines()), default=0.0)
            ax.set_ylim(0.0, max(0.05, 1.1 * top))
        ax.set_title(name)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_lines():
            ax.legend(fontsize=7)
    evals = [r for r in records if r.get("kind") == "eval"]
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/")})[:6]
    ax = axes[-1]
    for key in eval_keys:
        xs, ys = _series(evals, key)
        ax.plot(xs, ys, marker="o", label=key, lw=1.2)
    ax.set_title("evaluation" if eval_keys else "evaluation (none logged)")
    ax.set_xlabel("tokens")
    ax.grid(alpha=0.3)
    if eval_keys:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.28, hspace=0.45)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
