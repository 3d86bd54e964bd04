"""Splice fidelity and the evaluation record, on tiny random models (no download)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saekit.eval.evaluate import EvalResult, evaluate_sae
from saekit.eval.splice import splice_fidelity
from saekit.models.hooks import forward_to_hooks, splice
from saekit.models.tiny import byte_tokenizer, tiny_gpt2, tiny_llama

HOOK = "layers.1.resid_post"
BOS, EOS, PAD = 0, 1, 2
SPECIAL = {BOS, EOS, PAD}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _tokens(b=3, t=12, seed=0, eos_at=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (b, t), generator=g)
    ids[:, 0] = BOS
    if eos_at is not None:
        ids[:, eos_at] = EOS
    return ids


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(n_layers=2)


def identity(a):
    return a


def zeros(a):
    return torch.zeros_like(a)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_identity_splice_is_perfect(make_model):
    model = make_model(n_layers=2)
    r = splice_fidelity(model, HOOK, identity, _tokens(), special_ids=SPECIAL)
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-9)
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert abs(r["kl_sae"]) < 1e-9 and r["kl_score"] == pytest.approx(1.0)
    assert r["delta_ce"] == pytest.approx(0.0, abs=1e-9)
    assert r["kl_ablation"] > 0 and r["ce_ablation"] != pytest.approx(r["ce_clean"])
    assert r["n_predictions"] == 3 * 11 and r["splice_mode"] == "special-token positions left clean"


def test_zero_sae_recovers_nothing_under_zero_ablation(llama):
    r = splice_fidelity(llama, HOOK, zeros, _tokens(), special_ids=SPECIAL, ablation="zero")
    assert r["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert r["kl_score"] == pytest.approx(0.0, abs=1e-9)
    assert r["ce_sae"] == pytest.approx(r["ce_ablation"], abs=1e-9)


def test_ce_matches_torch_cross_entropy_and_skips_padding(llama):
    ids = _tokens(b=2, t=10, seed=3)
    am = torch.ones_like(ids)
    ids[1, 7:], am[1, 7:] = PAD, 0  # right padding on the second row
    r = splice_fidelity(llama, HOOK, identity, ids, attention_mask=am, special_ids=SPECIAL)
    logits = llama(input_ids=ids, attention_mask=am).logits
    targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    assert r["ce_clean"] == pytest.approx(float(want), rel=1e-5)
    assert r["n_predictions"] == 9 + 6
    assert r["n_tokens"] == 10 + 7


def test_special_positions_are_left_clean_by_default(llama):
    ids = _tokens(b=2, t=10, eos_at=5)
    seen = []

    def recording_zeros(a):
        seen.append(a.shape[0])
        return torch.zeros_like(a)

    r = splice_fidelity(llama, HOOK, recording_zeros, ids, special_ids=SPECIAL)
    assert seen == [2 * 8]  # BOS and EOS of both rows kept clean
    assert r["n_replaced_positions"] == 16

    # A manual splice that zeroes exactly the non-special positions gives the same CE.
    keep = torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    with splice(llama, HOOK, lambda act: act * keep[..., None]):
        logits = llama(input_ids=ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert r["ce_sae"] == pytest.approx(float(want), rel=1e-5)

    seen.clear()
    r_all = splice_fidelity(llama, HOOK, recording_zeros, ids, special_ids=SPECIAL, splice_special=True)
    assert seen == [20] and r_all["splice_mode"] == "all positions spliced"
    assert r_all["ce_sae"] != pytest.approx(r["ce_sae"])


def test_mean_ablation_uses_the_mean_and_differs_from_zero(llama):
    ids = _tokens(b=2, t=10, seed=5)
    r_zero = splice_fidelity(llama, HOOK, identity, ids, special_ids=SPECIAL, ablation="zero")
    r_mean = splice_fidelity(llama, HOOK, identity, ids, special_ids=SPECIAL, ablation="mean")
    assert r_mean["ablation"] == "mean"
    assert r_mean["ce_ablation"] != pytest.approx(r_zero["ce_ablation"], rel=1e-3)
    # Same as splicing the manual mean of the non-special activations as the "SAE".
    act = forward_to_hooks(llama, ids, [HOOK])[HOOK]
    mean_D = act[ids != BOS].mean(0)
    r_manual = splice_fidelity(llama, HOOK, lambda a: mean_D.expand_as(a), ids, special_ids=SPECIAL)
    assert r_mean["ce_ablation"] == pytest.approx(r_manual["ce_sae"], rel=1e-5)


def test_batch_forms_agree(llama):
    ids = _tokens(b=4, t=8, seed=7)
    one = splice_fidelity(llama, HOOK, lambda a: 0.5 * a, ids, special_ids=SPECIAL)
    split = splice_fidelity(llama, HOOK, lambda a: 0.5 * a, [ids[:1], ids[1:]], special_ids=SPECIAL)
    pairs = splice_fidelity(
        llama, HOOK, lambda a: 0.5 * a, [(ids, torch.ones_like(ids))], special_ids=SPECIAL
    )
    for key in ["ce_clean", "ce_sae", "ce_ablation", "kl_sae", "kl_ablation"]:
        assert split[key] == pytest.approx(one[key], rel=1e-5)
        assert pairs[key] == pytest.approx(one[key], rel=1e-5)


def test_chunked_log_softmax_matches_one_chunk(llama, monkeypatch):
    import saekit.eval.splice as S

    ids = _tokens(b=2, t=12, seed=9)
    am = torch.ones_like(ids)
    am[0, 9:] = 0
    whole = splice_fidelity(llama, HOOK, lambda a: 0.7 * a, ids, attention_mask=am, special_ids=SPECIAL)
    monkeypatch.setattr(S, "_KL_CHUNK", 4)  # 11 predictions per row → chunks of 4, 4, 3
    chunked = splice_fidelity(llama, HOOK, lambda a: 0.7 * a, ids, attention_mask=am, special_ids=SPECIAL)
    for key in ["ce_clean", "ce_sae", "ce_ablation", "kl_sae", "kl_ablation"]:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-10)
    assert chunked["n_predictions"] == whole["n_predictions"] == 8 + 11


def test_splice_bad_input(llama):
    with pytest.raises(ValueError, match="ablation"):
        splice_fidelity(llama, HOOK, identity, _tokens(), ablation="random")
    with pytest.raises(ValueError, match="attention_mask"):
        splice_fidelity(llama, HOOK, identity, [_tokens()], attention_mask=torch.ones(3, 12))
    r = splice_fidelity(
        llama, HOOK, identity, _tokens()
    )  # no special ids: say so instead of claiming BOS is kept
    assert r["splice_mode"] == "all positions spliced (no special token ids given)"
    with pytest.raises(ValueError, match="returned shape"):
        splice_fidelity(llama, HOOK, lambda a: a[:1], _tokens())


# -- evaluate_sae and EvalResult ------------------------------------------------------------------------
class ScaledIdentitySAE(nn.Module):
    """encode = x (every latent a coordinate), decode = scale · f: an SAE with known metrics."""

    arch = "scaled_identity"

    def __init__(self, d: int, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.eye(d))
        self.scale = scale

    def encode(self, x):
        return x @ self.W

    def decode(self, f):
        return self.scale * (f @ self.W.T)


def _contexts(n=6, t=16, seed=0):
    return list(_tokens(b=n, t=t, seed=seed))


def test_evaluate_identity_sae_is_perfect(llama):
    sae = ScaledIdentitySAE(llama.config.hidden_size)
    res = evaluate_sae(
        sae, llama, byte_tokenizer(), HOOK, iter(_contexts()), n_tokens=70, batch_size=2, outlier_factor=None
    )
    assert res.n_tokens == 80  # whole contexts until ≥ 70 tokens: 5 × 16
    assert res.excluded == {"special": 5, "outlier": 0}
    assert res.reconstruction["n_tokens"] == 75
    assert res.reconstruction["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert res.reconstruction["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert res.splice["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert abs(res.splice["kl_sae"]) < 1e-9


def test_evaluate_matches_manual_metrics_and_counts_outliers(llama):
    sae = ScaledIdentitySAE(llama.config.hidden_size, scale=0.5)
    ctx = _contexts(n=4, t=16, seed=1)
    res = evaluate_sae(sae, llama, byte_tokenizer(), HOOK, ctx, n_tokens=64, batch_size=4, outlier_factor=1.0)
    ids = torch.stack(ctx)
    act = forward_to_hooks(llama, ids, [HOOK])[HOOK]
    norms = act.norm(dim=-1)
    non_special = ids != BOS
    outlier = (norms > norms[non_special].median()) & non_special
    keep = non_special & ~outlier
    x = act[keep]
    assert res.excluded == {"special": 4, "outlier": int(outlier.sum())}
    assert res.reconstruction["n_tokens"] == int(keep.sum())
    assert res.reconstruction["relative_reconstruction_bias"] == pytest.approx(0.5, rel=1e-6)
    fvu = float((0.5 * x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert res.reconstruction["fvu"] == pytest.approx(fvu, rel=1e-5)
    # The splice leaves the same positions clean: compare with splice_fidelity on an explicit rule.
    with splice(llama, HOOK, lambda a: torch.where(keep[..., None], 0.5 * a, a)):
        logits = llama(input_ids=ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert res.splice["ce_sae"] == pytest.approx(float(want), rel=1e-5)
    assert "outlier" in res.splice_mode


def test_eval_result_json_round_trip_and_table(llama, tmp_path):
    sae = ScaledIdentitySAE(llama.config.hidden_size, scale=0.9)
    res = evaluate_sae(
        sae, llama, byte_tokenizer(), HOOK, _contexts(n=2), n_tokens=32, batch_size=2,
        ablation="mean", model_name="tiny-llama", text_source="random",
    )  # fmt: skip
    text = res.to_json(tmp_path / "eval.json")
    data = json.loads(text)
    assert data["model"] == "tiny-llama" and data["ablation"] == "mean"
    assert isinstance(data["reconstruction"]["firing_frequencies"], list)
    back = EvalResult.from_json(tmp_path / "eval.json")
    assert back.to_dict() == res.to_dict()
    assert EvalResult.from_json(text).to_dict() == data
    table = res.format_table()
    for key in [
        "fvu",
        "explained_variance",
        "l0",
        "ce_loss_recovered",
        "delta_ce",
        "kl_score",
        "tiny-llama",
        HOOK,
    ]:
        assert key in table
    # Aligned: every value starts in the same column.
    value_cols = {
        len(line) - len(line[line.index("  ") :].lstrip()) for line in table.splitlines() if "  " in line
    }
    assert len(value_cols) == 1
    with pytest.raises(ValueError, match="unknown keys"):
        EvalResult.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="missing required keys: \\['hook'\\]"):
        EvalResult.from_dict({k: v for k, v in data.items() if k != "hook"})


def test_eval_result_nan_becomes_null():
    res = EvalResult(
        model="m", hook="h", text_source="t", n_tokens=1, splice_mode="x", ablation="zero",
        reconstruction={"fvu": float("nan")}, splice=None,
    )  # fmt: skip
    assert json.loads(res.to_json())["reconstruction"]["fvu"] is None
    assert "fvu" in res.format_table()
