"""saprmarks/dictionary_learning's format: ``ae.pt`` (a torch state dict) + ``config.json`` beside it.

Read from dictionary_learning 0.1.0 (``dictionary.py``, ``trainers/{top_k,batch_top_k,
matryoshka_batch_top_k}.py``, ``training.py``). ``config.json`` is ``{"trainer": {dict_class, activation_dim,
dict_size, k, layer, lm_name, submodule_name, …}, "buffer": {io, ctx_len, …}}``. Training normalisation is
folded into the saved biases (``scale_biases``), so ``ae.pt`` takes raw activations. Per ``dict_class``:

=======================  ====================================================  =====================
dict_class               encode (x̂ = decode(f))                                saekit
=======================  ====================================================  =====================
AutoEncoder              ReLU(enc(x − bias)); x̂ = dec(f) + bias                  relu (decoder normalised,
                                                                               as its from_pretrained)
AutoEncoderNew           ReLU(enc(x)); x̂ = dec(f) (decoder has a bias)           relu (b_dec absorbed)
GatedAutoEncoder         1[π_g > 0]·ReLU(π_m), x_enc = enc(x − decoder_bias)     gated
JumpReluAutoEncoder      ReLU(π·1[π > θ]), π = x W_enc + b_enc (no b_dec)        jumprelu
AutoEncoderTopK          TopK_k(ReLU(enc(x − b_dec))) (threshold unused)         topk
BatchTopKSAE             ReLU(π)·1[ReLU(π) > θ] (θ scalar)                       batchtopk; relu if θ < 0
MatryoshkaBatchTopKSAE   as BatchTopKSAE, W_enc/W_dec as parameters              batchtopk; relu if θ < 0
=======================  ====================================================  =====================

``enc``/``dec`` are ``nn.Linear`` (weights (M, d) and (d, M)). AutoEncoderTopK and BatchTopKSAE have the
same tensors, so without ``config.json`` (or ``dict_class=``) such a file is refused rather than guessed.
AutoEncoder's ``from_pretrained`` rescales the decoder columns to unit norm (and the encoder rows and bias
inversely) by default; saekit does the same, so codes equal those its loader gives. The hook point comes from
``submodule_name`` (``resid_post_layer_3``, ``mlp_out_layer_3``, ``attn_out_layer_3``) or, failing that, the
block output of ``layer`` (as SAELens' loader assumes).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from saekit.sae.base import SAE

from .common import (
    FormatError,
    absorb_input_bias,
    as_f64,
    build_sae,
    check_shapes,
    fold_decoder_norms,
    imported_metadata,
    log_threshold,
    model_id,
    read_json,
)

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
_KEYS = {
    "AutoEncoder": {"bias", "encoder.weight", "encoder.bias", "decoder.weight"},
    "AutoEncoderNew": {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"},
    "GatedAutoEncoder": {
        "decoder_bias",
        "encoder.weight",
        "r_mag",
        "gate_bias",
        "mag_bias",
        "decoder.weight",
    },
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "AutoEncoderTopK": {"k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"},
    "BatchTopKSAE": {"k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight", "b_dec"},
    "MatryoshkaBatchTopKSAE": {"k", "threshold", "group_sizes", "W_enc", "b_enc", "W_dec", "b_dec"},
}
_SUBMODULE_RE = re.compile(r"(resid_post|resid_pre|mlp_out|attn_out|mlp|attn)")
_KIND = {"mlp": "mlp_out", "attn": "attn_out"}


def _paths(path: Path) -> tuple[Path, Path]:
    """(ae.pt, config.json) for a folder or the ae.pt file itself."""
    if path.is_dir():
        return path / WEIGHTS_FILE, path / CONFIG_FILE
    return path, path.parent / CONFIG_FILE


def _dict_class(
    state: dict[str, torch.Tensor], trainer: dict[str, Any], given: str | None, where: Path
) -> str:
    """The dictionary class: given, else the config's, else the one class whose tensors match."""
    name = given or trainer.get("dict_class")
    keys = set(state)
    if name is not None:
        if name not in _KEYS:
            raise FormatError(
                f"{where}: dictionary_learning class {name!r} is not supported ({sorted(_KEYS)})"
            )
        if keys != _KEYS[name]:
            raise FormatError(
                f"{where}: tensors {sorted(keys)} do not match {name} (expects {sorted(_KEYS[name])})"
            )
        return name
    matches = [n for n, want in _KEYS.items() if keys == want]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise FormatError(
            f"{where} could be any of {matches} (same tensors, different encoders) and no {CONFIG_FILE} "
            'beside it names the class: add one holding {"trainer": {"dict_class": ...}}, or pass '
            "dict_class="
        )
    raise FormatError(f"{where}: tensors {sorted(keys)} match no dictionary_learning class {sorted(_KEYS)}")


def _hook(trainer: dict[str, Any], buffer: dict[str, Any]) -> tuple[str | None, str | None]:
    """(saekit hook point, the foreign description) from the trainer's layer and submodule name."""
    layer, sub = trainer.get("layer"), trainer.get("submodule_name")
    if not isinstance(layer, int):
        return None, sub
    m = _SUBMODULE_RE.search(sub or "")
    if m:
        kind = _KIND.get(m.group(1), m.group(1))
    else:
        kind = "resid_pre" if buffer.get("io") == "in" else "resid_post"
    return f"layers.{layer}.{kind}", sub or f"layer {layer} ({buffer.get('io', 'out')})"


def load(path: str | Path, dict_class: str | None = None) -> SAE:
    """A saekit SAE computing what dictionary_learning's ``<dict_class>.from_pretrained(ae.pt)`` computes."""
    weights, config_path = _paths(Path(path))
    if not weights.is_file():
        raise FormatError(f"missing weights file {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zips, non-tensor objects: all mean "not a state dict"
        raise FormatError(f"{weights} is not a readable torch state dict: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{weights} must hold a state dict of tensors (dictionary_learning's ae.pt)")
    config = read_json(config_path) if config_path.is_file() else {}
    trainer, buffer = config.get("trainer") or {}, config.get("buffer") or {}
    cls = _dict_class(state, trainer, dict_class, weights)
    t = as_f64(state)
    notes: list[str] = []

    if "encoder.weight" in t:
        W_enc, W_dec = t["encoder.weight"].t().contiguous(), t["decoder.weight"].t().contiguous()
    else:
        W_enc, W_dec = t["W_enc"], t["W_dec"]
    d, m = W_enc.shape
    d_sized = ("bias", "b_dec", "decoder_bias", "decoder.bias")
    vec = {n: (v, (d,) if n in d_sized else (m,)) for n, v in t.items() if v.ndim == 1 and n != "group_sizes"}
    check_shapes({"W_dec": (W_dec, (m, d)), **vec}, weights)

    if cls == "AutoEncoder":
        W_enc, b_enc, W_dec = fold_decoder_norms(W_enc, t["encoder.bias"], W_dec)
        notes.append("decoder normalised to unit rows, as AutoEncoder.from_pretrained does by default")
        arch, cfg, tensors = "relu", {}, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": t["bias"]}
    elif cls == "AutoEncoderNew":
        b_dec = t["decoder.bias"]
        b_enc = absorb_input_bias(t["encoder.bias"], W_enc, b_dec)
        arch, cfg = "relu", {"decoder_norm": "weighted"}
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    elif cls == "GatedAutoEncoder":
        arch, cfg = "gated", {}
        tensors = {
            "W_enc": W_enc,
            "b_gate": t["gate_bias"],
            "r_mag": t["r_mag"],
            "b_mag": t["mag_bias"],
            "W_dec": W_dec,
            "b_dec": t["decoder_bias"],
        }
    elif cls == "JumpReluAutoEncoder":
        arch, cfg = "jumprelu", {"pre_enc_bias": False}
        tensors = {
            "W_enc": W_enc,
            "b_enc": t["b_enc"],
            "log_threshold": log_threshold(t["threshold"]),
            "W_dec": W_dec,
            "b_dec": t["b_dec"],
        }
    else:  # the top-k family
        b_enc = t["encoder.bias"] if "encoder.bias" in t else t["b_enc"]
        k = int(t["k"])
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": t["b_dec"]}
        theta = float(t["threshold"])
        if cls == "AutoEncoderTopK":
            arch, cfg = "topk", {"k": k}
        elif theta >= 0:
            arch, cfg = "batchtopk", {"k": k}
            tensors["threshold"] = torch.tensor(theta)
        else:
            arch, cfg = "relu", {"decoder_norm": "weighted"}
            notes.append(f"{cls} threshold {theta} was never estimated: its encode is then a plain ReLU")
    hook, foreign_hook = _hook(trainer, buffer)
    extra = {"dict_class": cls}
    if "ctx_len" in buffer:
        extra["ctx_len"] = buffer["ctx_len"]
    meta = imported_metadata(
        "dictionary_learning",
        weights,
        hook=hook,
        model=model_id(trainer.get("lm_name")),
        foreign_hook=foreign_hook,
        notes=notes,
        extra=extra,
    )
    return build_sae(arch, {"d_in": d, "width": m, **cfg}, tensors, meta)
