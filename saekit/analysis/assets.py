"""The report's stylesheet and scripts, written into ``report/assets/`` by :mod:`saekit.analysis.report`.

Kept as Python strings so they ship with the package without package-data configuration. The pages load
their data from ``<script>`` tags (``data/index.js``, or inline in a latent page), never with ``fetch``,
which browsers refuse for ``file://`` pages: the report opens from disk with no server. Token text is only
ever inserted with ``textContent``, never as HTML.
"""

CSS = """
:root { --fg: #1d1d1f; --muted: #6e6e73; --line: #d9d9de; --bg: #fbfbfd; --accent: #2f5fb3;
        --hi: 255, 120, 0; --up: #2e8b57; --down: #c0392b; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       background: var(--bg); }
header.top { display: flex; gap: 1.2em; align-items: baseline; padding: 0.6em 1.2em;
             border-bottom: 1px solid var(--line); background: #fff; position: sticky; top: 0; z-index: 2; }
header.top h1 { font-size: 1.15em; margin: 0; }
header.top nav a { margin-right: 0.9em; }
main { padding: 0.8em 1.2em 3em; max-width: 1200px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.muted { color: var(--muted); }
h2 { font-size: 1.05em; margin: 1.4em 0 0.5em; }
table { border-collapse: collapse; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.sortable { cursor: pointer; user-select: none; white-space: nowrap; }
th.sortable:hover { background: #eef2fa; }
th.sorted-asc::after { content: " \\25B2"; font-size: 0.75em; }
th.sorted-desc::after { content: " \\25BC"; font-size: 0.75em; }
.controls { display: flex; gap: 1em; align-items: center; margin: 0.6em 0; flex-wrap: wrap; }
.controls input[type=search] { width: 22em; padding: 0.3em 0.5em; font-size: 1em; }
.pager button { margin: 0 0.2em; }
.chips span { display: inline-block; font-family: ui-monospace, Menlo, monospace; font-size: 0.9em;
              background: #f0f0f4; border-radius: 3px; padding: 0 0.3em; margin: 0 0.2em 0.15em 0;
              white-space: pre; }
.chips.up span { background: #e5f4ea; }
.bar { display: inline-block; height: 0.7em; background: #a9bde0; vertical-align: middle;
       margin-right: 0.4em; }
.stats { display: flex; gap: 2em; flex-wrap: wrap; margin: 0.4em 0 0.8em; }
.stats div b { display: block; font-size: 1.2em; }
.panels { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.panel { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 0.6em 0.9em; }
.panel h2 { margin-top: 0.3em; }
.logits { display: flex; gap: 2em; }
.logits table td { border: none; padding: 0.05em 0.5em; }
.logits .tokcell { font-family: ui-monospace, Menlo, monospace; white-space: pre; }
.logits .up { color: var(--up); } .logits .down { color: var(--down); }
.ctx { font-family: ui-monospace, Menlo, monospace; font-size: 0.92em; padding: 0.2em 0;
       border-bottom: 1px solid #eee; display: flex; gap: 0.8em; }
.ctx .val { color: var(--muted); min-width: 4.5em; text-align: right; flex: none; }
.ctx .text { overflow-wrap: anywhere; }
.tok { white-space: pre; border-radius: 2px; }
.tok.center { outline: 1.5px solid rgba(var(--hi), 0.9); }
.tok.special { color: var(--muted); }
.quantile h3 { font-size: 0.95em; margin: 1em 0 0.2em; }
table.heads td { border: none; padding: 0.05em 0.5em; }
table.heads tr.top td { font-weight: 600; }
table.heads .hbar { display: inline-block; height: 0.75em; background: #8fa9d6; vertical-align: middle; }
svg text { font: 11px system-ui, sans-serif; fill: #555; }
img.plot { max-width: 100%; border: 1px solid var(--line); background: #fff; }
"""

INDEX_JS = r"""
"use strict";
(function () {
  const D = window.SAEKIT_INDEX;
  const rows = D.latents;  // [id, density, max, mean, [top tokens], [promoted tokens](, top head, share)]
  const PAGE = 200;
  const state = { key: 2, dir: -1, query: "", page: 0, hideDead: false };
  const $ = (id) => document.getElementById(id);

  function show(t) { return t.replace(/\n/g, "\u21B5").replace(/\t/g, "\u21E5") || "\u2205"; }
  function fmt(x, digits) { return x === 0 ? "0" : Number(x).toPrecision(digits || 3); }
  function chips(cls, tokens) {
    const el = document.createElement("span");
    el.className = "chips " + cls;
    for (const t of tokens) {
      const s = document.createElement("span");
      s.textContent = show(t);
      el.appendChild(s);
    }
    return el;
  }
  function matches(r, q) {
    if (!q) return true;
    if (/^#?\d+$/.test(q)) return String(r[0]) === q.replace("#", "");
    const lq = q.toLowerCase();
    return r[4].some((t) => t.toLowerCase().includes(lq)) || r[5].some((t) => t.toLowerCase().includes(lq));
  }
  function selected() {
    const out = rows.filter((r) => matches(r, state.query) && (!state.hideDead || r[1] > 0));
    out.sort((a, b) => (a[state.key] - b[state.key]) * state.dir || a[0] - b[0]);
    return out;
  }
  function render() {
    const sel = selected();
    const pages = Math.max(1, Math.ceil(sel.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const body = $("rows");
    body.textContent = "";
    const logMin = Math.log10(1 / Math.max(D.meta.n_tokens, 1));
    for (const r of sel.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
      const tr = document.createElement("tr");
      const id = document.createElement("td");
      const a = document.createElement("a");
      a.href = "latents/" + r[0] + ".html";
      a.className = "latent-link";
      a.textContent = r[0];
      id.appendChild(a);
      const dens = document.createElement("td");
      dens.className = "num";
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = (r[1] > 0 ? 4 * (1 - Math.log10(r[1]) / logMin) + 0.2 : 0) + "em";
      dens.appendChild(bar);
      dens.appendChild(document.createTextNode(r[1] > 0 ? fmt(100 * r[1], 3) + "%" : "dead"));
      const mx = document.createElement("td"); mx.className = "num"; mx.textContent = fmt(r[2]);
      const mean = document.createElement("td"); mean.className = "num"; mean.textContent = fmt(r[3]);
      const top = document.createElement("td"); top.appendChild(chips("", r[4]));
      const up = document.createElement("td"); up.appendChild(chips("up", r[5]));
      tr.append(id, dens, mx, mean);
      if (D.meta.heads) {  // attn_z SAE: the head with the largest share of the decoder row, and the share
        const hd = document.createElement("td"); hd.className = "num head";
        hd.textContent = "h" + r[6] + " " + Math.round(100 * r[7]) + "%";
        tr.appendChild(hd);
      }
      tr.append(top, up);
      body.appendChild(tr);
    }
    $("count").textContent = sel.length + " of " + rows.length + " latents";
    $("page").textContent = "page " + (state.page + 1) + " of " + pages;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
    for (const th of document.querySelectorAll("th.sortable")) {
      const k = Number(th.dataset.key);
      th.classList.toggle("sorted-asc", k === state.key && state.dir > 0);
      th.classList.toggle("sorted-desc", k === state.key && state.dir < 0);
    }
  }
  for (const th of document.querySelectorAll("th.sortable")) {
    th.addEventListener("click", () => {
      const k = Number(th.dataset.key);
      state.dir = state.key === k ? -state.dir : (k === 0 ? 1 : -1);
      state.key = k;
      state.page = 0;
      render();
    });
  }
  $("search").addEventListener("input", (e) => {
    state.query = e.target.value.trim(); state.page = 0; render();
  });
  $("hide-dead").addEventListener("change", (e) => {
    state.hideDead = e.target.checked; state.page = 0; render();
  });
  $("prev").addEventListener("click", () => { state.page -= 1; render(); });
  $("next").addEventListener("click", () => { state.page += 1; render(); });
  render();
})();
"""

LATENT_JS = r"""
"use strict";
(function () {
  const L = window.SAEKIT_LATENT;
  const S = L.strings;
  const $ = (id) => document.getElementById(id);
  function show(t) { return t.replace(/\n/g, "\u21B5").replace(/\t/g, "\u21E5") || "\u2205"; }
  function fmt(x, digits) { return x === 0 ? "0" : Number(x).toPrecision(digits || 3); }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function context(c) {  // c = [value, context, position, center, [string idx], [acts]]
    const row = el("div", "ctx");
    row.appendChild(el("span", "val", fmt(c[0])));
    const text = el("span", "text");
    const scale = L.max > 0 ? L.max : 1;
    c[4].forEach((s, j) => {
      const a = c[5][j];
      const tok = el("span", "tok", show(S[s]));
      if (L.special.includes(s)) tok.classList.add("special");
      if (a > 0) {
        tok.classList.add("on");
        const alpha = Math.min(1, 0.12 + 0.88 * a / scale).toFixed(3);
        tok.style.backgroundColor = "rgba(var(--hi), " + alpha + ")";
      }
      if (j === c[3]) tok.classList.add("center");
      tok.title = "activation " + fmt(a, 4);
      text.appendChild(tok);
    });
    row.appendChild(text);
    row.title = "context " + c[1] + ", position " + c[2];
    return row;
  }

  function histogram() {
    const h = L.hist, counts = h.counts;
    const used = counts.map((c, i) => (c > 0 ? i : -1)).filter((i) => i >= 0);
    const svgNS = "http://www.w3.org/2000/svg";
    const W = 420, H = 180, pad = { l: 44, r: 10, t: 10, b: 30 };
    const svg = document.createElementNS(svgNS, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("id", "hist-svg");
    function add(tag, attrs, text) {
      const e = document.createElementNS(svgNS, tag);
      for (const k in attrs) e.setAttribute(k, attrs[k]);
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e);
      return e;
    }
    if (!used.length) { add("text", { x: 20, y: H / 2 }, "never fired"); return svg; }
    const lo = used[0], hi = used[used.length - 1] + 1;
    const top = Math.max.apply(null, counts.slice(lo, hi));
    const x = (i) => pad.l + (i - lo) / (hi - lo) * (W - pad.l - pad.r);
    const y = (c) => H - pad.b - c / top * (H - pad.t - pad.b);
    for (let i = lo; i < hi; i++) {
      if (!counts[i]) continue;
      const r = add("rect", { x: x(i), y: y(counts[i]), width: Math.max(1, x(i + 1) - x(i) - 1),
                              height: H - pad.b - y(counts[i]), fill: "#dd8452" });
      const e0 = Math.pow(10, h.lo + i / h.per_decade), e1 = Math.pow(10, h.lo + (i + 1) / h.per_decade);
      r.appendChild(document.createElementNS(svgNS, "title")).textContent =
        fmt(e0) + " to " + fmt(e1) + ": " + counts[i] + " firings";
    }
    add("line", { x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b, stroke: "#888" });
    add("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: H - pad.b, stroke: "#888" });
    const l0 = h.lo + lo / h.per_decade, l1 = h.lo + hi / h.per_decade;  // plotted range, log10
    let ticks = [];
    for (let d = Math.floor(l0); d <= Math.ceil(l1); d++) {
      for (const m of (l1 - l0 > 3 ? [1] : [1, 2, 5])) ticks.push(Math.log10(m) + d);
    }
    ticks = ticks.filter((t) => t >= l0 - 1e-9 && t <= l1 + 1e-9);
    for (const t of ticks) {
      const xi = x((t - h.lo) * h.per_decade);
      add("line", { x1: xi, y1: H - pad.b, x2: xi, y2: H - pad.b + 4, stroke: "#888" });
      add("text", { x: xi, y: H - pad.b + 16, "text-anchor": "middle" }, fmt(Math.pow(10, t), 1));
    }
    add("text", { x: pad.l - 6, y: pad.t + 8, "text-anchor": "end" }, String(top));
    add("text", { x: pad.l - 6, y: H - pad.b, "text-anchor": "end" }, "0");
    add("text", { x: (W + pad.l) / 2, y: H - 2, "text-anchor": "middle" }, "activation (log scale)");
    return svg;
  }

  function logitTable(title, items, cls) {
    const box = el("div");
    box.appendChild(el("b", cls, title));
    const t = el("table");
    for (const [s, v] of items) {
      const tr = el("tr");
      tr.appendChild(el("td", "tokcell", show(S[s])));
      tr.appendChild(el("td", "num " + cls, (v > 0 ? "+" : "") + fmt(v)));
      t.appendChild(tr);
    }
    box.appendChild(t);
    return box;
  }

  $("stats").append(
    ...[["density", L.fires ? fmt(100 * L.density) + "%" : "never fired"], ["firings", L.fires],
        ["max activation", fmt(L.max)], ["mean activation", fmt(L.mean)]].map(([k, v]) => {
      const d = el("div", "", k); d.appendChild(el("b", "", String(v))); return d;
    }));
  $("hist").appendChild(histogram());
  if (L.hist.under || L.hist.over) {
    $("hist").appendChild(el("div", "muted", L.hist.under + " firings below and " + L.hist.over +
      " above the plotted range"));
  }
  if (L.up.length || L.down.length) {
    const box = el("div", "logits");
    box.append(logitTable("promoted", L.up, "up"), logitTable("suppressed", L.down, "down"));
    $("logits").appendChild(box);
  } else {
    $("logits").appendChild(el("div", "muted", "no logit effects recorded"));
  }
  if (L.heads) {  // attn_z SAE: one bar per head, its share of the decoder row's squared norm
    const t = el("table", "heads");
    const best = L.heads.indexOf(Math.max.apply(null, L.heads));
    L.heads.forEach((share, h) => {
      const tr = el("tr", h === best ? "top" : "");
      tr.appendChild(el("td", "", "head " + h));
      const cell = el("td");
      const bar = el("span", "hbar");
      bar.style.width = (12 * share).toFixed(2) + "em";
      cell.appendChild(bar);
      tr.appendChild(cell);
      tr.appendChild(el("td", "num", (100 * share).toFixed(1) + "%"));
      t.appendChild(tr);
    });
    $("heads").appendChild(t);
  }
  if (!L.top.length) {
    $("top").appendChild(el("div", "muted", "This latent never fired on the recorded tokens."));
  }
  for (const c of L.top) $("top").appendChild(context(c));
  const groups = [];
  for (const c of L.samples) (groups[c[6]] = groups[c[6]] || []).push(c);
  for (let q = groups.length - 1; q >= 0; q--) {
    if (!groups[q]) continue;
    const g = groups[q];
    const box = el("div", "quantile");
    box.appendChild(el("h3", "", "quantile " + (q + 1) + " of " + L.nq + " (activations " +
      fmt(g[0][0]) + " to " + fmt(g[g.length - 1][0]) + ")"));
    for (const c of g.slice().reverse()) box.appendChild(context(c));
    $("samples").appendChild(box);
  }
  if (!L.samples.length) $("samples").appendChild(el("div", "muted", "no firings to sample"));
})();
"""
