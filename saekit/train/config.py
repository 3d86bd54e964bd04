"""Training settings: one dataclass whose field docstrings are the CLI's help text (see saekit.config)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from saekit.config import strict_from_dict
from saekit.train.schedules import DECAYS

# Settings that change how a run is observed, not the weights it produces: they may differ when resuming.
RUNTIME_FIELDS = frozenset(
    {"log_every", "eval_every", "checkpoint_every", "threads", "progress", "wandb_project", "tensorboard"}
)


@dataclass
class TrainConfig:
    total_tokens: int = 10_000_000
    """Tokens to train on; the run has ceil(total_tokens / batch_size) optimizer steps."""
    batch_size: int = 4096
    """Activations (tokens) per optimizer step. The activation source must yield batches of this size."""
    lr: float = 3e-4
    """Peak learning rate of Adam."""
    adam_beta1: float = 0.9
    """Adam beta1 (GDM recipes for Gated/JumpReLU use 0)."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 500
    """Steps of linear learning-rate warm-up from lr/warmup_steps to lr."""
    decay: Literal["cosine", "linear", "constant"] = "linear"
    """Shape of the learning-rate decay after decay_start_fraction of the run."""
    decay_start_fraction: float = 0.8
    """Fraction of the steps after which the learning rate starts to decay."""
    final_lr_fraction: float = 0.0
    """Learning rate at the end of the decay, as a fraction of lr."""
    sparsity_warmup_steps: int = 0
    """Steps over which the SAE's sparsity coefficient ramps linearly from 0 to its full value (0 = off)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How to initialise the decoder bias from the first init_tokens activations."""
    init_tokens: int = 32_768
    """Activations (taken from the first batches, which are then trained on too) used to estimate the
    normalization scale and the decoder-bias initialisation."""
    normalize_activations: bool = True
    """Train on s*x with one scalar s such that E||s x||^2 = d; s is folded into the saved SAE so that it
    takes raw activations."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens (capped by the tokens seen so far) is dead."""
    log_every: int = 50
    """Write a metrics.jsonl record (losses averaged since the last one) every this many steps."""
    eval_every: int = 0
    """Call the trainer's on_eval callback every this many steps and at the end (0 = never)."""
    checkpoint_every: int = 500
    """Write a resumable checkpoint every this many steps (0 = only at the end)."""
    seed: int = 0
    """Seed for torch, numpy and random at the start of a fresh run."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    nan_policy: Literal["error", "skip"] = "error"
    """Input rows with NaN/Inf: 'error' stops, naming the step and batch; 'skip' drops and counts them."""
    threads: int = 0
    """torch CPU threads during fit (0 = leave torch's default). Resuming with another thread count is
    allowed, but bit-identical results are only promised for the same count."""
    progress: bool = True
    """Show a progress bar (tokens/s, ETA, loss, L0)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the wandb package)."""
    tensorboard: bool = False
    """Also write TensorBoard events under out_dir/tensorboard (needs the tensorboard package)."""

    @property
    def total_steps(self) -> int:
        return -(-self.total_tokens // self.batch_size)

    def validate(self) -> None:
        """Reject settings that cannot work, naming the field, before any data is read."""
        positive = ("total_tokens", "batch_size", "init_tokens", "dead_tokens", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "sparsity_warmup_steps", "eval_every", "checkpoint_every", "threads")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be positive, got {self.adam_eps}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        for name in ("decay_start_fraction", "final_lr_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(
                f"b_dec_init must be 'geometric_median', 'mean' or 'zeros', got {self.b_dec_init!r}"
            )
        if self.nan_policy not in ("error", "skip"):
            raise ValueError(f"nan_policy must be 'error' or 'skip', got {self.nan_policy!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict: unknown keys are an error naming them; missing keys take defaults."""
        return strict_from_dict(cls, data)

    def result_settings(self) -> dict[str, Any]:
        """The settings that determine the trained weights (everything but RUNTIME_FIELDS)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def config_hash(self) -> str:
        """Short hash of ``result_settings()``: a checkpoint only resumes under the same hash."""
        text = json.dumps(self.result_settings(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class E2EConfig:
    """End-to-end training (Braun et al. 2024, arXiv 2405.12241; saekit.train.e2e): the SAE's reconstruction
    replaces the activation inside the model and the loss is the KL divergence of the next-token
    distributions, optionally plus the MSE of later residual-stream activations (e2e+ds)."""

    e2e: bool = False
    """Train end to end: splice the SAE into the model and minimise KL(clean || spliced) of the next-token
    distributions instead of the local reconstruction error (the activations then come from the model,
    not a cache)."""
    e2e_kl_coeff: float | None = None
    """Coefficient of the KL term (default: 1.0, or 0.5 with e2e_downstream_hooks, as in Braun et al.)."""
    e2e_downstream_hooks: list[str] = field(default_factory=list)
    """Later hook points (e.g. layers.7.resid_pre) whose spliced activations are pulled towards the clean
    ones by an MSE term (e2e+ds). Repeatable."""
    e2e_downstream_coeff: float = 2.5
    """Total coefficient of the downstream MSE terms, split evenly over e2e_downstream_hooks."""
    e2e_local_coeff: float = 0.0
    """Weight of the architecture's own local reconstruction term ('recon'); 0 = pure e2e. Its sparsity
    and auxiliary terms are always kept."""

    @property
    def kl_coeff(self) -> float:
        """The KL coefficient in use: Braun et al.'s 1.0 (e2e) or 0.5 (e2e+ds) unless one is given."""
        if self.e2e_kl_coeff is not None:
            return self.e2e_kl_coeff
        return 0.5 if self.e2e_downstream_hooks else 1.0

    def validate(self) -> None:
        """Reject settings that cannot work, naming the field."""
        given = {k: v for k, v in self.to_dict().items() if k != "e2e" and v != _E2E_DEFAULTS[k]}
        if given and not self.e2e:
            raise ValueError(
                f"settings {sorted(given)} only apply to end-to-end training: add e2e=True (--e2e)"
            )
        for name in ("e2e_downstream_coeff", "e2e_local_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_coeff < 0:
            raise ValueError(f"e2e_kl_coeff must be >= 0, got {self.e2e_kl_coeff}")
        hooks = self.e2e_downstream_hooks
        if isinstance(hooks, str) or not all(isinstance(h, str) and h for h in hooks):
            raise ValueError(f"e2e_downstream_hooks must be a list of hook names, got {hooks!r}")
        if len(set(hooks)) != len(hooks):
            raise ValueError(f"e2e_downstream_hooks lists a hook point twice: {hooks}")
        downstream = self.e2e_downstream_coeff if hooks else 0.0
        if self.e2e and self.kl_coeff == 0 and downstream == 0 and self.e2e_local_coeff == 0:
            raise ValueError(
                "e2e_kl_coeff, the downstream term and e2e_local_coeff are all 0: nothing would tie the "
                "SAE's reconstruction to the model"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> E2EConfig:
        """Build from a dict: unknown keys are an error naming them; missing keys take defaults."""
        return strict_from_dict(cls, data)


_E2E_DEFAULTS = E2EConfig().to_dict()
