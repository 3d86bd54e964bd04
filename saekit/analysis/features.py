"""Feature records in one streaming pass: for every latent, what makes it fire and what it writes.

One pass over a corpus (packed contexts → model forward to the hook point → SAE encode) updates, per latent:

* the ``n_top`` highest activations, each with its context window (tokens and this latent's activation at
  every window position), kept as a running top-n: ``topk`` over [the current best, this batch's best];
* ``n_samples`` firing positions drawn uniformly at random (without replacement), with their windows: every
  firing gets a random key and the ``n_samples`` largest keys are kept — the same running top-n, scored by
  the key, which makes it a reservoir sample. Sorted by activation at the end and cut into ``n_quantiles``
  equal groups, group q is a uniform sample of the latent's q-th activation quantile (by rank among its
  firings), without knowing the quantiles while streaming;
* firing counts, activation sums and a histogram over fixed log-spaced bins (fixed, so no second pass and no
  rescaling as the maximum grows).

Memory is O(M · (n_top + n_samples) · window) and does not grow with the corpus. Windows are cut while the
whole batch of contexts is in memory, so no second pass is needed to show surrounding tokens.

Positions the extraction excludes (special tokens, attention-sink outliers; see
:mod:`saekit.activations.extract`) are never recorded or counted; inside a window they show activation 0.
The logit effects (:mod:`saekit.analysis.logits`) need only the weights and are computed once; so does, for an
SAE on ``layers.{i}.attn_z``, each latent's per-head attribution (:mod:`saekit.analysis.heads`); its logit
effects are those of the decoder rows mapped through the attention output projection.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from saekit.activations.extract import DEFAULT_OUTLIER_FACTOR, KEPT, iter_activations
from saekit.analysis.heads import HeadGeometry, attach_to_records, is_attn_z, residual_directions
from saekit.analysis.logits import logit_effects
from saekit.analysis.records import FeatureRecords
from saekit.data import special_token_ids

HIST_LOG10_LO, HIST_LOG10_HI, HIST_PER_DECADE = -4.0, 4.0, 10
"""Activation histogram: 10 bins per decade from 1e-4 to 1e4, plus an underflow and an overflow bin."""


@dataclass
class FeatureConfig:
    """What the feature records keep per latent."""

    n_top: int = 20
    """Top-activating contexts kept per latent."""
    n_samples: int = 24
    """Firings sampled uniformly per latent, shown grouped by activation quantile."""
    n_quantiles: int = 4
    """Quantile groups the samples are cut into (n_samples / n_quantiles samples each)."""
    before: int = 12
    """Tokens of context kept before the activating token."""
    after: int = 4
    """Tokens of context kept after the activating token."""
    n_logits: int = 10
    """Most promoted and most suppressed tokens kept per latent (logit effect of the decoder row)."""
    feature_batch_size: int = 16
    """Contexts per model forward pass."""
    seed: int = 0
    """Seed of the random keys that choose the sampled firings."""

    def validate(self) -> None:
        if min(self.n_top, self.n_samples, self.n_quantiles, self.feature_batch_size) < 1:
            raise ValueError("n_top, n_samples, n_quantiles and feature_batch_size must be >= 1")
        if min(self.before, self.after, self.n_logits) < 0:
            raise ValueError("before, after and n_logits must be >= 0")


class _Batch:
    """One batch's contexts and latents, with the map between kept rows and positions of the B·T grid."""

    def __init__(
        self, f_NM: torch.Tensor, keep_BT: torch.Tensor, ids_BT: torch.Tensor, first_context_id: int
    ):
        self.f_NM, self.ids_BT, self.first_context_id = f_NM, ids_BT, first_context_id
        self.flat_of_row = keep_BT.reshape(-1).nonzero().view(-1)  # (N,) grid position of each kept row
        self.row_of_flat = torch.full((keep_BT.numel(),), -1, dtype=torch.long, device=keep_BT.device)
        self.row_of_flat[self.flat_of_row] = torch.arange(self.flat_of_row.shape[0], device=keep_BT.device)

    def latent_at(self, flat: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Activation of ``latent`` at grid positions ``flat`` (broadcast together); 0 where excluded."""
        row = self.row_of_flat[flat]
        return torch.where(row >= 0, self.f_NM[row.clamp_min(0), latent], 0.0).clamp_min(0.0)


def _best_per_latent(
    latent_n: torch.Tensor, score_n: torch.Tensor, flat_n: torch.Tensor, width: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """From entries (latent, score, grid position): per latent the n best, as (M, n) score and position
    tensors (score -inf where a latent has fewer entries). Sorts by score, then stably by latent."""
    order = score_n.argsort(descending=True)
    order = order[latent_n[order].argsort(stable=True)]
    lat = latent_n[order]
    counts = torch.bincount(lat, minlength=width)
    rank = torch.arange(lat.shape[0], device=lat.device) - (counts.cumsum(0) - counts)[lat]
    sel = rank < n
    score_MK = torch.full((width, n), -torch.inf, device=score_n.device)
    flat_MK = torch.zeros(width, n, dtype=torch.long, device=score_n.device)
    score_MK[lat[sel], rank[sel]] = score_n[order][sel]
    flat_MK[lat[sel], rank[sel]] = flat_n[order][sel]
    return score_MK, flat_MK


class BestN:
    """Per latent, the ``n`` entries with the highest score seen so far, each with its context window.

    Scores of -inf mark unused slots. Everything lives on one device as (M, n[, W]) tensors.
    """

    def __init__(self, width: int, n: int, before: int, after: int, device: torch.device):
        W = before + 1 + after
        self.n = n
        self.offsets_W = torch.arange(-before, after + 1, device=device)
        self.score = torch.full((width, n), -torch.inf, device=device)
        self.value = torch.zeros(width, n, device=device)
        self.context = torch.full((width, n), -1, dtype=torch.long, device=device)
        self.position = torch.full((width, n), -1, dtype=torch.long, device=device)
        self.tokens = torch.full((width, n, W), -1, dtype=torch.long, device=device)
        self.acts = torch.zeros(width, n, W, device=device)

    def update(self, score_MK: torch.Tensor, flat_MK: torch.Tensor, batch: _Batch) -> None:
        """Merge candidates (score, flat position in the batch's B·T grid; -inf for none) into the best n.
        Windows are cut only for the candidates that get in: after the first batches, a handful."""
        best, sel_MN = torch.cat([self.score, score_MK], 1).topk(self.n, dim=1)
        new_MN = (sel_MN >= self.n) & torch.isfinite(best)
        changed_C = new_MN.any(dim=1).nonzero().view(-1)  # latents that take a new entry: reorder those
        old_CN = sel_MN[changed_C].clamp(max=self.n - 1)
        for name in ("value", "context", "position", "tokens", "acts"):
            t = getattr(self, name)
            t[changed_C] = t[changed_C].gather(
                1, old_CN if t.ndim == 2 else old_CN[..., None].expand(-1, -1, t.shape[2])
            )
        self.score = best
        m_S, slot_S = new_MN.nonzero(as_tuple=True)
        flat_S = flat_MK[m_S, sel_MN[m_S, slot_S] - self.n]
        T = batch.ids_BT.shape[1]
        b_S, t_S = flat_S // T, flat_S % T
        pos_SW = t_S[:, None] + self.offsets_W
        inside = (pos_SW >= 0) & (pos_SW < T)
        flat_SW = b_S[:, None] * T + pos_SW.clamp(0, T - 1)
        self.tokens[m_S, slot_S] = batch.ids_BT.reshape(-1)[flat_SW].masked_fill(~inside, -1)
        self.acts[m_S, slot_S] = batch.latent_at(flat_SW, m_S[:, None]).masked_fill(~inside, 0.0)
        self.value[m_S, slot_S] = batch.latent_at(flat_S, m_S)
        self.context[m_S, slot_S] = b_S + batch.first_context_id
        self.position[m_S, slot_S] = t_S

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}_score": self.score.cpu().numpy().astype(np.float32),
            f"{prefix}_value": self.value.cpu().numpy().astype(np.float32),
            f"{prefix}_context": self.context.cpu().numpy(),
            f"{prefix}_position": self.position.cpu().numpy().astype(np.int32),
            f"{prefix}_tokens": self.tokens.cpu().numpy().astype(np.int32),
            f"{prefix}_acts": self.acts.cpu().numpy().astype(np.float32),
        }

    def sort_by_value(self) -> None:
        """Reorder each latent's valid entries by increasing activation (unused slots stay last)."""
        key = torch.where(torch.isfinite(self.score), self.value, torch.inf)
        order = key.argsort(dim=1)
        for name in ("score", "value", "context", "position", "tokens", "acts"):
            t = getattr(self, name)
            idx = order if t.ndim == 2 else order[..., None].expand_as(t)
            setattr(self, name, t.gather(1, idx))


class FeatureAccumulator:
    """The state of the streaming pass; :meth:`add` takes one batch, :meth:`finish` makes the records."""

    def __init__(self, width: int, cfg: FeatureConfig, device: torch.device):
        cfg.validate()
        self.cfg, self.width, self.device = cfg, width, device
        self.top = BestN(width, cfg.n_top, cfg.before, cfg.after, device)
        self.samples = BestN(width, cfg.n_samples, cfg.before, cfg.after, device)
        self.n_bins = int(round((HIST_LOG10_HI - HIST_LOG10_LO) * HIST_PER_DECADE))
        self.hist = torch.zeros(width * (self.n_bins + 2), dtype=torch.long, device=device)
        self.fires = torch.zeros(width, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.rng = torch.Generator().manual_seed(cfg.seed)

    @torch.no_grad()
    def add(self, f_NM: torch.Tensor, keep_BT: torch.Tensor, ids_BT: torch.Tensor, first_context_id: int):
        """One batch: ``f_NM`` the latents of the kept positions (``keep_BT``, in row-major order) of the
        contexts ``ids_BT``, numbered from ``first_context_id``.

        Works on the firing entries only (N·L0 of them, not N·M) and cuts windows only for entries that
        get in, so a batch costs little next to the model forward that produced it."""
        f_NM = f_NM.float()  # activations <= 0 do not fire; windows show them as 0
        batch = _Batch(f_NM, keep_BT.to(self.device), ids_BT.to(self.device), first_context_id)
        rows_n, latent_n = (f_NM > 0).nonzero(as_tuple=True)
        value_n = f_NM[rows_n, latent_n]
        flat_n = batch.flat_of_row[rows_n]
        self.top.update(*_best_per_latent(latent_n, value_n, flat_n, self.width, self.cfg.n_top), batch)
        keys_n = torch.rand(latent_n.shape[0], generator=self.rng).to(self.device)
        self.samples.update(
            *_best_per_latent(latent_n, keys_n, flat_n, self.width, self.cfg.n_samples), batch
        )

        self.fires += torch.bincount(latent_n, minlength=self.width)
        self.act_sum.index_add_(0, latent_n, value_n.double())
        bin_n = ((torch.log10(value_n) - HIST_LOG10_LO) * HIST_PER_DECADE).floor()
        b = bin_n.clamp(-1, self.n_bins).long() + 1  # 0: underflow, n_bins + 1: overflow
        self.hist += torch.bincount(latent_n * (self.n_bins + 2) + b, minlength=self.hist.shape[0])
        self.n_tokens += int(f_NM.shape[0])

    def finish(self, W_dec_MD: torch.Tensor | None, model: Any, meta: dict[str, Any]) -> FeatureRecords:
        """The records: windows and statistics, the logit effects of ``W_dec_MD`` through ``model``'s
        unembedding, and ``meta`` (provenance) with the settings added."""
        self.samples.sort_by_value()
        arrays = {**self.top.arrays("top"), **self.samples.arrays("sample")}
        arrays["hist"] = self.hist.view(self.width, -1).cpu().numpy()
        n_log = self.cfg.n_logits
        effects = logit_effects(W_dec_MD, model, n_log) if W_dec_MD is not None and n_log > 0 else None
        if effects is None:
            empty_i, empty_v = np.full((self.width, 0), -1, np.int64), np.zeros((self.width, 0), np.float32)
            effects_np = [empty_i, empty_v, empty_i, empty_v]
        else:
            effects_np = [t.numpy() for t in effects]
        for name, arr in zip(
            ("logit_up_ids", "logit_up", "logit_down_ids", "logit_down"), effects_np, strict=True
        ):
            arrays[name] = arr.astype(np.int64 if name.endswith("ids") else np.float32)
        fires = self.fires.cpu().numpy()
        act_sum = self.act_sum.cpu().numpy()
        summary = {
            "fires": fires,
            "act_sum": act_sum,
            "density": fires / max(self.n_tokens, 1),
            "max_act": np.where(fires > 0, arrays["top_value"][:, 0], 0.0).astype(np.float32),
            "mean_act": (act_sum / np.maximum(fires, 1)).astype(np.float32),
        }
        meta = {
            **meta,
            "width": self.width,
            "n_tokens": self.n_tokens,
            "config": asdict(self.cfg),
            "hist": {"log10_lo": HIST_LOG10_LO, "log10_hi": HIST_LOG10_HI, "per_decade": HIST_PER_DECADE},
            "logit_effects": effects is not None,
        }
        return FeatureRecords(meta, summary, {}, arrays)


def _numbered(contexts: Iterable[torch.Tensor], store: dict[int, torch.Tensor]) -> Iterator[torch.Tensor]:
    """Pass contexts through, remembering each by its index until the batch that holds it is processed."""
    for i, ctx in enumerate(contexts):
        store[i] = torch.as_tensor(ctx, dtype=torch.long)
        yield store[i]


@torch.no_grad()
def collect_features(
    sae: Any,
    model: Any,
    tokenizer: Any,
    hook: str,
    contexts: Iterable[torch.Tensor],
    *,
    n_tokens: int,
    cfg: FeatureConfig | None = None,
    exclude_special: bool = True,
    outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> FeatureRecords:
    """Stream ``contexts`` through ``model`` up to ``hook``, encode with ``sae`` and return the records of
    ``n_tokens`` kept positions (fewer if the contexts run out; ``meta["n_tokens"]`` says how many).
    The vocabulary of the records holds the decoded text of every token id they mention."""
    cfg = cfg or FeatureConfig()
    sae_device = next(sae.parameters()).device
    acc = FeatureAccumulator(sae.width, cfg, sae_device)
    store: dict[int, torch.Tensor] = {}
    excluded = {"special": 0, "outlier": 0}
    n_contexts = 0
    bar = _progress(n_tokens) if progress else None
    t0 = time.perf_counter()
    batches = iter_activations(
        model,
        tokenizer,
        _numbered(contexts, store),
        [hook],
        batch_size=cfg.feature_batch_size,
        exclude_special=exclude_special,
        outlier_factor=outlier_factor,
    )
    for batch in batches:
        batch = batch.head(n_tokens - acc.n_tokens)
        first, B = batch.first_context_id, batch.n_contexts
        ids_BT = torch.stack([store.pop(i) for i in range(first, first + B)])
        if len(batch):
            f_NM = sae.encode(batch.acts[hook].to(sae_device))
            acc.add(f_NM, batch.reasons_BT == KEPT, ids_BT, first)
        for key, value in batch.excluded.items():
            excluded[key] += value
        n_contexts += int((batch.reasons_BT >= 0).any(dim=1).sum())  # contexts it read from
        if bar is not None:
            bar.update(len(batch))
        if acc.n_tokens >= n_tokens:
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    run_meta = {
        **(meta or {}),
        "hook": hook,
        "n_contexts": n_contexts,
        "excluded": excluded,
        "exclude_special": exclude_special,
        "outlier_factor": outlier_factor,
        "seconds": seconds,
    }
    if tokenizer is not None:
        run_meta["special_ids"] = sorted(special_token_ids(tokenizer))
    W_dec = getattr(sae, "W_dec", None)
    # attn_z: decoder rows reach the residual stream through the attention output projection
    on_heads = is_attn_z(hook) and isinstance(W_dec, torch.Tensor)
    records = acc.finish(residual_directions(W_dec, model, hook) if on_heads else W_dec, model, run_meta)
    if on_heads:
        attach_to_records(records, W_dec.detach(), HeadGeometry.from_model(model, hook))
    records.vocab = _vocab(tokenizer, records.arrays)
    return records


def _vocab(tokenizer: Any, arrays: dict[str, np.ndarray]) -> dict[int, str]:
    """Decoded text of each token id in the windows and logit lists (one token at a time, as shown)."""
    if tokenizer is None:
        return {}
    ids = np.unique(np.concatenate([arrays[k].reshape(-1) for k in arrays if k.endswith(("tokens", "ids"))]))
    ids = [int(i) for i in ids if i >= 0]
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True))


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="features", dynamic_ncols=True)
