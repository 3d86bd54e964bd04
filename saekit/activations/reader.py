"""Reading a sharded activation cache without loading it: array views across shards and shuffled batches.

Two access paths, for two jobs:

* :class:`ShardedArray` looks like one (N, ...) array across all shards (``len``, ``shape``, ints, slices,
  integer arrays). Each access reads only the rows asked for, through ``np.load(mmap_mode="r")``, so analysis
  code can index a 100 GB cache. ``np.concatenate`` of the memmaps would copy everything into RAM.
* :func:`shuffled_batches` feeds the trainer. It permutes fixed-size *blocks* of rows (a seeded permutation
  over all shards), reads a window of blocks into one bounded buffer with plain file reads (``readinto``,
  no mapping: pages of a mapped file would count in the process's resident memory until unmapped), shuffles
  rows inside the window and cuts batches. Every row is emitted exactly once per epoch, the order depends
  only on (seed, cache layout), and ``skip_batches`` resumes without reading the skipped windows.
  With ``rank``/``world_size`` (data-parallel training) every rank walks the same seeded order and keeps
  only its share of each global batch (rows ``[r·B/W, (r+1)·B/W)``), so the ranks' shares together are
  exactly the single-process batch. A rank still reads the windows whole: with few ranks, sequential
  reads of the window beat reading its scattered ~1/W of the rows one by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAX_OPEN_FILES = 64
BFLOAT16 = "bfloat16"
"""Numpy has no bfloat16: such shards are stored as uint16 bit patterns and widened on read."""


@dataclass(frozen=True)
class ShardFile:
    """One ``.npy`` file of one shard, with what is needed to read rows from it directly."""

    path: Path
    rows: int
    row_shape: tuple[int, ...]
    storage_dtype: np.dtype
    data_offset: int
    """Byte offset of the first row (the length of the .npy header)."""

    @property
    def row_bytes(self) -> int:
        return int(self.storage_dtype.itemsize * math.prod(self.row_shape))


def to_output(arr: np.ndarray, logical_dtype: str) -> np.ndarray:
    """Convert stored values to what readers get: float32 for activations (bf16 bits widened), ints as is."""
    if logical_dtype == BFLOAT16:
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if logical_dtype in ("float16", "float32"):
        return arr.astype(np.float32, copy=False)
    return arr


class ShardedArray:
    """An (N, ...) array view over the same-named file of every shard; indexing reads only what it needs."""

    def __init__(self, files: list[ShardFile], logical_dtype: str):
        self.files = files
        self.logical_dtype = logical_dtype
        self.offsets = np.concatenate([[0], np.cumsum([f.rows for f in files])]).astype(np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(files)

    @property
    def shape(self) -> tuple[int, ...]:
        row_shape = self.files[0].row_shape if self.files else ()
        return (int(self.offsets[-1]), *row_shape)

    @property
    def dtype(self) -> np.dtype:
        if self.logical_dtype in (BFLOAT16, "float16", "float32"):
            return np.dtype(np.float32)
        return self.files[0].storage_dtype if self.files else np.dtype(self.logical_dtype)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.logical_dtype}, shards={len(self.files)})"

    def shard(self, i: int) -> np.ndarray:
        """The raw memmap of shard ``i`` (storage dtype: bf16 caches give uint16 bits here)."""
        if self._maps[i] is None:
            self._maps[i] = np.load(self.files[i].path, mmap_mode="r")
        return self._maps[i]  # type: ignore[return-value]

    def __getitem__(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            s = int(np.searchsorted(self.offsets, i, side="right") - 1)
            return to_output(np.array(self.shard(s)[i - self.offsets[s]]), self.logical_dtype)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._read_range(start, max(start, stop))
        if isinstance(key, tuple):
            raise TypeError("index rows first (e.g. arr[rows][:, cols]); multi-axis keys are not supported")
        idx = np.asarray(key)
        if idx.dtype == bool:
            raise TypeError("boolean masks would touch every row; use np.flatnonzero(mask) as the index")
        return self._gather(idx.astype(np.int64))

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for s in range(len(self.files)):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo < hi:
                parts.append(self.shard(s)[lo - self.offsets[s] : hi - self.offsets[s]])
        if not parts:
            return to_output(np.empty((0, *self.shape[1:]), self._storage_dtype()), self.logical_dtype)
        return to_output(np.concatenate(parts), self.logical_dtype)

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        n = len(self)
        flat = np.where(idx < 0, idx + n, idx).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        order = np.argsort(flat, kind="stable")
        sorted_rows = flat[order]
        out = np.empty((flat.size, *self.shape[1:]), self._storage_dtype())
        shard_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.files) + 1))
        for s in range(len(self.files)):
            a, b = bounds[s], bounds[s + 1]
            if a < b:
                out[order[a:b]] = self.shard(s)[sorted_rows[a:b] - self.offsets[s]]
        return to_output(out.reshape(*idx.shape, *self.shape[1:]), self.logical_dtype)

    def _storage_dtype(self) -> np.dtype:
        return self.files[0].storage_dtype if self.files else np.dtype(np.float32)


def shuffled_batches(
    acts: ShardedArray,
    batch_size: int,
    *,
    seed: int = 0,
    skip_batches: int = 0,
    epochs: int | None = None,
    buffer_rows: int = 65_536,
    block_rows: int = 1_024,
    drop_last: bool = False,
    return_rows: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (batch_size, d) float32 tensors in a seeded shuffled order; see the module docstring.

    The row stream is epoch after epoch, each a permutation of all rows; batches are cut from that stream,
    so with ``epochs=None`` (endless) every batch is full, and with a finite number the last one may be
    short (dropped when ``drop_last``). ``return_rows`` also yields each row's global index (B,) int64,
    which indexes ``cache.tokens``, ``cache.context_ids`` and ``cache.positions``. Memory: one buffer of
    ``buffer_rows × d`` stored values plus a batch. ``rank`` of ``world_size``: yield only that rank's
    share of each batch (``skip_batches`` still counts whole batches).
    """
    if batch_size <= 0 or buffer_rows <= 0 or block_rows <= 0:
        raise ValueError(
            f"batch_size, buffer_rows, block_rows must be positive: {batch_size}, {buffer_rows}, {block_rows}"
        )
    if skip_batches < 0 or (epochs is not None and epochs < 0):
        raise ValueError(f"skip_batches and epochs must be >= 0, got {skip_batches}, {epochs}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size positive, got {rank}, {world_size}")
    n_rows = len(acts)
    if n_rows == 0:
        raise ValueError("the cache holds no rows")
    block_rows = min(block_rows, buffer_rows)
    blocks = [
        (s, lo, min(lo + block_rows, f.rows))
        for s, f in enumerate(acts.files)
        for lo in range(0, f.rows, block_rows)
    ]
    per_window = max(1, buffer_rows // block_rows)
    lo, hi = rank * batch_size // world_size, (rank + 1) * batch_size // world_size
    gen = _batch_stream(acts, blocks, per_window, batch_size, seed, skip_batches, epochs, drop_last, (lo, hi))
    for x, rows in gen:
        yield (x, rows) if return_rows else x


def _batch_stream(acts, blocks, per_window, batch_size, seed, skip_batches, epochs, drop_last, keep):
    n_rows = len(acts)
    skip_rows = skip_batches * batch_size
    epoch = skip_rows // n_rows
    offset = skip_rows - epoch * n_rows  # rows of `epoch` already consumed
    d_shape = acts.shape[1:]
    buf = np.empty((per_window * max(b[2] - b[1] for b in blocks), *d_shape), acts.files[0].storage_dtype)
    rows_buf = np.empty(buf.shape[0], np.int64)
    carry_x: list[np.ndarray] = []
    carry_r: list[np.ndarray] = []
    carried = 0
    handles: dict[int, object] = {}
    try:
        while epochs is None or epoch < epochs:
            perm = np.random.default_rng([seed, epoch]).permutation(len(blocks))
            for w, start in enumerate(range(0, len(blocks), per_window)):
                window = [blocks[i] for i in perm[start : start + per_window]]
                w_rows = sum(hi - lo for _, lo, hi in window)
                if offset >= w_rows:  # consumed before a resume: skip without reading
                    offset -= w_rows
                    continue
                pos = 0
                for s, lo, hi in window:
                    _read_rows(acts.files[s], handles, s, lo, hi, buf[pos : pos + hi - lo])
                    rows_buf[pos : pos + hi - lo] = np.arange(lo, hi) + acts.offsets[s]
                    pos += hi - lo
                order = np.random.default_rng([seed, epoch, 1 + w]).permutation(w_rows)
                pos, offset = offset, 0
                while pos < w_rows:
                    take = min(batch_size - carried, w_rows - pos)
                    # the part of batch positions [carried, carried + take) inside this rank's share
                    a, b = max(carried, keep[0]), min(carried + take, keep[1])
                    if a < b:
                        idx = order[pos + a - carried : pos + b - carried]
                        carry_x.append(buf[idx])
                        carry_r.append(rows_buf[idx])
                    pos += take
                    carried += take
                    if carried == batch_size:
                        yield _emit(carry_x, carry_r, acts.logical_dtype, buf)
                        carry_x, carry_r, carried = [], [], 0
            epoch += 1
        if carried and not drop_last:
            yield _emit(carry_x, carry_r, acts.logical_dtype, buf)
    finally:
        for fh in handles.values():
            fh.close()  # type: ignore[attr-defined]


def _emit(parts_x: list[np.ndarray], parts_r: list[np.ndarray], logical_dtype: str, buf: np.ndarray):
    if not parts_x:  # a share of no rows (more ranks than rows in a final short batch)
        parts_x, parts_r = [buf[:0]], [np.empty(0, np.int64)]
    x = parts_x[0] if len(parts_x) == 1 else np.concatenate(parts_x)
    rows = parts_r[0] if len(parts_r) == 1 else np.concatenate(parts_r)
    return torch.from_numpy(np.ascontiguousarray(to_output(x, logical_dtype))), torch.from_numpy(rows)


def _read_rows(f: ShardFile, handles: dict, key: int, lo: int, hi: int, out: np.ndarray) -> None:
    """Read rows [lo, hi) of one shard file straight into ``out`` (a contiguous slice of the buffer)."""
    fh = handles.get(key)
    if fh is None:
        if len(handles) >= MAX_OPEN_FILES:  # a window touches few shards; don't hold thousands open
            for old in handles.values():
                old.close()
            handles.clear()
        fh = handles[key] = open(f.path, "rb")  # noqa: SIM115 (closed by the caller's finally)
    fh.seek(f.data_offset + lo * f.row_bytes)
    view = memoryview(out).cast("B")
    got = fh.readinto(view)
    if got != view.nbytes:
        raise OSError(f"{f.path}: expected {view.nbytes} bytes at row {lo}, read {got} (file truncated?)")
