"""Which format a path holds, and the calls that load, import and export through the format modules.

Detection reads content, not names alone: saekit and sparsify both write ``cfg.json`` + ``sae.safetensors``,
so the JSON decides (saekit: ``arch`` + ``config``; SAELens: ``d_sae``/``architecture``/hook name; sparsify:
``d_in`` + ``k`` + ``expansion_factor``/``num_latents``). dictionary_learning is an ``ae.pt``, Gemma Scope a
``params.npz``; each may be given as the file or its folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from saekit.sae.base import SAE

from . import dictionary_learning, gemma_scope, hub, saelens, sparsify
from .common import FormatError, read_json

NAMES = {
    "saekit": "saekit",
    "saelens": "SAELens",
    "sparsify": "sparsify",
    "dictionary_learning": "dictionary_learning",
    "gemma_scope": "Gemma Scope",
}
LOADERS: dict[str, Callable[[Path], SAE]] = {
    "saelens": saelens.load,
    "sparsify": sparsify.load,
    "dictionary_learning": dictionary_learning.load,
    "gemma_scope": gemma_scope.load,
}
EXPORTERS: dict[str, Callable[[SAE, Path], Path]] = {"saelens": saelens.export}
_MARKERS = ("cfg.json", dictionary_learning.WEIGHTS_FILE, gemma_scope.WEIGHTS_FILE)


def detect_format(path: str | Path) -> str:
    """The format of the SAE at ``path`` (a key of :data:`NAMES`), or a FormatError saying what was found."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE not found: {path}")
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        if path.suffix in (".pt", ".pth"):
            return "dictionary_learning"
        raise FormatError(
            f"{path} is a file saekit cannot read as an SAE: give the SAE's folder, a params.npz or an ae.pt"
        )
    cfg_path = path / "cfg.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        if "arch" in cfg and "config" in cfg:
            return "saekit"
        if saelens.is_saelens_cfg(cfg):
            return "saelens"
        if sparsify.is_sparsify_cfg(cfg):
            return "sparsify"
        raise FormatError(
            f"{cfg_path} matches no known SAE config (saekit: arch + config; SAELens: d_in + d_sae; "
            f"sparsify: d_in + k + expansion_factor); keys found: {sorted(cfg)[:12]}"
        )
    if (path / "sae" / "cfg.json").is_file():
        return "saekit"  # a run folder
    if (path / dictionary_learning.WEIGHTS_FILE).is_file():
        return "dictionary_learning"
    if (path / gemma_scope.WEIGHTS_FILE).is_file():
        return "gemma_scope"
    inner = sorted(p for p in path.iterdir() if p.is_dir() and any((p / f).is_file() for f in _MARKERS))
    if inner:
        shown = ", ".join(str(p) for p in inner[:12]) + (", …" if len(inner) > 12 else "")
        raise FormatError(f"{path} holds no SAE itself but SAEs in subfolders (one per hook point?): {shown}")
    raise FormatError(
        f"no SAE found in {path}: expected cfg.json (saekit, SAELens, sparsify), "
        f"{dictionary_learning.WEIGHTS_FILE} (dictionary_learning) or "
        f"{gemma_scope.WEIGHTS_FILE} (Gemma Scope)"
    )


def load(path: str | Path, device: str = "cpu", *, format: str | None = None) -> SAE:
    """Load the SAE at ``path`` (any supported format, or ``hf:REPO[/SUBFOLDER]``) as a saekit SAE."""
    if hub.is_hub_spec(path):
        path = hub.resolve(str(path))
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt == "saekit":
        from saekit.sae import load_sae

        if not (path / "cfg.json").is_file() and (path / "sae" / "cfg.json").is_file():
            path = path / "sae"
        return load_sae(path, device=device)
    if fmt not in LOADERS:
        raise FormatError(f"unknown SAE format {fmt!r}; known: {sorted(NAMES)}")
    return LOADERS[fmt](path).to(device)


def import_sae(
    src: str | Path,
    out: str | Path,
    *,
    hook: str | None = None,
    model: str | None = None,
    format: str | None = None,
) -> SAE:
    """Load a foreign SAE and save it as a saekit SAE folder at ``out`` (so ``saekit features``/``report``/
    ``info`` work on it). ``hook``/``model`` set (or correct) the hook point and model it reads."""
    from saekit.sae import save_sae

    sae = load(src, format=format)
    meta: dict[str, Any] = dict(sae.metadata)
    if hook:
        meta["hook"] = hook
    if model:
        meta["model"] = {"name": model, "source": model}
    sae.metadata = meta
    save_sae(sae, out)
    return sae


def export_sae(sae: SAE | str | Path, out: str | Path, format: str = "saelens") -> Path:
    """Write ``sae`` (an SAE or anything :func:`load` accepts) to ``out`` in another library's format."""
    if format not in EXPORTERS:
        raise FormatError(f"cannot export to {format!r}; export formats: {sorted(EXPORTERS)}")
    if not isinstance(sae, SAE):
        sae = load(sae)
    return EXPORTERS[format](sae, Path(out))


def foreign_hint(path: str | Path) -> str:
    """'' unless ``path`` holds another library's SAE, else how to use it (for saekit-only loaders)."""
    try:
        fmt = detect_format(path)
    except (OSError, ValueError):
        return ""
    if fmt == "saekit":
        return ""
    return (
        f"; it holds a {NAMES[fmt]} SAE: load it with saekit.load(), or convert it with "
        f"`saekit import {path} OUT` and use OUT"
    )
