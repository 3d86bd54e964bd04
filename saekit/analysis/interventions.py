"""Interventions: run a model with an SAE spliced in at its hook point, with chosen latents ablated, clamped
or used as steering directions, and generate text with and without the change.

Three edits, composable in one :func:`intervene` block:

* ``ablate=[i, ...]`` sets latent i to 0 in the SAE's code;
* ``clamp={i: v}`` sets latent i to v in the SAE's code, at every edited position (whether or not it fired);
* ``steer={i: s}`` adds s · W_dec[i] / ‖W_dec[i]‖ to the hook output at every edited position: "activation
  addition" along the latent's unit decoder direction, so s is in the hook's own units (on SmolLM2's
  residual stream a typical token has norm ~170; :func:`typical_norm` reads it from the SAE's metadata).

Ablate and clamp act on the code f = encode(x). With ``keep_error=True`` (the default) the SAE's error
term is kept, so downstream computation sees exactly what the edit changes and nothing else:

    out = x̂(f') + (x − x̂(f)),   computed as   out = x + (x̂(f') − x̂(f))

(at the positions whose edited latents change). With no edit, or at a position where the edited latents
already had their new values, ``out`` is ``x`` bit for bit. With ``keep_error=False`` the hook output is
the SAE's reconstruction x̂(f') itself, as in the CE-loss-recovered evaluation. Ablating or clamping edits
the code; it does not re-run the encoder's selection (a TopK SAE does not promote the (k+1)-th latent in
place of an ablated one).

Which positions are edited: as in training and evaluation (:mod:`saekit.eval.splice`), positions holding
special tokens (BOS, EOS, ...) and attention sinks (activation norm above ``outlier_factor`` × the typical
norm) keep their clean activation, because no SAE is trained on them and replacing a sink by its
reconstruction wrecks every later token. Token ids are read from the model's input-embedding module, so
this works for a plain forward, for ``model.generate`` with a KV cache (each step sees only its new
tokens) and for the base model alone; a forward given ``inputs_embeds`` has no ids and only the norm rule
applies. The typical norm is √d / s, where s is the normalization scale the trainer recorded
(E‖s·x‖² = d on the training tokens, so √d / s is their RMS norm, close to the median away from heavy
tails); it is a constant, so the rule behaves the same for a one-token generation step as for a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from saekit.activations.extract import DEFAULT_OUTLIER_FACTOR
from saekit.models.hooks import splice


@dataclass(frozen=True)
class Edit:
    """What to do at each edited position (see the module docstring for the exact formulas)."""

    ablate: tuple[int, ...] = ()
    """Latents set to 0 in the code."""
    clamp: Mapping[int, float] = field(default_factory=dict)
    """Latent → value it is set to in the code."""
    steer: Mapping[int, float] = field(default_factory=dict)
    """Latent → scale s: s · (unit decoder row) is added to the hook output."""
    keep_error: bool = True
    """Keep the SAE's error term x − x̂(f), so an edit changes the activation by exactly its own effect."""

    def validate(self, width: int) -> None:
        for what, ids in (("ablate", self.ablate), ("clamp", self.clamp), ("steer", self.steer)):
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < width]
            if bad:
                raise ValueError(f"{what}: latent ids {bad} out of range; the SAE has {width} latents")
        both = sorted(set(self.ablate) & set(self.clamp))
        if both:
            raise ValueError(f"latents {both} are both ablated and clamped; choose one")
        for i, v in {**self.clamp, **self.steer}.items():
            if not math.isfinite(v):
                raise ValueError(f"latent {i}: value {v} is not finite")

    @property
    def code_edits(self) -> dict[int, float]:
        """Latent → new value in the code (ablations are clamps to 0)."""
        return {**dict.fromkeys(self.ablate, 0.0), **self.clamp}


def unit_direction(sae: nn.Module, latent: int) -> torch.Tensor:
    """(d,) the latent's decoder row scaled to unit norm (saved SAEs fold the normalization into W_dec,
    so raw rows are not unit norm even for architectures that constrain them during training)."""
    row = sae.W_dec[latent].detach()
    norm = row.norm()
    if norm == 0:
        raise ValueError(f"latent {latent} has a zero decoder row; it has no direction to steer along")
    return row / norm


def steering_vector(sae: nn.Module, steer: Mapping[int, float]) -> torch.Tensor | None:
    """(d,) Σ s_i · unit(W_dec[i]), or None when nothing is steered."""
    if not steer:
        return None
    return sum(s * unit_direction(sae, i) for i, s in steer.items())  # type: ignore[return-value]


@torch.no_grad()
def edit_activations(sae: nn.Module, x_ND: torch.Tensor, edit: Edit) -> torch.Tensor:
    """(N, d) activations → (N, d) edited activations, in the input's dtype. A pure function: the splice in
    :func:`intervene` applies it to the positions it edits, and tests can check it without a model."""
    edit.validate(sae.W_dec.shape[0])
    W_dec = sae.W_dec.detach()
    x = x_ND.to(W_dec.dtype)
    codes = edit.code_edits
    if not edit.keep_error:
        f_NM = sae.encode(x)
        for i, v in codes.items():
            f_NM[:, i] = v
        out = sae.decode(f_NM)
    elif codes:
        ids = list(codes)
        f_NM = sae.encode(x)
        edited_NM = f_NM.clone()
        for i, v in codes.items():
            edited_NM[:, i] = v
        changed_N = (edited_NM[:, ids] != f_NM[:, ids]).any(-1)
        out = x.clone()
        # decode, not (f' − f) W_dec: the multi-layer SAE's decoder also scales per token. Only rows whose
        # code changed are touched, so every other row stays bitwise equal to x.
        delta_ND = sae.decode(edited_NM) - sae.decode(f_NM)
        out[changed_N] = x[changed_N] + delta_ND[changed_N]
    else:
        out = x
    vec = steering_vector(sae, edit.steer)
    if vec is not None:
        out = out + vec.to(out)
    return out.to(x_ND.dtype)


def typical_norm(sae: nn.Module) -> float | None:
    """√d / s from the SAE's recorded normalization (the RMS activation norm of its training tokens), or
    None when the SAE carries no normalization metadata."""
    norm = (getattr(sae, "metadata", None) or {}).get("normalization") or {}
    scale = norm.get("scale")
    if not scale or norm.get("rule", "E||s x||^2 = d") != "E||s x||^2 = d":
        return None
    return math.sqrt(sae.W_dec.shape[1]) / float(scale)


def _sae_outlier_factor(sae: nn.Module) -> float | None:
    """The outlier factor the SAE's training tokens were filtered with (0 or None there: no filtering)."""
    extract = (getattr(sae, "metadata", None) or {}).get("extract") or {}
    factor = extract.get("outlier_factor", DEFAULT_OUTLIER_FACTOR)
    return float(factor) if factor else None


def model_special_ids(model: nn.Module) -> set[int]:
    """BOS/EOS/PAD ids from the model's config and generation config (when no tokenizer is at hand)."""
    ids: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(cfg, attr, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            ids.update(v for v in values if isinstance(v, int))
    return ids


@dataclass
class InterventionLog:
    """Running counts over the forwards run inside an :func:`intervene` block."""

    edited: int = 0
    """Positions whose hook output went through the edit."""
    left_clean: int = 0
    """Positions left with their clean activation (special tokens and outliers)."""
    forwards: int = 0


@contextmanager
def intervene(
    model: nn.Module,
    sae: nn.Module,
    hook: str | None = None,
    *,
    ablate: Iterable[int] = (),
    clamp: Mapping[int, float] | None = None,
    steer: Mapping[int, float] | None = None,
    keep_error: bool = True,
    skip_token_ids: Iterable[int] | None = None,
    outlier_factor: float | None | str = "sae",
) -> Iterator[InterventionLog]:
    """Run forwards inside the block with the edit applied at ``hook`` (default: the SAE's own hook point).

    ``skip_token_ids``: positions holding these tokens are left clean (default: the model config's BOS, EOS
    and PAD ids; pass ``saekit.data.special_token_ids(tokenizer)`` for the tokenizer's full list, or ``()``
    to edit them too). ``outlier_factor``: positions with norm above this × :func:`typical_norm` are left
    clean; "sae" (default) uses the factor the SAE's training tokens were filtered with, None edits every
    position. Yields an :class:`InterventionLog` that counts edited and clean positions.
    """
    hook = hook or (getattr(sae, "metadata", None) or {}).get("hook")
    if not hook:
        raise ValueError("the SAE's metadata names no hook point: pass hook=")
    edit = Edit(tuple(ablate), dict(clamp or {}), dict(steer or {}), keep_error)
    edit.validate(sae.W_dec.shape[0])
    skip = model_special_ids(model) if skip_token_ids is None else set(skip_token_ids)
    factor = _sae_outlier_factor(sae) if outlier_factor == "sae" else outlier_factor
    ref = typical_norm(sae)
    max_norm = factor * ref if factor is not None and ref is not None else None
    skip_T = torch.tensor(sorted(skip), dtype=torch.long)
    log = InterventionLog()
    state: dict[str, Any] = {"ids": None}

    def record_ids(module: nn.Module, args: tuple) -> None:
        state["ids"] = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def fn(x_BTD: torch.Tensor) -> torch.Tensor:
        ids_BT, state["ids"] = state["ids"], None  # used once: a later inputs_embeds forward has no ids
        edit_BT = torch.ones(x_BTD.shape[:-1], dtype=torch.bool, device=x_BTD.device)
        if ids_BT is not None and len(skip):
            if ids_BT.shape != x_BTD.shape[:-1]:
                raise ValueError(
                    f"token ids of shape {tuple(ids_BT.shape)} do not match the activations at {hook!r} "
                    f"of shape {tuple(x_BTD.shape)}; pass skip_token_ids=() to edit every position"
                )
            edit_BT &= ~torch.isin(ids_BT.to(x_BTD.device), skip_T.to(x_BTD.device))
        if max_norm is not None:
            edit_BT &= x_BTD.norm(dim=-1) <= max_norm
        n_edit = int(edit_BT.sum())
        log.forwards += 1
        log.edited += n_edit
        log.left_clean += edit_BT.numel() - n_edit
        if n_edit == 0:
            return x_BTD
        out = x_BTD.clone()
        out[edit_BT] = edit_activations(sae, x_BTD[edit_BT], edit)
        return out

    handle = model.get_input_embeddings().register_forward_pre_hook(record_ids)
    try:
        with splice(model, hook, fn):
            yield log
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Generation.


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool = False, prepend_bos: bool = True) -> list[int]:
    """Token ids for ``prompt``. BOS is prepended (if the tokenizer has one and it is not already there)
    because saekit trains SAEs on contexts that start with BOS; ``chat`` wraps the prompt in the
    tokenizer's chat template as a user turn followed by the assistant's turn."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 40,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    chat: bool = False,
) -> str:
    """The model's continuation of ``prompt`` (new text only). Greedy by default, so a run with and without
    an intervention differs only by the intervention; sampling draws from a generator seeded with ``seed``
    (the global RNG state is restored afterwards), so two calls with the same seed are comparable too.
    Run it inside :func:`intervene` to generate with an edit."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    if not ids:
        raise ValueError("the prompt is empty and the tokenizer has no BOS token to start from")
    input_ids = torch.tensor([ids], device=device)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_k=None,
        top_p=None,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else eos,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
