"""``saekit bench synthetic``: train SAEs on activations whose true features are known, and score how well
each architecture recovers them.

Data (:mod:`saekit.eval.synthetic`). A sample is a sparse non-negative combination of unit directions
g_j ∈ R^d, with more features than dimensions (superposition), plus Gaussian noise:

    x = Σ_j m_j · 1[feature j fires] · g_j + ε,   P(j fires) ∝ (j+1)^(−α),  m_j ~ U[0.5, 1.5],  ε ~ N(0, σ²I)

With ``hierarchy`` the features form a two-level tree instead: parent p fires with probability
``parent_prob``, and each of its children only with it, with probability ``child_prob``. With ``n_groups``
= G > 0, G disjoint groups of ``group_size`` features (drawn at random) also fire together: group g fires
with probability ``group_prob`` and then each member j adds m'_j · g_j, m'_j drawn like m_j (saekit's
choice: on top of the members' own firing, so a member firing both ways carries both magnitudes).
One seeded draw of n_train + n_heldout samples; the last n_heldout are held out.

Training. Each architecture gets width = expansion × (number of true features), is initialised under
torch seed ``seed`` and trained by :class:`saekit.train.Trainer` on the same batches (inputs normalised
to E‖x‖² = d, folded back afterwards). Options follow the data where the architecture has them: k (every
TopK-like) and target_l0 (JumpReLU) default to the data's expected L0, E[#features firing], rounded for k;
l1_coeff (ReLU, Gated) to the architecture's default. On hierarchical data Matryoshka gets two groups and
the Tree SAE two layers, split in the proportion of true parents to children (and Tree's k split in the
proportion of their expected firing counts); the Tree SAE's reallocation schedule is scaled to the run's
length (first at 1/12 of the steps, at most every 1/3, root reset at 3/4).

Scores on the held-out rows, with b(j) = argmax_i cos(g_j, W_dec,i) the best latent of true feature j:

* MMCS = mean_j max_i cos(g_j, W_dec,i); recovered = share of j with max_i cos ≥ 0.9 (Sharkey et al. 2022);
* FVU (centred), L0 and dead = share of latents that never fire (:mod:`saekit.eval.metrics`);
* hierarchical data, Matryoshka (first group = latents before the first group end) and Tree (first group =
  layer 0): the share of true parents p with b(p) in the first group, and of true children c with b(c)
  after it;
* hierarchical data, Tree: the share of true children c with parent_M[b(c)] = b(parent(c)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saekit.config import add_dataclass_args, dataclass_from_args, field_docs
from saekit.eval.metrics import sae_reconstruction
from saekit.eval.synthetic import hierarchical_activations, mmcs, recovered_fraction, synthetic_activations

RECOVERED_COS = 0.9
"""A true feature counts as recovered when some decoder row has at least this cosine with it."""


@dataclass
class SyntheticBenchConfig:
    """Synthetic ground-truth benchmark: data with known features, the architectures to train, training."""

    archs: list[str] = field(default_factory=lambda: ["topk", "batchtopk", "relu", "jumprelu"])
    """Architectures to train (any registered name; see `saekit archs`)."""
    d: int = 32
    """Dimension of the activations."""
    n_features: int = 64
    """True features (without --hierarchy); more than d puts them in superposition."""
    avg_active: float = 3.0
    """Expected number of true features firing per sample (without --hierarchy)."""
    exponent: float = 0.5
    """Power-law exponent α of the firing probabilities, P(j) ∝ (j+1)^-α (0: all equally frequent)."""
    noise_std: float = 0.01
    """Standard deviation of the Gaussian noise added to every dimension."""
    hierarchy: bool = False
    """Draw a two-level hierarchy instead (children fire only with their parent)."""
    n_parents: int = 8
    """Parent features (with --hierarchy)."""
    children_per_parent: int = 3
    """Children of each parent (with --hierarchy)."""
    parent_prob: float = 0.2
    """Probability that a parent fires (with --hierarchy)."""
    child_prob: float = 0.3
    """Probability that a child fires when its parent does (with --hierarchy)."""
    n_groups: int = 0
    """Groups of features that also fire together (0: none)."""
    group_size: int = 3
    """Features per correlated group."""
    group_prob: float = 0.02
    """Probability that a correlated group fires (all its members at once)."""
    n_train: int = 16_384
    """Training samples."""
    n_heldout: int = 4_096
    """Held-out samples the scores are computed on."""
    expansion: float = 2.0
    """SAE width = expansion × number of true features."""
    k: int | None = None
    """Active latents of TopK-like SAEs (default: the data's expected L0, rounded)."""
    l1: float | None = None
    """L1 coefficient of ReLU/Gated SAEs (default: the architecture's own)."""
    target_l0: float | None = None
    """Target L0 of JumpReLU (default: the data's expected L0)."""
    steps: int = 600
    """Optimizer steps per SAE."""
    batch_size: int = 256
    """Samples per optimizer step."""
    lr: float = 3e-3
    """Peak Adam learning rate."""
    seed: int = 0
    """Seed of the data and of each SAE's initialisation and batch order."""
    out: str = ""
    """Folder to keep each trained SAE in (OUT/ARCH); default: a temporary folder, deleted afterwards."""

    def validate(self) -> None:
        """Reject settings that cannot work, naming the field, before any data is drawn."""
        if not self.archs:
            raise ValueError("archs must name at least one architecture")
        positive = ["d", "n_features", "n_parents", "children_per_parent", "group_size", "n_train"]
        for name in [*positive, "n_heldout", "steps", "batch_size"]:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("expansion", "lr", "avg_active"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("parent_prob", "child_prob", "group_prob"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.exponent < 0 or self.noise_std < 0 or self.n_groups < 0:
            raise ValueError("exponent, noise_std and n_groups must be >= 0")
        if self.n_groups * self.group_size > self.n_true_features:
            need = self.n_groups * self.group_size
            raise ValueError(
                f"{self.n_groups} groups of {self.group_size} features need {need} distinct features, "
                f"but the data has only {self.n_true_features}"
            )
        if not self.hierarchy and self.avg_active > self.n_features:
            raise ValueError(f"avg_active={self.avg_active} exceeds n_features={self.n_features}")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")
        if self.l1 is not None and self.l1 < 0:
            raise ValueError(f"l1 must be >= 0, got {self.l1}")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ValueError(f"target_l0 must be positive, got {self.target_l0}")

    @property
    def n_true_features(self) -> int:
        return self.n_parents * (1 + self.children_per_parent) if self.hierarchy else self.n_features

    @property
    def width(self) -> int:
        return max(1, round(self.expansion * self.n_true_features))

    def expected_l0(self) -> float:
        """E[number of true features firing per sample] (a feature firing twice, alone and in its group,
        counted twice)."""
        if self.hierarchy:
            base = self.n_parents * self.parent_prob * (1 + self.children_per_parent * self.child_prob)
        else:
            base = self.avg_active
        return base + self.n_groups * self.group_size * self.group_prob


# -- data ------------------------------------------------------------------------------------------------
def correlated_groups(
    n_samples: int,
    dirs_FD: torch.Tensor,
    n_groups: int,
    group_size: int,
    group_prob: float,
    *,
    magnitude_range: tuple[float, float] = (0.5, 1.5),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of features that fire together: returns ``(x_ND, groups_GS)``, where ``groups_GS``
    holds the member features of each of ``n_groups`` disjoint random groups; each group fires
    independently with probability ``group_prob``, and then every member j adds m_j · g_j."""
    gen = torch.Generator().manual_seed(seed)
    n_features = dirs_FD.shape[0]
    groups_GS = torch.randperm(n_features, generator=gen)[: n_groups * group_size].view(n_groups, group_size)
    fires_NG = torch.rand(n_samples, n_groups, generator=gen) < group_prob
    lo, hi = magnitude_range
    mags_NGS = lo + (hi - lo) * torch.rand(n_samples, n_groups, group_size, generator=gen)
    x_ND = (fires_NG[:, :, None] * mags_NGS).flatten(1) @ dirs_FD[groups_GS.flatten()]
    return x_ND, groups_GS


def make_data(cfg: SyntheticBenchConfig) -> dict[str, torch.Tensor]:
    """The train and held-out rows, the true directions and (hierarchy) each feature's parent, −1 for none."""
    n = cfg.n_train + cfg.n_heldout
    if cfg.hierarchy:
        x_ND, dirs_FD, parent_F = hierarchical_activations(
            n, cfg.d, cfg.n_parents, cfg.children_per_parent,
            parent_prob=cfg.parent_prob, child_prob=cfg.child_prob, noise_std=cfg.noise_std, seed=cfg.seed,
        )  # fmt: skip
    else:
        x_ND, dirs_FD = synthetic_activations(
            n, cfg.d, cfg.n_features,
            avg_active=cfg.avg_active, exponent=cfg.exponent, noise_std=cfg.noise_std, seed=cfg.seed,
        )  # fmt: skip
        parent_F = torch.full((cfg.n_features,), -1)
    data = {"dirs_FD": dirs_FD, "parent_F": parent_F}
    if cfg.n_groups:
        x_group_ND, data["groups_GS"] = correlated_groups(
            n, dirs_FD, cfg.n_groups, cfg.group_size, cfg.group_prob, seed=cfg.seed + 1
        )
        x_ND = x_ND + x_group_ND
    data["train_ND"], data["heldout_ND"] = x_ND[: cfg.n_train], x_ND[cfg.n_train :]
    return data


# -- hierarchy scores ------------------------------------------------------------------------------------
def best_latents(W_dec_MD: torch.Tensor, dirs_FD: torch.Tensor) -> torch.Tensor:
    """(F,) index of the decoder row with the highest cosine with each true direction."""
    W_MD = torch.nn.functional.normalize(W_dec_MD.detach().float(), dim=1)
    G_FD = torch.nn.functional.normalize(dirs_FD.detach().float().to(W_MD.device), dim=1)
    return (G_FD @ W_MD.t()).argmax(dim=1)


def nesting_shares(
    best_F: torch.Tensor, parent_F: torch.Tensor, first_M: torch.Tensor
) -> tuple[float, float]:
    """(share of true parents whose best latent is in the first group, share of true children whose best
    latent is not); ``first_M`` (M,) bool marks the first group's latents."""
    in_first_F = first_M.to(best_F.device)[best_F]
    is_parent_F = parent_F.to(best_F.device) < 0
    return in_first_F[is_parent_F].float().mean().item(), (~in_first_F[~is_parent_F]).float().mean().item()


def tree_match(best_F: torch.Tensor, parent_F: torch.Tensor, parent_M: torch.Tensor) -> float:
    """Share of true children c whose best latent hangs under the best latent of c's true parent:
    parent_M[b(c)] = b(parent(c))."""
    parent_F = parent_F.to(best_F.device)
    child_C = (parent_F >= 0).nonzero().squeeze(1)
    attached_C = parent_M.to(best_F.device)[best_F[child_C]] == best_F[parent_F[child_C]]
    return attached_C.float().mean().item()


def first_group(sae) -> torch.Tensor | None:
    """(M,) bool: the latents of a nested SAE's first level (Tree: layer 0; Matryoshka: before the first
    group end), None for an SAE without nested levels."""
    if hasattr(sae, "layer_M"):
        return sae.layer_M == 0
    if hasattr(sae.cfg, "group_ends") and getattr(sae.cfg, "prefixes", "groups") == "groups":
        return torch.arange(sae.width) < sae.cfg.group_ends[0]
    return None


# -- training and evaluation -----------------------------------------------------------------------------
def arch_options(arch_cls, cfg: SyntheticBenchConfig) -> dict[str, Any]:
    """The options this benchmark sets for ``arch_cls`` (see the module docstring), besides d_in and width."""
    fields = {f.name for f in dataclasses.fields(arch_cls.config_class)}
    k = cfg.k or max(1, round(cfg.expected_l0()))
    opts: dict[str, Any] = {}
    if "k" in fields:
        opts["k"] = k
    if "l1_coeff" in fields and cfg.l1 is not None:
        opts["l1_coeff"] = cfg.l1
    if "target_l0" in fields:
        opts["target_l0"] = cfg.target_l0 or cfg.expected_l0()
    parent_share = cfg.n_parents / cfg.n_true_features
    if "group_fractions" in fields and cfg.hierarchy:
        opts["group_fractions"] = [parent_share, 1 - parent_share]
    if "realloc_interval" in fields:  # the learned Tree SAE
        opts |= {
            "realloc_interval": max(1, cfg.steps // 12),
            "max_realloc_interval": max(1, cfg.steps // 3),
            "root_reset_step": 3 * cfg.steps // 4,
            "parent_eligibility_tokens": 10 * cfg.batch_size,
        }
        if cfg.hierarchy:
            n_first = min(cfg.width - 1, max(1, round(parent_share * cfg.width)))
            k_first = cfg.n_parents * cfg.parent_prob / cfg.expected_l0()
            k_first = min(k - 1, max(1, round(k_first * k))) if k > 1 else 1
            opts |= {"layer_sizes": [n_first, cfg.width - n_first], "k_per_layer": [k_first, k - k_first]}
    return opts


def build_sae(arch: str, cfg: SyntheticBenchConfig):
    """An untrained ``arch`` SAE for this data, initialised under torch seed ``cfg.seed``."""
    from saekit.sae import SAE, get_architecture

    arch_cls = get_architecture(arch)
    own_rows = arch_cls.own_training_rows.__func__ is not SAE.own_training_rows.__func__  # the meta-SAE
    if own_rows or arch_cls.multi_hook:
        raise ValueError(
            f"{arch} does not train on one stream of activations, so it cannot be benchmarked here"
        )
    options = {"d_in": cfg.d, "width": cfg.width, **arch_options(arch_cls, cfg)}
    torch.manual_seed(cfg.seed)
    try:
        return arch_cls(arch_cls.config_class.from_dict(options))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{arch} with {options}: {e}") from e


def train(sae, cfg: SyntheticBenchConfig, train_ND: torch.Tensor, out_dir: Path):
    """Train ``sae`` with the Trainer on ``train_ND``; returns the trained SAE taking raw activations."""
    from saekit.jobs import rows_batch_source
    from saekit.train import TrainConfig, Trainer

    train_cfg = TrainConfig(
        total_tokens=cfg.steps * cfg.batch_size,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=max(1, cfg.steps // 20),
        sparsity_warmup_steps=max(1, cfg.steps // 10),
        init_tokens=min(cfg.n_train, 4_096),
        dead_tokens=max(cfg.batch_size, cfg.steps * cfg.batch_size // 20),
        log_every=max(1, cfg.steps // 10),
        checkpoint_every=0,
        seed=cfg.seed,
        progress=False,
    )
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)  # always retrain: the seconds are reported
    trainer = Trainer(sae, train_cfg, out_dir)
    trainer.fit(rows_batch_source(train_ND, cfg.batch_size, cfg.seed))
    return trainer.folded_sae()


@torch.no_grad()
def evaluate(sae, x_ND: torch.Tensor, dirs_FD: torch.Tensor, parent_F: torch.Tensor) -> dict[str, Any]:
    """Recovery, reconstruction and (hierarchical data) nesting scores of ``sae`` on held-out rows."""
    rec = sae_reconstruction(sae, x_ND)
    W_dec_MD = sae.W_dec
    scores: dict[str, Any] = {
        "mmcs": mmcs(W_dec_MD, dirs_FD),
        "recovered": recovered_fraction(W_dec_MD, dirs_FD, RECOVERED_COS),
        "fvu": rec["fvu"],
        "l0": rec["l0"],
        "dead_fraction": rec["dead_fraction"],
        "parents_first": None,
        "children_later": None,
        "tree_match": None,
    }
    first_M = first_group(sae)
    if (parent_F >= 0).any() and first_M is not None:
        best_F = best_latents(W_dec_MD, dirs_FD)
        scores["parents_first"], scores["children_later"] = nesting_shares(best_F, parent_F, first_M)
        if hasattr(sae, "parent_M"):
            scores["tree_match"] = tree_match(best_F, parent_F, sae.parent_M)
    return scores


def run_synthetic_bench(cfg: SyntheticBenchConfig) -> dict[str, Any]:
    """Draw the data, train and score every architecture of ``cfg.archs``; returns a JSON-ready dict with
    the settings, a description of the data and one record per architecture (the order of ``archs``)."""
    cfg.validate()
    for arch in cfg.archs:  # an impossible one fails now, not after the others have trained
        build_sae(arch, cfg)
    data = make_data(cfg)
    runs = []
    with tempfile.TemporaryDirectory(prefix="saekit_bench_") as tmp:
        root = Path(cfg.out or tmp)
        for arch in cfg.archs:
            sae = build_sae(arch, cfg)
            options = {k: v for k, v in sae.cfg.to_dict().items() if k in arch_options(type(sae), cfg)}
            start = time.perf_counter()
            trained = train(sae, cfg, data["train_ND"], root / arch)
            seconds = time.perf_counter() - start
            scores = evaluate(trained, data["heldout_ND"], data["dirs_FD"], data["parent_F"])
            runs.append({"arch": arch, "width": cfg.width, "options": options, **scores, "train_s": seconds})
    info = {
        "n_true_features": cfg.n_true_features,
        "expected_l0": cfg.expected_l0(),
        "hierarchy": cfg.hierarchy,
        "groups": data["groups_GS"].tolist() if "groups_GS" in data else [],
    }
    return {"config": dataclasses.asdict(cfg), "data": info, "runs": runs}


def format_table(result: dict[str, Any]) -> str:
    """One line per architecture; columns that no run has (the nesting scores on flat data) are left out."""
    cols = ["arch", "options", "mmcs", "recovered", "fvu", "l0", "dead_fraction"]
    cols += [
        c
        for c in ("parents_first", "children_later", "tree_match")
        if any(r[c] is not None for r in result["runs"])
    ]
    cols.append("train_s")

    def cell(run: dict[str, Any], col: str) -> str:
        value = run[col]
        if col == "options":
            return " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in value.items()
                if k in ("k", "l1_coeff", "target_l0")
            )
        if value is None:
            return "-"
        return value if isinstance(value, str) else f"{value:.3f}" if col != "train_s" else f"{value:.1f}"

    rows = [cols] + [[cell(r, c) for c in cols] for r in result["runs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    data = result["data"]
    head = (
        f"{data['n_true_features']} true features in d={result['config']['d']}, expected L0 "
        f"{data['expected_l0']:.2f}{', hierarchical' if data['hierarchy'] else ''}; width "
        f"{result['runs'][0]['width']}; recovered = share of features with max cos >= {RECOVERED_COS}"
    )
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([head, *lines])


# -- command line ----------------------------------------------------------------------------------------
def add_synthetic_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``synthetic`` command to ``subparsers`` (those of ``saekit bench``); returns its parser."""
    p = subparsers.add_parser(
        "synthetic",
        help="train SAEs on synthetic activations with known features and score their recovery",
        description="Train each architecture on synthetic activations with known feature directions in "
        "superposition (optionally hierarchical or in correlated groups) and score, on held-out rows, how "
        "well it recovers them (MMCS, share recovered at cos >= 0.9), FVU, L0, dead latents and, on "
        "hierarchical data, whether Matryoshka's groups and the Tree SAE's tree match the true hierarchy.",
    )
    default_archs = SyntheticBenchConfig().archs
    p.add_argument(
        "--archs",
        nargs="+",
        default=None,
        metavar="ARCH",
        help=f"{field_docs(SyntheticBenchConfig)['archs']} (default: {' '.join(default_archs)})",
    )
    add_dataclass_args(p, SyntheticBenchConfig, skip={"archs"})
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    return p


def cmd_bench_synthetic(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed options: print the table, write ``--json``."""
    cfg = dataclass_from_args(SyntheticBenchConfig, args)
    result = run_synthetic_bench(cfg)
    print(format_table(result))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return 0


__all__ = [
    "SyntheticBenchConfig",
    "add_synthetic_parser",
    "cmd_bench_synthetic",
    "run_synthetic_bench",
]
