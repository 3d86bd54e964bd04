"""Activation extraction: packed contexts → one model forward per batch → aligned rows of activations.

Which positions are kept matters as much as the forward. Two kinds are dropped by default, with counts:

* special tokens (BOS, EOS, padding): their activations are a constant of the model, not of the text;
* outliers: positions whose activation norm at any requested hook exceeds ``outlier_factor`` × the running
  median norm of that hook. SmolLM2 turns the first text position of ~4% of contexts into an attention sink
  with norm ~2e4 against a median ~170 (DESIGN.md); 63 such rows in 200k held 75% of the centred variance,
  so an SAE (and FVU) trained on them learns little else.

The same keep-mask applies to every hook of a forward, so row i of every hook is the same token.

Choosing the factor (measured on SmolLM2-135M, stdlib corpus, 160-240 contexts of 128 tokens, BOS first;
ratio = norm / median norm at the layer):

    resid_post layer     0    1    3     5     8     10   12    15    20    25    29
    ordinary max ratio   2.2  5.0  12.3  10.8  7.4   1.5  2.5   1.5   1.4   1.3   2.0
    sink ratios (pos 1)  -    -    -     -     -     -    5-107 2-89  2-65  3-30  ≤5

Sinks (always position 1, right after BOS, in ~5% of contexts) appear from layer ~11 on and hold 71%, 65%,
47%, 24% of the centred variance at layers 12, 15, 20, 25. Early layers have no sinks but a real heavy tail
(" the" and " " tokens reach 12x at layer 3), so a factor of 10 would drop 0.34% of ordinary tokens holding
22% of layer 3's variance. The default, 15, drops no ordinary token at any layer measured and removes all
but ≤2% of the variance the sinks hold at layers 12-25 (the sinks it keeps are the mild ones, ≤15x).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from saekit.data import iter_texts, pack_contexts, special_token_ids
from saekit.models import LoadedModel, forward_to_hooks

DEFAULT_OUTLIER_FACTOR = 15.0
KEPT, SPECIAL, OUTLIER, UNUSED = 0, 1, 2, -1
"""Per-position codes in :attr:`ActivationBatch.reasons_BT`; UNUSED marks positions cut off by ``head``."""


@dataclass
class ActivationBatch:
    """The kept positions of one forward over ``B`` contexts of ``T`` tokens, in context-major order."""

    tokens: torch.Tensor
    """(n,) int64 token id of each kept row (CPU)."""
    context_ids: torch.Tensor
    """(n,) int64 global index of the context each row came from (CPU)."""
    positions: torch.Tensor
    """(n,) int64 position of the row inside its context (CPU)."""
    acts: dict[str, torch.Tensor]
    """hook → (n, d) float32 activations, on the model's device."""
    reasons_BT: torch.Tensor
    """(B, T) int8 code per position: KEPT, SPECIAL, OUTLIER (or UNUSED after :meth:`head`)."""
    first_context_id: int

    @property
    def n_contexts(self) -> int:
        return int(self.reasons_BT.shape[0])

    @property
    def n_positions(self) -> int:
        """Positions looked at (kept + excluded), i.e. not counting UNUSED ones."""
        return int((self.reasons_BT >= 0).sum())

    @property
    def excluded(self) -> dict[str, int]:
        return {
            "special": int((self.reasons_BT == SPECIAL).sum()),
            "outlier": int((self.reasons_BT == OUTLIER).sum()),
        }

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def head(self, n: int) -> ActivationBatch:
        """The first ``n`` kept rows; positions after the last of them become UNUSED, so counts stay exact."""
        if n >= len(self):
            return self
        reasons = self.reasons_BT.clone()
        flat = reasons.view(-1)
        kept_at = torch.nonzero(flat == KEPT).view(-1)
        cut = int(kept_at[n]) if n > 0 else 0  # first flat position not consumed
        flat[cut:] = UNUSED
        return ActivationBatch(
            self.tokens[:n],
            self.context_ids[:n],
            self.positions[:n],
            {h: a[:n] for h, a in self.acts.items()},
            reasons,
            self.first_context_id,
        )


class NormTracker:
    """Running median of activation norms per hook, kept as a histogram of log10(norm).

    A histogram (1,600 log-spaced bins over 1e-8..1e8, ≈2.3% wide) rather than a window of recent values:
    it is bounded, exact to a bin, insensitive to the rare outliers it is meant to catch, and its state is
    a few hundred integers that the cache manifest stores so a resumed extraction decides exactly like an
    uninterrupted one.
    """

    LOG_LO, LOG_HI, BINS = -8.0, 8.0, 1600

    def __init__(self, hooks: Sequence[str]):
        self.counts = {h: np.zeros(self.BINS, np.int64) for h in hooks}

    def update(self, hook: str, norms: torch.Tensor) -> None:
        width = (self.LOG_HI - self.LOG_LO) / self.BINS
        logs = torch.log10(norms.detach().float().clamp_min(1e-30))
        idx = ((logs - self.LOG_LO) / width).floor().clamp(0, self.BINS - 1).long()
        self.counts[hook] += torch.bincount(idx.view(-1), minlength=self.BINS).cpu().numpy()

    def median(self, hook: str) -> float:
        """Median norm seen so far (interpolated inside its bin); NaN before any update."""
        counts = self.counts[hook]
        total = counts.sum()
        if total == 0:
            return float("nan")
        cum = np.cumsum(counts)
        b = int(np.searchsorted(cum, total / 2))
        before = cum[b] - counts[b]
        frac = (total / 2 - before) / counts[b]
        width = (self.LOG_HI - self.LOG_LO) / self.BINS
        return float(10 ** (self.LOG_LO + (b + frac) * width))

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly sparse form: {hook: {"bins": [...], "counts": [...]}}."""
        out = {}
        for h, c in self.counts.items():
            nz = np.flatnonzero(c)
            out[h] = {"bins": nz.tolist(), "counts": c[nz].tolist()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for h in self.counts:
            c = np.zeros(self.BINS, np.int64)
            if h in state:
                c[np.asarray(state[h]["bins"], np.int64)] = state[h]["counts"]
            self.counts[h] = c


def _batched(contexts: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    it = iter(contexts)
    while chunk := list(itertools.islice(it, batch_size)):
        lengths = {len(c) for c in chunk}
        if len(lengths) != 1:
            raise ValueError(f"contexts in a batch must have one length, got lengths {sorted(lengths)}")
        yield torch.stack([torch.as_tensor(c, dtype=torch.long) for c in chunk])


def iter_activations(
    loaded_or_model: LoadedModel | nn.Module,
    tokenizer: Any,
    contexts_iter: Iterable[torch.Tensor],
    hooks: Sequence[str],
    *,
    batch_size: int,
    exclude_special: bool = True,
    outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR,
    first_context_id: int = 0,
    norm_tracker: NormTracker | None = None,
) -> Iterator[ActivationBatch]:
    """Run the model over ``batch_size`` contexts at a time and yield the kept positions of each batch.

    ``tokenizer`` may be None when a :class:`LoadedModel` is given (its tokenizer is used); it is only
    needed to know the special token ids. ``outlier_factor=None`` keeps every non-special position
    (``exclude_special=False`` keeps those too). All hooks come from one ``forward_to_hooks`` call, which
    stops after the deepest hook. ``first_context_id`` numbers the contexts (a resumed run starts after the
    contexts already consumed) and ``norm_tracker`` carries the running median across calls.
    """
    hooks = list(hooks)
    if not hooks:
        raise ValueError("iter_activations needs at least one hook point")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if outlier_factor is not None and outlier_factor <= 1.0:
        raise ValueError(
            f"outlier_factor must be > 1 (a multiple of the median norm) or None, got {outlier_factor}"
        )
    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    if tokenizer is None and isinstance(loaded_or_model, LoadedModel):
        tokenizer = loaded_or_model.tokenizer
    if exclude_special and tokenizer is None:
        raise ValueError("exclude_special=True needs a tokenizer to know the special token ids")
    specials = torch.tensor(sorted(special_token_ids(tokenizer)) if exclude_special else [], dtype=torch.long)
    tracker = norm_tracker if norm_tracker is not None else NormTracker(hooks)
    device = next(model.parameters()).device
    next_id = first_context_id
    for ids_BT in _batched(contexts_iter, batch_size):
        B, T = ids_BT.shape
        out = forward_to_hooks(model, ids_BT.to(device), hooks)  # no_grad inside; stops after the last hook
        reasons_BT = torch.where(torch.isin(ids_BT, specials), SPECIAL, KEPT).to(torch.int8)
        candidate_BT = (reasons_BT == KEPT).to(device)
        outlier_BT = torch.zeros(B, T, dtype=torch.bool, device=device)
        for h in hooks:
            norms_BT = torch.linalg.vector_norm(out[h].float(), dim=-1)
            tracker.update(h, norms_BT[candidate_BT])
            if outlier_factor is not None:
                outlier_BT |= norms_BT > outlier_factor * tracker.median(h)
        reasons_BT[(outlier_BT & candidate_BT).cpu()] = OUTLIER
        keep_BT = reasons_BT == KEPT
        keep_dev = keep_BT.to(device)
        ctx_BT = torch.arange(next_id, next_id + B).view(B, 1).expand(B, T)
        pos_BT = torch.arange(T).view(1, T).expand(B, T)
        yield ActivationBatch(
            tokens=ids_BT[keep_BT],
            context_ids=ctx_BT[keep_BT],
            positions=pos_BT[keep_BT],
            acts={h: out[h][keep_dev].float() for h in hooks},
            reasons_BT=reasons_BT,
            first_context_id=next_id,
        )
        next_id += B


def iter_source_activations(
    loaded: LoadedModel,
    hooks: Sequence[str],
    *,
    source: str = "stdlib",
    split: str = "train",
    context_len: int = 128,
    batch_size: int = 16,
    prepend_bos: bool = True,
    skip_contexts: int = 0,
    exclude_special: bool = True,
    outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR,
    norm_tracker: NormTracker | None = None,
) -> Iterator[ActivationBatch]:
    """Text source → packed contexts → :func:`iter_activations`: the pipeline both the cache writer and the
    streaming trainer use. ``skip_contexts`` drops that many packed contexts first (tokenized, not run
    through the model), which is how a resumed run continues deterministically."""
    texts = iter_texts(source, split)
    contexts = pack_contexts(texts, loaded.tokenizer, context_len, prepend_bos=prepend_bos)
    yield from iter_activations(
        loaded,
        None,
        itertools.islice(contexts, skip_contexts, None),
        hooks,
        batch_size=batch_size,
        exclude_special=exclude_special,
        outlier_factor=outlier_factor,
        first_context_id=skip_contexts,
        norm_tracker=norm_tracker,
    )
