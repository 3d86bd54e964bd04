"""The interface every SAE architecture implements, and the registry that names them.

The trainer, the evaluation and the analysis code only ever talk to this interface, so an architecture is
one file that (1) declares a config dataclass derived from :class:`SAEConfig`, (2) subclasses :class:`SAE`
and (3) registers itself with :func:`register`. Conventions (see DESIGN.md):

* ``W_enc`` is (d_in, width), ``W_dec`` is (width, d_in); rows of ``W_dec`` are the feature directions.
* ``encode(x_ND) -> f_NM`` is the *inference* encoder: one token's code never depends on the rest
  of the batch.
* ``decode(f_NM) -> x_hat_ND``.
* ``forward(x_ND, ctx) -> SAEOutput`` is the *training* pass: reconstruction, latents and a dict of named
  loss terms whose sum is the loss the trainer minimises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from saekit.config import strict_from_dict


@dataclass
class SAEConfig:
    """Fields shared by every architecture. Subclasses add their own hyperparameters with defaults."""

    d_in: int
    """Width of the activations the SAE reads (d)."""
    width: int
    """Number of latents (M)."""

    def validate(self) -> None:
        """Reject configs that cannot work, before any work starts. Subclasses extend this."""
        if self.d_in <= 0 or self.width <= 0:
            raise ValueError(f"d_in and width must be positive, got d_in={self.d_in}, width={self.width}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from a dict: unknown keys are an error naming them; missing optional keys take defaults."""
        return strict_from_dict(cls, data)


@dataclass
class StepContext:
    """What the trainer tells an SAE about the current step. Architectures ignore what they don't need."""

    sparsity_scale: float = 1.0
    """Multiplier in [0, 1] for the sparsity coefficient (the trainer's sparsity warm-up)."""
    dead_mask: torch.Tensor | None = None
    """(M,) bool: latents that have not fired for ``dead_tokens`` tokens (for AuxK-style losses)."""
    step: int = 0
    total_steps: int = 0
    """Steps in the whole run (0 = unknown). Schedules inside an architecture (SoftSAE's temperature
    annealing and hard phase, Tree SAE's reallocation) read ``progress``."""

    @property
    def progress(self) -> float:
        """Fraction of the run completed before this step, in [0, 1] (0 when the length is unknown)."""
        return min(1.0, self.step / self.total_steps) if self.total_steps > 0 else 0.0


@dataclass
class SparseCode:
    """A batch's code as COO entries: latent ``cols[s]`` of token ``rows[s]`` has value ``vals[s]`` (no
    duplicates; rows ascending). The sparse training path returns this instead of an (N, M) tensor, which
    at M = 18,432 and N = 4,096 would take 300 MB and a pass over it for every statistic."""

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple[int, int]
    """(N, M)."""

    def to_dense(self) -> torch.Tensor:
        """The (N, M) code (differentiable with respect to ``vals``)."""
        n, m = self.shape
        out = self.vals.new_zeros(n * m)
        return out.index_put((self.rows * m + self.cols,), self.vals).view(n, m)

    def firing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fired_M, l0)``: the latents non-zero on some token, and the mean non-zero count per token."""
        n, m = self.shape
        nonzero = self.vals != 0
        fired_M = torch.zeros(m, dtype=torch.bool, device=self.cols.device)
        fired_M[self.cols[nonzero]] = True
        return fired_M, nonzero.sum().float() / max(n, 1)


@dataclass
class SAEOutput:
    x_hat: torch.Tensor
    """(N, d) reconstruction."""
    f: torch.Tensor | None
    """(N, M) latent activations used for the reconstruction (zeros where inactive). An SAE that has the
    code as ``code`` passes None here; reading ``f`` then builds the dense tensor once (lazily), so the
    trainer, which needs only :meth:`firing`, never pays for it."""
    losses: dict[str, torch.Tensor]
    """Named scalar loss terms; the training loss is their sum."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Extra scalars worth logging (not optimised)."""
    code: SparseCode | None = None
    """The same code as COO entries, when the SAE computed it sparsely."""

    def __post_init__(self) -> None:
        if self._f is None and self.code is None:
            raise ValueError("SAEOutput needs the code: pass f (dense) or code (SparseCode)")

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]

    def firing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fired_M, l0)``: (M,) bool, latents non-zero on some token of the batch, and the mean number
        of non-zero latents per token (a 0-d tensor: no host sync). Read from ``code`` when there is one."""
        if self.code is not None:
            return self.code.firing()
        fired_NM = self._f != 0
        return fired_NM.any(dim=0), fired_NM.sum(dim=1).float().mean()


def _get_f(self: SAEOutput) -> torch.Tensor:
    if self._f is None:
        self._f = self.code.to_dense()  # type: ignore[union-attr]
    return self._f


def _set_f(self: SAEOutput, value: torch.Tensor | None) -> None:
    self._f = value


# ``f`` stays a dataclass field (positional construction and ``dataclasses.replace`` keep working) but is
# read through a property, so that a sparse output materialises its dense code only when someone asks.
SAEOutput.f = property(_get_f, _set_f)  # type: ignore[assignment]


class SAE(nn.Module):
    """Base class. Subclasses set ``config_class`` and implement ``encode``, ``decode`` and ``forward``."""

    arch: ClassVar[str]
    config_class: ClassVar[type[SAEConfig]]
    multi_hook: ClassVar[bool] = False
    """True for an SAE trained on the pooled rows of several hook points (the multi-layer SAE). Its config
    then has an ``n_layers`` field, and the train job feeds batches of ``n_layers`` equal blocks, block l
    from hook point l (the same tokens in every block), and records the hook points in
    ``metadata["hooks"]``."""
    ordered_latents: ClassVar[bool] = False
    """True when training orders the latents by importance (Matryoshka prefixes), so progressive coding
    (``saekit eval --progressive``) reads them in index order instead of ranking them by E[f²]."""
    permutable_latents: ClassVar[bool] = True
    """False when latents cannot be reordered freely (Switch: each expert owns a block of latents)."""
    latent_axes: ClassVar[dict[str, int | None]] = {}
    """State-dict tensors whose latent axis cannot be inferred from the conventions (``W_enc`` (d, M),
    ``W_dec`` (M, d), ``b_enc`` and other 1-D (M,) tensors when M ≠ d): name → latent axis, None for none.
    Used by :func:`saekit.eval.progressive.permute_latents`."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.metadata: dict[str, Any] = {}
        """Free-form provenance (hook point, model, normalization, ...), saved in cfg.json by ``save_sae``."""

    # -- the three calls everything uses -------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        raise NotImplementedError

    def describe_structure(self) -> str | None:
        """Text describing learned structure beyond the weights (the Tree SAE's tree), printed by
        ``saekit info``; None when there is none."""
        return None

    @classmethod
    def own_training_rows(cls, options: dict[str, Any]) -> torch.Tensor | None:
        """Rows (N, d_in) to train on instead of model activations, given the job's architecture options
        (the meta-SAE trains on another SAE's decoder rows). ``None``, the default: train on activations
        of a model's hook point."""
        return None

    # -- hooks the trainer calls around the optimizer step ---------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, each ``{"params": [...], "lr_scale": s}``: the trainer gives a
        group s × its learning rate (and schedule). One group by default; an architecture whose parameters
        need another step size (JumpReLU's log-thresholds) splits them off."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def before_optimizer_step(self) -> None:
        """Called after backward, before ``optimizer.step()`` (e.g. remove decoder-parallel gradients)."""

    def after_optimizer_step(self) -> None:
        """Called after ``optimizer.step()`` (e.g. renormalise decoder rows)."""

    # -- initialisation and saving ---------------------------------------------------------------------
    def init_from_data(self, sample: torch.Tensor, b_dec_init: torch.Tensor | None) -> None:
        """Data-dependent initialisation. Default: ``b_dec`` = the given centre (geometric median/mean)."""
        if b_dec_init is not None and hasattr(self, "b_dec"):
            with torch.no_grad():
                self.b_dec.copy_(b_dec_init.to(self.b_dec))

    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` take raw ``x``: afterwards ``encode(x)`` equals the old
        ``encode(scale * x)`` and ``decode(f)`` equals the old ``decode(f) / scale``. Latent units (and so
        thresholds) are unchanged. The default covers SAEs whose input enters only through ``W_enc``
        after subtracting ``b_dec``; architectures with other input paths override it."""
        with torch.no_grad():
            self.W_enc.mul_(scale)
            self.W_dec.div_(scale)
            self.b_dec.div_(scale)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def width(self) -> int:
        return self.cfg.width


_REGISTRY: dict[str, type[SAE]] = {}


def register(name: str):
    """Class decorator: ``@register("topk")`` makes the architecture available by name."""

    def wrap(cls: type[SAE]) -> type[SAE]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"architecture name {name!r} registered twice")
        cls.arch = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_architecture(name: str) -> type[SAE]:
    from saekit import sae as _all  # noqa: F401  (importing the package registers every architecture)

    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_architectures() -> list[str]:
    from saekit import sae as _all  # noqa: F401

    return sorted(_REGISTRY)
