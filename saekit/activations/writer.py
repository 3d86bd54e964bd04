"""Writing an activation cache: extraction → shards → manifest, resumable after a kill.

A shard is built in memory (bounded by ``shard_rows`` plus one batch), saved into ``shard_NNNNN.tmp/``,
renamed to ``shard_NNNNN/`` and only then recorded in the manifest, which is rewritten atomically. The
manifest therefore lists only complete shards, and it carries what a resumed run needs to continue exactly
where the last complete shard ended: the number of contexts consumed (shards end on batch boundaries, so
the resumed run's batches are the same ones) and the running-median state of the outlier filter.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saekit.activations.cache import (
    ACT_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    INDEX_ARRAYS,
    MANIFEST,
    ActivationCache,
    CacheError,
    hook_filename,
    open_cache,
    read_manifest,
    sha256_file,
    shard_name,
    write_json_atomic,
)
from saekit.activations.extract import (
    DEFAULT_OUTLIER_FACTOR,
    ActivationBatch,
    NormTracker,
    iter_source_activations,
)
from saekit.data import describe_source, special_token_ids
from saekit.models import LoadedModel, hook_width, validate_hooks

FLOAT16_MAX = 65504.0


def write_cache(
    out_dir: str | Path,
    loaded: LoadedModel,
    hooks: Sequence[str],
    *,
    n_tokens: int,
    source: str = "stdlib",
    split: str = "train",
    context_len: int = 128,
    batch_size: int = 16,
    shard_rows: int = 32_768,
    dtype: str = "float32",
    prepend_bos: bool = True,
    exclude_special: bool = True,
    outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR,
    progress: bool = True,
    overwrite: bool = False,
) -> ActivationCache:
    """Extract ``n_tokens`` kept positions of ``source`` at ``hooks`` and write them to ``out_dir``.

    ``batch_size`` counts contexts per forward; ``shard_rows`` is the target rows per shard (a shard ends
    at the first batch boundary past it, so shards hold up to one batch more). If ``out_dir`` already holds
    a cache made with the same arguments, a finished one is returned as is and an interrupted one is
    resumed; different arguments are an error listing them (``overwrite=True`` deletes that cache first).
    Returns the opened cache. Fewer tokens are written, with a warning, if the text source runs out.
    """
    hooks = list(hooks)
    if dtype not in ACT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(ACT_DTYPES)}, got {dtype!r}")
    if n_tokens <= 0 or shard_rows <= 0 or batch_size <= 0 or context_len <= 0:
        raise ValueError("n_tokens, shard_rows, batch_size and context_len must be positive")
    if len(set(hooks)) != len(hooks) or not hooks:
        raise ValueError(f"hooks must be a non-empty list without repeats, got {hooks}")
    validate_hooks(loaded.model, hooks)
    files = {h: hook_filename(h) for h in hooks}
    if len(set(files.values())) != len(files):
        raise ValueError(f"hook names {hooks} map to clashing file names {files}")
    settings = _jsonable(
        {
            "model": {"name": loaded.name, "file_hash": loaded.file_hash},
            "hooks": hooks,
            "dtype": dtype,
            "source": source,
            "source_description": describe_source(source),
            "split": split,
            "context_len": context_len,
            "prepend_bos": prepend_bos,
            "batch_size": batch_size,
            "shard_rows": shard_rows,
            "n_tokens": n_tokens,
            "exclude_special": exclude_special,
            "outlier_factor": outlier_factor,
        }
    )
    out = Path(out_dir)
    state = _resume_or_start(out, settings, overwrite)
    if state is None:
        state = _new_manifest(settings, hooks, files, loaded)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / MANIFEST, state)
    if state["complete"]:
        return open_cache(out)
    ActivationCache(out, state, verify="size")  # the shards we continue after must be intact
    _extract_into(out, state, loaded, hooks, files, progress)
    return open_cache(out)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _resume_or_start(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest to continue from, or None for a fresh cache (after clearing an old one if allowed)."""
    if not out.exists():
        return None
    if not (out / MANIFEST).exists():
        if any(out.iterdir()) and not overwrite:
            raise CacheError(
                f"{out}: exists, is not empty and has no {MANIFEST}; refusing to write a cache into it"
            )
        _clear(out)
        return None
    try:
        old = read_manifest(out)
    except CacheError:
        if not overwrite:
            raise
        _clear(out)
        return None
    if old["settings"] != settings:
        if overwrite:
            _clear(out)
            return None
        diffs = [
            f"{k}: cache has {old['settings'].get(k)!r}, asked {settings.get(k)!r}"
            for k in sorted(set(old["settings"]) | set(settings))
            if old["settings"].get(k) != settings.get(k)
        ]
        raise CacheError(
            f"{out / MANIFEST}: the cache there was made with different arguments ({'; '.join(diffs)}); "
            "use another directory, the same arguments to resume, or overwrite=True"
        )
    listed = {s["name"] for s in old["shards"]}
    for p in out.glob("shard_*"):  # a shard written after the last manifest update, or a temp dir
        if p.name not in listed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return old


def _clear(out: Path) -> None:
    """Remove only what a cache writer creates (never other files a user keeps in the directory)."""
    for p in [*out.glob("shard_*"), out / MANIFEST, out / (MANIFEST + ".tmp")]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _new_manifest(
    settings: dict[str, Any], hooks: list[str], files: dict[str, str], loaded
) -> dict[str, Any]:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": now,
        "updated": now,
        "complete": False,
        "settings": settings,
        "model": {"name": loaded.name, "source": str(loaded.source), "file_hash": loaded.file_hash},
        "hooks": [{"name": h, "width": hook_width(loaded.model, h), "file": files[h]} for h in hooks],
        "dtype": settings["dtype"],
        "special_token_ids": sorted(int(t) for t in special_token_ids(loaded.tokenizer)),
        "tokens_written": 0,
        "positions_seen": 0,
        "excluded": {"special": 0, "outlier": 0},
        "contexts_consumed": 0,
        "source_exhausted": False,
        "extract_seconds": 0.0,
        "median_norms": {},
        "norm_state": {},
        "shards": [],
    }


class _ShardBuilder:
    """Preallocated arrays for one shard (``shard_rows`` + one batch of rows), filled batch by batch."""

    def __init__(self, capacity: int, widths: dict[str, int], dtype: str):
        self.dtype = dtype
        self.arrays = {a: np.empty(capacity, np.int32) for a in INDEX_ARRAYS}
        self.arrays.update({h: np.empty((capacity, d), ACT_DTYPES[dtype]) for h, d in widths.items()})
        self.rows = self.contexts = self.positions = 0
        self.excluded = {"special": 0, "outlier": 0}
        self.first_context: int | None = None

    def add(self, batch: ActivationBatch) -> None:
        n, r = len(batch), self.rows
        if self.first_context is None:
            self.first_context = batch.first_context_id
        self.arrays["tokens"][r : r + n] = batch.tokens.numpy()
        self.arrays["context_ids"][r : r + n] = batch.context_ids.numpy()
        self.arrays["positions"][r : r + n] = batch.positions.numpy()
        for h, a in batch.acts.items():
            self.arrays[h][r : r + n] = _to_storage(a.cpu(), self.dtype, h)
        self.rows += n
        self.contexts += batch.n_contexts
        self.positions += batch.n_positions
        for k, v in batch.excluded.items():
            self.excluded[k] += v


def _to_storage(x_nD: torch.Tensor, dtype: str, hook: str) -> np.ndarray:
    if dtype == "float16":
        peak = float(x_nD.abs().max()) if x_nD.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise ValueError(
                f"activation magnitude {peak:.4g} at {hook} overflows float16 (max {FLOAT16_MAX}); "
                "use dtype bfloat16 or float32, or keep the outlier filter on"
            )
        return x_nD.to(torch.float16).numpy()
    if dtype == "bfloat16":
        return x_nD.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x_nD.numpy()


def _extract_into(
    out: Path, state: dict[str, Any], loaded, hooks: list[str], files: dict[str, str], progress: bool
):
    s = state["settings"]
    widths = {h["name"]: int(h["width"]) for h in state["hooks"]}
    tracker = NormTracker(hooks)
    tracker.load_state_dict(state["norm_state"])
    stream = iter_source_activations(
        loaded,
        hooks,
        source=s["source"],
        split=s["split"],
        context_len=s["context_len"],
        batch_size=s["batch_size"],
        prepend_bos=s["prepend_bos"],
        skip_contexts=state["contexts_consumed"],
        exclude_special=s["exclude_special"],
        outlier_factor=s["outlier_factor"],
        norm_tracker=tracker,
    )
    capacity = s["shard_rows"] + s["batch_size"] * s["context_len"]
    shard = _ShardBuilder(capacity, widths, s["dtype"])
    bar = tqdm(
        total=s["n_tokens"], initial=state["tokens_written"], unit="tok", unit_scale=True,
        desc="caching activations", disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        for batch in stream:
            batch = batch.head(s["n_tokens"] - state["tokens_written"] - shard.rows)
            shard.add(batch)
            bar.update(len(batch))
            done = state["tokens_written"] + shard.rows >= s["n_tokens"]
            if shard.rows >= s["shard_rows"] or done:
                state["extract_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                _flush(out, state, shard, files, tracker)
                shard = _ShardBuilder(capacity, widths, s["dtype"])
            if done:
                break
        else:
            state["source_exhausted"] = True
            if shard.rows:
                _flush(out, state, shard, files, tracker)
    finally:
        bar.close()
    state["extract_seconds"] += time.perf_counter() - t0
    state["complete"] = True
    write_json_atomic(out / MANIFEST, state)
    if state["source_exhausted"]:
        warnings.warn(
            f"text source {s['source']!r} (split {s['split']}) ran out after {state['tokens_written']:,} of "
            f"{s['n_tokens']:,} requested tokens; the cache holds what there was",
            stacklevel=3,
        )


def _flush(
    out: Path, state: dict[str, Any], shard: _ShardBuilder, files: dict[str, str], tracker: NormTracker
):
    """Save one shard beside its final name, rename it into place, then record it in the manifest."""
    name = shard_name(len(state["shards"]))
    tmp = out / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    records = {}
    for key, arr in shard.arrays.items():
        fname = files.get(key, key + ".npy")
        np.save(tmp / fname, arr[: shard.rows])
        records[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": sha256_file(tmp / fname)}
    tmp.rename(out / name)
    state["shards"].append(
        {
            "name": name,
            "rows": shard.rows,
            "first_context": shard.first_context,
            "contexts": shard.contexts,
            "files": records,
        }
    )
    state["tokens_written"] += shard.rows
    state["contexts_consumed"] += shard.contexts
    state["positions_seen"] += shard.positions
    for k, v in shard.excluded.items():
        state["excluded"][k] += v
    state["norm_state"] = tracker.state_dict()
    state["median_norms"] = {h: tracker.median(h) for h in tracker.counts}
    state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(out / MANIFEST, state)
