"""Pieces the training benchmarks share (``topk_vs_saelens.py``, ``train_speed.py`` and their workers).

This module is imported both by the orchestrators (saekit's ``.venv``) and by the peer workers, which run in
the separate benchmark environment (``.bench-venv``: SAELens, sparsify, no saekit). So its top level imports
only the standard library and numpy; what needs saekit or torch imports it inside the function.

What lives here and why:

* the benchmark environment (:func:`bench_python`): created or extended with pinned versions, never
  touching saekit's own ``.venv``;
* the activations every library trains on (:func:`ensure_cache`, :func:`shuffled_training_rows`) and the
  way workers read them (:class:`NpyRows`): consecutive row blocks read from disk, so a worker holds one
  batch of data in memory rather than the whole file and peak RSS measures the library, not the data;
* the neutral output format (:class:`OutputWriter`, :func:`iter_outputs`): each worker writes its held-out
  reconstructions and its codes as plain ``.npy`` (codes as CSR), and the orchestrator computes every
  metric with the same saekit code for every library;
* the learning-rate schedule the peers are given (:func:`lr_factor`, saekit's linear warm-up / constant /
  linear decay to 0) and process memory figures (:func:`peak_rss_mb`, :func:`rss_now_mb`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HOOK = "layers.15.resid_post"
DEFAULT_HELDOUT = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
EXTRACT_RATE = 600  # tokens/s of SmolLM2 up to layer 15 on 2 CPU cores (for the time estimate only)

TORCH_PIN = "torch==2.13.0"
# import name -> (distribution name, pinned requirement). sparsify is EleutherAI's, published on PyPI as
# ``eai-sparsify``; the PyPI project called ``sparsify`` is an unrelated (Neural Magic) package.
PEER_PINS: dict[str, tuple[str, str]] = {
    "sae_lens": ("sae-lens", "sae-lens==6.54.12"),
    "sparsify": ("eai-sparsify", "eai-sparsify==1.3.3"),
}


# -- the benchmark environment -----------------------------------------------------------------------------
def worker_env() -> dict[str, str]:
    """The environment a peer worker runs in: no saekit venv leaking in, wandb off, sparsify's eager
    (non-Triton) decoder, which is the only one that works on CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["WANDB_MODE"] = "disabled"
    env["SPARSIFY_DISABLE_TRITON"] = "1"
    return env


def _installed_versions(py: Path, dists: list[str]) -> dict[str, str | None]:
    """Installed version of each distribution in the venv of ``py`` (None where missing)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([str(py), "-c", code, *dists], capture_output=True, text=True, env=worker_env())
    if res.returncode != 0:
        return dict.fromkeys(dists)
    return json.loads(res.stdout)


def bench_python(venv: Path, allow_setup: bool, need: tuple[str, ...] = ("sae_lens",)) -> Path:
    """The bench venv's python, after creating the venv or extending it so that every package in ``need``
    (import names, keys of PEER_PINS) is installed at its pinned version next to torch 2.13.0 (CPU).

    It never installs into saekit's own environment, and torch is pinned in the same ``pip install`` so
    adding a peer cannot replace the torch the others were measured with."""
    unknown = [n for n in need if n not in PEER_PINS]
    if unknown:
        raise ValueError(f"no pinned version known for {unknown}; known: {sorted(PEER_PINS)}")
    py = venv / "bin" / "python"
    dists = [PEER_PINS[n][0] for n in need] + ["torch"]
    want = {PEER_PINS[n][0]: PEER_PINS[n][1].split("==")[1] for n in need}
    want["torch"] = TORCH_PIN.split("==")[1]
    have = _installed_versions(py, dists) if py.is_file() else dict.fromkeys(dists)
    wrong = [d for d in dists if not (have[d] or "").split("+")[0] == want[d]]
    if not wrong:
        return py
    pins = [TORCH_PIN, *(PEER_PINS[n][1] for n in need)]
    found = ", ".join(f"{d} {have[d] or 'missing'}" for d in wrong)
    if not allow_setup:
        raise SystemExit(
            f"{venv} is not ready ({found}); run without --no-setup or set it up by hand: "
            f"python3 -m venv {venv} && {py} -m pip install {' '.join(pins)} (benchmarks/README.md)"
        )
    print(f"{venv}: {found}; installing {' '.join(pins)} (python3 -m venv + pip; needs a package index)")
    if not py.is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", *pins], check=True)
    have = _installed_versions(py, dists)
    still = [d for d in dists if not (have[d] or "").split("+")[0] == want[d]]
    if still:
        raise SystemExit(f"{venv}: after pip install, {still} are still not at {want}")
    return py


# -- activations ------------------------------------------------------------------------------------------
def ensure_cache(out: Path, min_tokens: int, source: str, split: str, model_box: list):
    """A complete cache of at least ``min_tokens`` rows of ``source``/``split`` at HOOK in ``out``.

    An existing cache of the same text and split with enough rows is reused (a quick run reads a prefix or
    a subset of the full run's cache); otherwise ``min_tokens`` are extracted, replacing it.
    ``model_box`` holds the loaded model so that several caches share one load."""
    from saekit.activations import open_cache, write_cache

    try:
        cache = open_cache(out)
        s = cache.manifest["settings"]
        if (s["source"], s["split"]) == (source, split) and cache.n_tokens >= min_tokens:
            print(f"reusing {cache.n_tokens:,} cached tokens of {source} ({split}) in {out}")
            return cache
    except (ValueError, KeyError, FileNotFoundError):
        pass
    if not model_box:
        from saekit.models import load_model

        model_box.append(load_model("smollm2"))
    eta = min_tokens / EXTRACT_RATE
    print(f"extracting {min_tokens:,} tokens of {source} ({split}) into {out} (~{eta:.0f} s)")
    return write_cache(
        out, model_box[0], [HOOK], n_tokens=min_tokens, source=source, split=split, overwrite=True
    )


def shuffled_training_rows(cache, n_rows: int, seed: int, path: Path) -> np.ndarray:
    """The first ``n_rows`` of a seeded permutation of the cache's rows, saved to ``path`` (N, d) float32.

    Every library reads this one file front to back, so all see the same batches in the same order."""
    acts = cache.acts(HOOK)[: len(cache.acts(HOOK))]
    if n_rows > acts.shape[0]:
        raise ValueError(f"asked for {n_rows:,} training rows but the cache has {acts.shape[0]:,}")
    perm = np.random.default_rng(seed).permutation(acts.shape[0])[:n_rows]
    x = np.ascontiguousarray(acts[perm], dtype=np.float32)
    np.save(path, x)
    return x


class NpyRows:
    """Rows of a 2-D C-order ``.npy`` file, read block by block with plain file reads.

    Neither memory-mapped nor loaded whole: a worker's resident memory then holds one batch of training
    data, the same for every library, and its peak RSS measures the library rather than the data file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"{self.path}: unsupported .npy format version {version}")
            self.offset = fh.tell()
        if len(shape) != 2:
            raise ValueError(f"{self.path}: expected a 2-D (rows, d) array, got shape {shape}")
        if fortran:
            raise ValueError(f"{self.path}: Fortran-order arrays are not supported; save it C-ordered")
        if dtype.hasobject:
            raise ValueError(f"{self.path}: object arrays are not supported")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.row_bytes = self.shape[1] * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, n: int) -> np.ndarray:
        """Rows ``start`` .. ``start + n`` as a fresh (n, d) array."""
        if start < 0 or n < 0 or start + n > self.shape[0]:
            raise IndexError(f"rows {start}..{start + n} are outside {self.path} with {self.shape[0]} rows")
        out = np.empty((n, self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * self.row_bytes)
            got = fh.readinto(memoryview(out).cast("B"))
        if got != out.nbytes:
            raise OSError(f"{self.path}: short read ({got} of {out.nbytes} bytes); is the file truncated?")
        return out

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Every row in order, ``size`` rows at a time (the last chunk may be shorter)."""
        for start in range(0, self.shape[0], size):
            yield self.read(start, min(size, self.shape[0] - start))

    def batches(self, batch_size: int, start_batch: int = 0, cycle: bool = False) -> Iterator[np.ndarray]:
        """Consecutive full batches of ``batch_size`` rows from batch ``start_batch`` on; with ``cycle``,
        start over at the first batch when the file is used up (rows past the last full batch are never
        used, so every pass yields the same batches)."""
        n_batches = self.shape[0] // batch_size
        if n_batches == 0:
            raise ValueError(f"{self.shape[0]} rows in {self.path} are fewer than one batch of {batch_size}")
        b = start_batch
        while True:
            if b >= n_batches:
                if not cycle:
                    return
                b = 0
            yield self.read(b * batch_size, batch_size)
            b += 1


# -- worker outputs -----------------------------------------------------------------------------------------
class OutputWriter:
    """Collects a worker's held-out outputs: reconstructions (N, d) and codes (N, M) as CSR.

    CSR (``f_indptr``, ``f_indices``, ``f_values``) holds any architecture's code, TopK's k per row as well
    as ReLU's variable number, in a few MB where the dense (N, M) matrix would take gigabytes."""

    def __init__(self, out_dir: str | Path, width: int):
        self.out_dir, self.width = Path(out_dir), width
        self.x_hat: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def add_dense(self, x_hat_ND: np.ndarray, f_NM: np.ndarray) -> None:
        """One chunk of reconstructions and dense codes; zeros of the code are dropped."""
        if f_NM.shape != (x_hat_ND.shape[0], self.width):
            raise ValueError(
                f"codes of shape {f_NM.shape} for {x_hat_ND.shape[0]} rows and width {self.width}"
            )
        rows, cols = np.nonzero(f_NM)
        self._add(x_hat_ND, np.bincount(rows, minlength=f_NM.shape[0]), cols, f_NM[rows, cols])

    def add_topk(self, x_hat_NK: np.ndarray, idx_NK: np.ndarray, val_NK: np.ndarray) -> None:
        """One chunk of reconstructions and (N, k) selected latents with their values; zero values (a
        selected latent whose ReLU is 0) are dropped; each latent may appear once per row."""
        if idx_NK.shape != val_NK.shape or idx_NK.shape[0] != x_hat_NK.shape[0]:
            raise ValueError(f"indices {idx_NK.shape} and values {val_NK.shape} for {x_hat_NK.shape[0]} rows")
        if idx_NK.size and (idx_NK.min() < 0 or idx_NK.max() >= self.width):
            raise ValueError(f"latent indices outside [0, {self.width})")
        order = np.argsort(idx_NK, axis=1, kind="stable")
        idx, val = np.take_along_axis(idx_NK, order, 1), np.take_along_axis(val_NK, order, 1)
        if idx.shape[1] > 1 and (np.diff(idx, axis=1) == 0).any():
            raise ValueError("a latent is selected twice in one row")
        keep = val != 0
        self._add(x_hat_NK, keep.sum(1), idx[keep], val[keep])

    def _add(self, x_hat: np.ndarray, counts: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        self.x_hat.append(np.asarray(x_hat, dtype=np.float32))
        self.counts.append(counts.astype(np.int64))
        self.indices.append(cols.astype(np.int32))
        self.values.append(vals.astype(np.float32))

    def close(self) -> None:
        """Write ``x_hat.npy``, ``f_indptr.npy``, ``f_indices.npy``, ``f_values.npy`` into ``out_dir``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, np.int64)
        np.save(self.out_dir / "x_hat.npy", np.concatenate(self.x_hat))
        np.save(self.out_dir / "f_indptr.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        np.save(self.out_dir / "f_indices.npy", np.concatenate(self.indices))
        np.save(self.out_dir / "f_values.npy", np.concatenate(self.values))


def iter_outputs(out_dir: str | Path, width: int, chunk: int = 1024) -> Iterator[tuple[slice, Any, Any]]:
    """(row slice, x_hat chunk, dense code chunk) as torch tensors, from what :class:`OutputWriter` wrote."""
    import torch

    out_dir = Path(out_dir)
    x_hat = np.load(out_dir / "x_hat.npy", mmap_mode="r")
    indptr = np.load(out_dir / "f_indptr.npy")
    indices, values = np.load(out_dir / "f_indices.npy"), np.load(out_dir / "f_values.npy")
    if indptr.shape[0] != x_hat.shape[0] + 1 or not int(indptr[-1]) == indices.shape[0] == values.shape[0]:
        raise ValueError(f"{out_dir}: inconsistent outputs (x_hat {x_hat.shape}, indptr {indptr.shape})")
    for start in range(0, x_hat.shape[0], chunk):
        stop = min(start + chunk, x_hat.shape[0])
        lo, hi = int(indptr[start]), int(indptr[stop])
        rows = np.repeat(np.arange(stop - start), np.diff(indptr[start : stop + 1]))
        f = torch.zeros(stop - start, width)
        f[torch.from_numpy(rows), torch.from_numpy(indices[lo:hi].astype(np.int64))] = torch.from_numpy(
            values[lo:hi]
        )
        yield slice(start, stop), torch.from_numpy(np.array(x_hat[start:stop])), f


# -- schedule and process figures ---------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_start_fraction: float = 0.8) -> float:
    """saekit's learning-rate factor (``saekit.train.schedules.lr_factor`` with decay='linear' and
    final_lr_fraction=0), restated here because the benchmark environment has no saekit: linear warm-up
    ``(step + 1) / warmup_steps``, then 1, then linear decay to 0 from step
    ``int(decay_start_fraction * total_steps)``."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    start = int(decay_start_fraction * total_steps)
    if step < start:
        return warm
    return warm * (1.0 - min(1.0, (step - start) / max(1, total_steps - start)))


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (None where the file or field is missing: not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's ``VmHWM`` (the high-water mark of this process image's resident set), not ``ru_maxrss``: a
    child started with fork + exec inherits its parent's ``ru_maxrss`` (the kernel carries the old image's
    peak across exec), so a worker launched by an orchestrator holding the activations in memory would
    report the orchestrator's peak. ``ru_maxrss`` is the fallback where ``/proc`` is missing."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def rss_now_mb() -> float:
    """Current resident memory of this process, in MiB (``VmRSS``; 0 where ``/proc`` is missing)."""
    return (_status_kib("VmRSS") or 0) / 1024


def package_version(dist: str) -> str | None:
    """Installed version of a distribution in this environment, None where missing."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
