"""Other libraries' SAE formats (saekit.formats): foreign files built by hand from each format's specification
(no downloads), saekit's encode/decode checked against hand-written references of the foreign libraries'
forward passes (read from their source), export round trips, clear errors for bad input, the hub's offline
error, `saekit import/export/eval` on a tiny model, and, where the separate benchmark environment
``.bench-venv`` exists, round trips through the real SAELens and sparsify packages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import saekit
from saekit.cli import main
from saekit.formats import FormatError, HubUnavailableError, detect_format, export_sae
from saekit.formats.common import model_id, module_to_saekit, saekit_hook_to_tl, tl_hook_to_saekit
from saekit.sae import get_architecture, load_sae

D, M, K = 12, 40, 5
REPO = Path(__file__).resolve().parents[1]
BENCH_PYTHON = REPO / ".bench-venv" / "bin" / "python"


def _rand(*shape: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def x() -> torch.Tensor:
    return _rand(64, D, seed=99, scale=1.0)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tol * max(1.0, float(b.abs().max())), rtol=0), float((a - b).abs().max())


def _dense_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


# -- SAELens ---------------------------------------------------------------------------------------------
def _saelens_tensors(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with non-unit decoder rows and non-zero biases (so every folding matters)."""
    t = {
        "W_enc": _rand(D, M, seed=seed),
        "W_dec": _rand(M, D, seed=seed + 1) * torch.linspace(0.5, 2.0, M)[:, None],
        "b_dec": _rand(D, seed=seed + 2),
    }
    if arch == "gated":
        t |= {
            "b_gate": _rand(M, seed=seed + 3),
            "b_mag": _rand(M, seed=seed + 4),
            "r_mag": _rand(M, seed=seed + 5),
        }
    else:
        t["b_enc"] = _rand(M, seed=seed + 3)
    if arch == "jumprelu":
        t["threshold"] = _rand(M, seed=seed + 6).abs()
        t["threshold"][:3] = torch.tensor([0.0, -0.2, 0.0])  # θ ≤ 0 happens (dead or always-on latents)
    return t


def _write_saelens(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _saelens_cfg(arch: str, **over) -> dict:
    cfg = {
        "architecture": arch,
        "d_in": D,
        "d_sae": M,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_post",
        },
    }
    if arch == "topk":
        cfg |= {"k": K, "rescale_acts_by_decoder_norm": False}
    return cfg | over


def saelens_reference(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor):
    """SAELens 6's inference encode/decode (saes/{standard,topk,jumprelu,gated}_sae.py, sae.py
    process_sae_in), written out in float64; ``scaling_factor`` is SAELens 5's finetuning scale."""
    t = {k: v.double() for k, v in t.items()}
    x = x.double()
    arch = cfg.get("architecture", "standard")
    x_c = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    n = t["W_dec"].norm(dim=-1)
    rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    if arch == "gated":
        gate = (x_c @ t["W_enc"] + t["b_gate"] > 0).double()
        f = gate * F.relu(x_c @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = x_c @ t["W_enc"] + t["b_enc"]
        if arch == "jumprelu":
            f = F.relu(pre) * (pre > t["threshold"]).double()
        elif arch == "topk":
            f = _dense_topk(pre * n if rescale else pre, cfg["k"])
        else:
            f = F.relu(pre)
    f_dec = f / n if rescale else f
    if "scaling_factor" in t:
        f_dec = f_dec * t["scaling_factor"]
    return f, f_dec @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize(
    "arch,over",
    [
        ("standard", {}),
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {}),
        ("topk", {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
        ("jumprelu", {"apply_b_dec_to_input": False}),
        ("gated", {}),
        ("gated", {"apply_b_dec_to_input": False}),
    ],
)
def test_saelens_import_matches_its_forward(tmp_path, x, arch, over):
    cfg, t = _saelens_cfg(arch, **over), _saelens_tensors(arch)
    folder = _write_saelens(tmp_path / "sl", cfg, t)
    assert detect_format(folder) == "saelens"
    sae = saekit.load(folder)
    assert sae.arch == {"standard": "relu"}.get(arch, arch)
    f_ref, x_hat_ref = saelens_reference(cfg, t, x)
    _close(sae.encode(x), f_ref)
    _close(sae.decode(sae.encode(x)), x_hat_ref)
    assert sae.metadata["hook"] == "layers.3.resid_post"
    assert sae.metadata["model"] == {"name": "gpt2", "source": "gpt2"}
    assert sae.metadata["imported"]["foreign_hook"] == "blocks.3.hook_resid_post"


def test_saelens_pre_6_layout(tmp_path, x):
    """SAELens < 6: everything at the top level, hook_point, activation_fn_str 'topk' + kwargs, a finetuning
    scaling factor; the model name is a TransformerLens short name."""
    t = _saelens_tensors("topk") | {"scaling_factor": 1 + _rand(M, seed=7).abs()}
    cfg = {
        "d_in": D,
        "d_sae": M,
        "dtype": "float32",
        "hook_point": "blocks.1.hook_mlp_out",
        "model_name": "pythia-70m-deduped",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": True,
        "normalize_activations": False,
    }
    sae = saekit.load(_write_saelens(tmp_path / "old", cfg, t))
    f_ref, x_hat_ref = saelens_reference(cfg | {"architecture": "topk", "k": K}, t, x)
    assert sae.arch == "topk" and sae.cfg.k == K
    _close(sae.encode(x), f_ref)
    _close(sae.decode(sae.encode(x)), x_hat_ref)
    assert sae.metadata["hook"] == "layers.1.mlp_out"
    assert sae.metadata["model"]["source"] == "EleutherAI/pythia-70m-deduped"


@pytest.mark.parametrize(
    "over,match",
    [
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"normalize_activations": "constant_norm_rescale"}, "rescales every token"),
        ({"architecture": "transcoder"}, "architecture 'transcoder' has no saekit equivalent"),
        ({"hook_head_index": 2}, "hook_head_index=2"),
        ({"d_sae": 0}, "'d_sae' must be a positive integer"),
    ],
)
def test_saelens_unsupported_fields_are_named(tmp_path, over, match):
    folder = _write_saelens(tmp_path / "sl", _saelens_cfg("standard", **over), _saelens_tensors("standard"))
    with pytest.raises(FormatError, match=match):
        saekit.load(folder)


def test_saelens_wrong_shapes_and_missing_tensors(tmp_path):
    t = _saelens_tensors("jumprelu")
    with pytest.raises(FormatError, match=r"lacks tensors \['threshold'\]"):
        saekit.load(
            _write_saelens(
                tmp_path / "a", _saelens_cfg("jumprelu"), {k: v for k, v in t.items() if k != "threshold"}
            )
        )
    t["W_enc"] = t["W_enc"][:, :-1]
    with pytest.raises(FormatError, match=r"W_enc \(12, 39\) \(expected \(12, 40\)\)"):
        saekit.load(_write_saelens(tmp_path / "b", _saelens_cfg("jumprelu"), t))


def test_unknown_hook_is_kept_and_eval_asks_for_one(tmp_path):
    cfg = _saelens_cfg("standard")
    cfg["metadata"]["hook_name"] = "blocks.2.hook_resid_mid"
    sae = saekit.load(_write_saelens(tmp_path / "mid", cfg, _saelens_tensors("standard")))
    assert "hook" not in sae.metadata
    assert sae.metadata["imported"]["foreign_hook"] == "blocks.2.hook_resid_mid"
    assert any("pass --hook" in n for n in sae.metadata["imported"]["notes"])


def test_hook_z_saes_read_attn_z_both_ways(tmp_path, x):
    """SAELens hook_z SAEs flatten (…, n_heads, d_head) head-major: saekit's flat layers.{i}.attn_z."""
    cfg = _saelens_cfg("standard", reshape_activations="hook_z")
    cfg["metadata"]["hook_name"] = "blocks.2.attn.hook_z"
    sae = saekit.load(_write_saelens(tmp_path / "z", cfg, _saelens_tensors("standard")))
    assert sae.metadata["hook"] == "layers.2.attn_z"
    _close(sae.encode(x), saelens_reference(cfg, _saelens_tensors("standard"), x)[0])
    exported = json.loads((export_sae(sae, tmp_path / "back") / "cfg.json").read_text())
    assert exported["reshape_activations"] == "hook_z"
    assert exported["metadata"]["hook_name"] == "blocks.2.attn.hook_z"


# -- sparsify ---------------------------------------------------------------------------------------------
def _write_sparsify(
    run: Path, hookpoint: str = "layers.2", **cfg_over
) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = run / hookpoint
    folder.mkdir(parents=True)
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": M,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
    } | cfg_over
    (folder / "cfg.json").write_text(json.dumps(cfg))
    t = {
        "encoder.weight": _rand(M, D, seed=10),
        "encoder.bias": _rand(M, seed=11),
        "W_dec": _rand(M, D, seed=12),
        "b_dec": _rand(D, seed=13),
    }
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(folder / "sae.safetensors"))
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m", "ctx_len": 2048}))
    return folder, {k: v.to(torch.bfloat16) for k, v in t.items()}


def sparsify_reference(t: dict[str, torch.Tensor], k: int, x: torch.Tensor):
    """sparsify's SparseCoder.encode/decode (sparse_coder.py, fused_encoder.py) in float64, and its FVU."""
    t = {n: v.double() for n, v in t.items()}
    x = x.double()
    pre = F.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    x_hat = f @ t["W_dec"] + t["b_dec"]
    fvu = (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return f, x_hat, float(fvu)


def test_sparsify_import_matches_its_forward(tmp_path, x):
    from saekit.eval.metrics import fvu

    folder, t = _write_sparsify(tmp_path / "run")
    assert detect_format(folder) == "sparsify"
    sae = saekit.load(folder)
    f_ref, x_hat_ref, fvu_ref = sparsify_reference(t, K, x)
    assert sae.arch == "topk" and sae.cfg.k == K and sae.width == M
    _close(sae.encode(x), f_ref)
    x_hat = sae.decode(sae.encode(x))
    _close(x_hat, x_hat_ref)
    assert fvu(x, x_hat) == pytest.approx(fvu_ref, rel=1e-5)
    assert sae.metadata["hook"] == "layers.2.resid_post"
    assert sae.metadata["model"]["source"] == "EleutherAI/pythia-160m"


def test_sparsify_run_folder_lists_its_hookpoints_and_refuses_transcoders(tmp_path):
    _write_sparsify(tmp_path / "run", "layers.2")
    _write_sparsify(tmp_path / "run2", "layers.3", transcode=True)
    (tmp_path / "run" / "layers.4").mkdir()
    with pytest.raises(FormatError, match=r"holds no SAE itself but SAEs in subfolders .*: \S*layers\.2$"):
        saekit.load(tmp_path / "run")
    with pytest.raises(FormatError, match="transcode=True"):
        saekit.load(tmp_path / "run2" / "layers.3")


# -- dictionary_learning ------------------------------------------------------------------------------------
def _dl_state(cls: str) -> dict[str, torch.Tensor]:
    enc_w, enc_b = _rand(M, D, seed=20), _rand(M, seed=21)
    dec_w = _rand(D, M, seed=22) * torch.linspace(0.5, 2.0, M)  # nn.Linear(M, d): columns are the atoms
    if cls == "AutoEncoder":
        return {
            "bias": _rand(D, seed=23),
            "encoder.weight": enc_w,
            "encoder.bias": enc_b,
            "decoder.weight": dec_w,
        }
    if cls == "AutoEncoderNew":
        return {
            "encoder.weight": enc_w,
            "encoder.bias": enc_b,
            "decoder.weight": dec_w,
            "decoder.bias": _rand(D, seed=23),
        }
    if cls == "GatedAutoEncoder":
        return {
            "decoder_bias": _rand(D, seed=23),
            "encoder.weight": enc_w,
            "r_mag": _rand(M, seed=24),
            "gate_bias": _rand(M, seed=25),
            "mag_bias": _rand(M, seed=26),
            "decoder.weight": dec_w,
        }
    if cls == "JumpReluAutoEncoder":
        theta = _rand(M, seed=27).abs()
        return {
            "W_enc": enc_w.T.clone(),
            "b_enc": enc_b,
            "W_dec": dec_w.T.clone(),
            "b_dec": _rand(D, seed=23),
            "threshold": theta,
        }
    topk = {
        "k": torch.tensor(K, dtype=torch.int),
        "threshold": torch.tensor(0.15),
        "b_dec": _rand(D, seed=23),
    }
    if cls == "MatryoshkaBatchTopKSAE":
        return topk | {
            "group_sizes": torch.tensor([10, 30]),
            "W_enc": enc_w.T.clone(),
            "b_enc": enc_b,
            "W_dec": dec_w.T.clone(),
        }
    return topk | {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w}


def dictionary_learning_reference(cls: str, s: dict[str, torch.Tensor], x: torch.Tensor):
    """dictionary_learning 0.1.0's encode/decode per class (dictionary.py, trainers/*.py) in float64, after
    ``from_pretrained`` (AutoEncoder's rescales the decoder to unit columns: codes × column norms)."""
    s = {n: v.double() if v.is_floating_point() else v for n, v in s.items()}
    x = x.double()
    if cls == "AutoEncoder":
        f = F.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f * s["decoder.weight"].norm(dim=0), f @ s["decoder.weight"].T + s["bias"]
    if cls == "AutoEncoderNew":
        f = F.relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["decoder.bias"]
    if cls == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        f = (x_enc + s["gate_bias"] > 0).double() * F.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].T + s["decoder_bias"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = F.relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        post = F.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    post = F.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    if cls == "AutoEncoderTopK":
        vals, idx = post.topk(int(s["k"]), dim=-1)
        f = torch.zeros_like(post).scatter(-1, idx, vals)
    else:  # BatchTopKSAE.encode(use_threshold=True), its default
        f = post * (post > s["threshold"])
    return f, f @ s["decoder.weight"].T + s["b_dec"]


@pytest.mark.parametrize(
    "cls,arch",
    [
        ("AutoEncoder", "relu"),
        ("AutoEncoderNew", "relu"),
        ("GatedAutoEncoder", "gated"),
        ("JumpReluAutoEncoder", "jumprelu"),
        ("AutoEncoderTopK", "topk"),
        ("BatchTopKSAE", "batchtopk"),
        ("MatryoshkaBatchTopKSAE", "batchtopk"),
    ],
)
def test_dictionary_learning_import_matches_its_forward(tmp_path, x, cls, arch):
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    state = _dl_state(cls)
    torch.save(state, folder / "ae.pt")
    trainer = {
        "dict_class": cls,
        "layer": 3,
        "lm_name": "google/gemma-2-2b",
        "submodule_name": "resid_post_layer_3",
    }
    (folder / "config.json").write_text(
        json.dumps({"trainer": trainer, "buffer": {"io": "out", "ctx_len": 128}})
    )
    assert (
        detect_format(folder) == "dictionary_learning"
        and detect_format(folder / "ae.pt") == "dictionary_learning"
    )
    sae = saekit.load(folder)
    assert sae.arch == arch
    f_ref, x_hat_ref = dictionary_learning_reference(cls, state, x)
    _close(sae.encode(x), f_ref)
    _close(sae.decode(sae.encode(x)), x_hat_ref)
    assert sae.metadata["hook"] == "layers.3.resid_post"
    assert sae.metadata["model"]["source"] == "google/gemma-2-2b"


def test_dictionary_learning_without_config(tmp_path, x):
    """Classes are told apart by their tensors; top-k and batch top-k share them, so that is an error; a
    BatchTopK threshold never estimated (−1) makes dictionary_learning's encode a plain ReLU."""
    state = _dl_state("GatedAutoEncoder")
    torch.save(state, tmp_path / "gated.pt")
    _close(
        saekit.load(tmp_path / "gated.pt").encode(x),
        dictionary_learning_reference("GatedAutoEncoder", state, x)[0],
    )
    torch.save(_dl_state("AutoEncoderTopK"), tmp_path / "ae.pt")
    with pytest.raises(FormatError, match=r"could be any of \['AutoEncoderTopK', 'BatchTopKSAE'\]"):
        saekit.load(tmp_path)
    from saekit.formats import dictionary_learning

    state = _dl_state("BatchTopKSAE") | {"threshold": torch.tensor(-1.0)}
    torch.save(state, tmp_path / "ae.pt")
    sae = dictionary_learning.load(tmp_path, dict_class="BatchTopKSAE")
    assert sae.arch == "relu" and "never estimated" in sae.metadata["imported"]["notes"][0]
    _close(sae.encode(x), dictionary_learning_reference("BatchTopKSAE", state, x)[0])
    torch.save({"encoder.weight": torch.zeros(3, 2)}, tmp_path / "ae.pt")
    with pytest.raises(FormatError, match="match no dictionary_learning class"):
        saekit.load(tmp_path)
    (tmp_path / "ae.pt").write_bytes(b"not a torch file")
    with pytest.raises(FormatError, match="not a readable torch state dict"):
        saekit.load(tmp_path)


# -- Gemma Scope ---------------------------------------------------------------------------------------
def test_gemma_scope_npz_matches_its_forward(tmp_path, x):
    folder = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_7" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    p = {
        "W_enc": _rand(D, M, seed=30),
        "W_dec": _rand(M, D, seed=31),
        "b_enc": _rand(M, seed=32),
        "b_dec": _rand(D, seed=33),
        "threshold": _rand(M, seed=34).abs(),
    }
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in p.items()})
    sae = saekit.load(folder)
    pre = x.double() @ p["W_enc"].double() + p["b_enc"].double()  # the Gemma Scope tutorial's JumpReLU
    f_ref = (pre > p["threshold"].double()) * F.relu(pre)
    assert sae.arch == "jumprelu" and not sae.cfg.pre_enc_bias
    _close(sae.encode(x), f_ref)
    _close(sae.decode(sae.encode(x)), f_ref @ p["W_dec"].double() + p["b_dec"].double())
    assert sae.metadata["hook"] == "layers.7.mlp_out"
    assert sae.metadata["model"]["source"] == "google/gemma-2-2b"
    np.savez(tmp_path / "params.npz", W_enc=p["W_enc"].numpy())
    with pytest.raises(FormatError, match=r"lacks tensors \['W_dec', 'b_enc', 'b_dec', 'threshold'\]"):
        saekit.load(tmp_path / "params.npz")
    (tmp_path / "params.npz").write_bytes(b"garbage")
    with pytest.raises(FormatError, match="not a readable .npz"):
        saekit.load(tmp_path / "params.npz")


# -- export -----------------------------------------------------------------------------------------------
def _random_saekit(arch: str, **cfg) -> torch.nn.Module:
    cls = get_architecture(arch)
    sae = cls(cls.config_class.from_dict({"d_in": D, "width": M, **cfg}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if name == "log_threshold":
                p.copy_((torch.rand(p.shape, generator=g) * 0.5 + 0.05).log())
    sae.metadata = {
        "hook": "layers.2.attn_out",
        "model": {"name": "m", "source": "m"},
        "extract": {"context_len": 64},
    }
    return sae.eval()


EXPORTABLE = [
    ("relu", {}),
    ("relu", {"tied": True}),
    ("topk", {"k": K}),
    ("batchtopk", {"k": K}),
    ("matryoshka", {"k": K}),
    ("jumprelu", {}),
    ("jumprelu", {"pre_enc_bias": True}),
    ("gated", {}),
]


@pytest.mark.parametrize("arch,cfg", EXPORTABLE)
def test_export_to_saelens_and_back(tmp_path, x, arch, cfg):
    sae = _random_saekit(arch, **cfg)
    if arch in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.2)
    out = export_sae(sae, tmp_path / "exp")
    exported = json.loads((out / "cfg.json").read_text())
    from safetensors.torch import load_file

    f_ref, x_hat_ref = saelens_reference(exported, load_file(str(out / "sae_weights.safetensors")), x)
    _close(sae.encode(x), f_ref)
    _close(sae.decode(sae.encode(x)), x_hat_ref)
    assert exported["metadata"]["hook_name"] == "blocks.2.hook_attn_out"
    assert exported["metadata"]["context_size"] == 64
    back = saekit.load(out)
    _close(back.encode(x), sae.encode(x), tol=1e-6)
    _close(back.decode(back.encode(x)), sae.decode(sae.encode(x)), tol=1e-6)
    assert back.metadata["hook"] == "layers.2.attn_out"


def test_export_of_an_unestimated_batchtopk_is_topk_and_unsupported_archs_are_named(tmp_path, x):
    sae = _random_saekit("batchtopk", k=K)  # θ = −1: saekit encodes with per-token top-k
    out = export_sae(sae, tmp_path / "exp")
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "topk"
    _close(saekit.load(out).encode(x), sae.encode(x), tol=1e-6)
    with pytest.raises(FormatError, match="'switch' SAE has no SAELens equivalent"):
        export_sae(_random_saekit("switch", n_experts=4, k=4), tmp_path / "sw")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        export_sae(sae, tmp_path / "busy")


# -- detection, errors, hub --------------------------------------------------------------------------
def test_detection_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="SAE not found"):
        saekit.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no SAE found in .*ae.pt .*params.npz"):
        saekit.load(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "cfg.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(FormatError, match=r"matches no known SAE config.*\['foo'\]"):
        saekit.load(tmp_path / "odd")
    (tmp_path / "odd" / "cfg.json").write_text("{not json")
    with pytest.raises(FormatError, match="not readable JSON"):
        saekit.load(tmp_path / "odd")
    sl = _write_saelens(tmp_path / "sl", _saelens_cfg("standard"), _saelens_tensors("standard"))
    (sl / "sae_weights.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(FormatError, match="corrupt or not a safetensors file"):
        saekit.load(sl)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(FormatError, match="cannot read as an SAE"):
        saekit.load(tmp_path / "w.bin")


def test_saekit_only_loaders_point_at_import(tmp_path):
    """`saekit features`/`report`/`info` read saekit folders only; on a foreign folder they say what it is."""
    folder = _write_saelens(tmp_path / "sl", _saelens_cfg("standard"), _saelens_tensors("standard"))
    with pytest.raises(FileNotFoundError, match=r"SAELens SAE: .*`saekit import"):
        load_sae(folder)
    sp, _ = _write_sparsify(tmp_path / "run")
    with pytest.raises(ValueError, match=r"sparsify SAE: .*`saekit import"):
        load_sae(sp)


def test_hook_and_model_names():
    assert tl_hook_to_saekit("blocks.11.hook_resid_pre") == "layers.11.resid_pre"
    assert tl_hook_to_saekit("blocks.0.hook_resid_mid") is None
    assert tl_hook_to_saekit("blocks.5.attn.hook_z") == "layers.5.attn_z"
    assert saekit_hook_to_tl("layers.5.attn_z") == "blocks.5.attn.hook_z"
    assert saekit_hook_to_tl("layers.4.mlp_out") == "blocks.4.hook_mlp_out"
    assert saekit_hook_to_tl("model.layers.4.mlp") == "model.layers.4.mlp"
    assert module_to_saekit("layers.7") == "layers.7.resid_post"
    assert module_to_saekit("model.layers.7.self_attn") == "layers.7.attn_out"
    assert module_to_saekit("h.2.mlp") == "layers.2.mlp_out"
    assert module_to_saekit("embed_tokens") is None
    assert model_id("gemma-2-9b") == "google/gemma-2-9b" and model_id("gpt2") == "gpt2"


def test_hub_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        HubUnavailableError, match=r"hub could not be reached \(HF_HUB_OFFLINE is set\).*hf download"
    ):
        saekit.load("hf:someone/some-saes/layer_3")
    with pytest.raises(FormatError, match="not a hub SAE name"):
        saekit.load("hf:no-owner")
    # A repo already in the local cache loads offline.
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--some-saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _write_saelens(
        repo / "snapshots" / commit / "layer_3", _saelens_cfg("standard"), _saelens_tensors("standard")
    )
    assert saekit.load("hf:someone/some-saes/layer_3").metadata["hook"] == "layers.3.resid_post"
    with pytest.raises(FormatError, match="has no 'layer_9'"):
        saekit.load("hf:someone/some-saes/layer_9")


# -- CLI on a tiny model -----------------------------------------------------------------------------------
class _SAELensReference(torch.nn.Module):
    """SAELens' forward as an object the evaluation can run (it needs only encode, decode, parameters)."""

    def __init__(self, cfg: dict, t: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg_, self.t = cfg, t
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def encode(self, x):
        return saelens_reference(self.cfg_, self.t, x)[0]

    def decode(self, f):
        t = {k: v.double() for k, v in self.t.items()}
        n = t["W_dec"].norm(dim=-1) if self.cfg_.get("rescale_acts_by_decoder_norm") else 1.0
        return (f.double() / n) @ t["W_dec"] + t["b_dec"]


def test_cli_import_export_eval_features_on_a_tiny_model(tmp_path, capsys):
    """A SAELens TopK SAE at blocks.1.hook_resid_post of a tiny saved Llama: `saekit eval` reads it directly
    and reports what the evaluation of SAELens' own forward reports; `saekit import` makes a saekit folder
    that `features` reads; `saekit export` writes it back."""
    from saekit.jobs import EvalConfig, run_eval
    from saekit.models.tiny import byte_tokenizer, tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(n_layers=3, d_model=32).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(
        "\n".join(f"Line {i}: the quick brown fox {i * 7} jumps over the lazy dog." for i in range(200))
    )
    d = 32
    t = {
        "W_enc": _rand(d, 96, seed=40),
        "b_enc": _rand(96, seed=41) * 0.1,
        "W_dec": _rand(96, d, seed=42),
        "b_dec": _rand(d, seed=43) * 0.1,
    }
    cfg = _saelens_cfg("topk", d_in=d, d_sae=96, k=8, rescale_acts_by_decoder_norm=True)
    cfg["metadata"] |= {"model_name": str(model_dir), "hook_name": "blocks.1.hook_resid_post"}
    folder = _write_saelens(tmp_path / "sl", cfg, t)

    eval_json = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--text", str(text), "--tokens", "256", "--json", str(eval_json)]) == 0
    got = json.loads(eval_json.read_text())
    ref = run_eval(
        _SAELensReference(cfg, t),
        "layers.1.resid_post",
        EvalConfig(eval_tokens=256, eval_text=str(text)),
        model=str(model_dir),
        text="stdlib",
    )
    for key in ("l0", "fvu", "dead_fraction"):
        assert got["reconstruction"][key] == pytest.approx(ref.reconstruction[key], rel=1e-4, abs=1e-6), key
    assert got["reconstruction"]["l0"] == pytest.approx(8.0)
    for key in ("ce_loss_recovered", "kl_sae"):
        assert got["splice"][key] == pytest.approx(ref.splice[key], rel=1e-3, abs=1e-5), key

    imported = tmp_path / "imported"
    assert main(["import", str(folder), str(imported)]) == 0
    assert "hook: layers.1.resid_post" in capsys.readouterr().out
    assert load_sae(imported).metadata["imported"]["format"] == "saelens"
    assert main(["features", str(imported), "--text", str(text), "--tokens", "128", "--no-progress"]) == 0
    assert (imported / "features").is_dir()
    assert main(["export", str(imported), str(tmp_path / "back")]) == 0
    assert (
        json.loads((tmp_path / "back" / "cfg.json").read_text())["metadata"]["hook_name"]
        == cfg["metadata"]["hook_name"]
    )
    assert main(["import", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "SAE not found" in capsys.readouterr().err


# -- the real packages, in the benchmark environment ---------------------------------------------------------
PEER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    work = Path(sys.argv[1])
    x = torch.from_numpy(np.load(work / "x.npy"))
    out = {}
    from sae_lens import SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    # 1. saekit's exports, loaded by SAELens.
    for folder in sorted((work / "exported").iterdir()):
        sae = SAE.load_from_disk(folder)
        with torch.no_grad():
            f = sae.encode(x)
            out[f"exported/{folder.name}/f"] = f.numpy()
            out[f"exported/{folder.name}/x_hat"] = sae.decode(f).numpy()
    # 2. SAEs SAELens saves itself.
    torch.manual_seed(0)
    native = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D, d_sae=M, apply_b_dec_to_input=False)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=M, apply_b_dec_to_input=False)),
        "gated": GatedSAE(GatedSAEConfig(d_in=D, d_sae=M)),
    }
    for name, sae in native.items():
        sae.cfg.metadata = SAEMetadata(hook_name="blocks.2.hook_resid_post", model_name="gpt2")
        with torch.no_grad():
            for pname, p in sae.named_parameters():
                p.copy_(torch.randn_like(p) * 0.3)
                if pname == "threshold":
                    p.abs_()
            f = sae.encode(x)
            out[f"native/{name}/f"] = f.numpy()
            out[f"native/{name}/x_hat"] = sae.decode(f).numpy()
        sae.save_model(work / "native" / name)
    # 3. sparsify.
    from sparsify import SparseCoder, SparseCoderConfig
    coder = SparseCoder(D, SparseCoderConfig(k=K, num_latents=M))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        res = coder(x)
    dense = torch.zeros(x.shape[0], M).scatter(-1, res.latent_indices, res.latent_acts)
    out["sparsify/f"], out["sparsify/x_hat"] = dense.numpy(), res.sae_out.numpy()
    out["sparsify/fvu"] = np.array(float(res.fvu))
    coder.save_to_disk(work / "sparsify" / "layers.2")
    np.savez(work / "peer_out.npz", **out)
    """
)


@pytest.mark.skipif(not BENCH_PYTHON.exists(), reason="no .bench-venv (SAELens, sparsify) here; CI has none")
def test_round_trips_through_the_real_saelens_and_sparsify(tmp_path, x):
    """SAELens loads saekit's exports and computes what saekit computes; saekit loads what SAELens and
    sparsify save and computes what they compute (sparsify's own FVU included)."""
    from saekit.eval.metrics import fvu

    np.save(tmp_path / "x.npy", x.numpy())
    saes = {f"{arch}{i}": _random_saekit(arch, **cfg) for i, (arch, cfg) in enumerate(EXPORTABLE)}
    for name, sae in saes.items():
        if sae.arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.2)
        export_sae(sae, tmp_path / "exported" / name)
    script = tmp_path / "peer.py"
    script.write_text(f"D, M, K = {D}, {M}, {K}\n" + PEER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SPARSIFY_DISABLE_TRITON": "1"}
    proc = subprocess.run(
        [str(BENCH_PYTHON), str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peer = np.load(tmp_path / "peer_out.npz")
    for name, sae in saes.items():
        _close(torch.from_numpy(peer[f"exported/{name}/f"]), sae.encode(x))
        _close(torch.from_numpy(peer[f"exported/{name}/x_hat"]), sae.decode(sae.encode(x)))
    for name in ("standard", "topk", "jumprelu", "gated"):
        sae = saekit.load(tmp_path / "native" / name)
        assert sae.metadata["hook"] == "layers.2.resid_post"
        _close(sae.encode(x), torch.from_numpy(peer[f"native/{name}/f"]))
        _close(sae.decode(sae.encode(x)), torch.from_numpy(peer[f"native/{name}/x_hat"]))
    sae = saekit.load(tmp_path / "sparsify" / "layers.2")
    _close(sae.encode(x), torch.from_numpy(peer["sparsify/f"]))
    x_hat = sae.decode(sae.encode(x))
    _close(x_hat, torch.from_numpy(peer["sparsify/x_hat"]))
    assert fvu(x, x_hat) == pytest.approx(float(peer["sparsify/fvu"]), rel=1e-4)
    assert not math.isnan(fvu(x, x_hat))
