"""The HTML report: files, summary contents, PNG plots, and the site itself in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from saekit.analysis.features import FeatureConfig, collect_features
from saekit.analysis.plots import plot_activation_histogram, plot_logit_effects
from saekit.analysis.report import _script_json, write_report
from saekit.data import pack_contexts
from saekit.models.tiny import byte_tokenizer, tiny_llama
from saekit.sae.topk import TopKConfig, TopKSAE
from saekit.train.plots import plot_training_curves

WIDTH = 260  # more than one page (200 rows) of the index

TEXT = [
    f'The {w} sat on the mat; it was {i} years old and liked <b>tags</b> & "quotes".\nNext line {i}.'
    for i, w in enumerate(["cat", "dog", "bird", "fish", "cow", "fox", "owl", "bee"] * 6)
]


@pytest.fixture(scope="module")
def records():
    model, tok = tiny_llama(n_layers=2, d_model=32), byte_tokenizer()
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=32, width=WIDTH, k=8)).eval()
    with torch.no_grad():
        sae.b_enc[7] = -1e6  # a latent that never fires
    contexts = pack_contexts(TEXT, tok, 48)
    cfg = FeatureConfig(n_top=8, n_samples=8, n_quantiles=2, feature_batch_size=8)
    meta = {"model": "tiny-llama", "text": "test text", "split": "all", "sae": {"path": "x", "arch": "topk"}}
    return collect_features(
        sae,
        model,
        tok,
        "layers.1.resid_post",
        contexts,
        n_tokens=1500,
        cfg=cfg,
        outlier_factor=None,
        meta=meta,
    )


@pytest.fixture(scope="module")
def report(records, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    steps = [{"kind": "train", "step": s, "tokens": 100 * s, "loss": 1 / s, "l0": 8.0} for s in range(1, 6)]
    plot_training_curves(steps, run / "train_curve.png")
    shutil.copy(run / "train_curve.png", run / "pareto_l0_fvu.png")
    (run / "eval.json").write_text(
        json.dumps({"model": "tiny", "hook": "h", "reconstruction": {"fvu": 0.25, "l0": 8.0, "freqs": [0.1]}})
    )
    (run / "summary.json").write_text(json.dumps({"arch": "topk", "train": {"steps": 5, "tokens": 500}}))
    index = write_report(records, run / "report", run_dir=run, latent_pngs=1)
    return index


def test_report_files_and_summary(report, records):
    out = report.parent
    assert len(list((out / "latents").glob("*.html"))) == WIDTH
    assert len(list((out / "latents" / "png").glob("*.png"))) == 1
    for name in ("train_curve.png", "pareto_l0_fvu.png", "log_density.png", "density_vs_max.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    summary = (out / "summary.html").read_text()
    for text in ("training curves", "Pareto frontier", "fvu", "0.25", "tiny-llama", "never fired"):
        assert text in summary
    # A latent page carries its own data, inline and parseable.
    page = (out / "latents" / "3.html").read_text()
    data = json.loads(re.search(r"window\.SAEKIT_LATENT = (.*);</script>", page).group(1))
    assert data["id"] == 3 and len(data["top"]) == len(records.latent(3)["top"]) > 0
    center = data["top"][0][3]
    assert data["strings"][data["top"][0][4][center]] in records.vocab.values()
    index = (out / "data" / "index.js").read_text()
    assert index.startswith("window.SAEKIT_INDEX = ") and index.count("],[") >= WIDTH - 1


def test_script_json_cannot_close_the_script():
    text = _script_json({"t": "</script><script>alert(1)</script><!--"})
    assert "<" not in text and json.loads(text)["t"].startswith("</script>")


def test_report_refuses_to_replace_other_folders(records, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        write_report(records, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_latent_pngs(records, tmp_path):
    r = records.latent(int(records.summary["max_act"].argmax()))
    assert plot_activation_histogram(r, tmp_path / "h.png").stat().st_size > 1000
    assert plot_logit_effects(r, records.vocab, tmp_path / "l.png").stat().st_size > 1000
    dead = records.latent(7)
    assert plot_activation_histogram(dead, tmp_path / "dead.png").is_file()


# -- the site in a real browser ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    from chromium import Browser, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (requirements.txt)")
    with Browser(binary) as b:
        yield b


def _rows(b):
    return b.js("[...document.querySelectorAll('#rows tr')].map(tr => tr.cells[0].textContent)")


def _search(b, query):
    b.js(
        "(() => { const s = document.getElementById('search'); "
        f"s.value = {json.dumps(query)}; s.dispatchEvent(new Event('input')); }})()"
    )


def test_site_in_chromium(report, records, browser):
    b = browser
    b.open(report.as_uri())
    assert b.errors() == []
    rows = _rows(b)
    assert (
        len(rows) == 200
        and b.js("document.getElementById('count').textContent") == f"{WIDTH} of {WIDTH} latents"
    )
    # Default order: max activation, largest first.
    s = records.summary
    assert s["max_act"][int(rows[0])] == pytest.approx(s["max_act"].max(), rel=1e-3)
    b.click("#next", navigates=False)
    assert len(_rows(b)) == WIDTH - 200
    # Sort by density (click the header): the densest latent comes first.
    b.click("th[data-key='1']", navigates=False)
    assert s["density"][int(_rows(b)[0])] == s["density"].max()
    # Search by token: every row left lists the token among its top-activating or promoted tokens.
    _search(b, "a")
    found = b.js(
        "[...document.querySelectorAll('#rows tr')]"
        ".map(tr => tr.cells[4].textContent + tr.cells[5].textContent)"
    )
    assert 0 < len(found) < WIDTH and all("a" in f.lower() for f in found)
    i = int(s["density"].argmax())
    _search(b, f"#{i}")
    assert _rows(b) == [str(i)]
    # A click opens that latent's page, with highlighted tokens.
    b.click("#rows a.latent-link")
    assert b.js("location.href").endswith(f"/latents/{i}.html")
    assert b.errors() == []
    lit = b.js(
        "[...document.querySelectorAll('#top span.tok.on')].map(e => getComputedStyle(e).backgroundColor)"
    )
    assert lit and all(c not in ("rgba(0, 0, 0, 0)", "transparent") for c in lit)
    assert b.js("document.querySelectorAll('#top .ctx').length") == len(records.latent(i)["top"])
    assert b.js("document.querySelectorAll('#top span.tok.center').length") == len(records.latent(i)["top"])
    assert b.js("document.querySelectorAll('#hist-svg rect').length") > 0
    assert b.js("document.querySelectorAll('#logits tr').length") == 2 * records.meta["config"]["n_logits"]
    assert b.js("document.querySelectorAll('#samples .quantile').length") >= 1
    # The page of a latent that never fired, and the summary with every image loaded.
    b.open((report.parent / "latents" / "7.html").as_uri())
    assert b.errors() == [] and "never fired" in b.js("document.body.textContent")
    b.open((report.parent / "summary.html").as_uri())
    assert b.errors() == []
    sizes = b.js("[...document.images].map(i => i.complete && i.naturalWidth)")
    assert len(sizes) == 4 and all(sizes)
