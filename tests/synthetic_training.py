"""Pieces shared by the per-architecture SAE tests (tests/test_sae_<arch>.py).

The learning tests all train on the same synthetic ground truth with the same bare loop (the trainer is
tested on its own in test_train.py), so that a failing recovery points at the architecture, not at the
loop. The checks every architecture must pass (exact input-scale folding, unit-norm decoder hooks) are
here too, so that each test file states only what differs: the SAE and its settings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from saekit.eval.synthetic import synthetic_activations
from saekit.sae import SAE, SAEOutput, StepContext

DEAD_AFTER_TOKENS = 2_000
"""A latent that has not fired for this many tokens counts as dead (the AuxK dead mask)."""

ContextFn = Callable[[int, torch.Tensor], StepContext]
"""(step, dead_mask (M,) bool) -> the StepContext for that step."""


def synthetic_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """20,000 samples in d=16 of 24 true features (2 active on average), and the true directions; scaled
    as the trainer normalises (E‖x‖² = d) so the learning rates match real training."""
    x, dirs = synthetic_activations(20_000, 16, 24, avg_active=2, seed=seed)
    x *= (16 / x.pow(2).sum(1).mean()).sqrt()
    return x, dirs


def sparsity_warmup(step: int, dead_mask: torch.Tensor) -> StepContext:
    """Sparsity coefficient ramped from 0 to full over the first 100 steps (for L1/L0-penalised SAEs)."""
    return StepContext(step=step, sparsity_scale=min(1.0, step / 100))


def with_dead_mask(step: int, dead_mask: torch.Tensor) -> StepContext:
    """The dead-latent mask (for SAEs with an AuxK loss)."""
    return StepContext(step=step, dead_mask=dead_mask)


def train_on_synthetic(
    sae: SAE, x: torch.Tensor, steps: int, ctx_fn: ContextFn, *, lr: float = 1e-2, batch: int = 256
) -> SAEOutput:
    """Train ``sae`` in place with Adam on random batches of ``x``; return the last step's output.

    Batches are drawn with the global torch RNG, so seed it before building the SAE. Dead latents are
    tracked as the trainer does (tokens since each latent last fired) and handed to ``ctx_fn``.
    """
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    tokens_since_fired = torch.zeros(sae.cfg.width)
    for step in range(steps):
        x_batch = x[torch.randint(0, len(x), (batch,))]
        out = sae(x_batch, ctx_fn(step, tokens_since_fired > DEAD_AFTER_TOKENS))
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
        tokens_since_fired += len(x_batch)
        tokens_since_fired[(out.f > 0).any(0)] = 0
    return out


def perturb_(sae: SAE, scale: float) -> SAE:
    """Add ``scale``·N(0, 1) noise to every parameter, so that checks do not pass by the init's symmetry
    (zero biases, tied encoder)."""
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(scale * torch.randn_like(p))
    return sae


def assert_fold_input_scale_exact(sae: SAE, x: torch.Tensor, s: float) -> None:
    """After ``fold_input_scale(s)`` the SAE on raw ``x`` gives the latents it gave on ``s·x``, and its
    decoder output is the old one divided by ``s``."""
    f_before = sae.encode(s * x)
    dec_before = sae.decode(f_before)
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae.encode(x), f_before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f_before) * s, dec_before, rtol=1e-5, atol=1e-5)


def assert_decoder_hooks_keep_unit_norm(sae: SAE, x: torch.Tensor, stretch: float) -> None:
    """``before_optimizer_step`` removes the decoder gradient parallel to each row, and
    ``after_optimizer_step`` puts rows stretched by ``stretch`` back to unit norm."""
    width = sae.cfg.width
    sae(x).loss.backward()
    sae.before_optimizer_step()
    torch.testing.assert_close(
        (sae.W_dec.grad * sae.W_dec.detach()).sum(1), torch.zeros(width), atol=1e-6, rtol=0
    )
    with torch.no_grad():
        sae.W_dec.mul_(stretch)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(width))
