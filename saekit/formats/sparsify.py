"""EleutherAI sparsify's format: one folder per hookpoint holding ``cfg.json`` + ``sae.safetensors``.

Read from sparsify's ``sparse_coder.py`` / ``fused_encoder.py`` (1.x) and ``config.py``:

* ``cfg.json`` is ``SparseCoderConfig`` plus ``d_in``: ``{activation, expansion_factor, normalize_decoder,
  num_latents, k, multi_topk, skip_connection, transcode, d_in}`` (num_latents 0 → d_in · expansion_factor);
* ``sae.safetensors`` holds ``encoder.weight`` (M, d), ``encoder.bias`` (M,), ``W_dec`` (M, d), ``b_dec`` (d,)
  and, with a skip connection, ``W_skip`` (d, d);
* encode: ``top_k(ReLU((x − b_dec) encoder.weightᵀ + encoder.bias))``; decode: Σ acts · W_dec[idx] + b_dec.

That is saekit's ``topk`` exactly (ReLU then top-k keeps the same values as top-k then ReLU), with
``W_enc = encoder.weightᵀ``. Transcoders (``transcode``: the target is another activation), skip connections,
``groupmax`` activations and signed top-k have no saekit equivalent and are refused by name.

The file names collide with saekit's own (``cfg.json`` + ``sae.safetensors``): a saekit cfg.json has ``arch``
and ``config``; sparsify's has ``d_in`` and ``k`` at the top. The hookpoint is the folder's name, a module
path relative to the model's ``base_model`` (``layers.5`` = the residual stream leaving block 5); the run
folder above it holds the training ``config.json`` with the model's hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.sae.base import SAE

from .common import (
    FormatError,
    as_f64,
    build_sae,
    check_shapes,
    imported_metadata,
    model_id,
    module_to_saekit,
    read_json,
    read_safetensors,
    require,
)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG = "config.json"


def is_sparsify_cfg(cfg: dict[str, Any]) -> bool:
    """A cfg.json written by sparsify's ``save_to_disk``: ``d_in`` and ``k`` at the top, no saekit keys."""
    return "d_in" in cfg and "k" in cfg and ("expansion_factor" in cfg or "num_latents" in cfg)


def load(path: str | Path) -> SAE:
    """A saekit ``topk`` SAE computing what sparsify's ``SparseCoder.load_from_disk(path)`` computes."""
    path = Path(path)
    cfg = read_json(path / CFG_FILE)
    if not is_sparsify_cfg(cfg):
        raise FormatError(f"{path / CFG_FILE} is not a sparsify config (needs d_in, k, expansion_factor)")
    for key, bad in (
        ("transcode", "a transcoder (predicts another activation than it reads)"),
        ("skip_connection", "a skip connection W_skip"),
        ("signed", "signed top-k"),
    ):
        if cfg.get(key):
            raise FormatError(f"{path}: sparsify {key}=True ({bad}) has no saekit equivalent")
    if cfg.get("activation", "topk") != "topk":
        raise FormatError(f"{path}: sparsify activation {cfg['activation']!r} is not supported (only 'topk')")
    d, k = cfg["d_in"], cfg["k"]
    m = cfg.get("num_latents") or d * cfg.get("expansion_factor", 0)
    if not all(isinstance(v, int) and v > 0 for v in (d, k, m)):
        raise FormatError(f"{path / CFG_FILE}: d_in, k and the latent count must be positive integers")

    weights = path / WEIGHTS_FILE
    t = as_f64(read_safetensors(weights))
    names = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"]
    require(t, names, weights)
    if "W_skip" in t:
        raise FormatError(f"{weights} holds a skip connection W_skip, which has no saekit equivalent")
    check_shapes(
        {
            "encoder.weight": (t["encoder.weight"], (m, d)),
            "encoder.bias": (t["encoder.bias"], (m,)),
            "W_dec": (t["W_dec"], (m, d)),
            "b_dec": (t["b_dec"], (d,)),
        },
        weights,
    )
    tensors = {
        "W_enc": t["encoder.weight"].t().contiguous(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    run_cfg_path = path.parent / RUN_CONFIG
    run_cfg = read_json(run_cfg_path) if run_cfg_path.is_file() else {}
    hookpoint = path.name
    hook = module_to_saekit(hookpoint)
    notes = [] if hook else [f"hookpoint {hookpoint!r} has no saekit hook point: pass --hook"]
    extra = {"ctx_len": run_cfg["ctx_len"]} if "ctx_len" in run_cfg else {}
    meta = imported_metadata(
        "sparsify",
        path,
        hook=hook,
        model=model_id(run_cfg.get("model")),
        foreign_hook=hookpoint,
        notes=notes,
        extra=extra,
    )
    return build_sae("topk", {"d_in": d, "width": m, "k": k}, tensors, meta)
