"""Tree SAE (Cao, Nhat, Alharbi, Nguyen, Thai 2026, arXiv 2605.07922; code tue147/tree-sae; spec §6.1).

The M latents form a forest under an always-active root ρ, split into L privilege layers of sizes s_l
(Σ s_l = M) with their own k_l (Σ k_l = L0). A latent i of layer l ≥ 1 has one parent a(i): a latent of a
layer < l, or ρ; layer 0 hangs from ρ. A child may fire only on tokens where its parent fires:

    h = (x − b_dec) W_enc                                    (no encoder bias, as the paper's code)
    for l = 0 … L−1:  g_i = 1[f_a(i) > 10⁻³]  (g_i = 1 under ρ),  f_l = ReLU(TopK_k_l(h_l ⊙ g_l))   (Eq. 6)
    x̂_≤l = Σ_{t ≤ l} f_t W_dec,t + b_dec                      (every prefix reconstructs x, Eq. 7)
    L = Σ_l ‖x − x̂_≤l‖² / (N·d·Var(x))  +  α · AuxK_0

Var(x) is the variance of all the batch's entries, so each term is an FVU; x̂_≤L−1 is the output. AuxK_0
(α = 1/32, k_aux = 256): ê = ReLU(TopK_k_aux(h over the dead latents of layer 0)) W_dec + b_dec reconstructs
e = x − x̂_≤0, scored ‖e − ê‖² / ‖e − mean_dims(e)‖² (the per-token residual variance). The paper gates the
dead candidates by their parents; layer 0 hangs from ρ, so that gate is always open.

Dynamic allocation (Algs. 1–2, ``tree``). After each training step the step's loss is shared equally among
the candidate parents of layer l (latents of layers < l, and ρ) that fired (> 10⁻³) in the batch; C_p sums
the shares. At steps 3,000, 9,000, 19,000, … (the interval doubles after each, capped at 10,000), per layer:
quotas k*_p maximising min_p C_p / k_p with Σ k*_p = s_l, found greedily (the next child goes to the parent
with the largest C_p / (k_p + 1): the D'Hondt rule), among parents that fired in the last 50k tokens (ρ
always); then only *dead* children move, from parents over quota to parents under it, and C restarts from 0.
At step 50,000 every dead child moves to ρ and reallocation stops. The initial tree is uniform at random.

``tree_given``, a simpler variant that is not in the paper: the user gives the tree (a parent per latent,
−1 for ρ) and it never changes; a latent's privilege layer is its depth; and a structure loss pulls every
parent's activation towards the sum of its children's, λ_s · Σ_p (f_p − Σ_{a(c) = p} f_c)² / (N·d·Var(x))
summed over tokens and over the latents that have children, on the scale of the FVU terms. Both sides of
the difference get gradient. :func:`format_tree` renders either tree as text.

saekit's choices where the spec is silent or its reference cannot be followed:
* No per-token standardisation of x (the paper's code standardises each token and undoes it on output):
  ``decode(f)`` must not need the token's statistics. The trainer's dataset-level scaling stands in for it.
* AuxK's residual e is detached (as Gao et al. and :func:`~saekit.sae.common.auxk_loss`; the paper's code
  lets AuxK pull on the main reconstruction) and AuxK is 0 when layer 0 has no dead latent (the paper's code
  then still scores ê = b_dec).
* Dead children are the trainer's ``ctx.dead_mask`` (``dead_tokens``, 10M by default as in the paper);
  parent eligibility is counted here, in tokens. The schedule is read from ``ctx.step``; all of its state is
  in buffers, so a checkpoint or a saved SAE resumes it. Ties go to the lower latent index (ρ last): the
  reallocation is deterministic. Capacities are updated for every layer before the schedule is checked
  (the paper's code checks it between layers, a difference only for L > 2).
* Decoder rows unit-norm (constraint hooks, as the paper); init W_enc = W_decᵀ, b_dec = the trainer's centre.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, StepContext, register
from .common import UnitNormDecoder, sparse_decode, tied_init, topk_relu, topk_to_coo

ACTIVE = 1e-3
"""A latent is active (opens its children's gate, counts as fired for the allocation) above this value."""
ROOT = -1
"""Parent index of the latents that hang from the root ρ."""


@dataclass
class TreeBaseConfig(SAEConfig):
    k: int = 32
    """Active latents per token, L0 = Σ_l k_l."""
    k_per_layer: list[int] = field(default_factory=list)
    """k_l of each privilege layer, summing to k; empty: [k] for one layer, the paper's 26:6 split of k for
    two (required for more)."""
    aux_coeff: float = 1 / 32
    """α, the coefficient of AuxK on layer 0 (0 turns it off)."""
    k_aux: int = 256
    """Dead latents of layer 0 that AuxK may use per token."""

    def layer_sizes_resolved(self) -> list[int]:
        """s_l of every privilege layer; raises ValueError naming what is wrong with the tree's layout."""
        raise NotImplementedError

    def k_layers(self) -> list[int]:
        if self.k_per_layer:
            return list(self.k_per_layer)
        n_layers = len(self.layer_sizes_resolved())
        if n_layers == 1:
            return [self.k]
        if n_layers == 2:  # the paper's L0 = 32 split, (26, 6); its L0 = 64 split (53, 11) is within one
            k1 = max(1, round(self.k * 6 / 32))
            return [self.k - k1, k1]
        raise ValueError(f"k_per_layer must be given for a tree with {n_layers} layers (one k per layer)")

    def validate(self) -> None:
        super().validate()
        if self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.aux_coeff < 0 or self.k_aux <= 0:
            raise ValueError(f"aux_coeff must be >= 0 and k_aux > 0, got {self.aux_coeff}, {self.k_aux}")
        sizes, ks = self.layer_sizes_resolved(), self.k_layers()
        if len(ks) != len(sizes):
            raise ValueError(f"k_per_layer has {len(ks)} entries but the tree has {len(sizes)} layers")
        if sum(ks) != self.k:
            raise ValueError(f"k_per_layer {ks} sums to {sum(ks)}, but k = {self.k}")
        for layer, (k, s) in enumerate(zip(ks, sizes, strict=True)):
            if not 0 < k <= s:
                raise ValueError(f"k_per_layer[{layer}] must be in [1, layer size {s}], got {k}")


@dataclass
class TreeConfig(TreeBaseConfig):
    layer_sizes: list[int] = field(default_factory=list)
    """s_l, latents in each privilege layer (at least 2, summing to width); empty: the paper's 1:3 split."""
    realloc_interval: int = 3000
    """Steps before the first reallocation of dead children."""
    realloc_growth: float = 2.0
    """Factor on the interval after each reallocation."""
    max_realloc_interval: int = 10_000
    """Cap on the interval between reallocations (steps)."""
    root_reset_step: int | None = 50_000
    """At this step every dead child moves to the root and reallocation stops (None: never)."""
    parent_eligibility_tokens: int = 50_000
    """A latent may receive children only if it fired within this many tokens."""

    def layer_sizes_resolved(self) -> list[int]:
        sizes = list(self.layer_sizes) or [self.width // 4, self.width - self.width // 4]
        if len(sizes) < 2 or min(sizes) <= 0 or sum(sizes) != self.width:
            raise ValueError(
                f"layer_sizes must be >= 2 positive sizes summing to width={self.width}, got {sizes}"
            )
        return sizes

    def validate(self) -> None:
        super().validate()
        if self.realloc_interval <= 0 or self.max_realloc_interval <= 0 or self.realloc_growth < 1:
            raise ValueError(
                "realloc_interval and max_realloc_interval must be positive and realloc_growth >= 1, got "
                f"{self.realloc_interval}, {self.max_realloc_interval}, {self.realloc_growth}"
            )
        if self.root_reset_step is not None and self.root_reset_step <= 0:
            raise ValueError(f"root_reset_step must be positive (or None), got {self.root_reset_step}")
        if self.parent_eligibility_tokens <= 0:
            raise ValueError(
                f"parent_eligibility_tokens must be positive, got {self.parent_eligibility_tokens}"
            )


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every latent of the forest ``parents`` (−1: a child of the root, depth 0). Raises ValueError
    naming the first bad entry: not −1 or a latent index, or on a cycle (a self-parent included)."""
    m = len(parents)
    depth: list[int] = [-1] * m  # −1: not known yet
    for start in range(m):
        path, on_path, node = [], set(), start
        while node != ROOT and depth[node] < 0:
            if node in on_path:
                raise ValueError(f"parents has a cycle through latent {node}")
            path.append(node)
            on_path.add(node)
            node = parents[node]
            if isinstance(node, bool) or not isinstance(node, int) or not -1 <= node < m:
                raise ValueError(f"parents[{path[-1]}] must be -1 or a latent index below {m}, got {node!r}")
        d = -1 if node == ROOT else depth[node]
        for i in reversed(path):
            d += 1
            depth[i] = d
    return depth


@dataclass
class TreeGivenConfig(TreeBaseConfig):
    parents: list[int] = field(default_factory=list)
    """The tree: parent latent of every latent (-1 for the root); privilege layer = depth."""
    parents_file: str = ""
    """Path of a JSON list of parents, instead of ``parents`` (read once; the saved config holds the list)."""
    structure_coeff: float = 0.1
    """λ_s, the coefficient of the loss pulling each parent's activation towards the sum of its children's."""

    def resolved_parents(self) -> list[int]:
        if bool(self.parents) == bool(self.parents_file):
            raise ValueError(
                "tree_given needs its tree as exactly one of parents (one parent index per latent, -1 for "
                "the root) or parents_file (a JSON list of them)"
            )
        if self.parents:
            return list(self.parents)
        path = Path(self.parents_file)
        try:
            parents = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read parents_file {path}: {e}") from e
        if not isinstance(parents, list):
            raise ValueError(f"parents_file {path} must hold a JSON list of parent indices")
        return parents

    def layer_sizes_resolved(self) -> list[int]:
        parents = self.resolved_parents()
        if len(parents) != self.width:
            raise ValueError(f"the tree has {len(parents)} parents but width = {self.width}")
        depths = tree_depths(parents)
        return [depths.count(d) for d in range(max(depths) + 1)]

    def validate(self) -> None:
        super().validate()
        if self.structure_coeff < 0:
            raise ValueError(f"structure_coeff must be >= 0, got {self.structure_coeff}")


class _TreeSAE(UnitNormDecoder, SAE):
    """Layered, parent-gated selection and the prefix losses; subclasses own the tree."""

    cfg: TreeBaseConfig
    permutable_latents = False  # parent_M holds latent indices, and layers are fixed sets of latents

    def describe_structure(self) -> str:
        return format_tree(self)

    def __init__(self, cfg: TreeBaseConfig, parent_M: torch.Tensor, layer_M: torch.Tensor):
        super().__init__(cfg)
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width)
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("parent_M", parent_M.long())
        self.register_buffer("layer_M", layer_M.long(), persistent=False)
        self.k_layers = cfg.k_layers()
        for layer in range(len(self.k_layers)):
            self.register_buffer(f"members_{layer}", (layer_M == layer).nonzero().flatten(), persistent=False)

    def members(self, layer: int) -> torch.Tensor:
        """Latent indices of privilege layer ``layer``, ascending."""
        return getattr(self, f"members_{layer}")

    def select(self, pre_NM: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Eq. 6, layer by layer: ``[(vals_NK, idx_NK) per layer]``, idx global latent indices."""
        n, m = pre_NM.shape
        active_NM1 = torch.zeros(n, m + 1, dtype=torch.bool, device=pre_NM.device)
        active_NM1[:, m] = True  # column m is the root
        slot_M = torch.where(self.parent_M < 0, m, self.parent_M)
        chosen = []
        for layer, k in enumerate(self.k_layers):
            members_S = self.members(layer)
            gate_NS = active_NM1[:, slot_M[members_S]]
            vals_NK, local_NK = topk_relu(pre_NM[:, members_S] * gate_NS, k)
            idx_NK = members_S[local_NK]
            active_NM1.scatter_(1, idx_NK, vals_NK.detach() > ACTIVE)
            chosen.append((vals_NK, idx_NK))
        return chosen

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (x_ND - self.b_dec) @ self.W_enc

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        pre_NM = self.pre_acts(x_ND)
        f_NM = torch.zeros_like(pre_NM)
        for vals_NK, idx_NK in self.select(pre_NM):
            f_NM.scatter_(1, idx_NK, vals_NK)
        return f_NM

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return f_NM @ self.W_dec + self.b_dec

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        n = x_ND.shape[0]
        pre_NM = self.pre_acts(x_ND)
        chosen = self.select(pre_NM)
        var = x_ND.var() + 1e-8
        losses: dict[str, torch.Tensor] = {}
        x_hat_ND = self.b_dec.expand_as(x_ND)
        x_hat_0_ND = x_hat_ND
        for layer, (vals_NK, idx_NK) in enumerate(chosen):
            x_hat_ND = x_hat_ND + sparse_decode(*topk_to_coo(vals_NK, idx_NK), n, self.W_dec)
            name = "recon" if layer == len(chosen) - 1 else f"prefix_{layer}"
            losses[name] = (x_ND - x_hat_ND).pow(2).mean() / var
            if layer == 0:
                x_hat_0_ND = x_hat_ND
        idx_NK, vals_NK = torch.cat([c[1] for c in chosen], 1), torch.cat([c[0] for c in chosen], 1)
        f_NM = torch.zeros_like(pre_NM).scatter(1, idx_NK, vals_NK)
        if self.cfg.aux_coeff > 0:
            dead_M = ctx.dead_mask if ctx is not None else None
            aux = pre_NM.new_zeros(()) if dead_M is None else self.auxk(pre_NM, dead_M, x_ND - x_hat_0_ND)
            losses["auxk"] = self.cfg.aux_coeff * aux
        losses.update(self.extra_losses(f_NM, var * x_ND.shape[1]))
        if self.training and ctx is not None:
            self.after_training_forward(f_NM, sum(losses.values()).detach(), ctx)
        metrics = {"l0": (vals_NK > 0).sum().item() / n}
        return SAEOutput(x_hat_ND, f_NM, losses, metrics)

    def auxk(self, pre_NM: torch.Tensor, dead_M: torch.Tensor, residual_ND: torch.Tensor) -> torch.Tensor:
        """‖e − ê‖² / ‖e − mean_dims(e)‖² with ê from layer 0's top-k_aux dead latents, plus b_dec."""
        members_S = self.members(0)
        dead_S = dead_M.to(pre_NM.device)[members_S]
        n_dead = int(dead_S.sum())
        if n_dead == 0:
            return pre_NM.new_zeros(())
        masked_NS = torch.where(dead_S, pre_NM[:, members_S], torch.finfo(pre_NM.dtype).min)
        vals_NK, local_NK = topk_relu(masked_NS, min(self.cfg.k_aux, n_dead))
        coo = topk_to_coo(vals_NK, members_S[local_NK])
        e_ND = residual_ND.detach()
        e_hat_ND = sparse_decode(*coo, pre_NM.shape[0], self.W_dec) + self.b_dec
        den = (e_ND - e_ND.mean(dim=1, keepdim=True)).pow(2).sum()
        num = (e_ND - e_hat_ND).pow(2).sum()
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num.new_zeros(()))

    def extra_losses(self, f_NM: torch.Tensor, total_var: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms a variant adds (``tree_given``'s structure loss); ``total_var`` = d·Var(x)."""
        return {}

    def after_training_forward(self, f_NM: torch.Tensor, loss: torch.Tensor, ctx: StepContext) -> None:
        """Called after each training-mode forward with the step's total loss (detached)."""


@register("tree")
class TreeSAE(_TreeSAE):
    """The learned tree: random at init, reshaped by the dynamic allocation of dead children."""

    config_class = TreeConfig
    cfg: TreeConfig
    ordered_latents = True  # privilege layers are index blocks, each prefix trained to reconstruct x

    def __init__(self, cfg: TreeConfig):
        cfg.validate()
        sizes = cfg.layer_sizes_resolved()
        layer_M = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)[layer_M]  # first latent of each latent's layer
        draw_M = (torch.rand(cfg.width) * (starts + 1)).long()  # uniform over the layers before, and ρ
        parent_M = torch.where((draw_M == starts) | (layer_M == 0), ROOT, draw_M)
        super().__init__(cfg, parent_M, layer_M)
        m, n_layers = cfg.width, len(sizes)
        pool_LM1 = torch.zeros(n_layers, m + 1, dtype=torch.bool)  # row l: candidate parents of layer l
        pool_LM1[:, :m] = torch.arange(n_layers)[:, None] > layer_M[None, :]
        pool_LM1[:, m] = True
        self.register_buffer("pool_LM1", pool_LM1, persistent=False)
        self.register_buffer("capacity_LM1", torch.zeros(n_layers, m + 1))
        self.register_buffer("tokens_since_fired_M", torch.zeros(m, dtype=torch.long))
        self.register_buffer("next_realloc_step", torch.tensor(cfg.realloc_interval))
        self.register_buffer("realloc_interval_now", torch.tensor(cfg.realloc_interval))
        self.register_buffer("root_reset_done", torch.tensor(False))

    @torch.no_grad()
    def after_training_forward(self, f_NM: torch.Tensor, loss: torch.Tensor, ctx: StepContext) -> None:
        if self.root_reset_done.item():
            return
        fired_M = (f_NM > ACTIVE).any(dim=0)
        self.tokens_since_fired_M.add_(f_NM.shape[0]).masked_fill_(fired_M, 0)
        candidates_LM1 = self.pool_LM1 & torch.cat([fired_M, fired_M.new_ones(1)])[None, :]
        self.capacity_LM1.add_(candidates_LM1 * (loss / candidates_LM1.sum(dim=1, keepdim=True)))
        steps_done = ctx.step + 1
        dead_M = ctx.dead_mask if ctx.dead_mask is not None else torch.zeros_like(fired_M)
        reset_at = self.cfg.root_reset_step
        if reset_at is not None and steps_done >= reset_at:
            self.attach_dead_to_root(dead_M)
        elif steps_done >= self.next_realloc_step.item():
            self.reallocate(dead_M)
            interval = min(
                self.cfg.max_realloc_interval, int(self.realloc_interval_now * self.cfg.realloc_growth)
            )
            self.realloc_interval_now.fill_(interval)
            self.next_realloc_step.fill_(steps_done + interval)

    @torch.no_grad()
    def attach_dead_to_root(self, dead_M: torch.Tensor) -> None:
        """The root reset: every dead latent of layers ≥ 1 becomes a child of ρ; allocation stops."""
        self.parent_M.masked_fill_(dead_M.to(self.parent_M.device) & (self.layer_M > 0), ROOT)
        self.root_reset_done.fill_(True)

    @torch.no_grad()
    def reallocate(self, dead_M: torch.Tensor) -> None:
        """Algorithm 2 for every layer ≥ 1, then clear the capacities."""
        m = self.cfg.width
        dead_M = dead_M.to(self.parent_M.device)
        eligible_M1 = torch.cat(
            [self.tokens_since_fired_M < self.cfg.parent_eligibility_tokens, dead_M.new_ones(1)]
        )
        for layer in range(1, len(self.k_layers)):
            members_S = self.members(layer)
            slot_S = torch.where(self.parent_M[members_S] < 0, m, self.parent_M[members_S])
            counts_P = torch.bincount(slot_S, minlength=m + 1)
            eligible_P = eligible_M1 & self.pool_LM1[layer]
            quotas_P = greedy_quotas(self.capacity_LM1[layer], len(members_S), eligible_P)
            extras_P, deficits_P = (counts_P - quotas_P).clamp(min=0), (quotas_P - counts_P).clamp(min=0)
            # Dead children, grouped by parent (stable: by index within a parent); the first extras_p of
            # each over-quota parent move, in that order, to the under-quota parents in index order.
            dead_S = dead_M[members_S].nonzero().flatten()
            order = torch.sort(slot_S[dead_S], stable=True).indices
            dead_S, owner = dead_S[order], slot_S[dead_S][order]
            rank = torch.arange(len(owner), device=owner.device) - torch.searchsorted(owner, owner)
            movers = dead_S[rank < extras_P[owner]]
            receivers = torch.repeat_interleave(torch.arange(m + 1, device=owner.device), deficits_P)
            n_moves = min(len(movers), len(receivers))
            new_parent = receivers[:n_moves]
            self.parent_M[members_S[movers[:n_moves]]] = torch.where(new_parent == m, ROOT, new_parent)
        self.capacity_LM1.zero_()


def greedy_quotas(capacity_P: torch.Tensor, n_children: int, eligible_P: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: quotas k_p (Σ = n_children) maximising min_p C_p / k_p over eligible parents with
    C_p > 0, one child at a time to the largest C_p / (k_p + 1) (ties: lower index). With no such parent,
    the children are spread evenly over the eligible ones (lower indices get the remainder)."""
    caps = capacity_P.tolist()
    ids = [p for p, ok in enumerate(eligible_P.tolist()) if ok]
    quotas = [0] * len(caps)
    heap = [(-caps[p], p) for p in ids if caps[p] > 0]
    heapq.heapify(heap)
    for j in range(n_children if ids else 0):
        if not heap:
            quotas[ids[j % len(ids)]] += 1
            continue
        _, p = heapq.heappop(heap)
        quotas[p] += 1
        heapq.heappush(heap, (-caps[p] / (quotas[p] + 1), p))
    return torch.tensor(quotas, device=capacity_P.device)


@register("tree_given")
class TreeGivenSAE(_TreeSAE):
    """A fixed tree given by the user, with the structure loss."""

    config_class = TreeGivenConfig
    cfg: TreeGivenConfig

    def __init__(self, cfg: TreeGivenConfig):
        parents = cfg.resolved_parents()
        cfg = dataclasses.replace(cfg, parents=parents, parents_file="")  # saved SAEs never need the file
        cfg.validate()
        parent_M = torch.tensor(parents, dtype=torch.long)
        super().__init__(cfg, parent_M, torch.tensor(tree_depths(parents)))
        child_C = (parent_M >= 0).nonzero().flatten()
        self.register_buffer("child_C", child_C, persistent=False)
        self.register_buffer("parent_P", parent_M[child_C].unique(), persistent=False)

    def extra_losses(self, f_NM: torch.Tensor, total_var: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.structure_coeff == 0 or len(self.parent_P) == 0:
            return {}
        sums_NM = torch.zeros_like(f_NM).index_add(1, self.parent_M[self.child_C], f_NM[:, self.child_C])
        gap_NP = f_NM[:, self.parent_P] - sums_NM[:, self.parent_P]
        return {"structure": self.cfg.structure_coeff * gap_NP.pow(2).sum(1).mean() / total_var}


def format_tree(
    sae: _TreeSAE, max_children: int = 10, labels: Sequence[str] | Mapping[int, str] | None = None
) -> str:
    """The tree as indented text, one latent per line under ``root``: children by subtree size (largest
    first, then index), at most ``max_children`` per node and a "… N more" line for the rest. ``labels``
    (a list, or a dict by latent index) adds a name after each index."""
    if max_children < 0:
        raise ValueError(f"max_children must be >= 0, got {max_children}")
    parents = sae.parent_M.tolist()
    depth = tree_depths(parents)
    children: dict[int, list[int]] = {}
    size = [1] * len(parents)  # latents in each subtree, accumulated from the deepest up
    for i in sorted(range(len(parents)), key=lambda j: -depth[j]):
        children.setdefault(parents[i], []).append(i)
        if parents[i] != ROOT:
            size[parents[i]] += size[i]

    def name(i: int) -> str:
        label = None if labels is None else (labels.get(i) if isinstance(labels, Mapping) else labels[i])
        n_kids = len(children.get(i, []))
        return (
            f"{i}"
            + (f" {label}" if label else "")
            + (f"  [{n_kids} child{'ren' if n_kids > 1 else ''}]" if n_kids else "")
        )

    def lines_under(node: int, prefix: str) -> list[tuple[str, str | None, int | str]]:
        """(line head, prefix of the child's own children or None, latent or text) for each line."""
        kids = sorted(children.get(node, []), key=lambda c: (-size[c], c))
        shown, hidden = kids[:max_children], len(kids) - min(len(kids), max_children)
        out: list[tuple[str, str | None, int | str]] = []
        for j, c in enumerate(shown):
            last = j == len(shown) - 1 and hidden == 0
            out.append((prefix + ("└── " if last else "├── "), prefix + ("    " if last else "│   "), c))
        if hidden:
            out.append((prefix + "└── ", None, f"… {hidden} more"))
        return out

    lines = [f"root  [{len(children.get(ROOT, []))} children, {len(parents)} latents]"]
    stack = lines_under(ROOT, "")[::-1]
    while stack:  # depth-first, iteratively: a given tree may be deeper than Python's recursion limit
        head, child_prefix, item = stack.pop()
        if child_prefix is None:
            lines.append(head + str(item))
            continue
        lines.append(head + name(int(item)))
        stack.extend(lines_under(int(item), child_prefix)[::-1])
    return "\n".join(lines)
