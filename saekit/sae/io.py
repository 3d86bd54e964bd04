"""Save and load SAEs as a folder: ``cfg.json`` + ``sae.safetensors`` (the SAELens layout).

``cfg.json`` is ``{"format_version", "arch", "config": {...}, "metadata": {...}}``. ``config`` is the
architecture's config dataclass as a dict; ``metadata`` is free-form JSON (hook point, model,
normalization, training provenance) and comes back as ``sae.metadata``. ``sae.safetensors`` holds every
parameter and buffer (e.g. BatchTopK's threshold) under its ``state_dict`` name.

Loading never needs the saving code's classes: unknown config keys are an error that names them, missing
optional keys take their defaults, and every other inconsistency (missing file, unknown architecture,
tensor names or shapes that do not match the config, a corrupt tensor file) is a clear error naming the file.
Writing is atomic: everything goes to a temporary folder next to the target, which is then renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base import SAE, get_architecture

FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def save_sae(sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` to the folder ``path`` and return it. An existing SAE folder (holding only our two
    files) is replaced; any other existing path is refused, so a run directory is never wiped by mistake.
    ``metadata`` defaults to ``sae.metadata``."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"cannot save SAE to {path}: it exists and is not a folder")
        extra = sorted(p.name for p in path.iterdir() if p.name not in (CFG_FILE, WEIGHTS_FILE))
        if extra:
            raise FileExistsError(f"refusing to replace {path}: it holds files other than an SAE's: {extra}")
    meta = dict(getattr(sae, "metadata", {}) if metadata is None else metadata)
    record = {
        "format_version": FORMAT_VERSION,
        "arch": sae.arch,
        "config": sae.cfg.to_dict(),
        "metadata": meta,
    }
    try:
        text = json.dumps(record, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"SAE config/metadata is not JSON-serialisable: {e}") from e
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / CFG_FILE).write_text(text + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "arch": sae.arch})
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by :func:`save_sae`, in ``eval()`` mode, with ``sae.metadata`` set."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {path}")
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(
                f"SAE folder {path} has no {f.name} (expected {CFG_FILE} and {WEIGHTS_FILE})"
                + _foreign_hint(path)
            )
    try:
        record = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(record, dict) or "arch" not in record or "config" not in record:
        raise ValueError(f"{cfg_path} must be an object with 'arch' and 'config' keys" + _foreign_hint(path))
    unknown = sorted(set(record) - {"format_version", "arch", "config", "metadata"})
    if unknown:
        raise ValueError(f"{cfg_path}: unknown top-level keys {unknown}")
    version = record.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path}: format_version {version!r} is newer than this saekit reads ({FORMAT_VERSION})"
        )
    try:
        cls = get_architecture(record["arch"])
        if not isinstance(record["config"], dict):
            raise ValueError("'config' must be an object")
        cfg = cls.config_class.from_dict(record["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    sae = cls(cfg)

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is corrupt or not a safetensors file: {e}") from e
    expected = sae.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{weights_path} does not match {record['arch']!r}: missing tensors {missing}, unexpected {extra}"
        )
    for name, want in expected.items():
        if tensors[name].shape != want.shape:
            raise ValueError(
                f"{weights_path}: tensor {name!r} has shape {tuple(tensors[name].shape)} but {cfg_path.name} "
                f"(d_in={cfg.d_in}, width={cfg.width}) implies {tuple(want.shape)}"
            )
    sae.load_state_dict(tensors)
    sae.metadata = dict(record.get("metadata") or {})
    return sae.to(device).eval()


def _foreign_hint(path: Path) -> str:
    """How to use ``path`` when it holds another library's SAE (saekit.formats), else ''."""
    from saekit.formats import foreign_hint

    return foreign_hint(path)
