"""Learning-rate and sparsity-coefficient schedules as pure functions of the step.

Pure functions make the schedule testable on values and make resuming trivial: the step count alone fixes
the learning rate, so a resumed run cannot drift from an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("cosine", "linear", "constant")


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "constant",
    decay_start_fraction: float = 0.0,
    final_lr_fraction: float = 0.0,
) -> float:
    """Multiplier of the base learning rate for the optimizer step with 0-based index ``step``.

    * Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, so the very first step
      already moves the weights (a factor of 0 would waste it).
    * Decay: from step ``s = int(decay_start_fraction * total_steps)`` the factor goes from 1 to
      ``final_lr_fraction`` with progress ``p = (step - s) / (total_steps - s)``: linearly, or along half a
      cosine. ``constant`` keeps 1.
    * Where warm-up and decay overlap (a decay starting early in a short run) the two factors multiply.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; choose one of {DECAYS}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay == "constant":
        return warm
    start = int(decay_start_fraction * total_steps)
    if step < start:
        return warm
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return warm * (final_lr_fraction + (1.0 - final_lr_fraction) * shape)


def sparsity_scale(step: int, warmup_steps: int) -> float:
    """Multiplier of the sparsity coefficient: ``step / warmup_steps`` (0 at the first step) up to 1.

    Starting the penalty at 0 lets latents find directions before the penalty pushes them to zero, which
    is why L1 and L0 penalties are usually warmed up (Gemma Scope: 10,000 steps)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


@dataclass
class LRSchedule:
    """``lr_factor`` with its settings bound, as the callable ``torch.optim.lr_scheduler.LambdaLR`` takes.

    A dataclass rather than a closure so the scheduler's ``state_dict`` can hold it (LambdaLR saves the
    ``__dict__`` of callable objects and skips plain functions)."""

    total_steps: int
    warmup_steps: int = 0
    decay: str = "constant"
    decay_start_fraction: float = 0.0
    final_lr_fraction: float = 0.0

    def __call__(self, step: int) -> float:
        return lr_factor(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            decay_start_fraction=self.decay_start_fraction,
            final_lr_fraction=self.final_lr_fraction,
        )
