"""The training loop, the same for every architecture.

The trainer knows nothing of a specific SAE: the SAE returns its loss terms by name and owns its decoder
constraint through ``before_optimizer_step``/``after_optimizer_step``; the trainer adds the terms, steps
Adam, schedules the learning rate and the sparsity warm-up, tracks dead latents, logs, and checkpoints.

Resuming is exact: a checkpoint holds everything the remaining steps depend on (weights, Adam moments,
scheduler, batches consumed, dead-latent counters, RNG states, normalization scale), and the activation
source is asked to skip the batches already consumed. A run killed at any moment and resumed ends with
the same weights, bit for bit on CPU, as one that was never interrupted.

An optional :class:`Objective` replaces the SAE's own loss by one computed from the whole batch, still
without the trainer knowing what it is: the batch source then yields what the objective reads (token
contexts for end-to-end training, ``saekit.train.e2e``), the objective turns each batch into the
activations the SAE is trained on and adds its loss terms to the SAE's output.

``fit`` is written on a step-level API (:meth:`Trainer.begin`, :meth:`Trainer.init_from_sample`,
:meth:`Trainer.start`, :meth:`Trainer.train_batch`, :meth:`Trainer.finish`), so that a caller holding
the batches can drive several trainers from one stream (``saekit.train.multi``).

With a :class:`saekit.train.distributed.Distributed` context (``torchrun``), each rank trains on its
share of every global batch: the loop is the same, and the few places where ranks must agree (row counts,
gradients, dead latents, buffers, the initial sample, logged values, checkpoints) go through it. Every
counter and the checkpoint are in global terms, so a run resumes with any number of ranks.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from saekit.sae.base import SAE, SAEOutput, StepContext
from saekit.train.allocator import retain_freed_memory
from saekit.train.checkpoint import (
    CHECKPOINT_NAME,
    arch_name,
    atomic_torch_save,
    load_checkpoint,
    restore_trainer,
    seed_everything,
    trainer_state,
)
from saekit.train.config import TrainConfig
from saekit.train.dead import DeadLatentTracker
from saekit.train.geometric_median import geometric_median
from saekit.train.logging import MetricsLogger, read_metrics, truncate_metrics
from saekit.train.plots import plot_training_curves
from saekit.train.schedules import LRSchedule, sparsity_scale

if TYPE_CHECKING:
    from saekit.train.distributed import Distributed

BatchSource = Callable[[int], Iterable[Any]]
_END = object()  # a batch source's end
EvalCallback = Callable[["Trainer", int], "dict[str, float] | None"]


class Objective(Protocol):
    """A loss computed from the whole batch rather than from the SAE's input alone (e.g. end to end)."""

    def activations(self, batch: Any) -> torch.Tensor:
        """The (N, d_in) raw activations of ``batch`` that the SAE reads (no gradient)."""
        ...

    def with_losses(self, batch: Any, out: SAEOutput, norm_scale: float) -> SAEOutput:
        """``out`` (the SAE's output on ``norm_scale`` × those activations) with the loss terms to minimise
        and any extra metrics. Called right after ``activations`` on the same batch."""
        ...

    def settings(self) -> dict[str, Any]:
        """Plain values that determine the trained weights: a checkpoint resumes only under the same."""
        ...


class Trainer:
    """Train ``sae`` under ``cfg``, writing checkpoints, metrics and the final SAE into ``out_dir``.

    ``on_eval(trainer, step)`` is called every ``cfg.eval_every`` steps and after the last step; a dict it
    returns is logged with the keys prefixed by ``eval/``. Use :meth:`folded_sae` there to get an SAE that
    takes raw activations. ``sae_metadata`` (hook point, model, ...) is stored with the saved SAE.
    ``objective`` (optional) supplies the loss instead of the SAE alone; see :class:`Objective`.
    ``distributed`` (optional, from :func:`saekit.train.distributed.from_env`): data-parallel training,
    each rank's batch source yielding its share of every global batch of ``cfg.batch_size`` rows.
    """

    def __init__(
        self,
        sae: SAE,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        on_eval: EvalCallback | None = None,
        sae_metadata: dict[str, Any] | None = None,
        objective: Objective | None = None,
        distributed: Distributed | None = None,
    ):
        cfg.validate()
        self.sae, self.cfg, self.out_dir = sae, cfg, Path(out_dir)
        self.objective = objective
        self.dist = distributed if distributed is not None and distributed.world_size > 1 else None
        if self.dist is not None and objective is not None:
            raise ValueError(
                "end-to-end training (an objective) is not supported in distributed training: "
                "run it in one process"
            )
        self.on_eval, self.sae_metadata = on_eval, dict(sae_metadata or {})
        self.device = next(sae.parameters()).device
        self.dtype = next(sae.parameters()).dtype
        # Adam steps a contiguous alias of each parameter stored transposed (a latent-major W_enc): the fused
        # kernel copies a non-contiguous tensor in and out on every step (4× its contiguous time).
        self._aliases = AdamAliases(sae.parameters())
        groups = [
            {"params": self._aliases.stepped(g["params"]), "lr": cfg.lr * g["lr_scale"]}
            for g in sae.param_groups()
        ]
        # The fused kernel (CPU and CUDA) is one pass over each tensor instead of several: measured 0.46 s
        # → 0.15 s per step at 32× width (d = 576) on 2 CPU cores, a third of a TopK step's non-GEMM time.
        self.optimizer = torch.optim.Adam(
            groups,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=self.device.type in ("cpu", "cuda") or None,
        )
        schedule = LRSchedule(
            cfg.total_steps, cfg.warmup_steps, cfg.decay, cfg.decay_start_fraction, cfg.final_lr_fraction
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.dead = DeadLatentTracker(
            sae.width, cfg.dead_tokens, self.device, sync=None if self.dist is None else self.dist.fired
        )
        self.step = 0  # optimizer steps done
        self.batches_consumed = 0  # batches taken from the source (skipped ones included)
        self.tokens = 0  # rows trained on
        self.rows_skipped = 0
        self.norm_scale = 1.0
        self.init_done = False
        self.train_seconds = 0.0
        self.resumed_from: int | None = None
        # Sums of the logged values since the last record; checkpointed so that records after a resume
        # average the same steps as those of an uninterrupted run.
        self.log_sums: dict[str, torch.Tensor | float] = {}
        self.log_count = 0
        self._step_rows = 0  # rows (over all ranks) of the batch being trained on
        self._logger: MetricsLogger | None = None
        self._bar: Any = None
        self._show_progress = cfg.progress
        self._clock: dict[str, float] | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0, or the only one)."""
        return self.dist is None or self.dist.rank == 0

    @property
    def done(self) -> bool:
        """True once every step of ``cfg.total_steps`` has been taken."""
        return self.step >= self.cfg.total_steps

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, batch_source: BatchSource) -> dict[str, Any]:
        """Train to ``cfg.total_tokens`` (resuming from ``out_dir``'s checkpoint if there is one) and write
        ``sae/``, ``metrics.jsonl``, ``train_curve.png`` and ``train_summary.json``. Returns the summary."""
        threads_before = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        try:
            return self._fit(batch_source)
        finally:
            torch.set_num_threads(threads_before)

    def _fit(self, batch_source: BatchSource) -> dict[str, Any]:
        skip = self.begin()
        stopped_early = False
        try:
            batches: Iterator[Any] = iter(batch_source(skip))
            if not self.init_done:
                n = self.init_batches()
                sample = list(itertools.islice(batches, n))
                self.init_from_sample(sample)
                batches = itertools.chain(sample, batches)
            self.start()
            while not self.done:
                raw = next(batches, _END)
                ended = raw is _END
                if ended if self.dist is None else self.dist.any(ended):  # on any rank: all stop together
                    stopped_early = True
                    warnings.warn(
                        f"the activation source ran out after {self.batches_consumed} batches, at step "
                        f"{self.step} of {self.cfg.total_steps}; saving the SAE as trained so far",
                        stacklevel=3,
                    )
                    break
                self.train_batch(raw)
        finally:
            self.close()
        return self.finish(stopped_early=stopped_early)

    # -- the step-level API (fit is written on it; saekit.train.multi drives several trainers with it) --
    def begin(self, *, progress: bool | None = None) -> int:
        """Resume from ``out_dir``'s checkpoint, or seed a fresh run; drop metrics records after the
        checkpoint. Returns the number of batches already consumed: the batch source must skip them.
        ``progress`` overrides ``cfg.progress`` (a caller driving several trainers shows its own bar)."""
        if progress is not None:
            self._show_progress = progress
        if self.device.type == "cpu":
            retain_freed_memory()  # no page faults on every step's (M, d) tensors (allocator.py)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.out_dir.glob(CHECKPOINT_NAME + ".*.tmp"):  # left by a kill during a write
                stale.unlink()
        if self._checkpoint_exists():
            self._resume()
        else:
            seed_everything(self.cfg.seed)
        if self.is_main:
            # Steps after the checkpoint (or all, on a fresh start) are redone: drop their old records.
            truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
        return self.batches_consumed

    def init_batches(self) -> int:
        """How many of the first batches :meth:`init_from_sample` wants (0 once initialised)."""
        return 0 if self.init_done else max(1, -(-self.cfg.init_tokens // self.cfg.batch_size))

    def start(self) -> None:
        """Open the metrics log and the progress bar and start the clocks; call after the initialisation,
        right before the first :meth:`train_batch`."""
        cfg = self.cfg
        if self.is_main and self._logger is None:
            self._logger = MetricsLogger(
                self.out_dir,
                wandb_project=cfg.wandb_project,
                tensorboard=cfg.tensorboard,
                run_config=cfg.to_dict(),
            )
            self._bar = self._progress_bar() if self._show_progress else None
        self.sae.train()
        now = time.perf_counter()
        self._clock = {
            "window": now,
            "tokens_window": self.tokens,
            "session": now,
            "before": self.train_seconds,
        }

    def train_batch(self, batch: Any, *, checkpoint: bool | None = None) -> bool:
        """Take one raw batch from the source: check it, train one step on it (unless every row was
        dropped), log, evaluate and checkpoint as scheduled. ``checkpoint``: None follows
        ``cfg.checkpoint_every``; False leaves it to the caller (who calls :meth:`save_checkpoint`).
        Returns True when a step was taken."""
        cfg = self.cfg
        if self._clock is None:
            self.start()
        clock = self._clock
        assert clock is not None
        x = self._prepare(batch, self.batches_consumed)
        self.batches_consumed += 1
        if x is None:
            return False
        last = self.step + 1 == cfg.total_steps
        log_now = (self.step + 1) % cfg.log_every == 0 or last
        self._train_step(x, log_now, batch)
        if self._bar is not None:
            self._bar.update(self._step_rows)
        if log_now:
            now = time.perf_counter()
            record = self._record((self.tokens - clock["tokens_window"]) / (now - clock["window"]))
            if self._logger is not None:
                self._logger.log(record)
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}")
            self.log_sums, self.log_count = {}, 0
            clock["window"], clock["tokens_window"] = now, self.tokens
        if self.on_eval is not None and cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
            self._run_eval()
        self.train_seconds = clock["before"] + time.perf_counter() - clock["session"]
        if checkpoint is None:
            checkpoint = self.checkpoint_due()
        if checkpoint:
            self.save_checkpoint()
        return True

    def checkpoint_due(self) -> bool:
        """True right after a step that ``cfg.checkpoint_every`` (or the end of the run) checkpoints."""
        every = self.cfg.checkpoint_every
        return self.step > 0 and ((every and self.step % every == 0) or self.done)

    def close(self) -> None:
        """Close the progress bar and the metrics log (safe to call twice, and after an error)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._logger is not None:
            self._logger.close()
            self._logger = None

    def finish(self, *, stopped_early: bool = False) -> dict[str, Any]:
        """Write ``sae/``, ``train_curve.png`` and ``train_summary.json`` (checkpointing first when the
        source ran out early) and return the summary."""
        self.close()
        if stopped_early:
            self.save_checkpoint()
        if self.dist is not None:
            self.dist.barrier()  # every rank's last records and checkpoint are written
        summary = self._write_outputs(stopped_early) if self.is_main else self._summary(stopped_early)
        if self.dist is not None:
            self.dist.barrier()  # the outputs exist before any rank returns
        return summary

    def _train_step(self, x: torch.Tensor, log_now: bool, batch: Any) -> None:
        sums = self.log_sums
        ctx = StepContext(
            sparsity_scale=sparsity_scale(self.step, self.cfg.sparsity_warmup_steps),
            dead_mask=self.dead.dead_mask(),
            step=self.step,
            total_steps=self.cfg.total_steps,
        )
        buffers = None if self.dist is None else self.dist.snapshot_buffers(self.sae)
        out = self.sae(x, ctx)
        if self.objective is not None:
            out = self.objective.with_losses(batch, out, self.norm_scale)
        loss = out.loss
        bad = not torch.isfinite(loss).item()
        if self.dist is not None:
            bad = self.dist.any(bad)  # every rank stops together, none waits in a collective
        if bad:
            terms = {k: v.item() for k, v in out.losses.items()}
            where = "" if self.dist is None else f" (terms on rank {self.dist.rank})"
            raise FloatingPointError(f"loss is not finite at step {self.step + 1}{where}: {terms}")
        self.optimizer.zero_grad(set_to_none=True)
        self.sae.zero_grad(set_to_none=True)  # the same tensors, except those Adam steps through an alias
        loss.backward()
        if self.dist is not None:
            # the gradient of the loss on the global batch: each rank's weighted by its share of rows
            self.dist.reduce_gradients(self.sae.parameters(), x.shape[0] / self._step_rows)
        self.sae.before_optimizer_step()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
            _accumulate(sums, "grad_norm", norm.detach())
        sums["_lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self._aliases.take_grads()
        self.optimizer.step()
        self.sae.after_optimizer_step()
        if buffers is not None:
            self.dist.average_changed_buffers(self.sae, buffers)  # type: ignore[union-attr]
        self.scheduler.step()
        with torch.no_grad():
            fired_M, l0_mean = out.firing()  # from the sparse code when there is one: no (N, M) pass
            self.dead.update(fired_M, x.shape[0])
            _accumulate(sums, "loss", loss.detach())
            for name, value in out.losses.items():
                _accumulate(sums, f"loss/{name}", value.detach())
            _accumulate(sums, "l0", l0_mean)
            for name, value in out.metrics.items():
                _accumulate(
                    sums, f"metrics/{name}", value.detach() if torch.is_tensor(value) else float(value)
                )
            if log_now:
                sums["_fvu_batch"] = _fvu(x, out.x_hat)
        self.step += 1
        self.tokens += self._step_rows
        self.log_count += 1

    def _record(self, tokens_per_s: float) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": "train", "step": self.step, "tokens": self.tokens}
        sums, n = dict(self.log_sums), self.log_count
        if self.dist is not None:
            sums = self.dist.mean_values(sums)  # logged values: means over ranks
        fvu, lr = sums.pop("_fvu_batch"), sums.pop("_lr")
        record.update({k: float(v) / n for k, v in sums.items()})
        record["fvu"] = float(fvu)
        record["lr"] = lr
        record["sparsity_scale"] = sparsity_scale(self.step - 1, self.cfg.sparsity_warmup_steps)
        record["dead_fraction"] = self.dead.dead_fraction()
        record["rows_skipped"] = self.rows_skipped
        record["tokens_per_s"] = tokens_per_s
        return record

    def _run_eval(self) -> None:
        if not self.is_main:  # evaluation reads the whole SAE: once, on rank 0
            return
        result = self.on_eval(self, self.step)  # type: ignore[misc]
        self.sae.train()
        if result and self._logger is not None:
            record = {"kind": "eval", "step": self.step, "tokens": self.tokens}
            record.update({f"eval/{k}": v for k, v in result.items()})
            self._logger.log(record)

    # -- data -------------------------------------------------------------------------------------------
    def _activations(self, batch: Any) -> torch.Tensor:
        return batch if self.objective is None else self.objective.activations(batch)

    def _prepare(self, batch: Any, index: int) -> torch.Tensor | None:
        """Check one raw batch, apply the NaN policy, move it to the SAE and scale it. None = nothing left."""
        raw = self._activations(batch)
        if raw.ndim != 2 or raw.shape[1] != self.sae.d_in:
            raise ValueError(
                f"batch {index} of the activation source has shape {tuple(raw.shape)}; "
                f"expected (batch, {self.sae.d_in}) for this SAE"
            )
        good_N = torch.isfinite(raw).all(dim=1)
        n_good = int(good_N.sum())
        n_bad, n_rows, good_R = raw.shape[0] - n_good, raw.shape[0], [n_good]
        if self.dist is not None:  # decide on the global batch, the same way on every rank
            good_R, bad_R = self.dist.gather_counts(n_good, n_bad)
            n_bad, n_rows = sum(bad_R), sum(good_R) + sum(bad_R)
        if n_bad:
            if self.cfg.nan_policy == "error" or self.objective is not None:
                fix = "(set nan_policy='skip' to drop such rows)"
                if self.objective is not None:
                    fix = "(the objective uses each batch whole, so rows cannot be dropped)"
                raise ValueError(
                    f"step {self.step + 1}: batch {index} of the activation source has {n_bad} of "
                    f"{n_rows} rows with NaN or Inf {fix}"
                )
            self.rows_skipped += n_bad
            raw = raw[good_N]
        if sum(good_R) == 0:
            return None
        if min(good_R) == 0:
            raise ValueError(
                f"step {self.step + 1}: batch {index} leaves rank {good_R.index(0)} no finite row (after "
                "dropping NaN/Inf rows); distributed training needs at least one per rank"
            )
        self._step_rows = sum(good_R)
        x = raw.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return x * self.norm_scale if self.norm_scale != 1.0 else x

    def _init_from_data(self, batches: Iterator[Any]) -> Iterator[Any]:
        """Estimate the norm scale and b_dec on the first batches, then give them back to be trained on."""
        sample = list(itertools.islice(batches, self.init_batches()))
        self.init_from_sample(sample)
        return itertools.chain(sample, batches)

    def init_from_sample(self, sample: list[Any]) -> None:
        """Estimate the norm scale and b_dec on ``sample``, the first :meth:`init_batches` raw batches of
        the source (which are then trained on too, so the caller hands them to :meth:`train_batch`).
        Distributed, the ranks' shares are gathered first, so every rank initialises from the rows the
        single-process run would use, and the SAE leaves with rank 0's weights on every rank."""
        if not sample:
            raise ValueError("the activation source yielded no batches")
        acts = [self._activations(b) for b in sample]
        for i, b in enumerate(acts):
            if b.ndim != 2 or b.shape[1] != self.sae.d_in:
                raise ValueError(
                    f"batch {i} of the activation source has shape {tuple(b.shape)}; "
                    f"expected (batch, {self.sae.d_in}) for this SAE"
                )
        acts = [b.to(device=self.device, dtype=self.dtype) for b in acts]
        if self.dist is not None:
            acts = self.dist.gather_batches(acts)
        rows = torch.cat(acts)  # a fresh tensor: scaled in place below, so the sample is held ~once
        del acts
        finite = torch.isfinite(rows).all(dim=1)
        if not finite.all():
            rows = rows[finite]
        rows = rows[: self.cfg.init_tokens]
        if rows.shape[0] == 0:
            raise ValueError("every row of the initial batches is NaN or Inf")
        self.norm_scale = 1.0
        if self.cfg.normalize_activations:
            # Imported here: the saekit.activations package pulls in the model code (transformers, ~1 s),
            # which importing saekit.train alone should not pay for.
            from saekit.activations.normalize import estimate_norm_scale

            self.norm_scale = estimate_norm_scale([rows], d=rows.shape[1], max_rows=rows.shape[0])
        x = rows.mul_(self.norm_scale)
        if self.cfg.b_dec_init == "geometric_median":
            center = geometric_median(x)
        elif self.cfg.b_dec_init == "mean":
            center = x.mean(dim=0)
        else:
            center = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
        with torch.no_grad():
            self.sae.init_from_data(x, center)
        self.init_done = True
        if self.dist is not None:
            self.dist.broadcast_module(self.sae)

    # -- outputs ----------------------------------------------------------------------------------------
    def folded_sae(self) -> SAE:
        """A copy of the SAE, in eval mode, that takes raw activations (the norm scale folded in)."""
        sae = copy.deepcopy(self.sae).eval()
        if self.norm_scale != 1.0:
            sae.fold_input_scale(self.norm_scale)
        return sae

    def _summary(self, stopped_early: bool) -> dict[str, Any]:
        records = read_metrics(self.out_dir / "metrics.jsonl")
        last = next((r for r in reversed(records) if r.get("kind") == "train"), {})
        return {
            "steps": self.step,
            "total_steps": self.cfg.total_steps,
            "tokens": self.tokens,
            "batches_consumed": self.batches_consumed,
            "rows_skipped": self.rows_skipped,
            "stopped_early": stopped_early,
            "resumed_from_step": self.resumed_from,
            "norm_scale": self.norm_scale,
            "dead_fraction": self.dead.dead_fraction(),
            "train_seconds": self.train_seconds,
            "tokens_per_s": self.tokens / self.train_seconds if self.train_seconds > 0 else None,
            "final": {k: v for k, v in last.items() if k not in ("kind",)},
            "sae": {"arch": arch_name(self.sae), "cfg": self.sae.cfg.to_dict()},
            "config": self.cfg.to_dict(),
        }

    def _write_outputs(self, stopped_early: bool) -> dict[str, Any]:
        summary = self._summary(stopped_early)
        metadata = {
            **self.sae_metadata,
            "normalization": {"scale": self.norm_scale, "folded": True, "rule": "E||s x||^2 = d"},
            "training": {
                k: summary[k] for k in ("steps", "tokens", "rows_skipped", "stopped_early", "dead_fraction")
            }
            | {"config": self.cfg.to_dict(), "b_dec_init": self.cfg.b_dec_init},
        }
        try:
            from saekit.sae.io import save_sae
        except ImportError:
            warnings.warn("saekit.sae.io is not available: the trained SAE was not saved", stacklevel=2)
        else:
            save_sae(self.folded_sae().cpu(), self.out_dir / "sae", metadata)
        plot_training_curves(
            read_metrics(self.out_dir / "metrics.jsonl"),
            self.out_dir / "train_curve.png",
            title=f"{arch_name(self.sae)} d={self.sae.d_in} M={self.sae.width}",
        )
        (self.out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _progress_bar(self):
        from tqdm.auto import tqdm

        total = self.cfg.total_steps * self.cfg.batch_size
        return tqdm(
            total=total, initial=self.tokens, unit="tok", unit_scale=True, desc="train", dynamic_ncols=True
        )

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write everything the remaining steps depend on to ``out_dir/checkpoint.pt`` (atomically).

        Distributed, every rank calls this: the partial logging window is averaged over ranks (so the
        checkpoint holds global values), the ranks' weights are checked to be identical, rank 0 writes and
        the others wait for it."""
        if self.dist is not None:
            self.log_sums = self.dist.mean_values(self.log_sums)
            self.dist.check_same_weights(self.sae)
        if self.is_main:
            state = trainer_state(self)
            if self.objective is not None:
                state["objective"] = self.objective.settings()
            if self.dist is not None:
                state["world_size"] = self.dist.world_size  # provenance only: any number of ranks resumes
            atomic_torch_save(state, self.checkpoint_path)
        if self.dist is not None:
            self.dist.barrier()

    def _checkpoint_exists(self) -> bool:
        exists = self.checkpoint_path.exists()
        return exists if self.dist is None else self.dist.broadcast_object(exists)

    def _resume(self) -> None:
        if self.dist is None:
            state = load_checkpoint(self.checkpoint_path)
        else:  # rank 0 reads it; the others need no access to the file
            state = self.dist.broadcast_object(
                load_checkpoint(self.checkpoint_path) if self.is_main else None
            )
        saved, now = state.get("objective"), None if self.objective is None else self.objective.settings()
        if saved != now:
            raise ValueError(
                f"{self.checkpoint_path} was written with objective settings {saved}, but this run has "
                f"{now}. Use the same settings to resume, or another out_dir to start afresh."
            )
        restore_trainer(self, state, source=self.checkpoint_path)
        self.resumed_from = self.step


def _accumulate(sums: dict[str, Any], key: str, value: torch.Tensor | float) -> None:
    sums[key] = sums[key] + value if key in sums else value


def _fvu(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> torch.Tensor:
    """FVU of one batch, centred on the batch mean (see specs/metrics.md)."""
    total = (x_ND - x_ND.mean(dim=0)).pow(2).sum()
    return (x_ND - x_hat_ND).pow(2).sum() / total.clamp_min(torch.finfo(x_ND.dtype).tiny)


def contiguous_alias(p: torch.nn.Parameter) -> torch.nn.Parameter | None:
    """A contiguous (n, m) parameter sharing the storage of the (m, n) ``p`` when ``p`` is stored
    transposed (its ``.t()`` is contiguous but it is not); None otherwise. Stepping the alias steps ``p``."""
    if p.dim() != 2 or p.is_contiguous() or not p.t().is_contiguous():
        return None
    return torch.nn.Parameter(p.detach().t(), requires_grad=p.requires_grad)


class AdamAliases:
    """The parameters Adam steps: each one stored transposed is replaced by its :func:`contiguous_alias`,
    which takes the parameter's gradient (as a free transpose) before every optimizer step."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.pairs = [(p, a) for p in params if (a := contiguous_alias(p)) is not None]
        self._alias_of = {id(p): a for p, a in self.pairs}

    def stepped(self, params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """``params`` with each aliased parameter replaced by its alias."""
        return [self._alias_of.get(id(p), p) for p in params]

    def take_grads(self) -> None:
        """Give every alias its parameter's current gradient."""
        for p, alias in self.pairs:
            alias.grad = None if p.grad is None else p.grad.t()
