"""A bounded shuffle buffer for streaming activations from the model straight into the trainer.

Activations arrive in context order: consecutive rows come from the same document, which makes an SAE
batch far less diverse than the data. The buffer holds up to ``capacity`` rows; once it is full it is
shuffled and batches are taken from it until it is down to half, then it is refilled. Every batch is
therefore a random draw from at least ``capacity / 2`` rows, memory stays at ``capacity × d`` floats,
and each incoming row is emitted exactly once (the tail is drained, shuffled, when the source ends).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch


class ShuffleBuffer:
    """Turn an iterator of (n, d) chunks into shuffled (batch_size, d) float32 batches.

    Deterministic given ``seed`` and the same input chunks. ``drop_last`` drops the final batch when
    it is smaller than ``batch_size``.
    """

    def __init__(self, capacity: int, batch_size: int, *, seed: int = 0, drop_last: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if capacity < 2 * batch_size:
            raise ValueError(
                f"capacity ({capacity}) must be at least 2 × batch_size ({batch_size}) so that a batch is "
                "drawn from more rows than it holds"
            )
        self.capacity = capacity
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last

    def __call__(self, chunks: Iterable[torch.Tensor | np.ndarray]) -> Iterator[torch.Tensor]:
        return self.iterate(chunks)

    def iterate(self, chunks: Iterable[torch.Tensor | np.ndarray]) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        store_ND: torch.Tensor | None = None
        filled = 0
        for chunk in chunks:
            x_nD = torch.as_tensor(chunk).detach().to(torch.float32)
            if x_nD.ndim != 2:
                raise ValueError(f"ShuffleBuffer expects (n, d) chunks, got shape {tuple(x_nD.shape)}")
            if store_ND is None:
                store_ND = torch.empty(self.capacity, x_nD.shape[1], dtype=torch.float32, device=x_nD.device)
            elif x_nD.shape[1] != store_ND.shape[1]:
                raise ValueError(
                    f"chunk width {x_nD.shape[1]} differs from earlier chunks ({store_ND.shape[1]})"
                )
            start = 0
            while start < x_nD.shape[0]:
                take = min(self.capacity - filled, x_nD.shape[0] - start)
                store_ND[filled : filled + take] = x_nD[start : start + take]
                filled += take
                start += take
                if filled == self.capacity:
                    _shuffle_(store_ND, filled, gen)
                    while filled - self.batch_size >= self.capacity // 2:
                        filled -= self.batch_size
                        yield store_ND[filled : filled + self.batch_size].clone()
        if store_ND is None or filled == 0:
            return
        _shuffle_(store_ND, filled, gen)  # drain: the rest, in one more shuffled pass
        while filled > 0:
            n = min(self.batch_size, filled)
            if n < self.batch_size and self.drop_last:
                return
            filled -= n
            yield store_ND[filled : filled + n].clone()


def _shuffle_(store_ND: torch.Tensor, filled: int, gen: torch.Generator) -> None:
    """Permute the first ``filled`` rows in place (one gather; rows kept from the last round mix in)."""
    perm = torch.randperm(filled, generator=gen).to(store_ND.device)
    store_ND[:filled] = store_ND[:filled][perm]
