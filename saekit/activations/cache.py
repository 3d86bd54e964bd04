"""The on-disk activation cache: shards of ``.npy`` files plus a ``manifest.json`` that says what they hold.

Layout of a cache directory::

    manifest.json              what was extracted, how, and the size/sha256 of every file below
    shard_00000/tokens.npy     (n,) int32 token id of each row
    shard_00000/context_ids.npy (n,) int32 index of the packed context the row came from
    shard_00000/positions.npy  (n,) int32 position inside that context
    shard_00000/<hook>.npy     (n, d) activations (float32, float16, or bfloat16 stored as uint16 bits)

Plain ``.npy`` so any tool can ``np.load(mmap_mode="r")`` a shard. Writing
(:func:`saekit.activations.writer.write_cache`) makes each shard in a temporary directory, renames it
into place and then rewrites the manifest atomically, so a killed run leaves a readable cache of complete
shards that the same command resumes. Opening checks the manifest against the files and refuses, naming
the file and the problem, anything that does not match: truncated data must never be read as activations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from saekit.activations.reader import BFLOAT16, ShardedArray, ShardFile, shuffled_batches

FORMAT = "saekit-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_ARRAYS = ("tokens", "context_ids", "positions")
ACT_DTYPES = {"float32": np.float32, "float16": np.float16, BFLOAT16: np.uint16}


class CacheError(ValueError):
    """A cache directory that cannot be read as activations: the message names the file and the problem."""


def hook_filename(hook: str) -> str:
    """File name for a hook's array; hook names are dotted paths, anything unusual becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", hook) + ".npy"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file and rename over ``path``: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """Load and check ``manifest.json`` (format name and version, required keys)."""
    path = Path(cache_dir) / MANIFEST
    if not Path(cache_dir).is_dir():
        raise CacheError(f"{cache_dir}: no such cache directory")
    if not path.is_file():
        raise CacheError(f"{path}: missing; {cache_dir} is not an activation cache (or was never started)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(
            f"{path}: not a saekit activation cache manifest (format={manifest.get('format')!r})"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format version {version!r} is not supported (this saekit reads version "
            f"{FORMAT_VERSION}); re-create the cache with this version"
        )
    missing = [k for k in ("hooks", "dtype", "shards", "settings", "tokens_written") if k not in manifest]
    if missing:
        raise CacheError(f"{path}: manifest lacks required keys {missing}")
    return manifest


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from a .npy header, reading only the header."""
    try:
        with open(path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError) as e:
        raise CacheError(f"{path}: not a readable .npy file ({e})") from e
    if fortran:
        raise CacheError(f"{path}: Fortran-ordered array; the cache writes C order only")
    return shape, dtype, offset


def _check_file(path: Path, rec: dict[str, Any], rows: int, row_shape: tuple, dtype: np.dtype, verify: str):
    if not path.is_file():
        raise CacheError(f"{path}: missing shard file (listed in the manifest)")
    shape, file_dtype, offset = _npy_header(path)
    if shape[:1] != (rows,):
        raise CacheError(f"{path}: holds {shape[0] if shape else 0} rows, the manifest says {rows}")
    if tuple(shape[1:]) != row_shape or file_dtype != dtype:
        raise CacheError(f"{path}: array {shape} {file_dtype}, expected ({rows}, *{row_shape}) {dtype}")
    if verify in ("size", "full"):
        size = path.stat().st_size
        expected = offset + rows * dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        if size != rec["bytes"] or size != expected:
            raise CacheError(
                f"{path}: {size} bytes, expected {rec['bytes']} (truncated or overwritten shard)"
            )
    if verify == "full" and sha256_file(path) != rec["sha256"]:
        raise CacheError(f"{path}: sha256 checksum mismatch (the file's contents changed or are corrupt)")
    return ShardFile(path, rows, tuple(shape[1:]), file_dtype, offset)


class ActivationCache:
    """A read-only view of a cache directory. Nothing is loaded until indexed; see :func:`open_cache`."""

    def __init__(self, cache_dir: str | Path, manifest: dict[str, Any], verify: str = "size"):
        self.dir = Path(cache_dir)
        self.manifest = manifest
        self.hooks: list[str] = [h["name"] for h in manifest["hooks"]]
        self.widths: dict[str, int] = {h["name"]: int(h["width"]) for h in manifest["hooks"]}
        self.dtype: str = manifest["dtype"]
        if self.dtype not in ACT_DTYPES:
            raise CacheError(f"{self.dir / MANIFEST}: unknown activation dtype {self.dtype!r}")
        names = {
            h["name"]: (h["file"], (int(h["width"]),), np.dtype(ACT_DTYPES[self.dtype]))
            for h in manifest["hooks"]
        }
        names.update({a: (a + ".npy", (), np.dtype(np.int32)) for a in INDEX_ARRAYS})
        files: dict[str, list[ShardFile]] = {k: [] for k in names}
        for shard in manifest["shards"]:
            for key, (fname, row_shape, dtype) in names.items():
                rec = shard["files"].get(fname)
                if rec is None:
                    raise CacheError(f"{self.dir / MANIFEST}: shard {shard['name']} lists no file {fname}")
                path = self.dir / shard["name"] / fname
                files[key].append(_check_file(path, rec, int(shard["rows"]), row_shape, dtype, verify))
        total = sum(int(s["rows"]) for s in manifest["shards"])
        if total != manifest["tokens_written"]:
            raise CacheError(
                f"{self.dir / MANIFEST}: shards hold {total} rows but tokens_written is "
                f"{manifest['tokens_written']}"
            )
        self._arrays = {
            k: ShardedArray(v, self.dtype if k in self.widths else "int32") for k, v in files.items()
        }

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens_written"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    @property
    def tokens(self) -> ShardedArray:
        return self._arrays["tokens"]

    @property
    def context_ids(self) -> ShardedArray:
        return self._arrays["context_ids"]

    @property
    def positions(self) -> ShardedArray:
        return self._arrays["positions"]

    def acts(self, hook: str) -> ShardedArray:
        """(N, d) activations at ``hook``; reads return float32 whatever the stored dtype."""
        if hook not in self.widths:
            raise CacheError(f"hook {hook!r} is not in the cache at {self.dir}; it holds {self.hooks}")
        return self._arrays[hook]

    def batches(self, hook: str, batch_size: int, **options: Any):
        """Shuffled (batch_size, d) float32 tensors of ``hook``: :func:`.reader.shuffled_batches` on
        ``self.acts(hook)``, which documents the keyword ``options`` (seed, skip_batches, epochs,
        buffer_rows, block_rows, drop_last, return_rows)."""
        return shuffled_batches(self.acts(hook), batch_size, **options)

    def nbytes(self) -> int:
        return sum(rec["bytes"] for s in self.manifest["shards"] for rec in s["files"].values())

    def describe(self) -> str:
        """A human-readable summary (what ``saekit info DIR`` prints)."""
        m, s = self.manifest, self.manifest["settings"]
        model = m.get("model", {})
        seen = max(1, m.get("positions_seen", 0))
        excl = m.get("excluded", {})
        status = "complete" if self.complete else "INCOMPLETE (re-run the same command to resume)"
        if m.get("source_exhausted"):
            status += " (the text source ran out before the requested tokens)"
        rate = self.n_tokens / m["extract_seconds"] if m.get("extract_seconds") else 0.0
        lines = [
            f"activation cache  {self.dir}",
            f"  format       v{m['format_version']}, created {m.get('created', '?')}, {status}",
            f"  model        {model.get('name')}  ({model.get('source')}, hash {model.get('file_hash')})",
            f"  text         {s.get('source')}  split={s.get('split')}  context_len={s.get('context_len')}"
            f"  prepend_bos={s.get('prepend_bos')}",
            f"  tokens       {self.n_tokens:,} written of {s.get('n_tokens', 0):,} requested"
            f" from {m.get('contexts_consumed', 0):,} contexts ({rate:,.0f} tokens/s)",
            f"  storage      {len(m['shards'])} shards, {self.nbytes() / 2**20:,.1f} MiB, {self.dtype}",
            f"  excluded     {excl.get('special', 0):,} special-token positions,"
            f" {excl.get('outlier', 0):,} outliers (norm > {s.get('outlier_factor')} x median)"
            f" = {100 * sum(excl.values()) / seen:.2f}% of {seen:,} positions",
        ]
        medians = m.get("median_norms", {})
        for h in self.hooks:
            med = f"  median norm {medians[h]:.4g}" if medians.get(h) else ""
            lines.append(f"  hook         {h}  d={self.widths[h]}{med}")
        return "\n".join(lines)


def open_cache(
    cache_dir: str | Path, verify: Literal["size", "full", "none"] = "size", *, allow_incomplete: bool = False
) -> ActivationCache:
    """Open a cache directory, checking it against its manifest.

    ``verify``: "size" (default, cheap) checks each file exists with the recorded size and .npy header;
    "full" also recomputes sha256 checksums (reads everything); "none" skips the size check (headers are
    still read: they locate the data). An interrupted cache is refused unless ``allow_incomplete``, so a
    half-written cache is never trained on by mistake.
    """
    if verify not in ("size", "full", "none"):
        raise ValueError(f"verify must be 'size', 'full' or 'none', got {verify!r}")
    manifest = read_manifest(cache_dir)
    if not manifest.get("complete", False) and not allow_incomplete:
        raise CacheError(
            f"{Path(cache_dir) / MANIFEST}: the cache is incomplete ({manifest['tokens_written']:,} of "
            f"{manifest['settings'].get('n_tokens', 0):,} tokens written); re-run the same cache command to "
            "resume it, or open it with allow_incomplete=True"
        )
    return ActivationCache(cache_dir, manifest, verify)
