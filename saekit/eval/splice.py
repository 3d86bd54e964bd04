"""Fidelity of an SAE inside the model: next-token CE and KL with the SAE spliced in, vs clean and ablated.

For each batch of tokens the model runs three times on the same input: clean; with the hook point's output
replaced by the SAE's reconstruction; and with it replaced by an ablation (zeros, or the mean activation at
that hook over the eval tokens). From the three sets of logits:

* CE: next-token cross-entropy averaged over predicted positions. A prediction is dropped when its target
  or its input position is padding.
* CE loss recovered = (CE_abl − CE_sae) / (CE_abl − CE_clean); ΔCE = CE_sae − CE_clean.
* KL(clean ‖ x) averaged over the same positions, over the full vocabulary, computed from float32
  log-softmax with float64 sums; KL score = (KL_abl − KL_sae) / KL_abl.

Positions holding special tokens (BOS, EOS, ...) are left clean by default in both the spliced and the
ablated run, because their activations are outliers no SAE is trained on; ``splice_special=True`` splices
them too. The mode is written into the result. Logits are turned into log-probs in place, reduced per batch
and never kept, because a 49k-token vocabulary makes them the largest tensors of the run (at most two at a
time: clean and spliced). float32 rather than float64: on CPU float64 log-softmax cost a third of the
forward's time, and float32 log-probs are accurate to ~1e-6 nats, far below any KL worth reporting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from saekit.models.hooks import forward_to_hooks, splice

SaeFn = Callable[[torch.Tensor], torch.Tensor]
ABLATIONS = ("zero", "mean")
_KL_CHUNK = 256  # positions per KL chunk: bounds the temporaries to a few × 256 × vocab floats


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def splice_mode_name(splice_special: bool, outlier_factor: float | None = None) -> str:
    """The human-readable splice mode written into results."""
    if splice_special:
        return "all positions spliced"
    if outlier_factor is None:
        return "special-token positions left clean"
    return f"special-token and outlier (norm > {outlier_factor:g}x median) positions left clean"


def replace_mask(
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor | None,
    special_ids: Iterable[int],
    splice_special: bool,
) -> torch.Tensor:
    """(B, T) bool: positions whose hook output gets replaced. Padding is never replaced (it is never read);
    special tokens are replaced only when ``splice_special``."""
    mask = torch.ones_like(input_ids_BT, dtype=torch.bool)
    if attention_mask_BT is not None:
        mask &= attention_mask_BT.bool()
    if not splice_special:
        ids = torch.tensor(sorted(set(special_ids)), dtype=input_ids_BT.dtype, device=input_ids_BT.device)
        mask &= ~torch.isin(input_ids_BT, ids)
    return mask


def prediction_mask(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None) -> torch.Tensor:
    """(B, T−1) bool: position t predicting token t+1 counts when neither t nor t+1 is padding."""
    b, t = input_ids_BT.shape
    if attention_mask_BT is None:
        return torch.ones(b, t - 1, dtype=torch.bool, device=input_ids_BT.device)
    am = attention_mask_BT.bool()
    return am[:, :-1] & am[:, 1:]


def replace_fn(mask_BT: torch.Tensor, values: SaeFn) -> Callable[[torch.Tensor], torch.Tensor]:
    """A splice function that writes ``values(act[mask])`` at the masked positions and keeps the rest."""

    def fn(act_BTD: torch.Tensor) -> torch.Tensor:
        if act_BTD.shape[:2] != mask_BT.shape:
            raise ValueError(
                f"hook output shape {tuple(act_BTD.shape)} does not match tokens {tuple(mask_BT.shape)}"
            )
        out = act_BTD.clone()
        new_KD = values(act_BTD[mask_BT])
        if new_KD.shape != (int(mask_BT.sum()), act_BTD.shape[-1]):
            raise ValueError(
                f"replacement function returned shape {tuple(new_KD.shape)}, "
                f"expected {(int(mask_BT.sum()), act_BTD.shape[-1])}"
            )
        out[mask_BT] = new_KD.to(device=out.device, dtype=out.dtype)
        return out

    return fn


def _logits(model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None):
    return model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).logits


def log_probs_(logits_BTV: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the vocabulary, computed row by row *in place* when the logits are already
    float32 (the model's fresh output, owned by the caller): the logits are the largest tensor of the run
    and this avoids a second copy. Other dtypes are converted first."""
    out = logits_BTV if logits_BTV.dtype == torch.float32 else logits_BTV.float()
    for row in range(out.shape[0]):
        out[row] = out[row].log_softmax(-1)
    return out


def _chunks(pred_BT1: torch.Tensor) -> Iterator[tuple[int, slice, torch.Tensor]]:
    """(row, position slice, mask) pieces of ≤ ``_KL_CHUNK`` predictions, so KL temporaries stay small."""
    b, t1 = pred_BT1.shape
    for row in range(b):
        for s in range(0, t1, _KL_CHUNK):
            m = pred_BT1[row, s : s + _KL_CHUNK]
            if m.any():
                yield row, slice(s, s + _KL_CHUNK), m


def ce_sum(logp_BTV: torch.Tensor, input_ids_BT: torch.Tensor, pred_BT1: torch.Tensor) -> float:
    """Σ over counted predictions of −log p(token t+1 | position t), accumulated in float64."""
    targets_BT1 = input_ids_BT[:, 1:].to(logp_BTV.device)
    picked_BT1 = logp_BTV[:, :-1].gather(-1, targets_BT1[..., None]).squeeze(-1)
    return -float(picked_BT1[pred_BT1.to(logp_BTV.device)].sum(dtype=torch.float64))


def kl_sum(clean_logp_BTV: torch.Tensor, other_logp_BTV: torch.Tensor, pred_BT1: torch.Tensor) -> float:
    """Σ over counted predictions of KL(clean ‖ other) = Σ_v p_clean (log p_clean − log p_other)."""
    total = 0.0
    for row, sl, m in _chunks(pred_BT1.to(clean_logp_BTV.device)):
        lp_c = clean_logp_BTV[row, :-1][sl][m]
        lp_o = other_logp_BTV[row, :-1][sl][m].to(lp_c.device)
        total += float((lp_c.exp() * (lp_c - lp_o)).sum(dtype=torch.float64))
    return total


class FidelityStats:
    """Running sums of CE and KL over batches; ``result()`` turns them into the fidelity metrics."""

    KEYS = ("ce_clean", "ce_sae", "ce_ablation", "kl_sae", "kl_ablation")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.n_predictions = 0
        self.n_tokens = 0
        self.n_replaced = 0

    @torch.no_grad()
    def add_batch(
        self,
        model: torch.nn.Module,
        hook: str,
        input_ids_BT: torch.Tensor,
        attention_mask_BT: torch.Tensor | None,
        clean_logp_BTV: torch.Tensor,
        mask_BT: torch.Tensor,
        sae_fn: SaeFn,
        ablation_D: torch.Tensor | None,
    ) -> None:
        """Run the spliced and ablated forwards for one batch whose clean log-probs (:func:`log_probs_` of
        the clean logits) are already known.

        ``mask_BT`` marks the positions to replace; ``sae_fn`` maps their (K, d) activations to (K, d)
        reconstructions; ``ablation_D`` is the mean activation (None means zero ablation).
        """
        pred = prediction_mask(input_ids_BT, attention_mask_BT)
        self.sums["ce_clean"] += ce_sum(clean_logp_BTV, input_ids_BT, pred)

        def ablate(act_KD: torch.Tensor) -> torch.Tensor:
            if ablation_D is None:
                return torch.zeros_like(act_KD)
            return ablation_D.to(act_KD).expand_as(act_KD)

        for name, values in (("sae", sae_fn), ("ablation", ablate)):
            with splice(model, hook, replace_fn(mask_BT, values)):
                other_logp_BTV = log_probs_(_logits(model, input_ids_BT, attention_mask_BT))
            self.sums[f"ce_{name}"] += ce_sum(other_logp_BTV, input_ids_BT, pred)
            self.sums[f"kl_{name}"] += kl_sum(clean_logp_BTV, other_logp_BTV, pred)
            del other_logp_BTV
        self.n_predictions += int(pred.sum())
        self.n_tokens += (
            int(attention_mask_BT.sum()) if attention_mask_BT is not None else input_ids_BT.numel()
        )
        self.n_replaced += int(mask_BT.sum())

    def result(self) -> dict[str, Any]:
        if self.n_predictions == 0:
            raise ValueError(
                "no predicted positions were evaluated (empty batches, or everything is padding)"
            )
        m = {k: v / self.n_predictions for k, v in self.sums.items()}
        ce_gap = m["ce_ablation"] - m["ce_clean"]
        return {
            **m,
            "ce_loss_recovered": (m["ce_ablation"] - m["ce_sae"]) / ce_gap if ce_gap != 0 else float("nan"),
            "delta_ce": m["ce_sae"] - m["ce_clean"],
            "kl_score": (
                (m["kl_ablation"] - m["kl_sae"]) / m["kl_ablation"] if m["kl_ablation"] != 0 else float("nan")
            ),
            "n_predictions": self.n_predictions,
            "n_tokens": self.n_tokens,
            "n_replaced_positions": self.n_replaced,
        }


def _as_batches(
    token_batches: torch.Tensor | Iterable[Any], attention_mask: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Normalise the accepted input forms to a list of (input_ids (B,T), attention_mask (B,T) | None)."""
    if isinstance(token_batches, torch.Tensor):
        ids = token_batches if token_batches.ndim == 2 else token_batches[None]
        batches: list[tuple[torch.Tensor, torch.Tensor | None]] = [(ids, attention_mask)]
    else:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask= applies to a single tensor of tokens; pass (ids, mask) pairs instead"
            )
        batches = []
        for item in token_batches:
            ids, am = item if isinstance(item, (tuple, list)) else (item, None)
            batches.append((ids if ids.ndim == 2 else ids[None], am))
    for ids, am in batches:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"token batches must be integer (B, T) tensors, got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.shape[1] < 2:
            raise ValueError(
                f"contexts need at least 2 tokens to predict anything, got length {ids.shape[1]}"
            )
        if am is not None and am.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(am.shape)} differs from tokens {tuple(ids.shape)}")
    return batches


@torch.no_grad()
def mean_activation(
    model: torch.nn.Module,
    hook: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    masks: Iterable[torch.Tensor],
) -> torch.Tensor:
    """Mean hook activation over the positions that will be replaced (float64 sum, returned as float32)."""
    total, count = None, 0
    for (ids, am), mask in zip(batches, masks, strict=True):
        act_BTD = forward_to_hooks(model, ids, [hook], attention_mask=am)[hook]
        s = act_BTD[mask.to(act_BTD.device)].double().sum(0)
        total = s if total is None else total + s
        count += int(mask.sum())
    if total is None or count == 0:
        raise ValueError("mean ablation needs at least one replaced position in the eval tokens")
    return (total / count).float()


@torch.no_grad()
def splice_fidelity(
    model: torch.nn.Module,
    hook: str,
    sae_fn: SaeFn,
    token_batches: torch.Tensor | Iterable[Any],
    *,
    ablation: str = "zero",
    splice_special: bool = False,
    special_ids: Iterable[int] = (),
    attention_mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """CE / KL fidelity of ``sae_fn`` spliced at ``hook``, against the clean model and an ablation.

    ``sae_fn`` maps raw (K, d) activations to reconstructions (the caller composes normalization and SAE).
    ``token_batches``: a (B, T) or (T,) token tensor (with ``attention_mask=`` if padded), or an iterable
    of (B, T) tensors or of (input_ids, attention_mask) pairs.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    device = model_device(model)
    batches = [
        (ids.to(device), None if am is None else am.to(device))
        for ids, am in _as_batches(token_batches, attention_mask)
    ]
    special = set(special_ids)
    masks = [replace_mask(ids, am, special, splice_special) for ids, am in batches]
    ablation_D = mean_activation(model, hook, batches, masks) if ablation == "mean" else None

    stats = FidelityStats()
    for (ids, am), mask in zip(batches, masks, strict=True):
        clean_logp = log_probs_(_logits(model, ids, am))
        stats.add_batch(model, hook, ids, am, clean_logp, mask, sae_fn, ablation_D)
        del clean_logp
    return {
        **stats.result(),
        "hook": hook,
        "ablation": ablation,
        "splice_special": splice_special,
        "splice_mode": splice_mode_name(splice_special or not special)
        + ("" if special or splice_special else " (no special token ids given)"),
    }
