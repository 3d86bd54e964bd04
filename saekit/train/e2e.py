"""End-to-end SAE training (Braun, Taylor, Goldowsky-Dill, Sharkey, NeurIPS 2024, arXiv 2405.12241).

A local SAE is trained to reproduce its activation x; an end-to-end SAE is trained to preserve what the model
does with it. The reconstruction x̂ replaces x at the hook point, the model runs on from there, and the loss on
a batch of B contexts of T tokens is (spec §7.1)

    L = λ_KL · (1/BT) Σ_{b,t} KL(p_clean(·|b,t) ‖ p_SAE(·|b,t))                             (e2e)
        + (λ_ds/|H|) · Σ_{h∈H} MSE(s·h^SAE, s·h^clean)                         (e2e+ds, H = later hooks)
        + λ_local · L_recon + the architecture's other terms (sparsity, AuxK, ...)

with KL(p‖q) = Σ_v p(v)(log p(v) − log q(v)), which is what e2e_sae's ``F.kl_div(log_softmax(new),
log_softmax(orig), log_target=True, reduction="batchmean")`` computes over every position. Braun et al.'s
coefficients are the defaults (:class:`saekit.train.config.E2EConfig`): λ_KL = 1 for e2e; λ_KL = 0.5 and
λ_ds = 2.5 split evenly over the hooks for e2e+ds; λ_local = 0. Their sparsity term (1.5·‖c‖₁/d) becomes the
architecture's own, set in its config (a ReLU SAE's λ, a TopK's k).

Each step runs the model twice on one token batch: clean and without gradients, capturing x, the downstream
activations and the log-probabilities; then with the trainer's x̂ spliced in. x̂ is computed once, from the
clean x: the layers before the hook are the same in both runs. The model is frozen (eval mode,
``requires_grad`` off), so the gradient reaches only the SAE, through the layers after the hook.

saekit's choices where the paper is silent:

* Special-token positions (BOS, EOS) and attention sinks keep their clean activation in the spliced run and
  are not trained on, exactly the positions evaluation leaves clean (``splice_special``/``outlier_factor``,
  the extraction settings). The KL and the downstream MSE still average over every position.
* s is the trainer's normalisation scale (E‖s x‖² = d at the SAE's hook), so the downstream MSE is in the
  SAE's training units and λ_ds does not depend on the model's activation scale; with
  ``normalize_activations`` off, s = 1 and it is e2e_sae's raw MSE. Mean over positions and dimensions.
* The architecture's local reconstruction term is its loss named "recon" (every saekit architecture names it
  so). Whatever an architecture puts in that term goes with it: Matryoshka's nested prefix losses live there,
  so pure e2e (λ_local = 0) trains a Matryoshka SAE without its nesting.
* Batches are whole packed contexts (batch_size tokens = contexts × context_len, no padding), shuffled in
  blocks with the run's seed; the text is read again when it runs out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from saekit.activations.extract import DEFAULT_OUTLIER_FACTOR
from saekit.data import iter_texts, pack_contexts, special_token_ids
from saekit.eval.evaluate import position_masks
from saekit.eval.splice import log_probs_, replace_fn
from saekit.models.hooks import capture, hook_layer, splice, validate_hooks
from saekit.sae.base import SAEOutput
from saekit.train.config import E2EConfig

TokenSource = Callable[[int], Iterator[torch.Tensor]]
_KIND_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


def kl_clean_to_spliced(clean_logp_BTV: torch.Tensor, logits_BTV: torch.Tensor) -> torch.Tensor:
    """Mean over all positions of KL(p_clean ‖ p) = Σ_v p_clean(v)(log p_clean(v) − log p(v)), where p is the
    softmax of ``logits_BTV``; differentiable in the logits. In float32 (as evaluation's KL) or finer."""
    logp_NV = logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32)).log_softmax(-1)
    logp_NV = logp_NV.flatten(0, -2)
    clean_NV = clean_logp_BTV.to(logp_NV).flatten(0, -2)
    return F.kl_div(logp_NV, clean_NV, log_target=True, reduction="batchmean")


def _comes_after(model: torch.nn.Module, later: str, earlier: str) -> bool:
    """Whether hook point ``later`` is computed after ``earlier``: by block, then resid_pre < attn_out <
    mlp_out < resid_post inside a block (raw module paths are ordered by block only)."""
    kinds = [_KIND_ORDER.get(name.rsplit(".", 1)[-1]) for name in (later, earlier)]
    layers = [hook_layer(model, name) for name in (later, earlier)]
    if None in kinds:
        return later != earlier and layers[0] >= layers[1]
    return (layers[0], kinds[0]) > (layers[1], kinds[1])


@dataclass
class _CleanRun:
    """What the clean forward of one batch leaves for the spliced one."""

    ids_BT: torch.Tensor
    mask_BT: torch.Tensor
    """Positions whose activation the SAE reads and replaces."""
    x_KD: torch.Tensor
    logp_BTV: torch.Tensor
    downstream: dict[str, torch.Tensor]


class E2EObjective:
    """The trainer objective of end-to-end training (see the module docstring).

    Pass it as ``Trainer(..., objective=E2EObjective(...))`` with a batch source of (contexts, tokens)
    integer batches (:func:`token_batch_source`). ``special_ids`` are the tokenizer's special tokens, left
    clean unless ``splice_special``; ``outlier_factor`` (None = off) leaves attention sinks clean too.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        hook: str,
        cfg: E2EConfig,
        *,
        special_ids: Iterable[int] = (),
        splice_special: bool = False,
        outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR,
    ):
        cfg.validate()
        if not cfg.e2e:
            raise ValueError("E2EObjective needs an E2EConfig with e2e=True")
        downstream = list(cfg.e2e_downstream_hooks)
        validate_hooks(model, [hook, *downstream])
        for h in downstream:
            if not _comes_after(model, h, hook):
                raise ValueError(f"downstream hook {h!r} does not come after the SAE's hook point {hook!r}")
        if outlier_factor is not None and outlier_factor <= 1:
            raise ValueError(
                f"outlier_factor must be > 1 (or None to keep every position), got {outlier_factor}"
            )
        self.model = model.eval().requires_grad_(False)
        self.hook, self.cfg, self.downstream = hook, cfg, downstream
        self.special_ids = sorted(set(special_ids))
        self.splice_special, self.outlier_factor = splice_special, outlier_factor
        self._clean: _CleanRun | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            **self.cfg.to_dict(),
            "special_ids": self.special_ids,
            "splice_special": self.splice_special,
            "outlier_factor": self.outlier_factor,
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _clean_run(self, ids_BT: torch.Tensor) -> _CleanRun:
        if ids_BT.ndim != 2 or ids_BT.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"e2e batches must be (contexts, tokens) integer tensors, got {ids_BT.dtype} "
                f"{tuple(ids_BT.shape)}"
            )
        ids = ids_BT.to(self.device)
        with capture(self.model, [self.hook, *self.downstream]) as acts:
            logits_BTV = self.model(input_ids=ids, use_cache=False).logits
        act_BTD = acts[self.hook]
        special = torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device)
        opts = {
            "outlier_factor": self.outlier_factor,
            "exclude_special": True,
            "splice_special": self.splice_special,
        }
        _, mask_BT, _ = position_masks(ids, act_BTD, special, opts)
        downstream = {h: acts[h] for h in self.downstream}
        return _CleanRun(ids_BT, mask_BT, act_BTD[mask_BT], log_probs_(logits_BTV), downstream)

    def activations(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """The (K, d) clean activations at the replaced positions, in the order of ``mask_BT``."""
        self._clean = self._clean_run(ids_BT)
        return self._clean.x_KD

    def with_losses(self, ids_BT: torch.Tensor, out: SAEOutput, norm_scale: float) -> SAEOutput:
        """Splice ``out.x_hat / norm_scale`` into the model and return ``out`` with the e2e loss terms."""
        clean = self._clean if self._clean is not None and self._clean.ids_BT is ids_BT else None
        clean = clean or self._clean_run(ids_BT)
        self._clean = None  # the clean log-probs are the largest tensor of the step: free them after use
        losses = dict(out.losses)
        if "recon" not in losses:
            raise ValueError(
                f"e2e training needs the architecture's local reconstruction loss to be named 'recon'; "
                f"its loss terms are {sorted(losses)}"
            )
        recon = losses.pop("recon")
        if self.cfg.e2e_local_coeff > 0:
            losses["recon"] = self.cfg.e2e_local_coeff * recon
        logits_BTV, spliced = self._spliced_run(clean, out.x_hat / norm_scale)
        kl = kl_clean_to_spliced(clean.logp_BTV, logits_BTV)
        losses["e2e_kl"] = self.cfg.kl_coeff * kl
        metrics: dict[str, Any] = {**out.metrics, "e2e_kl": kl.detach()}
        if self.downstream:
            total = 0.0
            for h in self.downstream:
                mse_h = (norm_scale * (spliced[h].float() - clean.downstream[h].float())).pow(2).mean()
                metrics[f"e2e_mse/{h}"] = mse_h.detach()
                total = total + mse_h
            losses["e2e_downstream"] = self.cfg.e2e_downstream_coeff / len(self.downstream) * total
        return dataclasses.replace(out, losses=losses, metrics=metrics)

    def _spliced_run(
        self, clean: _CleanRun, x_hat_KD: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and downstream activations (with gradients) when ``x_hat_KD`` replaces the masked
        positions."""
        recorded: dict[str, torch.Tensor] = {}

        def record(h: str) -> Callable[[torch.Tensor], torch.Tensor]:
            def keep(act_BTD: torch.Tensor) -> torch.Tensor:
                recorded[h] = act_BTD  # ``capture`` would detach it: an identity splice keeps the graph
                return act_BTD

            return keep

        with contextlib.ExitStack() as stack:
            stack.enter_context(splice(self.model, self.hook, replace_fn(clean.mask_BT, lambda _: x_hat_KD)))
            for h in self.downstream:
                stack.enter_context(splice(self.model, h, record(h)))
            logits_BTV = self.model(input_ids=clean.ids_BT.to(self.device), use_cache=False).logits
        return logits_BTV, recorded


def token_batch_source(
    texts: Callable[[], Iterable[str]],
    tokenizer: Any,
    context_len: int,
    contexts_per_batch: int,
    *,
    seed: int = 0,
    shuffle_batches: int = 64,
) -> TokenSource:
    """A trainer batch source of (contexts_per_batch, context_len) token batches packed from ``texts()``.

    Contexts are shuffled in blocks of ``shuffle_batches`` batches by a generator seeded with ``seed``; the
    text is read again (``texts()`` is called anew) whenever it runs out. ``source(skip)`` rebuilds the same
    stream and drops its first ``skip`` batches, so a resumed run sees the batches it would have seen.
    """
    if contexts_per_batch < 1 or shuffle_batches < 1:
        raise ValueError(
            f"contexts_per_batch and shuffle_batches must be >= 1, got {contexts_per_batch} and "
            f"{shuffle_batches}"
        )
    block = contexts_per_batch * shuffle_batches

    def batches() -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            n_batches = 0
            contexts = iter(pack_contexts(texts(), tokenizer, context_len))
            while chunk := list(itertools.islice(contexts, block)):
                ctx_CT = torch.stack(chunk)[torch.randperm(len(chunk), generator=gen)]
                for start in range(0, len(chunk) - contexts_per_batch + 1, contexts_per_batch):
                    n_batches += 1
                    yield ctx_CT[start : start + contexts_per_batch]
            if n_batches == 0:
                raise ValueError(
                    f"the text holds fewer than {contexts_per_batch} contexts of {context_len} tokens: "
                    "not one batch"
                )

    def source(skip: int) -> Iterator[torch.Tensor]:
        return itertools.islice(batches(), skip, None)

    return source


def e2e_training(
    loaded: Any,
    hook: str,
    cfg: E2EConfig,
    *,
    text: str,
    split: str,
    context_len: int,
    batch_size: int,
    seed: int,
    keep_special: bool = False,
    outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR,
) -> tuple[E2EObjective, TokenSource]:
    """The objective and batch source of an e2e run on a loaded model (``saekit.models.load_model``) and a
    text source (as in ``iter_texts``), for ``Trainer(..., objective=...).fit(source)``."""
    if batch_size % context_len:
        raise ValueError(
            f"e2e batches are whole contexts: batch_size ({batch_size} tokens) must be a multiple of "
            f"context_len ({context_len})"
        )
    objective = E2EObjective(
        loaded.model,
        hook,
        cfg,
        special_ids=special_token_ids(loaded.tokenizer),
        splice_special=keep_special,
        outlier_factor=outlier_factor,
    )
    source = token_batch_source(
        lambda: iter_texts(text, split), loaded.tokenizer, context_len, batch_size // context_len, seed=seed
    )
    return objective, source
