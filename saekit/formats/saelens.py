"""SAELens' folder format, both ways: ``cfg.json`` + ``sae_weights.safetensors``.

Read from SAELens' own code (sae_lens 6.x, ``saes/{standard,topk,jumprelu,gated}_sae.py`` and
``loading/pretrained_sae_loaders.py``). Every inference architecture computes, with
``x_c = x − b_dec·[apply_b_dec_to_input]``:

* ``standard``: f = ReLU(x_c W_enc + b_enc)                                → saekit ``relu``
* ``topk``:     π = x_c W_enc + b_enc (× ‖W_dec,i‖ if ``rescale_acts_by_decoder_norm``), f = ReLU(TopK_k(π)),
  x̂ = (f / ‖W_dec,i‖ if rescaled) W_dec + b_dec                            → saekit ``topk``
* ``jumprelu``: π = x_c W_enc + b_enc, f = ReLU(π)·1[π > θ]                 → saekit ``jumprelu``
  (SAELens saves its BatchTopK SAEs this way, with one θ for every latent)
* ``gated``:    π_g = x_c W_enc + b_gate, π_m = x_c (W_enc·exp r_mag) + b_mag, f = 1[π_g > 0]·ReLU(π_m)
                                                                            → saekit ``gated``
* x̂ = f W_dec + b_dec for all of them.

Config: SAELens 6 keeps ``d_in``, ``d_sae``, ``architecture``, ``apply_b_dec_to_input``,
``normalize_activations`` (and ``k`` …) at the top and the model/hook under ``metadata``; older files (no
``metadata.sae_lens_version`` ≥ 6) keep everything at the top, name the hook ``hook_point`` and mark TopK with
``activation_fn_str: "topk"`` + ``activation_fn_kwargs.k``. Both are read.

SAEs on ``blocks.{i}.attn.hook_z`` (``reshape_activations: hook_z``: SAELens flattens (…, n_heads, d_head)
head-major) read saekit's ``layers.{i}.attn_z``, the same flat vector.

Not representable (a clear error): ``normalize_activations`` ``constant_norm_rescale`` or ``layer_norm``
(a per-token rescaling of input and output that no saekit SAE has), ``hook_head_index`` (an SAE on one
head), and the other architectures
(transcoders, matching pursuit, temporal, abs-top-k). ``expected_average_only_in`` and
``covariance_whitening`` are read as SAELens' inference does (no runtime transform: its loader folds a
known scaling factor or whitening before saving), with a note in the metadata.

Export writes SAELens 6's layout; saekit SAEs take raw activations (any training normalisation is folded in
at save time), so ``normalize_activations`` is ``"none"``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
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
    module_to_saekit,
    read_json,
    read_safetensors,
    require,
    saekit_hook_to_tl,
    tl_hook_to_saekit,
    unit_rows,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: SAELens reads configs without it (or older) as pre-6 layouts."""
SUPPORTED = ("standard", "topk", "jumprelu", "gated")
_TENSORS = {
    "standard": ["W_enc", "b_enc", "W_dec", "b_dec"],
    "topk": ["W_enc", "b_enc", "W_dec", "b_dec"],
    "jumprelu": ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"],
    "gated": ["W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"],
}
_LEGACY_KEYS = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
_IDENTITY_NORMS = {None: None, False: None, "none": None}
_NOOP_NORMS = ("expected_average_only_in", "covariance_whitening", True)


def is_saelens_cfg(cfg: dict[str, Any]) -> bool:
    """A cfg.json that SAELens wrote (any version): it names ``d_sae`` or an ``architecture``/hook."""
    return "d_sae" in cfg or "architecture" in cfg or "hook_point" in cfg or "hook_name" in cfg


def _flatten_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """One dict with the keys of both layouts: legacy names renamed, ``metadata`` merged over the top."""
    flat = {_LEGACY_KEYS.get(k, k): v for k, v in cfg.items() if k != "metadata"}
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise FormatError(f"SAELens cfg 'metadata' must be an object, found {type(meta).__name__}")
    flat.update({_LEGACY_KEYS.get(k, k): v for k, v in meta.items()})
    return flat


def _architecture(flat: dict[str, Any]) -> tuple[str, int | None]:
    """(architecture, k) from either layout."""
    act = flat.get("activation_fn", flat.get("activation_fn_str", "relu"))
    kwargs = flat.get("activation_fn_kwargs") or {}
    arch = flat.get("architecture") or ("topk" if act == "topk" else "standard")
    if arch == "standard" and act not in ("relu", None, "topk"):
        raise FormatError(f"SAELens activation_fn {act!r} is not supported (saekit reads 'relu' and 'topk')")
    k = flat.get("k", kwargs.get("k"))
    if act == "topk" and arch == "standard":
        arch = "topk"
    if kwargs.get("signed"):
        raise FormatError("SAELens activation_fn_kwargs.signed=True (signed top-k) has no saekit equivalent")
    return arch, k


def _check_supported(flat: dict[str, Any], path: Path) -> list[str]:
    """FormatError for run-time transforms saekit cannot represent; notes for the ones read as no-ops."""
    notes: list[str] = []
    norm = flat.get("normalize_activations")
    if norm in _NOOP_NORMS:
        notes.append(
            f"normalize_activations={norm!r}: SAELens applies no transform at inference for it (its "
            "pretrained loader folds a known scaling factor first); imported as given"
        )
        warnings.warn(f"{path}: {notes[-1]}", stacklevel=3)
    elif norm not in _IDENTITY_NORMS:
        raise FormatError(
            f"{path}: normalize_activations={norm!r} rescales every token at run time; no saekit SAE can "
            "represent it (supported: 'none', 'expected_average_only_in', 'covariance_whitening')"
        )
    if flat.get("reshape_activations", "none") not in ("none", "hook_z", None):
        raise FormatError(f"{path}: reshape_activations={flat['reshape_activations']!r} is not supported")
    if flat.get("hook_head_index") is not None:
        raise FormatError(
            f"{path}: hook_head_index={flat['hook_head_index']} (an SAE on one attention head) is not "
            "supported: saekit's attn_z hook point holds every head"
        )
    return notes


def _read_tensors(weights: Path, arch: str, d: int, m: int, notes: list[str]) -> dict[str, torch.Tensor]:
    """The SAE's tensors in float64, names and shapes checked, SAELens 5's finetuning scale folded."""
    t = as_f64(read_safetensors(weights))
    names = _TENSORS[arch]
    require(t, names, weights)
    shape = {"W_enc": (d, m), "W_dec": (m, d), "b_dec": (d,)}
    check_shapes({n: (t[n], shape.get(n, (m,))) for n in names}, weights)
    scale = t.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        # SAELens < 6 decoded (f ⊙ s) W_dec: the same as decoding f with diag(s) W_dec.
        t["W_dec"] = t["W_dec"] * scale[:, None]
        notes.append("finetuning scaling factor folded into W_dec")
    unused = sorted(set(t) - set(names))
    if unused:
        raise FormatError(f"{weights}: unexpected tensors {unused} for SAELens architecture {arch!r}")
    return t


def load(path: str | Path) -> SAE:
    """A saekit SAE computing what SAELens computes for the SAE folder ``path``."""
    path = Path(path)
    flat = _flatten_cfg(read_json(path / CFG_FILE))
    for key in ("d_in", "d_sae"):
        if not isinstance(flat.get(key), int) or flat[key] <= 0:
            raise FormatError(f"{path / CFG_FILE}: {key!r} must be a positive integer, got {flat.get(key)!r}")
    d, m = flat["d_in"], flat["d_sae"]
    arch, k = _architecture(flat)
    if arch not in SUPPORTED:
        raise FormatError(
            f"{path}: SAELens architecture {arch!r} has no saekit equivalent "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    notes = _check_supported(flat, path)
    t = _read_tensors(path / WEIGHTS_FILE, arch, d, m, notes)

    apply_b_dec = bool(flat.get("apply_b_dec_to_input", True))
    W_enc, W_dec, b_dec = t["W_enc"], t["W_dec"], t["b_dec"]
    if arch == "gated":
        shift = 0.0 if apply_b_dec else b_dec @ W_enc
        b_gate, b_mag = t["b_gate"] + shift, t["b_mag"] + shift * t["r_mag"].exp()
        tensors = {"W_enc": W_enc, "b_gate": b_gate, "r_mag": t["r_mag"], "b_mag": b_mag}
        sae_arch, config = "gated", {}
    elif arch == "jumprelu":
        tensors = {"W_enc": W_enc, "b_enc": t["b_enc"], "log_threshold": log_threshold(t["threshold"])}
        sae_arch, config = "jumprelu", {"pre_enc_bias": apply_b_dec}
    else:
        b_enc = t["b_enc"] if apply_b_dec else absorb_input_bias(t["b_enc"], W_enc, b_dec)
        if arch == "topk" and flat.get("rescale_acts_by_decoder_norm"):
            W_enc, b_enc, W_dec = fold_decoder_norms(W_enc, b_enc, W_dec)
            notes.append(
                "rescale_acts_by_decoder_norm folded in: unit decoder rows, codes as SAELens reports"
            )
        tensors = {"W_enc": W_enc, "b_enc": b_enc}
        if arch == "topk":
            if not isinstance(k, int) or not 0 < k <= m:
                raise FormatError(f"{path}: TopK SAE needs an integer k in [1, {m}], got {k!r}")
            sae_arch, config = "topk", {"k": k}
        else:
            sae_arch, config = "relu", {"decoder_norm": "constrained" if unit_rows(W_dec) else "weighted"}
    tensors |= {"W_dec": W_dec, "b_dec": b_dec}
    if not apply_b_dec and arch != "jumprelu":
        notes.append("apply_b_dec_to_input=False: b_dec W_enc absorbed into the encoder bias")

    foreign_hook = flat.get("hook_name")
    hook = tl_hook_to_saekit(foreign_hook) or module_to_saekit(flat.get("hf_hook_name"))
    if hook is None and foreign_hook:
        notes.append(f"hook {foreign_hook!r} has no saekit hook point: pass --hook")
    extra = {"sae_lens_architecture": arch} | {
        key: flat[key] for key in ("dtype", "context_size") if key in flat
    }
    meta = imported_metadata(
        "saelens",
        path,
        hook=hook,
        model=model_id(flat.get("model_name")),
        foreign_hook=foreign_hook,
        notes=notes,
        extra=extra,
    )
    return build_sae(sae_arch, {"d_in": d, "width": m, **config}, tensors, meta)


# -- export ------------------------------------------------------------------------------------------------
def saelens_state(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the architecture part of cfg.json, the tensors) of the SAELens SAE computing what ``sae`` computes.

    relu → standard; topk → topk; jumprelu → jumprelu; gated → gated; batchtopk and matryoshka (full width)
    → jumprelu with their inference threshold θ on every latent (SAELens' own BatchTopK export), or → topk
    while θ is not estimated yet (saekit then encodes with per-token top-k)."""
    arch = sae.arch
    p = {n: v.detach().to("cpu", torch.float32).contiguous() for n, v in sae.state_dict().items()}
    m = sae.width
    if arch == "relu":
        W_enc = sae.W_enc.detach().to("cpu", torch.float32).contiguous()  # tied SAEs derive it
        return {"architecture": "standard", "apply_b_dec_to_input": True}, {
            "W_enc": W_enc,
            "b_enc": p["b_enc"],
            "W_dec": p["W_dec"],
            "b_dec": p["b_dec"],
        }
    base = {"W_enc": p["W_enc"], "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
    if arch == "topk" or (arch in ("batchtopk", "matryoshka") and float(p["threshold"]) < 0):
        cfg = {"architecture": "topk", "apply_b_dec_to_input": True, "k": int(sae.cfg.k)}
        return cfg | {"rescale_acts_by_decoder_norm": False}, base | {"b_enc": p["b_enc"]}
    if arch in ("batchtopk", "matryoshka"):
        theta = torch.full((m,), float(p["threshold"]), dtype=torch.float32)
        return {"architecture": "jumprelu", "apply_b_dec_to_input": True}, base | {
            "b_enc": p["b_enc"],
            "threshold": theta,
        }
    if arch == "jumprelu":
        return {"architecture": "jumprelu", "apply_b_dec_to_input": bool(sae.cfg.pre_enc_bias)}, base | {
            "b_enc": p["b_enc"],
            "threshold": p["log_threshold"].exp(),
        }
    if arch == "gated":
        return {"architecture": "gated", "apply_b_dec_to_input": True}, base | {
            "b_gate": p["b_gate"],
            "b_mag": p["b_mag"],
            "r_mag": p["r_mag"],
        }
    raise FormatError(
        f"a saekit {arch!r} SAE has no SAELens equivalent; exportable: relu, topk, batchtopk, matryoshka, "
        "jumprelu, gated"
    )


def export(sae: SAE, out: str | Path) -> Path:
    """Write ``sae`` to the folder ``out`` as a SAELens SAE (``SAE.load_from_disk(out)`` reads it) and
    return ``out``. An existing folder is replaced only if it holds nothing but a SAELens SAE's files."""
    from safetensors.torch import save_file

    from saekit import __version__

    arch_cfg, tensors = saelens_state(sae)
    meta = dict(getattr(sae, "metadata", {}) or {})
    hook = meta.get("hook")
    model = (meta.get("model") or {}).get("source") or (meta.get("model") or {}).get("name")
    extract = meta.get("extract") or {}
    cfg = {
        "d_in": sae.d_in,
        "d_sae": sae.width,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        # SAELens flattens hook_z's (…, n_heads, d_head) itself; saekit's attn_z is already flat.
        "reshape_activations": "hook_z" if hook and hook.endswith(".attn_z") else "none",
        **arch_cfg,
        "metadata": {
            "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": FORMAT_VERSION,
            "model_name": model,
            "hook_name": saekit_hook_to_tl(hook) if hook else None,
            "hook_head_index": None,
            "context_size": extract.get("context_len"),
            "prepend_bos": True,
            "exported_by": f"saekit {__version__}",
            "saekit_arch": sae.arch,
            "saekit_hook": hook,
        },
    }
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"cannot export to {out}: it exists and is not a folder")
        extra = sorted(p.name for p in out.iterdir() if p.name not in (CFG_FILE, WEIGHTS_FILE))
        if extra:
            raise FileExistsError(
                f"refusing to replace {out}: it holds files other than a SAELens SAE's: {extra}"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2, allow_nan=False) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
