"""Several SAEs trained in lockstep from one stream of activations.

Reading or extracting activations is most of the cost of training small SAEs on CPU (a model forward per
token, or a pass over a cache), and it is the same for every SAE that reads the same hook points. Here
each batch is read once, as a dict ``{hook: (batch, d) tensor}``, and handed to every trainer, each with
its own SAE, optimizer, schedule, out folder and checkpoint (:class:`saekit.train.trainer.Trainer`'s
step-level API). Sources: :func:`cache_source` (a cache, shuffled as ``saekit train`` reads it) and
:func:`stream_source` (one model forward feeds every hook point asked for).

What stays exact:

* Each trainer draws random numbers from its own RNG state (swapped in around each of its calls), so a
  trainer here produces, bit for bit on CPU, the SAE it would produce trained alone on the same batches.
* Checkpoints: whenever one trainer's schedule (``checkpoint_every``, or its last step) asks for a
  checkpoint, every unfinished trainer writes one, so after a kill they all resume from the same batch
  and the shared source skips once. A trainer without a checkpoint among trainers with one cannot be
  resumed from that point, and is refused, naming both.

Batch sizes must agree (the batches are shared): different ones are refused. Token budgets may differ:
a trainer stops at its own ``total_tokens`` and the pass goes on for the others (a finished trainer's
state is final; resuming skips it). The data order is the source's, so a trainer's ``seed`` only seeds
its initialisation and RNG.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from saekit.train.checkpoint import get_rng_state, set_rng_state
from saekit.train.trainer import Trainer

MultiSource = Callable[[int], Iterable[dict[str, torch.Tensor]]]


class MultiTrainer:
    """Drive ``trainers`` (pairs of (key, Trainer)) from one source of ``{key: batch}`` dicts: trainer i
    trains on ``batch[key_i]``; several trainers may share a key.

    ``progress``: one bar for the pass (the trainers' own bars are off). ``threads``: torch CPU threads
    during the pass (default: the largest ``cfg.threads`` of the trainers, 0 leaving torch's default).
    """

    def __init__(
        self,
        trainers: Sequence[tuple[str, Trainer]],
        *,
        progress: bool | None = None,
        threads: int | None = None,
    ):
        if not trainers:
            raise ValueError("MultiTrainer needs at least one trainer")
        self.keys = [k for k, _ in trainers]
        self.trainers = [t for _, t in trainers]
        sizes = {t.out_dir: t.cfg.batch_size for t in self.trainers}
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"the trainers' batch sizes differ ({ {str(k): v for k, v in sizes.items()} }): trainers "
                "that share batches need one batch_size; train the others in a separate pass"
            )
        outs = [t.out_dir.resolve() for t in self.trainers]
        if len(set(outs)) != len(outs):
            twice = sorted({str(o) for o in outs if outs.count(o) > 1})
            raise ValueError(f"two trainers write to the same out_dir: {twice}")
        self.batch_size = self.trainers[0].cfg.batch_size
        self.progress = any(t.cfg.progress for t in self.trainers) if progress is None else progress
        self.threads = max(t.cfg.threads for t in self.trainers) if threads is None else threads
        self._rng: list[dict[str, Any] | None] = [None] * len(self.trainers)

    @contextlib.contextmanager
    def _rng_of(self, i: int) -> Iterator[None]:
        """Run with trainer i's RNG state as the global one, and keep what it leaves."""
        if self._rng[i] is not None:
            set_rng_state(self._rng[i])  # type: ignore[arg-type]
        try:
            yield
        finally:
            self._rng[i] = get_rng_state()

    def fit(self, source: MultiSource) -> list[dict[str, Any]]:
        """Train every trainer to its ``total_tokens`` (resuming from their checkpoints) and write their
        outputs; returns their summaries, in order."""
        threads_before, rng_before = torch.get_num_threads(), get_rng_state()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            stopped_early = self._fit(source)
            summaries = []
            for i, t in enumerate(self.trainers):
                with self._rng_of(i):
                    summaries.append(t.finish(stopped_early=stopped_early and not t.done))
            return summaries
        finally:
            for t in self.trainers:
                t.close()
            set_rng_state(rng_before)
            torch.set_num_threads(threads_before)

    def _fit(self, source: MultiSource) -> bool:
        trainers = self.trainers
        skips = []
        for i, t in enumerate(trainers):
            with self._rng_of(i):
                skips.append(t.begin(progress=False))
        active = [i for i, t in enumerate(trainers) if not t.done]
        if not active:
            return False
        resume_points = {str(trainers[i].out_dir): skips[i] for i in active}
        if len(set(resume_points.values())) > 1:
            raise ValueError(
                f"the unfinished trainers resume from different batches {resume_points}: one pass cannot "
                "feed them; train them separately, or delete the checkpoints to start them afresh"
            )
        batches: Iterator[dict[str, torch.Tensor]] = iter(source(skips[active[0]]))
        need = max(trainers[i].init_batches() for i in active)
        if need:
            sample = list(itertools.islice(batches, need))
            for i in active:
                n = trainers[i].init_batches()
                if n:
                    with self._rng_of(i):
                        trainers[i].init_from_sample([b[self.keys[i]] for b in sample[:n]])
            batches = itertools.chain(sample, batches)
        for i in active:
            trainers[i].start()
        bar = self._bar(active)
        try:
            dist = trainers[0].dist
            while active:
                raw = next(batches, None)
                ended = raw is None
                if ended if dist is None else dist.any(ended):  # on any rank: all stop together
                    t = trainers[active[0]]
                    warnings.warn(
                        f"the activation source ran out after {t.batches_consumed} batches, at step "
                        f"{t.step} of {t.cfg.total_steps}; saving the unfinished SAEs as trained so far",
                        stacklevel=3,
                    )
                    return True
                due = False
                for i in active:
                    with self._rng_of(i):
                        stepped = trainers[i].train_batch(raw[self.keys[i]], checkpoint=False)
                    due = due or (stepped and trainers[i].checkpoint_due())
                if due:  # all together, so that they all resume from this batch
                    for i in active:
                        with self._rng_of(i):
                            trainers[i].save_checkpoint()
                active = [i for i in active if not trainers[i].done]
                if bar is not None:
                    bar.update(self.batch_size)
        finally:
            if bar is not None:
                bar.close()
        return False

    def _bar(self, active: list[int]):
        if not self.progress or not self.trainers[0].is_main:
            return None
        from tqdm.auto import tqdm

        lead = max(active, key=lambda i: self.trainers[i].cfg.total_steps)
        t = self.trainers[lead]
        return tqdm(
            total=t.cfg.total_steps * self.batch_size,
            initial=t.batches_consumed * self.batch_size,
            unit="tok",
            unit_scale=True,
            desc=f"train {len(self.trainers)} SAEs",
            dynamic_ncols=True,
        )


# -- shared sources ------------------------------------------------------------------------------------
def cache_source(
    cache, hooks: Sequence[str], batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1
) -> MultiSource:
    """``{hook: batch}`` dicts from a cache: each hook point's batches exactly as ``saekit train`` reads
    them for one hook (shuffled across shards with ``seed``, epochs repeated), read once for every SAE of
    that hook. The hook points share the cache's row order (checked on every batch), so the rows of one
    batch are the same tokens at every hook. ``rank`` of ``world_size``: this rank's share of each."""
    hooks = list(dict.fromkeys(hooks))
    opts = {"seed": seed, "epochs": None, "return_rows": True, "rank": rank, "world_size": world_size}

    def source(skip_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        streams = [cache.batches(h, batch_size, skip_batches=skip_batches, **opts) for h in hooks]
        for parts in zip(*streams, strict=False):
            rows = parts[0][1]
            if any(not torch.equal(r, rows) for _, r in parts[1:]):
                raise RuntimeError(f"the hook points {hooks} of {cache.dir} do not share one row order")
            yield {h: x for h, (x, _) in zip(hooks, parts, strict=True)}

    return source


def stream_source(
    loaded,
    hooks: Sequence[str],
    batch_size: int,
    seed: int,
    *,
    text: str = "stdlib",
    split: str = "train",
    context_len: int = 128,
    model_batch_size: int = 16,
    exclude_special: bool = True,
    outlier_factor: float | None = None,
    buffer_rows: int = 64 * 1024,
    rank: int = 0,
    world_size: int = 1,
) -> MultiSource:
    """``{hook: batch}`` dicts straight from the model: one forward per model batch captures every hook
    point (stopping after the deepest), a shuffle buffer of ``buffer_rows`` tokens mixes them (a token
    keeps its rows at every hook), and each batch is split by hook. Excluded positions (special tokens,
    outliers at *any* of the hook points) are dropped at every hook, so a row is one token throughout.

    One process reads the same stream as ``saekit train --stream`` for one hook point. With
    ``world_size`` > 1, rank r runs the model on contexts r, r + W, ... only and yields batches of its
    share of ``batch_size`` from its own shuffle buffer; a resumed rank replays its stream and drops the
    batches consumed, so resuming is exact with the same number of ranks (with another, each rank skips
    as many batches of its new stream: the same amount of text, not the same rows)."""
    from saekit.activations import ShuffleBuffer
    from saekit.activations.extract import iter_activations
    from saekit.data import iter_texts, pack_contexts
    from saekit.train.distributed import share

    hooks = list(dict.fromkeys(hooks))
    lo, hi = share(batch_size, rank, world_size)
    n = hi - lo
    if n <= 0:
        raise ValueError(f"batch_size {batch_size} leaves rank {rank} of {world_size} no rows")
    capacity = max(2 * n, buffer_rows // world_size)
    buffer_seed = seed if world_size == 1 else seed + 1_000_003 * rank

    def source(skip_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        contexts = pack_contexts(iter_texts(text, split), loaded.tokenizer, context_len, prepend_bos=True)
        acts = iter_activations(
            loaded,
            None,
            itertools.islice(contexts, rank, None, world_size),
            hooks,
            batch_size=model_batch_size,
            exclude_special=exclude_special,
            outlier_factor=outlier_factor,
        )
        widths: list[int] = []

        def chunks() -> Iterator[torch.Tensor]:
            for b in acts:
                if not widths:
                    widths.extend(b.acts[h].shape[1] for h in hooks)
                yield torch.cat([b.acts[h] for h in hooks], dim=1)  # (tokens, Σ d)

        stream = ShuffleBuffer(capacity, n, seed=buffer_seed, drop_last=True)(chunks())
        for i, batch in enumerate(stream):
            if i >= skip_batches:
                yield dict(zip(hooks, batch.split(widths, dim=1), strict=True))

    return source
