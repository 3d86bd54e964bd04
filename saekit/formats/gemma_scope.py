"""Gemma Scope's ``params.npz`` (Lieberum et al. 2024; google/gemma-scope-* on the Hugging Face hub).

The file holds ``W_enc`` (d, M), ``W_dec`` (M, d), ``b_enc`` (M,), ``b_dec`` (d,) and ``threshold`` (M,);
the JumpReLU of the Gemma Scope tutorial computes π = x W_enc + b_enc (no b_dec subtraction),
f = 1[π > θ]·ReLU(π), x̂ = f W_dec + b_dec: saekit's ``jumprelu`` with ``pre_enc_bias=False``. Lower-case
``w_enc``/``w_dec`` keys (some releases) are read too, as SAELens' loader does.

The file says nothing about its model or hook point; the hub layout does
(``google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz``), and a downloaded file keeps
it in its path, so both are read from there when present: ``-res`` → ``layers.{i}.resid_post``, ``-mlp`` →
``layers.{i}.mlp_out``, ``-att`` (trained on ``hook_z``, the concatenated per-head outputs) →
``layers.{i}.attn_z``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from saekit.sae.base import SAE

from .common import FormatError, as_f64, build_sae, check_shapes, imported_metadata, log_threshold, require

WEIGHTS_FILE = "params.npz"
_REPO_RE = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)")
_LAYER_RE = re.compile(r"layer_(\d+)")
_KIND = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}


def _hook_and_model(path: Path) -> tuple[str | None, str | None, str | None]:
    """(saekit hook, model id, the foreign description) from a hub-shaped path, where it has one."""
    text = path.as_posix()
    repo, layer = _REPO_RE.search(text), _LAYER_RE.search(text)
    if repo is None:
        return None, None, None
    size, variant, kind = repo.groups()
    model = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
    described = f"{repo.group(0)} layer {layer.group(1)}" if layer else repo.group(0)
    if layer is None or kind not in _KIND:
        return None, model, described
    return f"layers.{layer.group(1)}.{_KIND[kind]}", model, described


def load(path: str | Path) -> SAE:
    """A saekit ``jumprelu`` SAE computing the Gemma Scope JumpReLU in ``params.npz`` (file or folder)."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FormatError(f"missing weights file {weights}")
    try:
        with np.load(weights, allow_pickle=False) as data:
            raw = {
                (f"W_{k[2:]}" if k.startswith("w_") else k): torch.from_numpy(data[k].copy()) for k in data
            }
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FormatError(f"{weights} is not a readable .npz file: {e}") from e
    t = as_f64(raw)
    names = ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]
    require(t, names, weights)
    d, m = t["W_enc"].shape if t["W_enc"].ndim == 2 else (0, 0)
    check_shapes(
        {
            "W_enc": (t["W_enc"], (d, m)),
            "W_dec": (t["W_dec"], (m, d)),
            "b_enc": (t["b_enc"], (m,)),
            "b_dec": (t["b_dec"], (d,)),
            "threshold": (t["threshold"], (m,)),
        },
        weights,
    )
    if d == 0 or m == 0:
        raise FormatError(
            f"{weights}: W_enc must be a non-empty (d, M) matrix, got {tuple(t['W_enc'].shape)}"
        )
    tensors = {
        "W_enc": t["W_enc"],
        "b_enc": t["b_enc"],
        "log_threshold": log_threshold(t["threshold"]),
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    hook, model, described = _hook_and_model(weights.absolute())  # not resolve(): hub files are symlinks
    notes = [] if hook else ["hook point unknown (not a gemma-scope-*-res/-mlp/-att hub path): pass --hook"]
    meta = imported_metadata(
        "gemma_scope", weights, hook=hook, model=model, foreign_hook=described, notes=notes
    )
    return build_sae("jumprelu", {"d_in": d, "width": m, "pre_enc_bias": False}, tensors, meta)
