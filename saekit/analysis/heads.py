"""Per-head attribution of the latents of an SAE trained on ``layers.{i}.attn_z`` (Kissane et al. 2024).

``attn_z`` is the concatenation of the attention heads' outputs (head h in columns ``h·d_head … (h+1)·d_head
− 1``, see :mod:`saekit.models.hooks`), so a decoder row of such an SAE splits into one slice per head, and
the slice's size says how much of the latent that head writes. Kissane et al. ("Interpreting Attention Layer
Outputs with Sparse Autoencoders", weight-based head attribution) attribute each feature to heads by the norm
of its decoder weights per head. saekit uses the share of the row's **squared** norm:

    share[m, h] = ‖W_dec[m, h·d_head : (h+1)·d_head]‖² / ‖W_dec[m]‖²

The squared norms of disjoint slices add up to the squared norm of the row, so the shares of a latent sum to
exactly 1 (a latent living in one head's slice has share 1 there; one spread evenly over n heads, 1/n each),
and a share is the fraction of the latent's contribution to ‖z‖² that the head carries. It ranks heads as the
plain per-head norms do, so the top head is the same. The attribution is read off the weights: no data, no
model, and it exists for latents that never fire.

The logit effects of such an SAE's latents (:mod:`saekit.analysis.logits`) are those of its decoder rows
mapped through the attention output projection (:func:`residual_directions`): an ``attn_z`` row is not a
residual-stream vector.

Where it shows: ``saekit info`` (a summary), ``saekit features`` records (``top_head``, ``top_head_share``
per latent, the full ``head_share`` array), and the report (a "head" column in the index, a per-head bar
list on each latent page) — only for SAEs on ``attn_z``, whose metadata records ``attn_heads``
(``{"n_heads", "d_head"}``) when ``saekit train`` trains them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DOMINANT_SHARE = 0.9
"""A latent is *dominated* by one head when that head holds at least this share of its squared decoder
norm."""
METADATA_KEY = "attn_heads"
"""Key of the head geometry in an SAE's metadata (and in feature records' ``heads`` meta)."""
_ATTN_Z_RE = re.compile(r"^layers\.\d+\.attn_z$")


def is_attn_z(hook: str | None) -> bool:
    """Whether ``hook`` names the per-head attention outputs of a layer (``layers.{i}.attn_z``)."""
    return isinstance(hook, str) and _ATTN_Z_RE.match(hook) is not None


@dataclass(frozen=True)
class HeadGeometry:
    """How the columns of ``attn_z`` split into heads: ``n_heads`` blocks of ``d_head`` columns."""

    n_heads: int
    d_head: int

    def __post_init__(self) -> None:
        if self.n_heads < 1 or self.d_head < 1:
            raise ValueError(f"n_heads and d_head must be >= 1, got {self.n_heads} and {self.d_head}")

    @property
    def width(self) -> int:
        return self.n_heads * self.d_head

    def to_dict(self) -> dict[str, int]:
        return {"n_heads": self.n_heads, "d_head": self.d_head}

    @classmethod
    def from_model(cls, model: torch.nn.Module, hook: str) -> HeadGeometry:
        """The geometry of ``hook`` (an ``attn_z`` point) in ``model``, from its config and modules."""
        from saekit.models.hooks import attn_heads

        if not is_attn_z(hook):
            raise ValueError(f"per-head attribution needs an attn_z hook point, got {hook!r}")
        return cls(*attn_heads(model, int(hook.split(".")[1])))


def head_metadata(hooks: list[str], model: torch.nn.Module) -> dict[str, Any]:
    """``{"attn_heads": {"n_heads", "d_head"}}`` for an SAE on one ``attn_z`` point of ``model``, else ``{}``:
    what training records so that ``saekit info`` and the report can attribute latents without the model."""
    if len(hooks) != 1 or not is_attn_z(hooks[0]):
        return {}
    return {METADATA_KEY: HeadGeometry.from_model(model, hooks[0]).to_dict()}


def sae_geometry(sae: Any) -> HeadGeometry | None:
    """The head geometry an SAE's metadata records (None unless it was trained on ``attn_z``); an error when
    it does not match the SAE's input width."""
    meta = getattr(sae, "metadata", None) or {}
    geo = meta.get(METADATA_KEY)
    if not is_attn_z(meta.get("hook")) or not isinstance(geo, dict):
        return None
    geometry = HeadGeometry(int(geo["n_heads"]), int(geo["d_head"]))
    if geometry.width != sae.d_in:
        raise ValueError(
            f"the SAE's metadata says {geometry.n_heads} heads × {geometry.d_head} = {geometry.width} "
            f"columns, but the SAE reads {sae.d_in}"
        )
    return geometry


def head_shares(W_dec_MD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(M, n_heads) share of each decoder row's squared norm in each head's slice of its columns.

    Rows sum to 1; an all-zero row (a latent with no decoder direction) gets all-zero shares."""
    M, D = W_dec_MD.shape
    if n_heads < 1 or D % n_heads:
        raise ValueError(f"a decoder with {D} columns cannot split into {n_heads} equal head slices")
    sq_MH = W_dec_MD.detach().double().reshape(M, n_heads, D // n_heads).square().sum(-1)
    total_M1 = sq_MH.sum(-1, keepdim=True)
    return torch.where(total_M1 > 0, sq_MH / total_M1.clamp_min(1e-300), 0.0).float()


def top_heads(shares_MH: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the head with the largest share (lowest index on ties) and that share: (M,) int, float."""
    shares = np.asarray(shares_MH, dtype=np.float32)
    top = shares.argmax(axis=1).astype(np.int64)
    return top, shares[np.arange(shares.shape[0]), top]


def summarize(shares_MH: torch.Tensor | np.ndarray, dominant: float = DOMINANT_SHARE) -> dict[str, Any]:
    """What ``saekit info`` prints: how many latents one head dominates, how many each head is top head of,
    and each head's mean share (the heads that write most of the dictionary)."""
    shares = np.asarray(shares_MH, dtype=np.float64)
    top, share = top_heads(shares)
    alive = shares.sum(axis=1) > 0  # zero decoder rows belong to no head
    n_heads = shares.shape[1]
    return {
        "n_latents": int(shares.shape[0]),
        "n_heads": n_heads,
        "dominant_share": dominant,
        "dominated": int((alive & (share >= dominant)).sum()),
        "majority": int((alive & (share > 0.5)).sum()),
        "top_head_counts": np.bincount(top[alive], minlength=n_heads).tolist(),
        "mean_share": shares.mean(axis=0).tolist() if shares.shape[0] else [0.0] * n_heads,
    }


def format_summary(summary: dict[str, Any], n_top: int = 5) -> str:
    """The summary as a few lines of text."""
    n, counts = summary["n_latents"], summary["top_head_counts"]
    order = sorted(range(len(counts)), key=lambda h: (-counts[h], h))[:n_top]
    pct = 100.0 / max(n, 1)
    tops = ", ".join(
        f"h{h} ({counts[h]}, mean share {summary['mean_share'][h]:.2f})" for h in order if counts[h]
    )
    return "\n".join(
        [
            f"per-head attribution ({summary['n_heads']} heads; share of each decoder row's squared norm):",
            f"  dominated by one head (share >= {summary['dominant_share']:g}): {summary['dominated']} "
            f"of {n} latents ({summary['dominated'] * pct:.1f}%); over half in one head: "
            f"{summary['majority']} ({summary['majority'] * pct:.1f}%)",
            f"  top heads (latents whose largest share they hold): {tops or 'none'}",
        ]
    )


def describe_heads(sae: Any) -> str | None:
    """The per-head summary of an ``attn_z`` SAE for ``saekit info``; None for an SAE on another hook."""
    meta = getattr(sae, "metadata", None) or {}
    if not is_attn_z(meta.get("hook")):
        return None
    geometry = sae_geometry(sae)
    if geometry is None:
        return "per-head attribution: unavailable (the SAE's metadata does not record attn_heads)"
    W_dec = getattr(sae, "W_dec", None)
    if not isinstance(W_dec, torch.Tensor) or W_dec.ndim != 2:
        return f"per-head attribution: unavailable ({getattr(sae, 'arch', '?')} has no (M, d) decoder matrix)"
    return format_summary(summarize(head_shares(W_dec, geometry.n_heads)))


@torch.no_grad()
def residual_directions(W_dec_MD: torch.Tensor, model: torch.nn.Module, hook: str) -> torch.Tensor:
    """(M, d_model): the decoder rows of an ``attn_z`` SAE mapped through the attention output projection
    (without its bias), i.e. what one unit of each latent adds to the residual stream. An ``attn_z`` row is
    not a residual-stream vector even when n_heads · d_head = d_model (SmolLM2, GPT-2), so logit effects
    are computed from these."""
    from saekit.models.hooks import attn_projection

    if not is_attn_z(hook):
        raise ValueError(f"residual directions are for attn_z SAEs, got hook point {hook!r}")
    proj = attn_projection(model, int(hook.split(".")[1]))
    weight = proj.weight
    out_MD = proj(W_dec_MD.detach().to(device=weight.device, dtype=weight.dtype))
    bias = getattr(proj, "bias", None)
    return out_MD - bias if isinstance(bias, torch.Tensor) else out_MD


def attach_to_records(records: Any, W_dec_MD: torch.Tensor, geometry: HeadGeometry) -> None:
    """Add the attribution to feature records: ``head_share`` (M, n_heads) among the record arrays,
    ``top_head`` and ``top_head_share`` among the per-latent summary scalars, ``heads`` in the meta."""
    if W_dec_MD.shape[1] != geometry.width:
        raise ValueError(
            f"decoder rows have {W_dec_MD.shape[1]} columns, not {geometry.n_heads} heads × {geometry.d_head}"
        )
    shares = head_shares(W_dec_MD.cpu(), geometry.n_heads).numpy()
    top, share = top_heads(shares)
    records.arrays["head_share"] = shares.astype(np.float32)
    records.summary["top_head"] = top
    records.summary["top_head_share"] = share.astype(np.float32)
    records.meta["heads"] = geometry.to_dict() | {
        "measure": "share of the decoder row's squared norm per head",
        "dominant_share": DOMINANT_SHARE,
    }
