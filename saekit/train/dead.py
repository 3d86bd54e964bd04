"""Which latents are dead: a count of tokens since each latent last fired.

A latent is dead when it has not fired in the last ``dead_tokens`` tokens. Before that many tokens have
been seen, the window is capped by the tokens seen so far: a latent is then dead when it has never fired.
Counting tokens (not batches) makes the threshold independent of the batch size; int64 because 10M-token
windows overflow int32 counts on long runs.

Distributed, ``sync`` turns one rank's (fired mask, token count) into the global ones (a latent fired if
it fired on any rank; tokens summed), so every rank holds the same counters as a single process would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

FiredSync = Callable[[torch.Tensor, int], "tuple[torch.Tensor, int]"]


class DeadLatentTracker:
    def __init__(
        self,
        width: int,
        dead_tokens: int,
        device: torch.device | str = "cpu",
        *,
        sync: FiredSync | None = None,
    ):
        if width <= 0 or dead_tokens <= 0:
            raise ValueError(f"width and dead_tokens must be positive, got {width}, {dead_tokens}")
        self.sync = sync
        self.dead_tokens = int(dead_tokens)
        self.tokens_since_fire_M = torch.zeros(width, dtype=torch.int64, device=device)
        self.tokens_seen = 0

    def update(self, fired_M: torch.Tensor, n_tokens: int) -> None:
        """Record one batch: ``fired_M`` (M,) bool is True for latents active on any of its ``n_tokens``."""
        if fired_M.shape != self.tokens_since_fire_M.shape:
            raise ValueError(
                f"fired mask has shape {tuple(fired_M.shape)}, "
                f"expected ({self.tokens_since_fire_M.shape[0]},)"
            )
        if self.sync is not None:
            fired_M, n_tokens = self.sync(fired_M, n_tokens)
        self.tokens_since_fire_M += n_tokens
        self.tokens_since_fire_M.masked_fill_(fired_M.to(self.tokens_since_fire_M.device), 0)
        self.tokens_seen += int(n_tokens)

    @property
    def threshold(self) -> int:
        """The window in tokens: ``dead_tokens`` capped by the tokens seen so far."""
        return min(self.dead_tokens, self.tokens_seen)

    def dead_mask(self) -> torch.Tensor:
        """(M,) bool. All False before any token was seen (nothing can be judged yet)."""
        if self.tokens_seen == 0:
            return torch.zeros_like(self.tokens_since_fire_M, dtype=torch.bool)
        return self.tokens_since_fire_M >= self.threshold

    def dead_fraction(self) -> float:
        return self.dead_mask().float().mean().item()

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens_since_fire": self.tokens_since_fire_M.cpu().clone(),
            "tokens_seen": self.tokens_seen,
            "dead_tokens": self.dead_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = state["tokens_since_fire"]
        if counts.shape != self.tokens_since_fire_M.shape:
            raise ValueError(
                f"dead-latent state is for width {counts.shape[0]}, "
                f"this SAE has width {self.tokens_since_fire_M.shape[0]}"
            )
        self.tokens_since_fire_M.copy_(counts)
        self.tokens_seen = int(state["tokens_seen"])
        self.dead_tokens = int(state["dead_tokens"])
