"""Interventions (splice with the error term, ablate, clamp, steer) and the `saekit steer` command, on tiny
random models and random SAEs; one SmolLM2 test steers a real model."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.analysis.interventions import (
    Edit,
    edit_activations,
    encode_prompt,
    generate,
    intervene,
    typical_norm,
    unit_direction,
)
from saekit.cli import main
from saekit.models import capture, forward_to_hooks
from saekit.models.tiny import byte_tokenizer, tiny_gpt2, tiny_llama
from saekit.sae import save_sae
from saekit.sae.relu import ReLUConfig, ReLUSAE
from saekit.sae.topk import TopKConfig, TopKSAE

HOOK = "layers.1.resid_post"
UPSTREAM = "layers.0.resid_post"
BOS, EOS = 0, 1


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _sae(d: int = 32, width: int = 64, k: int = 4, seed: int = 0, scale: float | None = None) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKConfig(d_in=d, width=width, k=k)).eval()
    with torch.no_grad():
        sae.b_dec.normal_(std=0.005)  # small next to the tiny models' activations (norm ~0.12)
    sae.metadata = {"hook": HOOK}
    if scale is not None:
        sae.metadata["normalization"] = {"scale": scale, "folded": True, "rule": "E||s x||^2 = d"}
    return sae


def _ids(b: int = 2, t: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (b, t), generator=g)
    ids[:, 0] = BOS
    return ids


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(n_layers=3)


def _run(model, ids, hooks=(UPSTREAM, HOOK)):
    with capture(model, list(hooks)) as acts:
        logits = model(input_ids=ids).logits
    return logits, dict(acts)


# -- the error-term splice is exact ----------------------------------------------------------------------
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_error_term_splice_reproduces_clean_logits_exactly(make_model):
    model, sae, ids = make_model(n_layers=3), _sae(), _ids()
    clean, _ = _run(model, ids)
    with intervene(model, sae) as log:
        spliced, _ = _run(model, ids)
    assert torch.equal(spliced, clean)
    assert (log.edited, log.left_clean) == (2 * 15, 2)  # BOS left clean
    # An ablation of a latent that fires nowhere goes through the SAE and still changes nothing, bit for bit.
    f = sae.encode(forward_to_hooks(model, ids, [HOOK])[HOOK].flatten(0, 1))
    silent = int((f == 0).all(0).nonzero()[0])
    with intervene(model, sae, ablate=[silent], skip_token_ids=()):
        assert torch.equal(_run(model, ids)[0], clean)


def test_without_the_error_term_the_reconstruction_is_spliced(llama):
    sae, ids = _sae(), _ids()
    x = forward_to_hooks(llama, ids, [HOOK])[HOOK]
    with intervene(llama, sae, keep_error=False, skip_token_ids=()):
        logits, acts = _run(llama, ids)
    torch.testing.assert_close(acts[HOOK], sae.decode(sae.encode(x)), rtol=0, atol=0)
    assert not torch.equal(logits, _run(llama, ids)[0])


# -- ablation changes only what it should ----------------------------------------------------------------
def test_ablation_subtracts_exactly_the_latents_contribution(llama):
    sae, ids = _sae(), _ids()
    clean_logits, clean = _run(llama, ids)
    x_BTD = clean[HOOK]
    f_BTM = sae.encode(x_BTD)
    fired_BT = f_BTM > 0
    fired_BT[:, 0] = False  # BOS is left clean
    counts_M = fired_BT.sum((0, 1))
    i = int(((counts_M > 0) & (counts_M < 30)).nonzero()[0])  # fired at some of the 30 non-BOS positions
    fired = fired_BT[..., i]
    with intervene(llama, sae, ablate=[i]) as log:
        logits, acts = _run(llama, ids)
    assert log.edited == 30 and log.left_clean == 2
    out = acts[HOOK]
    # Where it fired: out − x = x̂(f') − x̂(f) = −f_i · W_dec[i], up to float32 rounding of |x| and |x̂|.
    want = -f_BTM[..., i][fired][:, None] * sae.W_dec[i]
    ulp = 4 * x_BTD[fired].abs().max() * torch.finfo(torch.float32).eps
    torch.testing.assert_close(out[fired] - x_BTD[fired], want, rtol=0, atol=float(ulp))
    # Where it did not fire (and at BOS): bitwise unchanged. Upstream: untouched.
    assert torch.equal(out[~fired], x_BTD[~fired])
    assert torch.equal(acts[UPSTREAM], clean[UPSTREAM])
    # Causality: logits before the first position it fired at are unchanged (bitwise: same shapes, and a
    # causal mask gives later positions weight exactly 0); from there on they move.
    for b in range(ids.shape[0]):
        pos = fired[b].nonzero()
        first = int(pos[0]) if len(pos) else ids.shape[1]
        assert torch.equal(logits[b, :first], clean_logits[b, :first])
        if first < ids.shape[1]:
            assert not torch.allclose(logits[b, first:], clean_logits[b, first:])


def test_clamp_sets_the_latent_and_only_it():
    sae = _sae()
    x = torch.randn(50, 32) * 3
    f = sae.encode(x)
    out = edit_activations(sae, x, Edit(clamp={5: 7.5}))
    torch.testing.assert_close(out - x, (7.5 - f[:, 5:6]) * sae.W_dec[5], rtol=1e-6, atol=1e-5)
    # Without the error term the output is the reconstruction of the clamped code.
    f_clamped = f.clone()
    f_clamped[:, 5] = 7.5
    no_err = edit_activations(sae, x, Edit(clamp={5: 7.5}, keep_error=False))
    torch.testing.assert_close(no_err, sae.decode(f_clamped), rtol=0, atol=0)
    # Clamping to the value it already has is no edit at all.
    relu = ReLUSAE(ReLUConfig(d_in=32, width=64)).eval()
    fr = relu.encode(x)
    row = int(fr[:, 3].argmax())
    one = edit_activations(relu, x[row : row + 1], Edit(clamp={3: float(fr[row, 3])}))
    assert torch.equal(one, x[row : row + 1])


def test_steer_adds_the_unit_direction_at_edited_positions(llama):
    sae, ids = _sae(), _ids()
    _, clean = _run(llama, ids)
    with intervene(llama, sae, steer={7: 4.0, 9: -2.0}):
        _, acts = _run(llama, ids)
    u7, u9 = unit_direction(sae, 7), unit_direction(sae, 9)
    assert float(u7.norm()) == pytest.approx(1.0, abs=1e-6)
    delta = acts[HOOK] - clean[HOOK]
    torch.testing.assert_close(delta[:, 1:], (4.0 * u7 - 2.0 * u9).expand_as(delta[:, 1:]), rtol=0, atol=1e-5)
    assert torch.equal(delta[:, 0], torch.zeros_like(delta[:, 0]))  # BOS left clean
    assert torch.equal(acts[UPSTREAM], clean[UPSTREAM])


def test_outliers_are_left_clean_using_the_sae_typical_norm(llama):
    ids = _ids()
    x = forward_to_hooks(llama, ids, [HOOK])[HOOK]
    norms = x.norm(dim=-1)
    sae = _sae(scale=math.sqrt(32) / float(norms.median()))
    assert typical_norm(sae) == pytest.approx(float(norms.median()), rel=1e-6)
    factor = float(norms.max() / norms.median()) * 0.999  # only the largest-norm position is an "outlier"
    with intervene(llama, sae, steer={1: 1.0}, skip_token_ids=(), outlier_factor=factor) as log:
        _, acts = _run(llama, ids)
    assert (log.edited, log.left_clean) == (31, 1)
    top = norms.flatten().argmax()
    assert torch.equal(acts[HOOK].flatten(0, 1)[top], x.flatten(0, 1)[top])
    with intervene(llama, sae, steer={1: 1.0}, skip_token_ids=(), outlier_factor=None) as log:
        _run(llama, ids)
    assert log.left_clean == 0


def test_bad_edits_are_clear_errors(llama):
    sae = _sae()
    with pytest.raises(ValueError, match="out of range"):
        with intervene(llama, sae, ablate=[64]):
            pass
    with pytest.raises(ValueError, match="both ablated and clamped"):
        edit_activations(sae, torch.zeros(1, 32), Edit(ablate=(2,), clamp={2: 1.0}))
    with pytest.raises(ValueError, match="not finite"):
        edit_activations(sae, torch.zeros(1, 32), Edit(steer={2: math.nan}))
    sae.metadata = {}
    with pytest.raises(ValueError, match="hook"):
        with intervene(llama, sae):
            pass


# -- generation ------------------------------------------------------------------------------------------
def test_steering_changes_generation_and_only_inside_the_block(llama):
    tok, sae = byte_tokenizer(), _sae()
    assert encode_prompt(tok, "ab")[0] == BOS
    base = generate(llama, tok, "The cat sat on", max_new_tokens=12)
    assert base == generate(llama, tok, "The cat sat on", max_new_tokens=12)  # greedy: deterministic
    with intervene(llama, sae, steer={3: 50.0}) as log:
        steered = generate(llama, tok, "The cat sat on", max_new_tokens=12)
    assert steered != base
    assert log.forwards >= 2 and log.left_clean >= 1  # KV-cached steps each see their new token only
    assert generate(llama, tok, "The cat sat on", max_new_tokens=12) == base  # hooks removed on exit
    s1 = generate(llama, tok, "The cat", max_new_tokens=8, greedy=False, seed=3)
    assert s1 == generate(llama, tok, "The cat", max_new_tokens=8, greedy=False, seed=3)


def test_cli_steer_on_a_tiny_saved_model(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama(n_layers=3).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    sae = _sae(scale=0.5)
    sae.metadata["model"] = {"name": str(model_dir), "source": str(model_dir)}
    save_sae(sae, tmp_path / "run" / "sae")
    argv = ["steer", str(tmp_path / "run"), "--latent", "3", "--scale", "50", "--max-new-tokens", "10"]
    assert main([*argv, "The cat sat on", "Hello"]) == 0
    out = capsys.readouterr().out
    assert "add 50.0 × unit decoder row of latent(s) 3" in out and f"at {HOOK}" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("baseline:", "steered:"))]
    assert len(lines) == 4 and lines[0][10:] != lines[1][10:]
    assert main([*argv[:4], "--mode", "clamp", "--scale", "30", "--max-new-tokens", "5", "x"]) == 0
    assert main([*argv[:4], "--mode", "ablate", "--no-error", "--max-new-tokens", "5", "x"]) == 0
    assert "error term dropped" in capsys.readouterr().out
    assert main(["steer", str(tmp_path / "run"), "--latent", "3", "x"]) == 2  # add needs --scale
    assert main(["steer", str(tmp_path / "run"), "--latent", "99", "--scale", "1", "x"]) == 2
    assert "out of range" in capsys.readouterr().err


# -- SmolLM2 ---------------------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_steering_changes_smollm2_generation():
    from saekit.models import ModelUnavailableError, load_model, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModelUnavailableError as err:
        pytest.skip(str(err))
    lm = load_model()
    hook = "layers.15.resid_post"
    # A random TopK SAE stands in for a trained one: exactness and steering do not depend on training.
    sae = _sae(d=576, width=256, k=8, scale=0.139)
    sae.metadata["hook"] = hook
    ids = torch.tensor([encode_prompt(lm.tokenizer, "The library opens at nine in the morning.")])
    clean = lm.model(input_ids=ids).logits
    with intervene(lm.model, sae) as log:
        assert torch.equal(lm.model(input_ids=ids).logits, clean)
    assert log.edited == ids.shape[1] - 1  # BOS left clean
    f = sae.encode(forward_to_hooks(lm.model, ids, [hook])[hook][0, 1:])
    with intervene(lm.model, sae, ablate=[int(f.sum(0).argmax())]):
        assert not torch.equal(lm.model(input_ids=ids).logits, clean)
    prompt = "My favourite food is"
    base = generate(lm.model, lm.tokenizer, prompt, max_new_tokens=8)
    with intervene(lm.model, sae, steer={0: 8 * typical_norm(sae)}):
        steered = generate(lm.model, lm.tokenizer, prompt, max_new_tokens=8)
    assert steered != base, (base, steered)
