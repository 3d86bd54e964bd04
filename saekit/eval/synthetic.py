"""Synthetic activations with known features, to test whether an SAE recovers them.

Each sample is a sparse non-negative combination of ``n_features`` unit directions in R^d with
``n_features > d`` allowed (superposition), plus optional Gaussian noise:

    x = Σ_j  m_j · 1[feature j fires] · g_j  (+ noise),   g_j ∈ R^d, ‖g_j‖ = 1

Feature j fires independently with probability p_j ∝ (j + 1)^(−α) (a power law, as feature frequencies in
language models roughly are), scaled so that on average ``avg_active`` features fire per sample.
Magnitudes m_j are uniform in ``magnitude_range`` (non-negative). Everything is drawn from one seeded
generator, so the same arguments give the same data.

Recovery metrics (specs/metrics.md, "Ground-truth recovery"): :func:`mmcs` is the mean over true features
of the best cosine with any decoder row; :func:`recovered_fraction` is the share of true features whose best
cosine reaches a threshold (0.9).
"""

from __future__ import annotations

import torch

_SEED_SALT = 0x5A3C_9E37
"""Added to ``seed`` so that ``torch.manual_seed(s)`` followed by an SAE's random init cannot draw the very
same Gaussians as the true directions (which makes recovery trivially perfect: it happened in development)."""


def firing_probabilities(n_features: int, avg_active: float, exponent: float) -> torch.Tensor:
    """p_j = min(1, c·(j+1)^(−exponent)) with c chosen (by bisection) so that Σ_j p_j = avg_active."""
    if not 0 < avg_active <= n_features:
        raise ValueError(f"avg_active must be in (0, n_features={n_features}], got {avg_active}")
    base = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-exponent)
    lo, hi = 0.0, float(avg_active / base.min())  # at hi every p_j is clipped to 1, so the sum is n_features
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if (mid * base).clamp(max=1).sum() < avg_active else (lo, mid)
    return (hi * base).clamp(max=1).float()


def synthetic_activations(
    n_samples: int,
    d: int,
    n_features: int,
    *,
    avg_active: float = 3.0,
    exponent: float = 0.5,
    magnitude_range: tuple[float, float] = (0.5, 1.5),
    noise_std: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x_ND, true_directions_FD)``: ``n_samples`` activations and the unit feature directions.

    ``exponent`` = 0 makes every feature equally frequent; larger values make the rarest features rarer
    (and harder to learn). ``noise_std`` is the per-dimension standard deviation of added Gaussian noise.
    """
    if n_samples <= 0 or d <= 0 or n_features <= 0:
        raise ValueError(f"n_samples, d and n_features must be positive, got {n_samples}, {d}, {n_features}")
    _check_magnitudes_and_noise(magnitude_range, noise_std)
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent}")
    gen = torch.Generator().manual_seed(_SEED_SALT + seed)
    dirs_FD = _unit_directions(n_features, d, gen)
    p_F = firing_probabilities(n_features, avg_active, exponent)
    fires_NF = torch.rand(n_samples, n_features, generator=gen) < p_F
    return _compose(fires_NF, dirs_FD, magnitude_range, noise_std, gen), dirs_FD


def _check_magnitudes_and_noise(magnitude_range: tuple[float, float], noise_std: float) -> None:
    lo, hi = magnitude_range
    if not 0 <= lo <= hi:
        raise ValueError(f"magnitude_range must satisfy 0 <= low <= high, got {magnitude_range}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")


def _unit_directions(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(n, d) Gaussian directions normalised to unit length (in general position)."""
    dirs = torch.randn(n, d, generator=gen)
    return dirs / dirs.norm(dim=1, keepdim=True)


def _compose(
    fires_NF: torch.Tensor,
    dirs_FD: torch.Tensor,
    magnitude_range: tuple[float, float],
    noise_std: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """x = Σ_j m_j · 1[fires_j] · g_j with m_j uniform in ``magnitude_range``, plus Gaussian noise."""
    lo, hi = magnitude_range
    mags_NF = lo + (hi - lo) * torch.rand(fires_NF.shape, generator=gen)
    x_ND = (fires_NF * mags_NF) @ dirs_FD
    if noise_std > 0:
        x_ND += noise_std * torch.randn(x_ND.shape, generator=gen)
    return x_ND


def _best_cosines(W_dec_MD: torch.Tensor, true_dirs_FD: torch.Tensor) -> torch.Tensor:
    """(F,) best cosine of each true direction with any decoder row."""
    if W_dec_MD.shape[-1] != true_dirs_FD.shape[-1]:
        raise ValueError(
            f"decoder rows have dim {W_dec_MD.shape[-1]} but true directions have {true_dirs_FD.shape[-1]}"
        )
    W = W_dec_MD.detach().float()
    G = true_dirs_FD.detach().float().to(W.device)
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    G = G / G.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (G @ W.t()).max(dim=1).values


def mmcs(W_dec_MD: torch.Tensor, true_dirs_FD: torch.Tensor) -> float:
    """Mean max cosine similarity: mean over true features of max_i cos(g_j, W_dec,i)."""
    return _best_cosines(W_dec_MD, true_dirs_FD).mean().item()


def recovered_fraction(W_dec_MD: torch.Tensor, true_dirs_FD: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of true features whose best cosine with a decoder row is at least ``threshold``."""
    return (_best_cosines(W_dec_MD, true_dirs_FD) >= threshold).float().mean().item()


def hierarchical_activations(
    n_samples: int,
    d: int,
    n_parents: int,
    children_per_parent: int,
    *,
    parent_prob: float = 0.1,
    child_prob: float = 0.5,
    magnitude_range: tuple[float, float] = (0.5, 1.5),
    noise_std: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations from a two-level feature hierarchy: children fire only with their parent.

    Each parent p fires independently with probability ``parent_prob``; when it fires, each of its
    ``children_per_parent`` children fires independently with probability ``child_prob`` (so
    P(child) = parent_prob · child_prob and a child never fires without its parent). A sample is
    Σ m_j · g_j over the firing features, parents and children alike, with unit directions g_j in general
    position (all features together may exceed d: superposition).

    Returns ``(x_ND, directions_FD, parent_F)``: features 0 … n_parents−1 are the parents, the rest the
    children; ``parent_F[j]`` is the index of feature j's parent, −1 for parents.
    """
    if min(n_samples, d, n_parents, children_per_parent) <= 0:
        raise ValueError("n_samples, d, n_parents and children_per_parent must be positive")
    if not (0 < parent_prob <= 1 and 0 < child_prob <= 1):
        raise ValueError(f"probabilities must be in (0, 1], got {parent_prob}, {child_prob}")
    _check_magnitudes_and_noise(magnitude_range, noise_std)
    n_children = n_parents * children_per_parent
    gen = torch.Generator().manual_seed(_SEED_SALT + seed)
    dirs_FD = _unit_directions(n_parents + n_children, d, gen)
    parent_of_child = torch.arange(n_parents).repeat_interleave(children_per_parent)
    parent_F = torch.cat([torch.full((n_parents,), -1), parent_of_child])
    parents_NP = torch.rand(n_samples, n_parents, generator=gen) < parent_prob
    children_NC = torch.rand(n_samples, n_children, generator=gen) < child_prob
    children_NC &= parents_NP[:, parent_of_child]
    fires_NF = torch.cat([parents_NP, children_NC], dim=1)
    return _compose(fires_NF, dirs_FD, magnitude_range, noise_std, gen), dirs_FD, parent_F
