"""Progressive coding: how well the first G latents of an SAE do alone, for a grid of G, for any SAE.

Peter & Søgaard 2025 (arXiv 2505.00190; spec §4.4) prune a trained SAE post hoc: rank its latents by an
importance score, keep the top G, and measure reconstruction and downstream loss as G grows. A Matryoshka
SAE is trained to be read this way in index order; any other SAE needs an order first:

    energy     E[f_i²]              (mean squared activation; the best order in the paper)
    frequency  E[1(f_i ≠ 0)]        (firing frequency)
    index      i                    (the natural order of a Matryoshka SAE)

Truncation to G latents keeps the SAE's own code on the kept latents and zeroes the others *after* the
SAE's selection (a TopK SAE is not asked for a new top-k among the kept latents):

    x̂_G = decode(f ⊙ 1[i ∈ order[:G]]),   f = encode(x)

so the code at G is a subset of the code at every G' > G, and G = M is the SAE itself. Reported per G:
FVU (centred, :mod:`saekit.eval.metrics`), MSE and L0 of the truncated code, and, through
:func:`saekit.eval.splice.splice_fidelity`, CE loss recovered with x̂_G spliced into the model.

:func:`permute_latents` turns an order into an SAE whose latent i is the old ``order[i]``, so that
truncation becomes "keep the first G" (what a Matryoshka SAE's ``encode(x, width=G)`` does). It reads the
SAE generically from its ``state_dict``, one tensor at a time:

* ``W_enc`` is permuted along its last axis, ``W_dec`` and ``b_enc`` along their first, ``b_dec`` not at
  all (the :mod:`saekit.sae.base` conventions);
* any other 1-D tensor of length ``width`` (b_enc, a threshold, a gate bias, a magnitude scale) is
  permuted, when ``d_in ≠ width``;
* a tensor with no axis of length ``width`` (a scalar threshold, a scale) is copied unchanged;
* anything else is ambiguous (a 2-D tensor with an axis of length ``width`` that is not W_enc/W_dec, or a
  1-D tensor of length ``width == d_in``) and raises, unless the class declares it in the optional class
  attribute ``latent_axes: dict[str, int | None]`` mapping ``state_dict`` names to their latent axis
  (``None``: no latent axis). A declaration always wins over the rules above, so e.g. JumpReLU declares
  ``{"log_threshold": 0}`` to be permutable when ``d_in == width``.

Orders are computed on one set of activations and may be evaluated on another; pass ``order=`` to
:func:`progressive_curve` to keep them apart.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch

from saekit.eval.metrics import ReconstructionStats
from saekit.eval.splice import splice_fidelity
from saekit.sae.base import SAE

OrderBy = Literal["energy", "frequency", "index"]
ORDERS = ("energy", "frequency", "index")
_KNOWN_AXES: dict[str, int | None] = {"W_enc": -1, "W_dec": 0, "b_enc": 0, "b_dec": None}


def _param(sae: SAE) -> torch.Tensor:
    """A parameter of ``sae``: where (device, dtype) its inputs must go."""
    return next(sae.parameters())


def _batches(x_ND: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    if x_ND.ndim != 2:
        raise ValueError(f"activations must be (N, d), got shape {tuple(x_ND.shape)}")
    return x_ND.split(batch_size)


def _check_order(order: torch.Tensor | Sequence[int], width: int) -> torch.Tensor:
    """The order as a CPU int64 tensor, after checking that it is a permutation of 0 … width−1."""
    order_M = torch.as_tensor(order, dtype=torch.long).cpu()
    if order_M.shape != (width,) or not torch.equal(order_M.sort().values, torch.arange(width)):
        raise ValueError(f"order must be a permutation of 0..{width - 1}, got shape {tuple(order_M.shape)}")
    return order_M


@torch.no_grad()
def latent_order(
    sae: SAE, x_ND: torch.Tensor, by: OrderBy = "energy", *, batch_size: int = 4096
) -> torch.Tensor:
    """(M,) int64: the latents by decreasing importance on ``x_ND`` (ties keep index order).

    ``energy`` ranks by E[f_i²], ``frequency`` by the share of tokens with f_i ≠ 0 (both from the SAE's
    inference ``encode``), ``index`` returns 0 … M−1 without reading ``x_ND``."""
    if by not in ORDERS:
        raise ValueError(f"by must be one of {ORDERS}, got {by!r}")
    if by == "index":
        return torch.arange(sae.width)
    p = _param(sae)
    score_M = torch.zeros(sae.width, dtype=torch.float64, device=p.device)
    for xb_ND in _batches(x_ND, batch_size):
        f_NM = sae.encode(xb_ND.to(device=p.device, dtype=p.dtype))
        score_M += f_NM.double().pow(2).sum(0) if by == "energy" else (f_NM != 0).sum(0)
    return torch.sort(score_M.cpu(), descending=True, stable=True).indices


def _latent_axis(sae: SAE, name: str, t: torch.Tensor) -> int | None:
    """The axis of state_dict tensor ``name`` that indexes latents, or None (see the module docstring)."""
    cls = type(sae).__name__
    declared: dict[str, int | None] = getattr(type(sae), "latent_axes", {})
    if name in declared or name in _KNOWN_AXES:
        axis = declared[name] if name in declared else _KNOWN_AXES[name]
        if axis is not None and (not -t.ndim <= axis < t.ndim or t.shape[axis] != sae.width):
            raise ValueError(
                f"{cls}.{name} has shape {tuple(t.shape)}: latent axis {axis} is not of length {sae.width}"
            )
        return None if axis is None else axis % t.ndim
    if sae.width not in t.shape:
        return None
    if t.ndim == 1 and sae.d_in != sae.width:
        return 0
    raise ValueError(
        f"cannot tell which axis of {cls}.{name} (shape {tuple(t.shape)}) indexes the {sae.width} latents "
        f"(d_in={sae.d_in}); declare it in the class: latent_axes = {{{name!r}: axis}} (None for none)"
    )


@torch.no_grad()
def permute_latents(sae: SAE, order: torch.Tensor | Sequence[int]) -> SAE:
    """A copy of ``sae`` whose latent i is ``sae``'s latent ``order[i]``: ``encode`` returns the old code's
    columns in that order and ``decode`` of it is unchanged. Every per-latent tensor (encoder columns,
    biases, thresholds, scales, decoder rows) moves together; ``sae`` itself is not modified."""
    order_M = _check_order(order, sae.width)
    if not type(sae).permutable_latents:
        raise ValueError(f"{sae.arch}'s latents cannot be reordered (truncated() needs no reordering)")
    state = {}
    for name, t in sae.state_dict().items():
        axis = _latent_axis(sae, name, t)
        state[name] = t if axis is None else t.index_select(axis, order_M.to(t.device))
    permuted = copy.deepcopy(sae)
    permuted.load_state_dict(state)
    return permuted


def keep_mask(order: torch.Tensor | Sequence[int], width: int, n_latents: int) -> torch.Tensor:
    """(M,) bool: True for the first ``width`` latents of ``order``."""
    order_M = _check_order(order, n_latents)
    if not 0 <= width <= n_latents:
        raise ValueError(f"width must be in [0, {n_latents}], got {width}")
    keep_M = torch.zeros(n_latents, dtype=torch.bool)
    keep_M[order_M[:width]] = True
    return keep_M


def truncated(
    sae: SAE, order: torch.Tensor | Sequence[int], width: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x → x̂ using only the first ``width`` latents of ``order``: the SAE's code with the other latents
    zeroed after its own selection. Inputs move to the SAE's device and dtype; outputs stay there."""
    p = _param(sae)
    keep_M = keep_mask(order, width, sae.width).to(p.device)

    def sae_fn(x_ND: torch.Tensor) -> torch.Tensor:
        f_NM = sae.encode(x_ND.to(device=p.device, dtype=p.dtype))
        return sae.decode(torch.where(keep_M, f_NM, 0))

    return sae_fn


@torch.no_grad()
def progressive_curve(
    sae: SAE,
    x_ND: torch.Tensor,
    widths: Sequence[int],
    *,
    by: OrderBy = "energy",
    order: torch.Tensor | Sequence[int] | None = None,
    batch_size: int = 4096,
) -> list[dict[str, Any]]:
    """Reconstruction of ``x_ND`` by the first G latents, for each G in ``widths``.

    Latents are ranked by ``by`` on ``x_ND`` itself unless ``order`` is given (e.g. computed on other
    data). Each row: ``{"width", "fvu", "mse", "l0"}`` (L0 of the truncated code). The SAE encodes each
    batch once; every width reuses that code."""
    if order is None:
        order = latent_order(sae, x_ND, by, batch_size=batch_size)
    p = _param(sae)
    keeps = [keep_mask(order, g, sae.width).to(p.device) for g in widths]
    stats = [ReconstructionStats() for _ in widths]
    for xb_ND in _batches(x_ND, batch_size):
        xb_ND = xb_ND.to(device=p.device, dtype=p.dtype)
        f_NM = sae.encode(xb_ND)
        for keep_M, st in zip(keeps, stats, strict=True):
            f_kept_NM = torch.where(keep_M, f_NM, 0)
            st.update(xb_ND, sae.decode(f_kept_NM), f_kept_NM)
    rows = []
    for g, st in zip(widths, stats, strict=True):
        r = st.result()
        rows.append({"width": int(g), "fvu": r["fvu"], "mse": r["mse"], "l0": r["l0"]})
    return rows


def geometric_widths(width: int, n: int, ratio: float = 2.0) -> list[int]:
    """Up to ``n`` increasing widths ending at ``width``, each ``ratio`` times the previous, rounded:
    ``[…, width/ratio², width/ratio, width]`` (with n = 5, ratio 2: a default Matryoshka SAE's group ends).
    Widths that round to 0 or to a duplicate are dropped, so a small ``width`` gives fewer than ``n``."""
    if width < 1 or n < 1 or not ratio > 1:
        raise ValueError(f"need width >= 1, n >= 1 and ratio > 1, got width={width}, n={n}, ratio={ratio}")
    grid = {math.floor(width / ratio**i + 0.5) for i in range(n)}
    return sorted(g for g in grid if g >= 1)


@torch.no_grad()
def progressive_fidelity(
    sae: SAE,
    model: torch.nn.Module,
    hook: str,
    token_batches: torch.Tensor | Iterable[Any],
    widths: Sequence[int],
    order: torch.Tensor | Sequence[int],
    *,
    ablation: str = "zero",
    special_ids: Iterable[int] = (),
    splice_special: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """CE/KL fidelity with the first G latents of ``order`` spliced in at ``hook``, for each G in ``widths``.

    Each row is ``{"width": G, **splice_fidelity(...)}`` (``ce_loss_recovered``, ``delta_ce``, ``kl_score``,
    ...); the keyword arguments are :func:`saekit.eval.splice.splice_fidelity`'s. ``sae`` takes the raw
    activations of ``hook`` (its input scale folded in, as saved SAEs are). The clean and ablated runs are
    repeated for every width (splice_fidelity's price for its simple interface): keep ``widths`` short."""
    if not isinstance(token_batches, torch.Tensor):
        token_batches = list(token_batches)  # read once per width
    special = list(special_ids)
    return [
        {
            "width": int(g),
            **splice_fidelity(
                model,
                hook,
                truncated(sae, order, g),
                token_batches,
                ablation=ablation,
                splice_special=splice_special,
                special_ids=special,
                attention_mask=attention_mask,
            ),
        }
        for g in widths
    ]
