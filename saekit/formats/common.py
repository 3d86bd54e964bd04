"""What every foreign-format module shares: the error type, hook-point and model-name translation, the
algebra that folds a foreign parameterisation into a saekit architecture, and building the saekit SAE.

Folding happens in float64 and the result is stored in float32 (saekit's parameter dtype), so an imported
SAE computes in float32 whatever dtype the foreign file held; a bfloat16 file's outputs therefore agree
with its library's float32 computation, and with its bfloat16 computation to bfloat16 precision.

Two facts make most foreign SAEs exact saekit SAEs without any new option:

* saekit's ReLU, TopK, BatchTopK and Gated encoders subtract ``b_dec`` before ``W_enc``. A foreign encoder
  that does not is the same function with ``b_enc' = b_enc + b_dec W_enc`` (:func:`absorb_input_bias`).
* A foreign SAE that multiplies pre-activations by the decoder-row norms n and divides the code by n again
  before decoding (SAELens' ``rescale_acts_by_decoder_norm``) is the same function with ``W_enc' = W_enc
  diag(n)``, ``b_enc' = b_enc ⊙ n``, ``W_dec' = diag(1/n) W_dec`` (:func:`fold_decoder_norms`); its codes are
  the ones the foreign library reports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from saekit.sae.base import SAE, get_architecture


class FormatError(ValueError):
    """A file or folder that is not a readable SAE of the expected format, or one saekit cannot represent."""


# -- hook points ------------------------------------------------------------------------------------------
_TL_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_post|mlp_out|attn_out)|attn\.hook_(z))$")
_SAEKIT_HOOK_RE = re.compile(r"^layers\.(\d+)\.(resid_pre|resid_post|mlp_out|attn_out|attn_z)$")
_MODULE_RE = re.compile(r"^(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")
_MODULE_PREFIXES = ("base_model.model.", "model.", "transformer.", "gpt_neox.")
_MODULE_KIND = {
    None: "resid_post",
    "mlp": "mlp_out",
    "self_attn": "attn_out",
    "attn": "attn_out",
    "attention": "attn_out",
}


def tl_hook_to_saekit(name: str | None) -> str | None:
    """TransformerLens ``blocks.{i}.hook_{resid_pre,resid_post,mlp_out,attn_out}`` → ``layers.{i}.…``, and
    ``blocks.{i}.attn.hook_z`` (per-head outputs, flattened head-major as SAELens' hook_z SAEs read them) →
    ``layers.{i}.attn_z``; None for names saekit has no hook point for (``hook_resid_mid``, ``hook_embed``).
    """
    m = _TL_HOOK_RE.match(name or "")
    if m is None:
        return None
    return f"layers.{m.group(1)}.{m.group(2) or 'attn_z'}"


def saekit_hook_to_tl(hook: str) -> str:
    """``layers.{i}.{kind}`` → ``blocks.{i}.hook_{kind}`` (``attn_z`` → ``blocks.{i}.attn.hook_z``); a raw
    module path is returned unchanged."""
    m = _SAEKIT_HOOK_RE.match(hook)
    if m is None:
        return hook
    return f"blocks.{m.group(1)}." + ("attn.hook_z" if m.group(2) == "attn_z" else f"hook_{m.group(2)}")


def module_to_saekit(path: str | None) -> str | None:
    """A Hugging Face module path whose *output* was read (sparsify's hookpoints, SAELens' ``hf_hook_name``)
    → a saekit hook point: a block (``layers.3``, ``h.3``, ``model.layers.3``) gives its residual output,
    ``….mlp`` the MLP output, ``….self_attn``/``attn``/``attention`` the attention output. None otherwise."""
    name = path or ""
    for prefix in _MODULE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    m = _MODULE_RE.match(name)
    return f"layers.{m.group(1)}.{_MODULE_KIND[m.group(2)]}" if m else None


# TransformerLens model names that are not Hugging Face ids, by prefix → the organisation that hosts them.
_TL_MODEL_ORGS = {
    "pythia-": "EleutherAI/",
    "gemma-": "google/",
    "Qwen": "Qwen/",
    "Llama-": "meta-llama/",
    "Meta-Llama-": "meta-llama/",
    "Mistral-": "mistralai/",
    "SmolLM": "HuggingFaceTB/",
}


def model_id(name: str | None) -> str | None:
    """A model name as another library recorded it → what ``saekit.models.load_model`` accepts: hub ids and
    paths unchanged, TransformerLens short names (``pythia-70m-deduped``, ``gemma-2-2b``) given their
    organisation. Unknown short names (``gpt2``, itself a hub id) are returned unchanged."""
    if not name:
        return None
    if "/" in name:
        return name
    for prefix, org in _TL_MODEL_ORGS.items():
        if name.startswith(prefix):
            return org + name
    return name


def imported_metadata(
    fmt: str,
    source: Path | str,
    *,
    hook: str | None,
    model: str | None,
    foreign_hook: str | None = None,
    notes: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """saekit metadata for an imported SAE: ``hook`` and ``model`` (what ``saekit eval``/``features`` read,
    when known) and ``imported`` (provenance: format, source, the foreign hook name, conversion notes)."""
    meta: dict[str, Any] = {}
    if hook:
        meta["hook"] = hook
    if model:
        meta["model"] = {"name": model, "source": model}
    imported: dict[str, Any] = {"format": fmt, "source": str(source)}
    if foreign_hook is not None:
        imported["foreign_hook"] = foreign_hook
    if notes:
        imported["notes"] = list(notes)
    imported.update(extra or {})
    meta["imported"] = imported
    return meta


# -- reading -------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a FormatError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, or a FormatError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FormatError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path} is corrupt or not a safetensors file: {e}") from e


def require(tensors: dict[str, torch.Tensor], names: list[str], where: Path | str) -> None:
    """FormatError naming the missing tensors (and those present) unless every name is there."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FormatError(f"{where} lacks tensors {missing} (found {sorted(tensors)})")


def as_f64(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float64 copies of floating-point tensors (integer buffers such as ``k`` unchanged), for folding."""
    return {n: t.detach().to(torch.float64) if t.is_floating_point() else t for n, t in tensors.items()}


def check_shapes(shapes: dict[str, tuple[torch.Tensor, tuple[int, ...]]], where: Path | str) -> None:
    """FormatError naming every tensor whose shape differs from the one its config implies."""
    bad = [f"{n} {tuple(t.shape)} (expected {want})" for n, (t, want) in shapes.items() if t.shape != want]
    if bad:
        raise FormatError(f"{where}: tensor shapes do not match the config: {', '.join(bad)}")


# -- folding ------------------------------------------------------------------------------------------------
def absorb_input_bias(b_enc_M: torch.Tensor, W_enc_DM: torch.Tensor, b_dec_D: torch.Tensor) -> torch.Tensor:
    """``b_enc + b_dec W_enc``: the encoder bias that makes ``(x − b_dec) W_enc + b_enc'`` equal a foreign
    ``x W_enc + b_enc`` that does not subtract ``b_dec``."""
    return b_enc_M + b_dec_D @ W_enc_DM


def fold_decoder_norms(
    W_enc_DM: torch.Tensor, b_enc_M: torch.Tensor, W_dec_MD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_enc diag(n), b_enc ⊙ n, diag(1/n) W_dec)`` with n the decoder-row norms: unit decoder rows, codes
    multiplied by n, reconstructions unchanged. A zero row stays zero (its latent then never fires)."""
    n_M = W_dec_MD.norm(dim=1)
    safe_M = torch.where(n_M > 0, n_M, torch.ones_like(n_M))
    return W_enc_DM * n_M, b_enc_M * n_M, W_dec_MD / safe_M[:, None]


def log_threshold(theta_M: torch.Tensor) -> torch.Tensor:
    """saekit's JumpReLU parameter log θ from a foreign θ. A foreign JumpReLU computes ReLU(π)·1[π > θ],
    which for θ < 0 equals θ = 0, so θ is clamped at 0 (log 0 = −inf: saekit's π·1[π > 0], exactly)."""
    return theta_M.clamp_min(0).log()


def unit_rows(W_dec_MD: torch.Tensor, tol: float = 1e-3) -> bool:
    """True when every decoder row has norm 1 within ``tol`` (saekit's training constraint)."""
    return bool(((W_dec_MD.norm(dim=1) - 1).abs() <= tol).all())


# -- building ---------------------------------------------------------------------------------------------
def build_sae(
    arch: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> SAE:
    """A saekit SAE of ``arch`` with ``config`` and exactly ``tensors`` as its state dict (float32), in eval
    mode. Names and shapes are checked against the architecture, so a wrong mapping fails here, loudly."""
    cls = get_architecture(arch)
    try:
        sae = cls(cls.config_class.from_dict(config))
    except (TypeError, ValueError) as e:
        raise FormatError(f"cannot build a saekit {arch!r} SAE from config {config}: {e}") from e
    expected = sae.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise FormatError(f"internal mapping error for {arch!r}: missing {missing}, unexpected {extra}")
    for name, want in expected.items():
        if tuple(tensors[name].shape) != tuple(want.shape):
            raise FormatError(
                f"tensor {name!r} has shape {tuple(tensors[name].shape)}, {arch!r} with d_in={sae.d_in}, "
                f"width={sae.width} needs {tuple(want.shape)}"
            )
    sae.load_state_dict({n: t.to(expected[n].dtype) for n, t in tensors.items()})
    sae.metadata = metadata
    return sae.eval()
