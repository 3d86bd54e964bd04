"""Feature records on disk: one folder that a report (or a notebook) reads without the model.

Layout of a records folder (``RUN/features`` by default)::

    features.json        provenance and settings (SAE, model, hook, text, tokens, exclusions, options)
    summary.safetensors  per-latent scalars: fires, act_sum, density, max_act, mean_act
    records.safetensors  per-latent arrays, latent-major (first axis = latent), see ARRAYS
    vocab.json           {token id: decoded text} for every token id the records mention

Everything is indexed by latent first, so one latent's record is a slice of each array:
:meth:`FeatureRecords.latent` reads only those slices (safetensors slices by offset), which is what
keeps a page of a report over thousands of latents cheap. The report, the plots and tests use the JSON-able
dict :meth:`FeatureRecords.latent` returns; its keys are documented there.

Window arrays hold the ``before + 1 + after`` tokens around the recorded position; token id -1 marks a
window position outside its context. ``top_score``/``sample_score`` are -inf for unused slots (a latent that
fired fewer times than there are slots), so the valid entries of a latent are the first ``n`` of its row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from saekit.analysis.folders import replacing_folder

FORMAT_VERSION = 1
META_FILE, SUMMARY_FILE, RECORDS_FILE, VOCAB_FILE = (
    "features.json",
    "summary.safetensors",
    "records.safetensors",
    "vocab.json",
)
SUMMARY_ARRAYS = ("fires", "act_sum", "density", "max_act", "mean_act")
ARRAYS = (
    # (M, n_top): the highest activations, best first, with the (context, position) they came from
    "top_score",
    "top_value",
    "top_context",
    "top_position",
    "top_tokens",  # (M, n_top, W) token ids of the window (-1 outside the context)
    "top_acts",  # (M, n_top, W) this latent's activation at each window position
    # (M, n_samples): a uniform random sample of the latent's firings, sorted by activation (ascending)
    "sample_score",
    "sample_value",
    "sample_context",
    "sample_position",
    "sample_tokens",
    "sample_acts",
    "hist",  # (M, n_bins + 2) activation histogram: underflow, log-spaced bins, overflow
    "logit_up_ids",  # (M, n_logits) tokens the decoder row promotes most, with the logit change
    "logit_up",
    "logit_down_ids",  # (M, n_logits) tokens it suppresses most
    "logit_down",
)
HEAD_ARRAYS = ("head_share",)
"""Only for SAEs on ``layers.{i}.attn_z`` (meta ``heads``): (M, n_heads) share of each decoder row's squared
norm per attention head; the summary then also holds ``top_head`` and ``top_head_share``
(:mod:`saekit.analysis.heads`)."""


def hist_edges(meta: dict[str, Any]) -> np.ndarray:
    """The log-spaced bin edges of the activation histograms (``meta["hist"]`` gives lo, hi, per decade)."""
    h = meta["hist"]
    n = int(round((h["log10_hi"] - h["log10_lo"]) * h["per_decade"]))
    return np.logspace(h["log10_lo"], h["log10_hi"], n + 1)


@dataclass
class FeatureRecords:
    """Feature records of one SAE: ``meta`` (JSON), per-latent ``summary`` arrays, the record arrays and
    the vocabulary. Arrays may be left on disk (``arrays`` empty) and read per latent."""

    meta: dict[str, Any]
    summary: dict[str, np.ndarray]
    vocab: dict[int, str]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None

    @property
    def width(self) -> int:
        return int(self.summary["fires"].shape[0])

    # -- reading --------------------------------------------------------------------------------------
    def _slice(self, name: str, i: int) -> np.ndarray:
        if name in self.arrays:
            return self.arrays[name][i]
        if self.path is None:
            raise KeyError(f"array {name!r} is neither loaded nor on disk")
        with safe_open(str(self.path / RECORDS_FILE), framework="np") as f:
            return f.get_slice(name)[i : i + 1][0]

    def load_arrays(self) -> FeatureRecords:
        """Read every record array into memory (what the report does: one read instead of M)."""
        if not self.arrays and self.path is not None:
            self.arrays = load_file(str(self.path / RECORDS_FILE))
        return self

    def latent(self, i: int) -> dict[str, Any]:
        """The JSON-able record of latent ``i``:

        ``latent, fires, density, max_act, mean_act``; ``top`` and ``samples``: lists of
        ``{"value", "context", "position", "tokens", "acts", "center"}`` (tokens/acts trimmed to the context,
        ``center`` the index of the recorded position in them), ``top`` best first and ``samples`` by
        increasing activation, each sample with its ``quantile`` group (0 = lowest); ``hist``:
        ``{"edges", "counts", "underflow", "overflow"}``; ``logits``: ``{"up": [[id, value], ...],
        "down": [...]}`` (empty when the SAE's width differs from the unembedding's); for an ``attn_z`` SAE
        also ``heads``: ``{"shares": [per head], "top": head, "top_share": its share}``.
        """
        if not 0 <= i < self.width:
            raise IndexError(f"latent {i} out of range: the SAE has {self.width} latents")
        s = {k: v[i].item() for k, v in self.summary.items()}
        record: dict[str, Any] = {
            "latent": i,
            "fires": int(s["fires"]),
            "density": float(s["density"]),
            "max_act": float(s["max_act"]),
            "mean_act": float(s["mean_act"]),
            "top": self._windows("top", i),
            "samples": self._windows("sample", i),
        }
        n_q = max(1, int(self.meta["config"]["n_quantiles"]))
        n_s = len(record["samples"])
        for j, sample in enumerate(record["samples"]):
            sample["quantile"] = min(n_q - 1, j * n_q // n_s)
        hist = self._slice("hist", i)
        record["hist"] = {
            "edges": hist_edges(self.meta).tolist(),
            "counts": hist[1:-1].tolist(),
            "underflow": int(hist[0]),
            "overflow": int(hist[-1]),
        }
        record["logits"] = {
            d: [
                [int(t), float(v)]
                for t, v in zip(self._slice(f"logit_{d}_ids", i), self._slice(f"logit_{d}", i), strict=True)
                if t >= 0
            ]
            for d in ("up", "down")
        }
        if "heads" in self.meta:
            shares = self._slice("head_share", i)
            top = int(np.argmax(shares))
            record["heads"] = {"shares": shares.tolist(), "top": top, "top_share": float(shares[top])}
        return record

    def _windows(self, kind: str, i: int) -> list[dict[str, Any]]:
        score = self._slice(f"{kind}_score", i)
        n = int(np.isfinite(score).sum())
        value, ctx, pos = (self._slice(f"{kind}_{k}", i)[:n] for k in ("value", "context", "position"))
        tokens, acts = self._slice(f"{kind}_tokens", i)[:n], self._slice(f"{kind}_acts", i)[:n]
        before = int(self.meta["config"]["before"])
        out = []
        for j in range(n):
            inside = tokens[j] >= 0
            first = int(np.argmax(inside))
            out.append(
                {
                    "value": float(value[j]),
                    "context": int(ctx[j]),
                    "position": int(pos[j]),
                    "tokens": tokens[j][inside].tolist(),
                    "acts": [float(a) for a in acts[j][inside]],
                    "center": before - first,
                }
            )
        return out

    def token_text(self, token_id: int) -> str:
        return self.vocab.get(int(token_id), f"<{token_id}>")

    # -- writing --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the folder atomically (temporary sibling, then rename); an existing records folder is
        replaced, any other existing path is refused."""
        path = Path(path)
        self.load_arrays()  # records opened lazily are read before their folder is replaced
        with replacing_folder(path, META_FILE) as tmp:
            meta = {"format_version": FORMAT_VERSION, **self.meta}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=_json_default) + "\n")
            save_file({k: np.ascontiguousarray(v) for k, v in self.summary.items()}, str(tmp / SUMMARY_FILE))
            save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()}, str(tmp / RECORDS_FILE))
            vocab = {str(k): v for k, v in sorted(self.vocab.items())}
            (tmp / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False))
        self.path = path
        return path


def load_records(path: str | Path, *, arrays: bool = False) -> FeatureRecords:
    """Open a records folder: metadata, summary and vocabulary now; the record arrays now if ``arrays``,
    else per latent on demand."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"no feature records in {path} (no {META_FILE}); run `saekit features` first")
    meta = json.loads((path / META_FILE).read_text())
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path / META_FILE}: format_version {version!r} is not one this saekit reads")
    vocab = {int(k): v for k, v in json.loads((path / VOCAB_FILE).read_text()).items()}
    records = FeatureRecords(meta, load_file(str(path / SUMMARY_FILE)), vocab, path=path)
    return records.load_arrays() if arrays else records


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        v = value.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
