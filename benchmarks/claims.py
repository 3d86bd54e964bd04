"""The literature's claims checked on saekit's own sweeps: reads the results of ``saekit sweep`` and
``saekit eval --progressive --json`` runs and prints the comparisons docs/results.md reports, with plots.

Every comparison is at matched sparsity, read off the sweeps' curves by linear interpolation in log L0
between the two runs that bracket the L0 of interest (never extrapolated: a point outside a curve's L0 range
is reported as such). The commands that make the inputs are in docs/results.md.

    python benchmarks/claims.py --frontier runs/claims/frontier runs/claims/topk_high \\
        --extras runs/claims/extras --in-distribution runs/claims/cache_stdlib_heldout \\
        --progressive runs/claims/progressive/*.json --plots docs/img/results
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def load_rows(sweep: str | Path) -> list[Row]:
    """The sweep's results.json rows, each with γ (relative reconstruction bias) from its run's eval.json."""
    rows = json.loads((Path(sweep) / "results.json").read_text())
    for row in rows:
        ev = json.loads((Path(row["run"]) / "eval.json").read_text())
        row["gamma"] = ev["reconstruction"].get("relative_reconstruction_bias")
    return rows


def add_in_distribution(rows: list[Row], cache_dir: str) -> None:
    """FVU and L0 of every run on held-out rows of the *training* text (``fvu_id``, ``l0_id``): the sweeps
    evaluate on WikiText, where BatchTopK's global threshold lets L0 drift from k (TopK's cannot)."""
    import numpy as np
    import torch

    import saekit
    from saekit.eval.metrics import sae_reconstruction

    cache = saekit.open_cache(cache_dir)
    x_ND = torch.from_numpy(np.asarray(cache.acts(cache.hooks[0]))).float()
    for row in rows:
        sae = saekit.load(row["run"]).eval()
        with torch.no_grad():
            stats = sae_reconstruction(sae, x_ND)
        row["fvu_id"], row["l0_id"] = stats["fvu"], stats["l0"]


def curve(rows: list[Row], arch: str) -> list[Row]:
    """One architecture's runs at the sweep's base width, by increasing L0."""
    return sorted((r for r in rows if r["arch"] == arch and r["width_factor"] == 1.0), key=lambda r: r["l0"])


def at_l0(points: list[Row], l0: float, key: str) -> float | None:
    """``key`` interpolated linearly in log L0 between the two runs bracketing ``l0`` (None outside; an L0
    within 1 % of the curve's ends counts as the end: a threshold SAE's L0 is never exactly k)."""
    if points and points[0]["l0"] / 1.01 <= l0 <= points[-1]["l0"] * 1.01:
        l0 = min(max(l0, points[0]["l0"]), points[-1]["l0"])
    for a, b in zip(points, points[1:], strict=False):
        if a["l0"] <= l0 <= b["l0"] and a["l0"] < b["l0"]:
            t = (math.log(l0) - math.log(a["l0"])) / (math.log(b["l0"]) - math.log(a["l0"]))
            return a[key] + t * (b[key] - a[key])
    exact = [p[key] for p in points if p["l0"] == l0]
    return exact[0] if exact else None


def l0_at(points: list[Row], value: float, key: str) -> float | None:
    """The L0 at which ``key`` reaches ``value`` on the curve (log-linear, monotone segments only)."""
    for a, b in zip(points, points[1:], strict=False):
        lo, hi = sorted((a[key], b[key]))
        if lo <= value <= hi and a[key] != b[key]:
            t = (value - a[key]) / (b[key] - a[key])
            return math.exp(math.log(a["l0"]) + t * (math.log(b["l0"]) - math.log(a["l0"])))
    return None


def fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def runs_table(rows: list[Row]) -> str:
    lines = [
        [
            r["name"],
            f"{r['width']:,}",
            fmt(r["l0"], 1),
            fmt(r["fvu"]),
            fmt(r["ce_loss_recovered"]),
            fmt(r["gamma"]),
            f"{100 * r['dead_fraction']:.0f} %",
            fmt(r.get("l0_id"), 1),
            fmt(r.get("fvu_id")),
        ]
        for r in rows
    ]
    header = ["run", "width", "L0", "FVU", "CE rec.", "γ", "silent", "L0 (train text)", "FVU (train text)"]
    return table(header, lines)


def gated_vs_relu(rows: list[Row]) -> str:
    relu, gated = curve(rows, "relu"), curve(rows, "gated")
    lines = []
    for g in gated:
        relu_l0 = l0_at(relu, g["ce_loss_recovered"], "ce_loss_recovered")
        ratio = None if relu_l0 is None else g["l0"] / relu_l0
        lines.append(
            [
                g["name"],
                fmt(g["l0"], 1),
                fmt(g["ce_loss_recovered"]),
                fmt(relu_l0, 1),
                fmt(ratio, 2),
                fmt(g["gamma"]),
                fmt(at_l0(relu, g["l0"], "gamma")),
            ]
        )
    header = [
        "Gated run",
        "L0",
        "CE rec.",
        "ReLU L0 at same CE",
        "Gated/ReLU L0",
        "γ Gated",
        "γ ReLU (same L0)",
    ]
    return table(header, lines)


def at_matched_l0(rows: list[Row], subject: str, others: list[str]) -> str:
    lines = []
    for s in curve(rows, subject):
        line = [s["name"], fmt(s["l0"], 1), fmt(s["fvu"]), fmt(s["ce_loss_recovered"])]
        for other in others:
            c = curve(rows, other)
            line += [fmt(at_l0(c, s["l0"], "fvu")), fmt(at_l0(c, s["l0"], "ce_loss_recovered"))]
        lines.append(line)
    header = ["run", "L0", "FVU", "CE rec."]
    for other in others:
        header += [f"{other} FVU", f"{other} CE rec."]
    return table(header, lines)


def batchtopk_vs_topk(rows: list[Row]) -> str:
    topk = {r["options"]["k"]: r for r in curve(rows, "topk")}
    lines = []
    for b in curve(rows, "batchtopk"):
        t = topk.get(b["options"]["k"])
        if t is None:
            continue
        lines.append(
            [
                str(b["options"]["k"]),
                fmt(t["fvu"]),
                fmt(b["fvu"]),
                fmt(b["l0"], 1),
                fmt(t["ce_loss_recovered"]),
                fmt(b["ce_loss_recovered"]),
                fmt(at_l0(curve(rows, "topk"), b["l0"], "fvu")),
                fmt(b.get("l0_id"), 1),
                fmt(t.get("fvu_id")),
                fmt(b.get("fvu_id")),
            ]
        )
    header = [
        "k",
        "TopK FVU",
        "BatchTopK FVU",
        "BatchTopK L0",
        "TopK CE",
        "BatchTopK CE",
        "TopK FVU at its L0",
        "BatchTopK L0 (train text)",
        "TopK FVU (train text)",
        "BatchTopK FVU (train text)",
    ]
    return table(header, lines)


def progressive_table(files: list[str]) -> tuple[str, dict[str, list[Row]]]:
    curves = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        curves[Path(f).stem] = data["extra"]["progressive"]["rows"]
    widths = sorted({r["width"] for rows in curves.values() for r in rows})
    lines = []
    for g in widths:
        line = [f"{g:,}"]
        for rows in curves.values():
            hit = [r for r in rows if r["width"] == g]
            line += [fmt(hit[0]["fvu"]) if hit else "—", fmt(hit[0]["ce_loss_recovered"]) if hit else "—"]
        lines.append(line)
    header = ["latents kept G"] + [f"{name} {m}" for name in curves for m in ("FVU", "CE rec.")]
    return table(header, lines), curves


def plot_all(rows: list[Row], extras: list[Row], curves: dict[str, list[Row]], out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label in (("fvu", "FVU (held out)"), ("ce_loss_recovered", "CE loss recovered")):
        fig = Figure(figsize=(6.4, 4.2), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for arch in dict.fromkeys(r["arch"] for r in rows):
            c = curve(rows, arch)
            ax.plot([r["l0"] for r in c], [r[key] for r in c], marker="o", label=arch)
        for r in extras:
            ax.scatter([r["l0"]], [r[key]], marker="*", s=120, label=r["name"], zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (held out, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"frontier_{key}.png")
        fig.savefig(paths[-1])
    if curves:
        fig = Figure(figsize=(6.4, 4.2), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for name, c in curves.items():
            ax.plot([r["width"] for r in c], [r["fvu"] for r in c], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latents kept G (Matryoshka: its first G; flat SAEs: top G by E[f²])")
        ax.set_ylabel("FVU (held out)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "progressive_fvu.png")
        fig.savefig(paths[-1])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--frontier",
        nargs="+",
        required=True,
        help="sweep folders of the curves (relu, gated, jumprelu, topk, ...)",
    )
    ap.add_argument(
        "--extras", nargs="*", default=[], help="sweep folders of single points (top_afa, switch, ...)"
    )
    ap.add_argument("--progressive", nargs="*", default=[], help="`saekit eval --progressive --json` files")
    ap.add_argument("--plots", default=None, help="folder for the PNGs")
    ap.add_argument("--in-distribution", default=None, help="cache of held-out rows of the training text")
    args = ap.parse_args()
    rows = [row for sweep in args.frontier for row in load_rows(sweep)]
    extras = [row for sweep in args.extras for row in load_rows(sweep)]
    if args.in_distribution:
        add_in_distribution(rows + extras, args.in_distribution)
    print("## Every run\n\n" + runs_table(rows + extras))
    print("\n## Gated vs ReLU+L1\n\n" + gated_vs_relu(rows))
    print("\n## JumpReLU at matched L0\n\n" + at_matched_l0(rows, "jumprelu", ["gated", "topk"]))
    print("\n## BatchTopK vs TopK at equal k\n\n" + batchtopk_vs_topk(rows))
    if extras:
        subjects = [r for r in extras if r["arch"] in ("top_afa", "switch", "matryoshka")]
        lines = []
        for r in subjects:
            topk = curve(rows, "topk")
            lines.append(
                [
                    r["name"],
                    f"{r['width']:,}",
                    fmt(r["l0"], 1),
                    fmt(r["fvu"]),
                    fmt(r["ce_loss_recovered"]),
                    fmt(at_l0(topk, r["l0"], "fvu")),
                    fmt(at_l0(topk, r["l0"], "ce_loss_recovered")),
                ]
            )
        header = ["run", "width", "L0", "FVU", "CE rec.", "TopK FVU at that L0", "TopK CE at that L0"]
        print("\n## Against the TopK curve\n\n" + table(header, lines))
    curves: dict[str, list[Row]] = {}
    if args.progressive:
        text, curves = progressive_table(args.progressive)
        print("\n## Progressive coding\n\n" + text)
    if args.plots:
        for p in plot_all(rows, extras, curves, Path(args.plots)):
            print(f"\nwrote {p}")


if __name__ == "__main__":
    main()
