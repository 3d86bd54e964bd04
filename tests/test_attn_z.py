"""Attention-output SAEs: the ``layers.{i}.attn_z`` hook point (the per-head outputs entering the attention
output projection) against attention computed by hand, splicing there against edited projection weights, the
per-head attribution on hand-built decoders, and a tiny run end to end (cache → train → info → features →
report)."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaForCausalLM

from saekit.analysis.heads import (
    HeadGeometry,
    describe_heads,
    head_metadata,
    head_shares,
    is_attn_z,
    sae_geometry,
    summarize,
    top_heads,
)
from saekit.models.hooks import (
    attn_heads,
    capture,
    forward_to_hooks,
    hook_layer,
    hook_points,
    hook_width,
    splice,
)
from saekit.models.tiny import BYTE_VOCAB, byte_tokenizer, tiny_gpt2, tiny_llama
from saekit.sae.topk import TopKConfig, TopKSAE

N_HEADS, D_MODEL = 4, 32


def llama_odd_heads(n_layers: int = 2) -> LlamaForCausalLM:
    """Llama with grouped-query attention (4 query heads, 2 key/value heads) and head_dim 6, so attn_z is
    4 · 6 = 24 wide while d_model is 32: a width taken from d_model would be wrong."""
    return tiny_llama(n_layers, D_MODEL, num_attention_heads=N_HEADS, head_dim=6, max_position_embeddings=128)


def tiny_neox() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=D_MODEL,
        intermediate_size=2 * D_MODEL,
        num_hidden_layers=2,
        num_attention_heads=N_HEADS,
        max_position_embeddings=128,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def _gpt2() -> nn.Module:
    model = tiny_gpt2(n_layers=2, d_model=D_MODEL)
    with torch.no_grad():  # GPT-2's projection biases start at zero; make them matter
        for block in model.transformer.h:
            block.attn.c_attn.bias.normal_(0, 0.1)
            block.attn.c_proj.bias.normal_(0, 0.1)
    return model


MODELS = {"llama": llama_odd_heads, "gpt2": _gpt2, "neox": tiny_neox}
D_HEAD = {"llama": 6, "gpt2": 8, "neox": 8}


def _proj(model: nn.Module, layer: int) -> nn.Module:
    """The attention output projection, found by its module path (not through saekit)."""
    if isinstance(model, LlamaForCausalLM):
        return model.model.layers[layer].self_attn.o_proj
    if isinstance(model, GPTNeoXForCausalLM):
        return model.gpt_neox.layers[layer].attention.dense
    return model.transformer.h[layer].attn.c_proj


def _proj_in_cols(model: nn.Module, layer: int, cols: slice) -> torch.Tensor:
    """Weights multiplying input columns ``cols`` (Linear: weight (out, in); Conv1D: (in, out))."""
    w = _proj(model, layer).weight
    return w[cols] if not isinstance(_proj(model, layer), nn.Linear) else w[:, cols]


@pytest.fixture(scope="module", params=list(MODELS))
def family(request):
    return request.param, MODELS[request.param]()


@pytest.fixture(scope="module")
def ids_BT():
    ids = torch.randint(3, BYTE_VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# -- the hook point ----------------------------------------------------------------------------------------
def test_attn_z_is_listed_sized_and_placed(family):
    name, model = family
    assert "layers.1.attn_z" in hook_points(model) and "layers.0.attn_z" in hook_points(model)
    assert attn_heads(model, 1) == (N_HEADS, D_HEAD[name])
    assert hook_width(model, "layers.1.attn_z") == N_HEADS * D_HEAD[name]
    assert hook_layer(model, "layers.1.attn_z") == 1
    assert HeadGeometry.from_model(model, "layers.1.attn_z") == HeadGeometry(N_HEADS, D_HEAD[name])
    assert head_metadata(["layers.0.attn_z"], model) == {"attn_heads": {"n_heads": 4, "d_head": D_HEAD[name]}}
    assert head_metadata(["layers.0.attn_out"], model) == {}


def test_capture_is_what_the_projection_receives(family, ids_BT):
    _, model = family
    seen: dict[int, torch.Tensor] = {}
    handles = [
        _proj(model, i).register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
        for i in range(2)
    ]
    try:
        with capture(model, ["layers.0.attn_z", "layers.1.attn_z"]) as acts, torch.no_grad():
            model(ids_BT)
    finally:
        for h in handles:
            h.remove()
    for i in range(2):
        assert acts[f"layers.{i}.attn_z"].shape == (2, 11, hook_width(model, f"layers.{i}.attn_z"))
        torch.testing.assert_close(acts[f"layers.{i}.attn_z"], seen[i], rtol=0, atol=0)
    # Extraction stops right there and gets the same values.
    early = forward_to_hooks(model, ids_BT, ["layers.0.attn_z"])["layers.0.attn_z"]
    torch.testing.assert_close(early, seen[0], rtol=0, atol=0)


def _causal_attention(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d + causal mask) v, heads concatenated head-major: (B, T, H·d)."""
    B, H, T, d = q_BHTd.shape
    scores = q_BHTd @ k_BHTd.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf)
    z_BHTd = scores.softmax(-1) @ v_BHTd
    return z_BHTd.transpose(1, 2).reshape(B, T, H * d)


def test_attn_z_equals_llama_attention_by_hand(ids_BT):
    model = llama_odd_heads()
    attn = model.model.layers[1].self_attn
    with capture(model, ["layers.1.resid_pre", "layers.1.attn_z"]) as acts, torch.no_grad():
        model(ids_BT)
        h = model.model.layers[1].input_layernorm(acts["layers.1.resid_pre"])
        B, T, _ = h.shape
        q = attn.q_proj(h).view(B, T, N_HEADS, 6).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, 2, 6).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, 2, 6).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(T)[None].expand(B, T))
        cos, sin = cos[:, None], sin[:, None]

        def rope(x):
            x1, x2 = x[..., :3], x[..., 3:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        q, k = rope(q), rope(k)
        # Grouped-query attention: query heads 0, 1 read key/value head 0; heads 2, 3 read head 1.
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        z = _causal_attention(q, k, v)
    assert z.shape == (2, 11, 24)
    torch.testing.assert_close(acts["layers.1.attn_z"], z, rtol=1e-5, atol=1e-6)


def test_attn_z_equals_gpt2_attention_by_hand(ids_BT):
    model = _gpt2()
    block = model.transformer.h[1]
    with capture(model, ["layers.1.resid_pre", "layers.1.attn_z"]) as acts, torch.no_grad():
        model(ids_BT)
        h = block.ln_1(acts["layers.1.resid_pre"])
        qkv = h @ block.attn.c_attn.weight + block.attn.c_attn.bias  # Conv1D: weight (in, out)
        B, T, _ = h.shape
        q, k, v = (t.view(B, T, N_HEADS, 8).transpose(1, 2) for t in qkv.split(D_MODEL, dim=-1))
        z = _causal_attention(q, k, v)
    torch.testing.assert_close(acts["layers.1.attn_z"], z, rtol=1e-5, atol=1e-6)


def test_splicing_attn_z_equals_editing_the_projection(family, ids_BT):
    name, model = family
    hook, d_head = "layers.1.attn_z", D_HEAD[name]
    clean = _logits(model, ids_BT)
    with splice(model, hook, lambda z: z):
        torch.testing.assert_close(_logits(model, ids_BT), clean, rtol=0, atol=0)

    zeroed = copy.deepcopy(model)  # zero input to the projection ≡ a projection with zero weights
    with torch.no_grad():
        _proj(zeroed, 1).weight.zero_()
    with splice(model, hook, torch.zeros_like), capture(model, ["layers.1.attn_out"]) as acts:
        spliced = _logits(model, ids_BT)
    torch.testing.assert_close(spliced, _logits(zeroed, ids_BT), rtol=1e-5, atol=1e-5)
    assert (spliced - clean).abs().max() > 1e-3
    bias = _proj(model, 1).bias
    expected = torch.zeros(D_MODEL) if bias is None else bias.detach()
    torch.testing.assert_close(acts["layers.1.attn_out"], expected.expand(2, 11, D_MODEL))

    # Ablating head 2 at attn_z ≡ zeroing the projection's weights on its columns: the layout is head-major.
    cols = slice(2 * d_head, 3 * d_head)
    no_head = copy.deepcopy(model)
    with torch.no_grad():
        _proj_in_cols(no_head, 1, cols).zero_()

    def ablate(z):
        z = z.clone()
        z[..., cols] = 0
        return z

    with splice(model, hook, ablate):
        ablated = _logits(model, ids_BT)
    torch.testing.assert_close(ablated, _logits(no_head, ids_BT), rtol=1e-5, atol=1e-5)
    assert (ablated - clean).abs().max() > 1e-4
    torch.testing.assert_close(_logits(model, ids_BT), clean, rtol=0, atol=0)  # hooks removed on exit


def test_attn_z_errors_are_clear():
    model = llama_odd_heads()
    with pytest.raises(ValueError, match="out of range"):
        hook_width(model, "layers.2.attn_z")
    with pytest.raises(ValueError, match="attn_z"):
        HeadGeometry.from_model(model, "layers.0.attn_out")
    with pytest.raises(ValueError, match=r"\(d_model wide\).*attn_z"):
        hook_width(model, "layers.0.attn_zz")


# -- per-head attribution ----------------------------------------------------------------------------------
def test_head_shares_on_a_hand_built_decoder():
    d_head = 6
    W = torch.zeros(5, N_HEADS * d_head)
    W[0, 2 * d_head : 3 * d_head] = torch.randn(d_head)  # lives in head 2's slice only
    W[1] = 0.3  # uniform: every head the same
    W[2, 0], W[2, 1], W[2, d_head + 5] = 3.0, 4.0, 1.0  # head 0: 3² + 4² = 25, head 1: 1² = 1
    W[4, 3 * d_head] = -2.0  # sign does not matter
    shares = head_shares(W, N_HEADS)
    expected = torch.tensor(
        [
            [0.0, 0.0, 1.0, 0.0],
            [0.25, 0.25, 0.25, 0.25],
            [25 / 26, 1 / 26, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],  # a zero row belongs to no head
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    torch.testing.assert_close(shares, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(head_shares(7.5 * W, N_HEADS), shares)  # scale-free
    top, share = top_heads(shares)
    assert top.tolist() == [2, 0, 0, 0, 3]
    np.testing.assert_allclose(share, [1.0, 0.25, 25 / 26, 0.0, 1.0], rtol=1e-6)
    s = summarize(shares)
    assert s["dominated"] == 3 and s["majority"] == 3  # rows 0, 2 and 4 (25/26 ≥ 0.9); not the uniform one
    assert s["top_head_counts"] == [2, 0, 1, 1]  # the zero row is counted nowhere
    np.testing.assert_allclose(s["mean_share"], expected.mean(0).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="equal head slices"):
        head_shares(W, 5)


def test_describe_heads_reads_the_sae_metadata():
    sae = TopKSAE(TopKConfig(d_in=24, width=8, k=2))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[:6, 6:12] = 1.0  # 6 latents in head 1
        sae.W_dec[6:, :] = 1.0  # 2 uniform
    assert describe_heads(sae) is None  # no hook recorded: not an attn_z SAE
    sae.metadata = {"hook": "layers.3.attn_z"}
    assert "unavailable" in describe_heads(sae)
    sae.metadata["attn_heads"] = {"n_heads": 4, "d_head": 6}
    assert sae_geometry(sae) == HeadGeometry(4, 6)
    text = describe_heads(sae)
    assert "6 of 8 latents (75.0%)" in text and "h1 (6, mean share 0.81)" in text and "h0 (2," in text
    sae.metadata["attn_heads"] = {"n_heads": 4, "d_head": 5}
    with pytest.raises(ValueError, match="reads 24"):
        describe_heads(sae)
    sae.metadata = {"hook": "layers.3.attn_out", "attn_heads": {"n_heads": 4, "d_head": 6}}
    assert describe_heads(sae) is None
    assert is_attn_z("layers.12.attn_z") and not is_attn_z("model.layers.1.self_attn.o_proj")


# -- end to end --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_attn_run(tmp_path_factory):
    """`saekit cache` at attn_z of a tiny GQA Llama, then `saekit train` (TopK) from that cache."""
    from saekit.cli import main

    root = tmp_path_factory.mktemp("attn-z")
    llama_odd_heads().save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    text = root / "corpus.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i} is about the number {i * 7} and topic {i % 5}." for i in range(400))
    )
    common = ["--model", str(root / "model"), "--text", str(text), "--context-len", "32"]
    cache = root / "cache"
    argv = [
        "cache",
        *common,
        "--hook",
        "layers.1.attn_z",
        "--tokens",
        "1200",
        "--out",
        str(cache),
        "--no-progress",
    ]
    assert main(argv) == 0
    train = ["train", "--arch", "topk", "--cache", str(cache), "--k", "4", "--expansion", "2",
             "--tokens", "1200", "--batch-size", "100", "--progress", "false", "--eval-tokens", "300",
             "--out", str(root / "run")]  # fmt: skip
    assert main(train) == 0
    return root


def test_end_to_end_attn_z_run(tiny_attn_run, capsys):
    import saekit
    from saekit.analysis.records import load_records
    from saekit.cli import main

    run = tiny_attn_run / "run"
    sae = saekit.load(run)
    assert sae.d_in == 24 and sae.width == 48 and sae.metadata["hook"] == "layers.1.attn_z"
    assert sae.metadata["attn_heads"] == {"n_heads": 4, "d_head": 6}
    ev = json.loads((run / "eval.json").read_text())  # spliced back in at attn_z for CE loss recovered
    assert math.isfinite(ev["splice"]["ce_loss_recovered"])
    capsys.readouterr()

    assert main(["info", str(run)]) == 0
    info = capsys.readouterr().out
    shares = head_shares(sae.W_dec, 4)
    top, share = top_heads(shares)
    assert "per-head attribution (4 heads" in info
    assert f"{int((share >= 0.9).sum())} of 48 latents" in info

    assert main(["features", str(run), "--tokens", "400", "--no-progress"]) == 0
    rec = load_records(run / "features")
    assert rec.meta["heads"]["n_heads"] == 4 and rec.meta["heads"]["d_head"] == 6
    np.testing.assert_array_equal(rec.summary["top_head"], top)
    np.testing.assert_allclose(rec.summary["top_head_share"], share, rtol=1e-6)
    r = rec.latent(5)
    np.testing.assert_allclose(r["heads"]["shares"], shares[5].numpy(), rtol=1e-6)
    assert r["heads"]["top"] == top[5] and sum(r["heads"]["shares"]) == pytest.approx(1.0, abs=1e-5)
    # Logit effects: decoder rows (24 wide) through o_proj (to d_model 32) and the unembedding, by hand.
    model = LlamaForCausalLM.from_pretrained(tiny_attn_run / "model").eval()
    with torch.no_grad():
        resid_MD = sae.W_dec @ model.model.layers[1].self_attn.o_proj.weight.T
        eff_MV = (resid_MD * model.model.norm.weight) @ model.lm_head.weight.T
        eff_MV -= eff_MV.mean(1, keepdim=True)
    assert rec.meta["logit_effects"]
    up_ids, up_vals = zip(*r["logits"]["up"], strict=True)
    assert list(up_ids) == eff_MV[5].topk(len(up_ids)).indices.tolist()
    np.testing.assert_allclose(up_vals, eff_MV[5].topk(len(up_ids)).values.numpy(), rtol=1e-4, atol=1e-6)

    assert main(["report", str(run)]) == 0
    site = run / "report"
    index_html = (site / "index.html").read_text()
    assert 'data-key="7"' in index_html and ">head</th>" in index_html
    index = json.loads((site / "data" / "index.js").read_text().removeprefix("window.SAEKIT_INDEX = ")[:-2])
    assert index["meta"]["heads"]["n_heads"] == 4
    rows = {row[0]: row for row in index["latents"]}
    assert len(rows) == 48 and all(len(row) == 8 for row in rows.values())
    assert rows[5][6] == top[5] and rows[5][7] == pytest.approx(share[5], rel=1e-3)
    page = (site / "latents" / "5.html").read_text()
    assert 'id="heads"' in page and "Per-head attribution" in page
    data = json.loads(re.search(r"window\.SAEKIT_LATENT = (.*);</script>", page).group(1))
    np.testing.assert_allclose(data["heads"], shares[5].numpy(), rtol=1e-3, atol=1e-4)
    assert "latents dominated by one head" in (site / "summary.html").read_text()


def test_reports_of_other_hook_points_have_no_head_column(tmp_path):
    from saekit.analysis.features import FeatureConfig, collect_features
    from saekit.analysis.report import write_report

    model = llama_odd_heads()
    sae = TopKSAE(TopKConfig(d_in=D_MODEL, width=8, k=2)).eval()
    ids = torch.randint(3, BYTE_VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = FeatureConfig(n_top=2, n_samples=2, n_quantiles=1, n_logits=2)
    rec = collect_features(
        sae,
        model,
        byte_tokenizer(),
        "layers.1.attn_out",
        list(ids),
        n_tokens=40,
        cfg=cfg,
        outlier_factor=None,
    )
    assert "heads" not in rec.meta and "head_share" not in rec.arrays and "heads" not in rec.latent(0)
    index = write_report(rec, tmp_path / "report")
    assert ">head</th>" not in index.read_text()
    assert 'id="heads"' not in (tmp_path / "report" / "latents" / "0.html").read_text()


def test_the_report_shows_heads_in_a_browser(tiny_attn_run):
    from chromium import Browser, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (requirements.txt)")
    from saekit.cli import main

    site = tiny_attn_run / "run" / "report"
    if not (site / "index.html").is_file():  # when run on its own
        assert main(["report", str(tiny_attn_run / "run"), "--tokens", "400", "--no-progress"]) == 0
    with Browser(binary) as b:
        b.open((site / "index.html").as_uri())
        assert b.errors() == []
        cells = b.js("[...document.querySelectorAll('#rows tr')].map(tr => tr.cells[4].textContent)")
        assert len(cells) == 48 and all(re.fullmatch(r"h[0-3] \d+%", c) for c in cells)
        b.click("th[data-key='7']", navigates=False)  # by the top head's share, largest first
        first = b.js("document.querySelector('#rows tr').cells[4].textContent")
        assert int(first.split()[1][:-1]) == max(int(c.split()[1][:-1]) for c in cells)
        b.open((site / "latents" / "5.html").as_uri())
        assert b.errors() == []
        assert b.js("document.querySelectorAll('#heads tr').length") == 4
        assert b.js("document.querySelectorAll('#heads tr.top').length") == 1
