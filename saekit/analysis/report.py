"""The report: a static HTML site over feature records that opens from disk (``file://``), no server.

Layout of the site (``RUN/report`` by default)::

    index.html          every latent: sortable by id, density, max and mean activation; searchable by token
    summary.html        the run's metrics and plots (training curves, densities, Pareto/progressive coding)
    latents/<i>.html    one page per latent: its data inline, rendered by assets/latent.js
    data/index.js       the index's table (one row per latent), loaded with a <script> tag
    assets/             stylesheet and scripts (saekit.analysis.assets)
    plots/              PNGs shown on the summary page (and per-latent PNGs with ``latent_pngs``)

Each latent page carries only its own data (a few kB), so the site stays usable for any number of latents;
the index holds one short row per latent and shows 200 at a time. Browsers refuse ``fetch`` on ``file://``,
hence data in ``<script>`` tags. The site is written into a temporary folder and renamed into place, so a
report is never half old, half new.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from saekit.analysis import assets
from saekit.analysis.folders import replacing_folder
from saekit.analysis.plots import plot_density_histogram, plot_density_vs_max, plot_latent
from saekit.analysis.records import FeatureRecords

MARKER = ".saekit-report"
INDEX_TOKENS = 6
"""Distinct top-activating tokens (and promoted tokens) listed per latent in the index, and searched."""
RUN_PLOTS = ("train_curve.png",)
"""Plots a run folder may hold that the summary shows first; any other PNG in the run folder follows."""


def write_report(
    records: FeatureRecords, out: str | Path, *, run_dir: str | Path | None = None, latent_pngs: int = 0
) -> Path:
    """Write the site for ``records`` (and the metrics and plots of ``run_dir``) to ``out``; return the
    path of its ``index.html``. An existing report folder is replaced; any other existing path is refused."""
    out = Path(out)
    records.load_arrays()
    with replacing_folder(out, MARKER) as tmp:
        _write_site(records, tmp, Path(run_dir) if run_dir else None, latent_pngs)
    return out / "index.html"


def _write_site(records: FeatureRecords, out: Path, run_dir: Path | None, latent_pngs: int) -> None:
    for sub in ("assets", "data", "latents", "plots"):
        (out / sub).mkdir()
    (out / MARKER).write_text("made by saekit report\n")
    (out / "assets" / "style.css").write_text(assets.CSS)
    (out / "assets" / "index.js").write_text(assets.INDEX_JS)
    (out / "assets" / "latent.js").write_text(assets.LATENT_JS)

    s = records.summary
    order = np.lexsort((np.arange(records.width), -s["max_act"]))
    with_png = {int(i) for i in order[: max(0, latent_pngs)]}
    rows = []
    for i in range(records.width):
        record = records.latent(i)
        png = None
        if i in with_png:
            plot_latent(record, records.vocab, out / "latents" / "png" / f"{i}.png")
            png = f"png/{i}.png"
        (out / "latents" / f"{i}.html").write_text(_latent_page(record, records, png))
        rows.append(_index_row(record, records.vocab))
    index_data = {"meta": _public_meta(records), "latents": rows}
    (out / "data" / "index.js").write_text(f"window.SAEKIT_INDEX = {_script_json(index_data)};\n")
    (out / "index.html").write_text(_index_page(records))
    plots = _plots(records, out / "plots", run_dir)
    (out / "summary.html").write_text(_summary_page(records, run_dir, plots))


# -- data ------------------------------------------------------------------------------------------------
def _script_json(data: Any) -> str:
    """JSON safe to place inside a <script> element (no '</script>' or '<!--' can appear in it)."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _top_tokens(record: dict[str, Any], vocab: dict[int, str]) -> list[str]:
    seen: dict[str, None] = {}
    for c in record["top"]:
        seen.setdefault(vocab.get(c["tokens"][c["center"]], "?"), None)
        if len(seen) == INDEX_TOKENS:
            break
    return list(seen)


def _index_row(record: dict[str, Any], vocab: dict[int, str]) -> list[Any]:
    promoted = [vocab.get(t, "?") for t, _ in record["logits"]["up"][:INDEX_TOKENS]]
    row = [
        record["latent"],
        _round(record["density"]),
        _round(record["max_act"]),
        _round(record["mean_act"]),
        _top_tokens(record, vocab),
        promoted,
    ]
    if "heads" in record:  # attn_z SAEs: the top head and its share (columns 6 and 7)
        row += [record["heads"]["top"], _round(record["heads"]["top_share"])]
    return row


def _latent_data(record: dict[str, Any], records: FeatureRecords, png: str | None) -> dict[str, Any]:
    """A latent page's data, with token text looked up once per page (``strings``) and indexed."""
    strings: list[str] = []
    index: dict[int, int] = {}

    def s(token: int) -> int:
        if token not in index:
            index[token] = len(strings)
            strings.append(records.token_text(token))
        return index[token]

    def ctx(c: dict[str, Any], *extra: Any) -> list[Any]:
        toks = [s(t) for t in c["tokens"]]
        acts = [_round(a) if a else 0 for a in c["acts"]]
        return [_round(c["value"]), c["context"], c["position"], c["center"], toks, acts, *extra]

    h = records.meta["hist"]
    return {
        "id": record["latent"],
        "width": records.width,
        "fires": record["fires"],
        "density": record["density"],
        "max": record["max_act"],
        "mean": record["mean_act"],
        "top": [ctx(c) for c in record["top"]],
        "samples": [ctx(c, c["quantile"]) for c in record["samples"]],
        "nq": records.meta["config"]["n_quantiles"],
        "hist": {
            "lo": h["log10_lo"],
            "per_decade": h["per_decade"],
            "counts": record["hist"]["counts"],
            "under": record["hist"]["underflow"],
            "over": record["hist"]["overflow"],
        },
        "up": [[s(t), _round(v)] for t, v in record["logits"]["up"]],
        "down": [[s(t), _round(v)] for t, v in record["logits"]["down"]],
        "png": png,
        "heads": [_round(x) for x in record["heads"]["shares"]] if "heads" in record else None,
        "special": [index[t] for t in records.meta.get("special_ids", []) if t in index],
        "strings": strings,
    }


def _public_meta(records: FeatureRecords) -> dict[str, Any]:
    m = records.meta
    keys = ("model", "hook", "text", "split", "n_tokens", "n_contexts", "width", "excluded")
    return {k: m.get(k) for k in keys} | {"sae": (m.get("sae") or {}).get("path"), "heads": m.get("heads")}


def _describe(records: FeatureRecords) -> str:
    m = records.meta
    return (
        f"{records.width:,} latents · {m.get('hook', '?')} of {m.get('model', '?')} · "
        f"{m.get('n_tokens', 0):,} tokens of {m.get('text', '?')} ({m.get('split', '?')})"
    )


# -- pages -----------------------------------------------------------------------------------------------
def _head(title: str, prefix: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        f'<link rel="stylesheet" href="{prefix}assets/style.css"></head>\n<body>\n'
    )


def _nav(prefix: str, title: str, extra: str = "") -> str:
    return (
        f'<header class="top"><h1>{html.escape(title)}</h1><nav><a href="{prefix}index.html">latents</a>'
        f'<a href="{prefix}summary.html">summary</a>{extra}</nav></header>\n'
    )


def _index_page(records: FeatureRecords) -> str:
    head = "".join(
        f'<th class="sortable{" num" if k in (1, 2, 3) else ""}" data-key="{k}">{name}</th>'
        for k, name in enumerate(("latent", "density", "max act", "mean act"))
    )
    if "heads" in records.meta:  # sorts by the top head's share (index column 7)
        head += (
            '<th class="sortable num" data-key="7" title="attention head with the largest share of the '
            "decoder row's squared norm, and that share\">head</th>"
        )
    return (
        _head("saekit report: latents", "")
        + _nav("", "Latents")
        + f'<main><p class="muted">{html.escape(_describe(records))}</p>\n'
        '<div class="controls"><input type="search" id="search" placeholder="search a token, or #id" '
        'autofocus><label><input type="checkbox" id="hide-dead"> hide latents that never fired</label>'
        '<span id="count" class="muted"></span><span class="pager"><button id="prev">&larr;</button>'
        '<span id="page"></span><button id="next">&rarr;</button></span></div>\n'
        f"<table><thead><tr>{head}<th>top-activating tokens</th><th>promoted tokens</th></tr></thead>"
        '<tbody id="rows"></tbody></table></main>\n'
        '<script src="data/index.js"></script><script src="assets/index.js"></script>\n</body></html>\n'
    )


def _latent_page(record: dict[str, Any], records: FeatureRecords, png: str | None) -> str:
    i, last = record["latent"], records.width - 1
    links = (f'<a href="{i - 1}.html">&larr; {i - 1}</a>' if i > 0 else "") + (
        f'<a href="{i + 1}.html">{i + 1} &rarr;</a>' if i < last else ""
    )
    if png:
        links += f'<a href="{png}">PNG</a>'
    data = _latent_data(record, records, png)
    n_top, n_samp = len(record["top"]), len(record["samples"])
    heads = (
        '<div class="panel"><h2>Per-head attribution (share of the decoder row\'s squared norm)</h2>'
        '<div id="heads"></div></div>'
        if "heads" in record
        else ""
    )
    path = "the attention output projection and the unembedding" if heads else "the unembedding"
    return (
        _head(f"latent {i}", "../")
        + _nav("../", f"Latent {i}", links)
        + f'<main><p class="muted">{html.escape(_describe(records))}</p>'
        '<div id="stats" class="stats"></div>\n'
        '<div class="panels"><div class="panel"><h2>Activation histogram</h2><div id="hist"></div></div>'
        f'<div class="panel"><h2>Logit effects (decoder row through {path})</h2>'
        f'<div id="logits"></div></div>{heads}</div>\n'
        f"<h2>Top activations ({n_top})</h2><p class='muted'>Shading: this latent's activation at each token "
        "(darkest = its maximum); outlined: the token the row is ranked by. Hover a token for its value.</p>"
        '<div id="top"></div>\n'
        f'<h2>Samples by activation quantile ({n_samp} random firings)</h2><div id="samples"></div></main>\n'
        f"<script>window.SAEKIT_LATENT = {_script_json(data)};</script>\n"
        '<script src="../assets/latent.js"></script>\n</body></html>\n'
    )


def _plots(records: FeatureRecords, out: Path, run_dir: Path | None) -> list[tuple[str, str]]:
    """Make the record plots and copy the run's plots into ``out``; return (caption, file name) pairs."""
    s, n_tokens = records.summary, int(records.meta.get("n_tokens", 0))
    plots = []
    if run_dir is not None:
        found = [run_dir / name for name in RUN_PLOTS if (run_dir / name).is_file()]
        found += sorted(p for p in run_dir.glob("*.png") if p.name not in RUN_PLOTS)
        for p in found:
            shutil.copy2(p, out / p.name)
            plots.append((_caption(p.name), p.name))
    plot_density_histogram(s["density"], n_tokens, out / "log_density.png")
    plot_density_vs_max(s["density"], s["max_act"], out / "density_vs_max.png")
    plots += [
        ("latent densities (feature records)", "log_density.png"),
        ("density against maximum activation", "density_vs_max.png"),
    ]
    return plots


def _caption(name: str) -> str:
    lower = name.lower()
    if lower == "train_curve.png":
        return "training curves"
    if "pareto" in lower:
        return f"Pareto frontier ({name})"
    if "progressive" in lower:
        return f"progressive coding ({name})"
    return name


def _table(pairs: list[tuple[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items())
        return str(v)

    body = "".join(
        f'<tr><td>{html.escape(str(k))}</td><td class="num">{html.escape(fmt(v))}</td></tr>' for k, v in pairs
    )
    return f"<table>{body}</table>\n"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _scalars(d: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]


def _head_rows(records: FeatureRecords) -> list[tuple[str, Any]]:
    """Summary-table rows of the per-head attribution (attn_z SAEs only)."""
    heads = records.meta.get("heads")
    if not heads or "top_head_share" not in records.summary:
        return []
    share, dominant = records.summary["top_head_share"], float(heads.get("dominant_share", 0.9))
    counts = np.bincount(records.summary["top_head"], minlength=int(heads["n_heads"]))
    busiest = ", ".join(f"h{h}: {counts[h]}" for h in np.argsort(-counts, kind="stable")[:5] if counts[h])
    return [
        ("attention heads", f"{heads['n_heads']} × d_head {heads['d_head']}"),
        (f"latents dominated by one head (share ≥ {dominant:g})", int((share >= dominant).sum())),
        ("latents per top head (most first)", busiest),
    ]


def _summary_page(records: FeatureRecords, run_dir: Path | None, plots: list[tuple[str, str]]) -> str:
    parts = [_head("saekit report: summary", ""), _nav("", "Summary"), "<main>"]
    m, s = records.meta, records.summary
    alive = s["density"][s["density"] > 0]
    parts.append("<h2>Feature records</h2>")
    parts.append(
        _table(
            [
                ("SAE", (m.get("sae") or {}).get("path", "?")),
                ("architecture", (m.get("sae") or {}).get("arch", "?")),
                ("latents", records.width),
                ("model", m.get("model", "?")),
                ("hook point", m.get("hook", "?")),
                ("text", f"{m.get('text', '?')} ({m.get('split', '?')})"),
                ("tokens recorded", m.get("n_tokens", 0)),
                ("contexts", m.get("n_contexts", 0)),
                ("excluded positions", m.get("excluded", {})),
                ("latents that never fired", int((s["fires"] == 0).sum())),
                ("median density (of latents that fired)", float(np.median(alive)) if alive.size else 0.0),
                *_head_rows(records),
            ]
        )
    )
    if run_dir is not None:
        ev = _read_json(run_dir / "eval.json")
        if ev:
            parts.append("<h2>Evaluation (eval.json)</h2>" + _table(_scalars(ev)))
            parts.append(
                "<h2>Reconstruction and sparsity</h2>" + _table(_scalars(ev.get("reconstruction") or {}))
            )
            if ev.get("splice"):
                parts.append("<h2>Splice into the model</h2>" + _table(_scalars(ev["splice"])))
        summary = _read_json(run_dir / "summary.json")
        if summary and isinstance(summary.get("train"), dict):
            parts.append("<h2>Training (summary.json)</h2>")
            parts.append(_table(_scalars(summary) + _scalars(summary["train"])))
    parts.append("<h2>Plots</h2>")
    for caption, name in plots:
        parts.append(
            f'<figure><img class="plot" src="plots/{html.escape(name)}" alt="{html.escape(caption)}">'
            f"<figcaption class='muted'>{html.escape(caption)}</figcaption></figure>"
        )
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
