"""Evaluate a saved SAE on a model and text: reconstruction, sparsity and splice fidelity in one pass.

Each batch of contexts runs through the model once cleanly, capturing the hook activations and the logits
together; the SAE reconstructs the kept positions; the splice and ablation runs reuse those clean logits and
(where the splice positions are the evaluated ones) those reconstructions. The result is an
:class:`EvalResult`, a plain record that round-trips through JSON and prints as a table.

Excluded positions (counted and reported, never silently dropped):

* special tokens (BOS, EOS, ...), because their activations are outliers no SAE is trained on;
* attention sinks: positions whose activation norm exceeds ``outlier_factor`` × the median norm of the
  batch. On SmolLM2 a handful of such rows (norm ~22,000 against ~200) hold most of the centred variance,
  so an FVU that includes them measures little else.

The same positions are left clean in the spliced run unless ``splice_special=True``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saekit.activations.extract import DEFAULT_OUTLIER_FACTOR
from saekit.config import strict_from_dict
from saekit.data.packing import special_token_ids
from saekit.eval.metrics import ReconstructionStats
from saekit.eval.splice import ABLATIONS, FidelityStats, log_probs_, model_device, splice_mode_name
from saekit.models.hooks import capture, forward_to_hooks

SCHEMA_VERSION = 1


def _jsonable(value: Any) -> Any:
    """Plain-JSON form: arrays/tensors to lists, numpy scalars to Python, NaN and ±inf to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class EvalResult:
    """Everything one evaluation measured, with the settings needed to reproduce it."""

    model: str
    hook: str
    text_source: str
    n_tokens: int
    """Tokens run through the model (reconstruction metrics use ``reconstruction['n_tokens']`` of them)."""
    splice_mode: str
    ablation: str
    reconstruction: dict[str, Any]
    """Output of :meth:`ReconstructionStats.result` (see the metric spec for definitions)."""
    splice: dict[str, Any] | None
    """Output of :class:`FidelityStats` (CE, KL, recovered scores), None when splicing was skipped."""
    excluded: dict[str, int] = field(default_factory=dict)
    """Positions left out of the reconstruction metrics, by reason."""
    sae: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Optional analyses by name (``afa``, ``progressive``: :mod:`saekit.eval.analyses`)."""
    elapsed_s: float = 0.0
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """The record as strict JSON (NaN written as null); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Build from a dict: unknown keys and missing required keys are errors naming them, and so is a
        schema newer than this code."""
        result = strict_from_dict(cls, data, what="eval result")
        if result.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"eval result schema {result.schema_version} is newer than this saekit understands "
                f"({SCHEMA_VERSION})"
            )
        return result

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> EvalResult:
        """Parse JSON text, or read it from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def format_table(self) -> str:
        """An aligned two-column table of the headline figures."""
        r, s = self.reconstruction, self.splice or {}
        rows: list[tuple[str, Any]] = [
            ("model", self.model),
            ("hook", self.hook),
            ("text", self.text_source),
            ("tokens evaluated", f"{r.get('n_tokens')} of {self.n_tokens}"),
            ("excluded", ", ".join(f"{v} {k}" for k, v in self.excluded.items()) or "none"),
            ("", ""),
            ("fvu", r.get("fvu")),
            ("explained_variance", r.get("explained_variance")),
            ("ev_per_token", r.get("ev_per_token")),
            ("mse", r.get("mse")),
            ("nmse", r.get("nmse")),
            ("cosine", r.get("cosine")),
            ("l2_ratio", r.get("l2_ratio")),
            ("relative_reconstruction_bias", r.get("relative_reconstruction_bias")),
            ("l0", r.get("l0")),
            ("l1", r.get("l1")),
            ("dead_fraction", r.get("dead_fraction")),
            ("dense_fraction", r.get("dense_fraction")),
        ]
        if self.splice is not None:
            rows += [
                ("", ""),
                ("splice_mode", f"{self.splice_mode}; ablation: {self.ablation}"),
                ("ce_clean", s.get("ce_clean")),
                ("ce_sae", s.get("ce_sae")),
                ("ce_ablation", s.get("ce_ablation")),
                ("ce_loss_recovered", s.get("ce_loss_recovered")),
                ("delta_ce", s.get("delta_ce")),
                ("kl_sae", s.get("kl_sae")),
                ("kl_ablation", s.get("kl_ablation")),
                ("kl_score", s.get("kl_score")),
            ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {_fmt(value)}".rstrip() for name, value in rows)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.5g}"
    return str(value)


def _context_batches(contexts: Iterable[torch.Tensor], n_tokens: int, batch_size: int) -> list[torch.Tensor]:
    """Stack contexts into (B, T) batches until at least ``n_tokens`` tokens are gathered."""
    batches, current, seen = [], [], 0
    for ctx in contexts:
        ctx = torch.as_tensor(ctx)
        if ctx.ndim != 1:
            raise ValueError(f"contexts must be 1-D token tensors, got shape {tuple(ctx.shape)}")
        current.append(ctx.long())
        seen += ctx.numel()
        if len(current) == batch_size or seen >= n_tokens:
            batches.append(torch.stack(current))
            current = []
        if seen >= n_tokens:
            break
    if current:
        batches.append(torch.stack(current))
    if not batches:
        raise ValueError("contexts_iter yielded no contexts")
    return batches


def position_masks(
    ids_BT: torch.Tensor, act_BTD: torch.Tensor, special: torch.Tensor, opts: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """(eval mask, splice mask, excluded counts) for one batch; see the module docstring."""
    is_special = torch.isin(ids_BT, special)
    norms_BT = act_BTD.float().norm(dim=-1)
    outlier = torch.zeros_like(is_special)
    if opts["outlier_factor"] is not None:
        ref = norms_BT[~is_special] if (~is_special).any() else norms_BT.flatten()
        outlier = (norms_BT > opts["outlier_factor"] * ref.median()) & ~is_special
    eval_mask = ~outlier & (~is_special if opts["exclude_special"] else torch.ones_like(is_special))
    splice_mask = torch.ones_like(is_special) if opts["splice_special"] else ~is_special & ~outlier
    counts = {
        "special": int(is_special.sum()) if opts["exclude_special"] else 0,
        "outlier": int(outlier.sum()),
    }
    return eval_mask, splice_mask, counts


@torch.no_grad()
def evaluate_sae(
    sae: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    hook: str,
    contexts_iter: Iterable[torch.Tensor],
    *,
    n_tokens: int,
    batch_size: int = 8,
    exclude_special: bool = True,
    outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR,
    splice_special: bool = False,
    ablation: str = "zero",
    run_splice: bool = True,
    center: torch.Tensor | None = None,
    model_name: str = "",
    text_source: str = "",
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> EvalResult:
    """Evaluate ``sae`` (raw-activation ``encode``/``decode``) at ``hook`` on about ``n_tokens`` tokens.

    ``contexts_iter`` yields 1-D token tensors (e.g. from ``saekit.data.pack_contexts``). ``outlier_factor``
    None keeps every non-special position; ``center`` is passed to :class:`ReconstructionStats` for an exact
    ``ev_per_token``. ``run_splice=False`` skips the two extra forwards per batch. ``on_batch(ids_BT, x_KD)``
    sees each batch's tokens and the activations the metrics were computed on (for further analyses).
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if n_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"n_tokens and batch_size must be positive, got {n_tokens} and {batch_size}")
    start = time.perf_counter()
    device = model_device(model)
    sae_param = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    sae_device = sae_param.device if sae_param is not None else device
    sae_dtype = sae_param.dtype if sae_param is not None else torch.float32

    def reconstruct(x_KD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = sae.encode(x_KD.to(device=sae_device, dtype=sae_dtype))
        return f, sae.decode(f).to(device=x_KD.device, dtype=x_KD.dtype)

    special = torch.tensor(sorted(special_token_ids(tokenizer)), dtype=torch.long, device=device)
    opts = {
        "outlier_factor": outlier_factor,
        "exclude_special": exclude_special,
        "splice_special": splice_special,
    }
    batches = [b.to(device) for b in _context_batches(contexts_iter, n_tokens, batch_size)]

    ablation_D = None
    if run_splice and ablation == "mean":  # needs a first pass (stopping at the hook) for the mean
        total, count = 0.0, 0
        for ids in batches:
            act = forward_to_hooks(model, ids, [hook])[hook]
            mask = position_masks(ids, act, special, opts)[1]
            total = total + act[mask].double().sum(0)
            count += int(mask.sum())
        ablation_D = (total / max(count, 1)).float()

    rec, fid = ReconstructionStats(center=center), FidelityStats()
    excluded = {"special": 0, "outlier": 0}
    for ids in batches:
        with capture(model, [hook]) as acts:
            clean_logp = log_probs_(model(input_ids=ids, use_cache=False).logits)
        act_BTD = acts[hook]
        eval_mask, splice_mask, counts = position_masks(ids, act_BTD, special, opts)
        for k, v in counts.items():
            excluded[k] += v
        f, x_hat = reconstruct(act_BTD[eval_mask])
        rec.update(act_BTD[eval_mask], x_hat, f)
        if on_batch is not None:
            on_batch(ids, act_BTD[eval_mask])
        if run_splice:
            if torch.equal(eval_mask, splice_mask):  # the same positions: reuse the reconstructions

                def values(a_KD: torch.Tensor, x_hat: torch.Tensor = x_hat) -> torch.Tensor:
                    return x_hat
            else:

                def values(a_KD: torch.Tensor) -> torch.Tensor:
                    return reconstruct(a_KD)[1]

            fid.add_batch(model, hook, ids, None, clean_logp, splice_mask, values, ablation_D)
        del clean_logp, acts

    n_seen = sum(b.numel() for b in batches)
    mode = splice_mode_name(splice_special, outlier_factor)
    cfg = getattr(sae, "cfg", None)
    return EvalResult(
        model=model_name,
        hook=hook,
        text_source=text_source,
        n_tokens=n_seen,
        splice_mode=mode,
        ablation=ablation,
        reconstruction=rec.result(),
        splice={**fid.result(), "splice_mode": mode, "ablation": ablation} if run_splice else None,
        excluded=excluded,
        sae={
            "arch": getattr(sae, "arch", type(sae).__name__),
            "d_in": getattr(cfg, "d_in", None),
            "width": getattr(cfg, "width", None),
        },
        settings={
            "batch_size": batch_size,
            "context_len": int(batches[0].shape[1]),
            "exclude_special": exclude_special,
            "outlier_factor": outlier_factor,
            "splice_special": splice_special,
            "center_given": center is not None,
        },
        elapsed_s=time.perf_counter() - start,
    )
