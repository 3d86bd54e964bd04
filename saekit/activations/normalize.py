"""The activation normalization scalar: one number s with E||s x||^2 = d on the training data.

Training on s·x makes hyperparameters (learning rate, sparsity coefficients) transfer across models and
layers whose activation scales differ by orders of magnitude; the trainer folds s back into the saved
weights so a saved SAE reads raw activations (DESIGN.md, "Activation normalization").
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch


def estimate_norm_scale(
    batches: Iterable[torch.Tensor | np.ndarray], d: int, max_rows: int = 100_000
) -> float:
    """Return s = sqrt(d / E||x||^2) estimated over the first ``max_rows`` rows of ``batches``.

    ``batches`` yields (B, d) arrays (tensors or numpy, any float dtype). The mean is accumulated in
    float64 so large activations (attention sinks reach norms of ~2e4, i.e. squared norms of ~5e8)
    lose no precision. Rows holding NaN or Inf are an error, reported with how many there were: one such
    row would make s zero or NaN and silently ruin training.
    """
    if d <= 0:
        raise ValueError(f"d must be positive, got {d}")
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    total_sq = 0.0
    n_rows = 0
    n_bad = 0
    for batch in batches:
        x_BD = torch.as_tensor(batch)
        if x_BD.ndim != 2 or x_BD.shape[1] != d:
            raise ValueError(f"expected batches of shape (B, {d}), got {tuple(x_BD.shape)}")
        # In blocks of rows: a float64 copy of a whole 32k-row sample (and its square) would cost
        # ~450 MB at d = 576, more than the SAE being trained.
        for block in x_BD[: max_rows - n_rows].split(4096):
            sq_B = block.to(torch.float64).square().sum(dim=1)
            finite_B = torch.isfinite(sq_B)  # a NaN or Inf anywhere in the row makes its square sum one
            n_bad += int((~finite_B).sum())
            total_sq += float(sq_B[finite_B].sum())
            n_rows += block.shape[0]
        if n_rows >= max_rows:
            break
    if n_bad:
        raise ValueError(
            f"{n_bad} of {n_rows} activation rows contain NaN or Inf; cannot estimate the norm scale "
            "(check the model dtype and the extraction: float16 overflows on large activations)"
        )
    if n_rows == 0:
        raise ValueError("no activation rows to estimate the norm scale from (empty batch source)")
    mean_sq = total_sq / n_rows
    if mean_sq <= 0.0:
        raise ValueError(f"all {n_rows} activation rows are zero; the norm scale is undefined")
    return math.sqrt(d / mean_sq)
