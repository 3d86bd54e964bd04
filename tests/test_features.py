"""Feature records against a brute-force computation on a tiny random model, storage round trip, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saekit.analysis.features import FeatureConfig, collect_features
from saekit.analysis.logits import logit_effects
from saekit.analysis.records import hist_edges, load_records
from saekit.models.hooks import forward_to_hooks
from saekit.models.tiny import byte_tokenizer, tiny_gpt2, tiny_llama
from saekit.sae import load_sae, save_sae
from saekit.sae.relu import ReLUConfig, ReLUSAE
from saekit.sae.topk import TopKConfig, TopKSAE

HOOK = "layers.1.resid_post"
BOS, EOS = 0, 1
CFG = FeatureConfig(n_top=5, n_samples=6, n_quantiles=3, before=3, after=2, n_logits=4, feature_batch_size=3)


def _contexts(n=9, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (n, t), generator=g)
    ids[:, 0] = BOS
    ids[2, 7] = EOS  # a special token mid-context: excluded, but shown in windows
    return ids


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(n_layers=2, d_model=32)
    torch.manual_seed(1)
    sae = TopKSAE(TopKConfig(d_in=32, width=24, k=4)).eval()
    return model, byte_tokenizer(), sae


def _brute(model, sae, ids, n_tokens):
    """Every kept position's latents, the old-fashioned way: one forward over everything."""
    with torch.no_grad():
        acts = forward_to_hooks(model, ids, [HOOK])[HOOK]
        keep = ~torch.isin(ids, torch.tensor([BOS, EOS]))
        flat = keep.view(-1).nonzero().view(-1)[:n_tokens]  # the first n_tokens kept positions
        keep = torch.zeros_like(keep).view(-1)
        keep[flat] = True
        keep = keep.view(ids.shape)
        f = torch.zeros(*ids.shape, sae.width)
        f[keep] = sae.encode(acts[keep]).clamp_min(0)
    return f, keep


def _window(ids, f, c, p, m, before, after):
    lo, hi = max(0, p - before), min(ids.shape[1], p + after + 1)
    return ids[c, lo:hi].tolist(), f[c, lo:hi, m].tolist(), p - lo


def test_records_match_brute_force(setup):
    model, tok, sae = setup
    ids = _contexts()
    n_tokens = 100  # 15 kept per context, minus the EOS: cuts into the 7th context, mid-batch
    rec = collect_features(sae, model, tok, HOOK, list(ids), n_tokens=n_tokens, cfg=CFG, outlier_factor=None)
    f, keep = _brute(model, sae, ids, n_tokens)
    assert rec.meta["n_tokens"] == n_tokens == int(keep.sum())
    assert rec.meta["n_contexts"] == 7 and rec.meta["excluded"] == {"special": 7 + 1, "outlier": 0}
    f_NM = f[keep]
    fires = (f_NM > 0).sum(0)
    np.testing.assert_array_equal(rec.summary["fires"], fires.numpy())
    np.testing.assert_allclose(rec.summary["density"], fires.numpy() / n_tokens)
    np.testing.assert_allclose(rec.summary["max_act"], f_NM.max(0).values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        rec.summary["mean_act"], (f_NM.sum(0) / fires.clamp_min(1)).numpy(), rtol=1e-5, atol=1e-7
    )
    edges = hist_edges(rec.meta)
    checked = 0
    for m in range(sae.width):
        r = rec.latent(m)
        vals = f_NM[:, m][f_NM[:, m] > 0].numpy()
        counts, _ = np.histogram(vals, bins=edges)
        assert r["hist"]["counts"] == counts.tolist()
        assert r["hist"]["underflow"] == int((vals < edges[0]).sum()) and r["hist"]["overflow"] == 0
        # Top contexts: the n_top largest activations, best first, with their windows.
        cs, ps = (f[..., m] > 0).nonzero(as_tuple=True)
        order = f[cs, ps, m].argsort(descending=True)[: CFG.n_top]
        assert len(r["top"]) == min(CFG.n_top, len(vals))
        for entry, j in zip(r["top"], order.tolist(), strict=True):
            c, p = int(cs[j]), int(ps[j])
            assert (entry["context"], entry["position"]) == (c, p)
            assert entry["value"] == pytest.approx(float(f[c, p, m]), rel=1e-5)
            tokens, acts, center = _window(ids, f, c, p, m, CFG.before, CFG.after)
            assert entry["tokens"] == tokens and entry["center"] == center
            np.testing.assert_allclose(entry["acts"], acts, rtol=1e-5, atol=1e-7)
            checked += 1
        # Samples: distinct firing positions, as many as fit, by increasing activation, with windows.
        samples = r["samples"]
        assert len(samples) == min(CFG.n_samples, len(vals))
        assert len({(s["context"], s["position"]) for s in samples}) == len(samples)
        assert [s["value"] for s in samples] == sorted(s["value"] for s in samples)
        assert [s["quantile"] for s in samples] == sorted(s["quantile"] for s in samples)
        for s in samples:
            c, p = s["context"], s["position"]
            assert keep[c, p] and s["value"] == pytest.approx(float(f[c, p, m]), rel=1e-5) and s["value"] > 0
            tokens, acts, center = _window(ids, f, c, p, m, CFG.before, CFG.after)
            assert s["tokens"] == tokens and s["center"] == center
            np.testing.assert_allclose(s["acts"], acts, rtol=1e-5, atol=1e-7)
    assert checked > 50
    # Every token of every window has its text in the vocabulary.
    assert {BOS, EOS} <= set(rec.vocab) and rec.vocab[BOS] == "<s>"


def test_samples_are_all_firings_when_they_fit_and_differ_by_seed(setup):
    model, tok, sae = setup
    ids = _contexts(n=4)
    cfg = FeatureConfig(n_samples=200, feature_batch_size=2)
    rec = collect_features(sae, model, tok, HOOK, list(ids), n_tokens=10**6, cfg=cfg, outlier_factor=None)
    f, keep = _brute(model, sae, ids, 10**6)
    for m in range(sae.width):
        want = {(int(c), int(p)) for c, p in zip(*(f[..., m] > 0).nonzero(as_tuple=True), strict=True)}
        assert {(s["context"], s["position"]) for s in rec.latent(m)["samples"]} == want
    # With fewer slots, the sample depends on the seed (it is random), the top contexts do not.
    a, b = (
        collect_features(
            sae, model, tok, HOOK, list(ids), n_tokens=10**6, cfg=FeatureConfig(n_samples=3, seed=s)
        )
        for s in (0, 1)
    )
    assert any(a.latent(m)["samples"] != b.latent(m)["samples"] for m in range(sae.width))
    assert all(a.latent(m)["top"] == b.latent(m)["top"] for m in range(sae.width))


def test_batch_size_does_not_change_the_records(setup):
    model, tok, sae = setup
    ids = _contexts()
    recs = [
        collect_features(
            sae,
            model,
            tok,
            HOOK,
            list(ids),
            n_tokens=90,
            outlier_factor=None,
            cfg=FeatureConfig(n_top=4, feature_batch_size=bs),
        )  # fmt: skip
        for bs in (1, 4, 9)
    ]
    for r in recs[1:]:
        np.testing.assert_array_equal(r.summary["fires"], recs[0].summary["fires"])
        np.testing.assert_array_equal(r.arrays["hist"], recs[0].arrays["hist"])
        np.testing.assert_array_equal(r.arrays["top_context"], recs[0].arrays["top_context"])
        np.testing.assert_array_equal(r.arrays["top_tokens"], recs[0].arrays["top_tokens"])
        np.testing.assert_allclose(r.arrays["top_acts"], recs[0].arrays["top_acts"], rtol=1e-5, atol=1e-7)


def test_outliers_are_never_recorded(setup):
    model, tok, sae = setup
    ids = _contexts()
    rec = collect_features(sae, model, tok, HOOK, list(ids), n_tokens=10**6, cfg=CFG, outlier_factor=1.05)
    n_out = rec.meta["excluded"]["outlier"]
    assert n_out > 0 and rec.meta["n_tokens"] == 9 * 15 - 1 - n_out
    # A recorded position is never an excluded one: its activation is > 0 and its token not special.
    for m in range(sae.width):
        for e in rec.latent(m)["top"] + rec.latent(m)["samples"]:
            assert e["value"] > 0 and int(ids[e["context"], e["position"]]) not in (BOS, EOS)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_logit_effects_match_the_full_matrix(make_model):
    model = make_model(n_layers=1, d_model=32)
    W_dec = torch.randn(10, 32)
    up_i, up_v, down_i, down_v = logit_effects(W_dec, model, k=5, chunk=3)
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    full = (W_dec * norm.weight) @ model.get_output_embeddings().weight.T
    full -= full.mean(1, keepdim=True)
    want_v, want_i = full.topk(5, dim=1)
    torch.testing.assert_close(up_v, want_v)
    assert torch.equal(up_i, want_i)
    torch.testing.assert_close(down_v, -(-full).topk(5, dim=1).values)
    assert logit_effects(torch.randn(10, 7), model, k=5) is None  # not a residual-stream width


def test_save_load_round_trip(setup, tmp_path):
    model, tok, sae = setup
    rec = collect_features(
        sae, model, tok, HOOK, list(_contexts()), n_tokens=80, cfg=CFG, outlier_factor=None
    )
    rec.save(tmp_path / "features")
    lazy = load_records(tmp_path / "features")
    assert not lazy.arrays and lazy.width == sae.width
    for m in (0, 5, sae.width - 1):
        assert lazy.latent(m) == rec.latent(m)
    eager = load_records(tmp_path / "features", arrays=True)
    assert eager.latent(3) == rec.latent(3) and eager.vocab == rec.vocab
    rec.save(tmp_path / "features")  # replacing records is fine
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError):
        rec.save(tmp_path / "other")
    with pytest.raises(IndexError):
        lazy.latent(sae.width)
    with pytest.raises(FileNotFoundError, match="saekit features"):
        load_records(tmp_path)


def test_dense_relu_sae_and_a_latent_that_never_fires(setup):
    model, tok, _ = setup
    torch.manual_seed(0)
    sae = ReLUSAE(ReLUConfig(d_in=32, width=16)).eval()
    with torch.no_grad():
        sae.b_enc[3] = -1e6  # latent 3 can never fire
    rec = collect_features(
        sae, model, tok, HOOK, list(_contexts()), n_tokens=60, cfg=CFG, outlier_factor=None
    )
    r = rec.latent(3)
    assert r["fires"] == 0 and r["top"] == [] and r["samples"] == [] and r["max_act"] == 0.0
    assert sum(r["hist"]["counts"]) == 0 and len(r["logits"]["up"]) == CFG.n_logits


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny model, a text file and a saved SAE whose metadata names them (as `saekit train` does)."""
    root = tmp_path_factory.mktemp("run")
    tiny_llama(n_layers=2, d_model=32).save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    text = root / "corpus.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i} is about the number {i * 7} and feature {i}." for i in range(60))
    )
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=32, width=24, k=4))
    sae.metadata = {
        "hook": HOOK,
        "model": {"name": str(root / "model"), "source": str(root / "model")},
        "extract": {"text": str(text), "context_len": 32, "keep_special": False, "outlier_factor": 0.0},
    }
    save_sae(sae, root / "run" / "sae")
    (root / "run" / "metrics.jsonl").write_text("")
    return root


def test_cli_features_then_report(tiny_run, capsys):
    from saekit.cli import main

    run = tiny_run / "run"
    assert main(["features", str(run / "sae"), "--tokens", "300", "--no-progress", "--n-top", "7"]) == 0
    meta = json.loads((run / "features" / "features.json").read_text())  # a run's sae/ counts as the run
    assert meta["n_tokens"] == 300 and meta["config"]["n_top"] == 7 and meta["hook"] == HOOK
    assert meta["text"].endswith("corpus.txt") and meta["outlier_factor"] is None
    assert main(["report", str(run), "--latent-pngs", "2"]) == 0
    out = capsys.readouterr().out
    assert "open file://" in out and (run / "report" / "index.html").is_file()
    assert len(list((run / "report" / "latents").glob("*.html"))) == 24
    assert len(list((run / "report" / "latents" / "png").glob("*.png"))) == 2
    # Retrained weights: the report still works from the old records, and says they are stale.
    sae = load_sae(run / "sae")
    with torch.no_grad():
        sae.W_enc.mul_(2)
    save_sae(sae, run / "sae")
    assert main(["report", str(run)]) == 0
    assert "other SAE weights" in capsys.readouterr().out


def test_report_computes_missing_records_and_errors_are_clear(tiny_run, tmp_path, capsys):
    from saekit.cli import main

    sae_dir = tmp_path / "bare"
    import shutil

    shutil.copytree(tiny_run / "run" / "sae", sae_dir)
    assert main(["report", str(sae_dir), "--tokens", "200", "--no-progress"]) == 0
    assert "no feature records" in capsys.readouterr().out
    assert (sae_dir / "features" / "features.json").is_file() and (
        sae_dir / "report" / "index.html"
    ).is_file()
    assert main(["features", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
