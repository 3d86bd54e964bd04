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
"""

from __future__ import annotations

import copy
import itertools
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from saekit.sae.base import SAE, SAEOutput, StepContext
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

BatchSource = Callable[[int], Iterable[Any]]
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
    ):
        cfg.validate()
        self.sae, self.cfg, self.out_dir = sae, cfg, Path(out_dir)
        self.objective = objective
        self.on_eval, self.sae_metadata = on_eval, dict(sae_metadata or {})
        self.device = next(sae.parameters()).device
        self.dtype = next(sae.parameters()).dtype
        groups = [{"params": g["params"], "lr": cfg.lr * g["lr_scale"]} for g in sae.param_groups()]
        self.optimizer = torch.optim.Adam(
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
        )
        schedule = LRSchedule(
            cfg.total_steps, cfg.warmup_steps, cfg.decay, cfg.decay_start_fraction, cfg.final_lr_fraction
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.dead = DeadLatentTracker(sae.width, cfg.dead_tokens, self.device)
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

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

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
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(CHECKPOINT_NAME + ".*.tmp"):  # left by a kill during a write
            stale.unlink()
        if self.checkpoint_path.exists():
            self._resume()
        else:
            seed_everything(cfg.seed)
        # Steps after the checkpoint (or all, on a fresh start) are redone: drop their old records.
        truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
        batches: Iterator[Any] = iter(batch_source(self.batches_consumed))
        if not self.init_done:
            batches = self._init_from_data(batches)
        logger = MetricsLogger(
            self.out_dir,
            wandb_project=cfg.wandb_project,
            tensorboard=cfg.tensorboard,
            run_config=cfg.to_dict(),
        )
        bar = self._progress_bar()
        self.sae.train()
        t_window, tokens_window = time.perf_counter(), self.tokens
        t_session, seconds_before = time.perf_counter(), self.train_seconds
        stopped_early = False
        try:
            while self.step < cfg.total_steps:
                try:
                    raw = next(batches)
                except StopIteration:
                    stopped_early = True
                    warnings.warn(
                        f"the activation source ran out after {self.batches_consumed} batches, at step "
                        f"{self.step} of {cfg.total_steps}; saving the SAE as trained so far",
                        stacklevel=2,
                    )
                    break
                x = self._prepare(raw, self.batches_consumed)
                self.batches_consumed += 1
                if x is None:
                    continue
                last = self.step + 1 == cfg.total_steps
                log_now = (self.step + 1) % cfg.log_every == 0 or last
                self._train_step(x, log_now, raw)
                if bar is not None:
                    bar.update(x.shape[0])
                if log_now:
                    now = time.perf_counter()
                    record = self._record((self.tokens - tokens_window) / (now - t_window))
                    logger.log(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}")
                    self.log_sums, self.log_count, t_window, tokens_window = {}, 0, now, self.tokens
                if self.on_eval is not None and cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                    self._run_eval(logger)
                self.train_seconds = seconds_before + time.perf_counter() - t_session
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        if stopped_early:
            self.save_checkpoint()
        return self._write_outputs(stopped_early)

    def _train_step(self, x: torch.Tensor, log_now: bool, batch: Any) -> None:
        sums = self.log_sums
        ctx = StepContext(
            sparsity_scale=sparsity_scale(self.step, self.cfg.sparsity_warmup_steps),
            dead_mask=self.dead.dead_mask(),
            step=self.step,
            total_steps=self.cfg.total_steps,
        )
        out = self.sae(x, ctx)
        if self.objective is not None:
            out = self.objective.with_losses(batch, out, self.norm_scale)
        loss = out.loss
        if not torch.isfinite(loss).item():
            terms = {k: v.item() for k, v in out.losses.items()}
            raise FloatingPointError(f"loss is not finite at step {self.step + 1}: {terms}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.before_optimizer_step()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
            _accumulate(sums, "grad_norm", norm.detach())
        sums["_lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.optimizer.step()
        self.sae.after_optimizer_step()
        self.scheduler.step()
        with torch.no_grad():
            fired_NM = out.f != 0
            self.dead.update(fired_NM.any(dim=0), x.shape[0])
            _accumulate(sums, "loss", loss.detach())
            for name, value in out.losses.items():
                _accumulate(sums, f"loss/{name}", value.detach())
            _accumulate(sums, "l0", fired_NM.sum(dim=1).float().mean())
            for name, value in out.metrics.items():
                _accumulate(
                    sums, f"metrics/{name}", value.detach() if torch.is_tensor(value) else float(value)
                )
            if log_now:
                sums["_fvu_batch"] = _fvu(x, out.x_hat)
        self.step += 1
        self.tokens += x.shape[0]
        self.log_count += 1

    def _record(self, tokens_per_s: float) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": "train", "step": self.step, "tokens": self.tokens}
        sums, n = dict(self.log_sums), self.log_count
        fvu, lr = sums.pop("_fvu_batch"), sums.pop("_lr")
        record.update({k: float(v) / n for k, v in sums.items()})
        record["fvu"] = float(fvu)
        record["lr"] = lr
        record["sparsity_scale"] = sparsity_scale(self.step - 1, self.cfg.sparsity_warmup_steps)
        record["dead_fraction"] = self.dead.dead_fraction()
        record["rows_skipped"] = self.rows_skipped
        record["tokens_per_s"] = tokens_per_s
        return record

    def _run_eval(self, logger: MetricsLogger) -> None:
        result = self.on_eval(self, self.step)  # type: ignore[misc]
        self.sae.train()
        if result:
            record = {"kind": "eval", "step": self.step, "tokens": self.tokens}
            record.update({f"eval/{k}": v for k, v in result.items()})
            logger.log(record)

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
        n_bad = raw.shape[0] - int(good_N.sum())
        if n_bad:
            if self.cfg.nan_policy == "error" or self.objective is not None:
                fix = "(set nan_policy='skip' to drop such rows)"
                if self.objective is not None:
                    fix = "(the objective uses each batch whole, so rows cannot be dropped)"
                raise ValueError(
                    f"step {self.step + 1}: batch {index} of the activation source has {n_bad} of "
                    f"{raw.shape[0]} rows with NaN or Inf {fix}"
                )
            self.rows_skipped += n_bad
            raw = raw[good_N]
            if raw.shape[0] == 0:
                return None
        x = raw.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return x * self.norm_scale if self.norm_scale != 1.0 else x

    def _init_from_data(self, batches: Iterator[Any]) -> Iterator[Any]:
        """Estimate the norm scale and b_dec on the first batches, then give them back to be trained on."""
        n_batches = max(1, -(-self.cfg.init_tokens // self.cfg.batch_size))
        sample = list(itertools.islice(batches, n_batches))
        if not sample:
            raise ValueError("the activation source yielded no batches")
        acts = [self._activations(b) for b in sample]
        for i, b in enumerate(acts):
            if b.ndim != 2 or b.shape[1] != self.sae.d_in:
                raise ValueError(
                    f"batch {i} of the activation source has shape {tuple(b.shape)}; "
                    f"expected (batch, {self.sae.d_in}) for this SAE"
                )
        rows = torch.cat([b.to(device=self.device, dtype=self.dtype) for b in acts])
        del acts
        rows = rows[torch.isfinite(rows).all(dim=1)][: self.cfg.init_tokens]
        if rows.shape[0] == 0:
            raise ValueError("every row of the initial batches is NaN or Inf")
        self.norm_scale = 1.0
        if self.cfg.normalize_activations:
            # Imported here: the saekit.activations package pulls in the model code (transformers, ~1 s),
            # which importing saekit.train alone should not pay for.
            from saekit.activations.normalize import estimate_norm_scale

            self.norm_scale = estimate_norm_scale([rows], d=rows.shape[1], max_rows=rows.shape[0])
        x = rows * self.norm_scale
        if self.cfg.b_dec_init == "geometric_median":
            center = geometric_median(x)
        elif self.cfg.b_dec_init == "mean":
            center = x.mean(dim=0)
        else:
            center = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
        with torch.no_grad():
            self.sae.init_from_data(x, center)
        self.init_done = True
        return itertools.chain(sample, batches)

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
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm

        total = self.cfg.total_steps * self.cfg.batch_size
        return tqdm(
            total=total, initial=self.tokens, unit="tok", unit_scale=True, desc="train", dynamic_ncols=True
        )

    # -- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write everything the remaining steps depend on to ``out_dir/checkpoint.pt`` (atomically)."""
        state = trainer_state(self)
        if self.objective is not None:
            state["objective"] = self.objective.settings()
        atomic_torch_save(state, self.checkpoint_path)

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
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
