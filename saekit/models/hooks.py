"""Model-independent hook-point names, and the context managers that read or replace activations there.

An SAE is trained on, evaluated at and spliced into one *hook point*. Naming hook points independently of the
model family (``layers.{i}.resid_post`` rather than ``model.layers.3`` or ``transformer.h.3``) lets configs,
caches and saved SAEs say where they belong without knowing the model's module layout:

* ``layers.{i}.resid_pre``  -- the residual stream entering block ``i`` (the block's input hidden states);
* ``layers.{i}.resid_post`` -- the residual stream leaving block ``i`` (the block's output hidden states);
* ``layers.{i}.attn_out``   -- the attention sub-layer's output, before it is added to the residual stream;
* ``layers.{i}.mlp_out``    -- the MLP sub-layer's output, before it is added to the residual stream;
* ``layers.{i}.attn_z``     -- the concatenated per-head outputs: the *input* of the attention output
  projection (Llama ``self_attn.o_proj``, GPT-2 ``attn.c_proj``, GPT-NeoX ``attention.dense``),
  ``n_heads · d_head`` columns, head h in columns ``h·d_head … (h+1)·d_head − 1``. ``attn_out`` is this times
  the projection (plus its bias), so an SAE here sees which head wrote what (Kissane et al. 2024);
  :func:`attn_heads` gives the head geometry. With grouped-query attention (SmolLM2: 9 query heads, 3
  key/value heads) there are still ``n_heads`` query-head outputs: the width is ``num_attention_heads ·
  head_dim``.

So ``layers.{i}.resid_pre`` equals transformers' ``hidden_states[i]`` and ``layers.{i}.resid_post`` equals
``hidden_states[i + 1]``, except for the last block: transformers applies the final norm to its last entry.

A raw module path (``model.layers.3.mlp``) is accepted too and means that module's output; it works for any
model, including families missing from :data:`FAMILIES`.

Supporting a new family is one entry in :data:`FAMILIES`: where its blocks live, the attribute names of
the attention and MLP modules inside a block, and of the output projection inside the attention module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out", "attn_z")
_D_MODEL_KINDS = KINDS[:4]
"""The kinds whose width is d_model (``attn_z`` is n_heads · d_head wide)."""
_NAMED_RE = re.compile(r"^layers\.(-?\d+)\.(\w+)$")


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its transformer blocks, and what a block calls its sub-layers."""

    blocks: str
    """Dotted path from the top model (``*ForCausalLM``) to the ``nn.ModuleList`` of blocks."""
    attn: str
    """Attribute of a block holding the attention module (its output must not include the residual)."""
    mlp: str
    """Attribute of a block holding the MLP module (its output must not include the residual)."""
    attn_proj: str = ""
    """Attribute of the attention module holding the output projection, whose input is ``attn_z``."""


FAMILIES: dict[str, Family] = {
    # Llama layout, shared by SmolLM2, Mistral, Qwen2/3, Gemma, Phi-3 and most recent decoders.
    "llama": Family(blocks="model.layers", attn="self_attn", mlp="mlp", attn_proj="o_proj"),
    # GPT-2 layout (GPT-J names its output projection out_proj: not covered by attn_z).
    "gpt2": Family(blocks="transformer.h", attn="attn", mlp="mlp", attn_proj="c_proj"),
    "gpt_neox": Family(blocks="gpt_neox.layers", attn="attention", mlp="mlp", attn_proj="dense"),
}


class _StopForward(Exception):
    """Raised from a hook to abandon a forward pass once every requested activation has been captured."""


@dataclass(frozen=True)
class _Point:
    """A resolved hook point: which module, whether we read its input (resid_pre, attn_z) or output, which
    block."""

    name: str
    module: nn.Module
    is_input: bool
    layer: int
    kind: str | None
    """One of KINDS, or None for a raw module path."""


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, Family] | None:
    """The first family whose layout matches ``model``: (path to the blocks, the blocks, the family).

    The blocks path is also tried without its first component, so a bare base model (``LlamaModel``,
    ``GPT2Model``) works as well as the ``*ForCausalLM`` wrapper.
    """
    for family in FAMILIES.values():
        candidates = [family.blocks]
        if "." in family.blocks:
            candidates.append(family.blocks.split(".", 1)[1])
        for path in candidates:
            blocks = _get_path(model, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                first = blocks[0]
                if _get_path(first, family.attn) is not None and _get_path(first, family.mlp) is not None:
                    return path, blocks, family
    return None


def n_layers(model: nn.Module) -> int:
    """Number of transformer blocks (from the module layout when the family is known, else the config)."""
    found = _find_blocks(model)
    if found is not None:
        return len(found[1])
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"cannot tell how many layers a {type(model).__name__} has")
    return int(n)


def _summary(model: nn.Module) -> str:
    """A compact description of the valid hook names, for error messages."""
    found = _find_blocks(model)
    if found is None:
        return (
            f"named hook points need a supported model family ({', '.join(FAMILIES)}); a "
            f"{type(model).__name__} is not one of them, so use a raw module path such as "
            f"{_example_module_path(model)!r}"
        )
    path, blocks, family = found
    layers = f"layers.{{0..{len(blocks) - 1}}}"
    return (
        f"{layers}.{{{','.join(_D_MODEL_KINDS)}}} (d_model wide), {layers}.attn_z (the per-head outputs "
        f"entering the attention output projection), or a module path such as '{path}.0.{family.mlp}'"
    )


def _example_module_path(model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n]
    return names[len(names) // 2] if names else "<none>"


def _resolve(model: nn.Module, name: str) -> _Point:
    """Map a hook name onto the module to hook; ValueError (listing the valid names) if it does not exist."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"hook point must be a non-empty string, got {name!r}; valid: {_summary(model)}")
    found = _find_blocks(model)
    match = _NAMED_RE.match(name)
    if match and (match.group(2) in KINDS or _get_path(model, name) is None):
        layer, kind = int(match.group(1)), match.group(2)
        if found is None:
            raise ValueError(f"cannot resolve hook point {name!r}: {_summary(model)}")
        _, blocks, family = found
        if kind not in KINDS:
            raise ValueError(f"unknown hook kind {kind!r} in {name!r}; valid: {_summary(model)}")
        if not 0 <= layer < len(blocks):
            raise ValueError(
                f"layer {layer} out of range in {name!r}: the model has {len(blocks)} layers; "
                f"valid: {_summary(model)}"
            )
        block = blocks[layer]
        if kind == "resid_pre":
            return _Point(name, block, True, layer, kind)
        if kind == "resid_post":
            return _Point(name, block, False, layer, kind)
        if kind == "attn_z":
            return _Point(name, _attn_projection(block, family, name), True, layer, kind)
        sub = family.attn if kind == "attn_out" else family.mlp
        return _Point(name, block.get_submodule(sub), False, layer, kind)

    module = _get_path(model, name)
    if module is None or module is model:
        raise ValueError(f"unknown hook point {name!r}; valid: {_summary(model)}")
    return _Point(name, module, False, _raw_layer(model, name, found), None)


def _attn_projection(block: nn.Module, family: Family, name: str) -> nn.Module:
    """The attention output projection of ``block``, whose input is the ``attn_z`` hook point."""
    proj = _get_path(block, f"{family.attn}.{family.attn_proj}") if family.attn_proj else None
    if proj is None:
        raise ValueError(
            f"cannot resolve {name!r}: this model's attention module has no output projection "
            f"{family.attn_proj or '(none configured for its family)'!r}; use a raw module path instead"
        )
    return proj


def _in_width(module: nn.Module) -> int | None:
    """Input width of a linear layer: ``nn.Linear`` (in_features) or GPT-2's ``Conv1D`` (weight (in, out))."""
    if isinstance(getattr(module, "in_features", None), int):
        return int(module.in_features)
    weight = getattr(module, "weight", None)
    if isinstance(getattr(module, "nf", None), int) and isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    return None


def attn_heads(model: nn.Module, layer: int = 0) -> tuple[int, int]:
    """``(n_heads, d_head)`` of the attention at ``layer``: the geometry of ``layers.{layer}.attn_z``.

    Read from the model config (``num_attention_heads``; ``head_dim`` where the config has one, else
    ``hidden_size / n_heads``), and checked against the output projection's input width, because per-head
    attribution is wrong if the columns are not n_heads blocks of d_head. Key/value heads (GQA) do not
    count: every query head writes its own d_head slice of ``attn_z``.
    """
    config = getattr(model, "config", None)
    n_heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"cannot tell how many attention heads a {type(model).__name__} has (no config)")
    d_head = getattr(config, "head_dim", None)
    if not isinstance(d_head, int) or d_head <= 0:
        if not isinstance(hidden, int) or hidden % n_heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {n_heads}")
        d_head = hidden // n_heads
    point = _resolve(model, f"layers.{layer}.attn_z")
    width = _in_width(point.module)
    if width is not None and width != n_heads * d_head:
        raise ValueError(
            f"the attention output projection of layer {layer} takes {width} columns, but the config says "
            f"{n_heads} heads × {d_head} = {n_heads * d_head}"
        )
    return n_heads, d_head


def attn_projection(model: nn.Module, layer: int) -> nn.Module:
    """The attention output projection of block ``layer``: the module whose input is ``layers.{layer}.attn_z``
    (Llama ``o_proj``, GPT-2 ``c_proj``, GPT-NeoX ``dense``)."""
    return _resolve(model, f"layers.{layer}.attn_z").module


def _raw_layer(model: nn.Module, path: str, found: tuple[str, nn.ModuleList, Family] | None) -> int:
    """Block index of a raw module path; outside the blocks: n_layers (run the whole stack), -1 if unknown."""
    if found is not None:
        prefix = found[0] + "."
        if path.startswith(prefix):
            index = path[len(prefix) :].split(".", 1)[0]
            if index.isdigit():
                return int(index)
    try:
        return n_layers(model)
    except ValueError:
        return -1


def _resolve_all(model: nn.Module, names: Sequence[str]) -> list[_Point]:
    if isinstance(names, str):
        raise TypeError(f"hooks must be a list of names, got the string {names!r}; wrap it in a list")
    unique = list(dict.fromkeys(names))
    if not unique:
        raise ValueError(f"no hook points requested; valid: {_summary(model)}")
    return [_resolve(model, n) for n in unique]


def hook_points(model: nn.Module) -> list[str]:
    """Every named hook point of ``model``, block by block (raw module paths are accepted but not listed;
    ``attn_z`` only where the family names its attention output projection)."""
    found = _find_blocks(model)
    if found is None:
        raise ValueError(_summary(model))
    path, blocks, family = found
    has_z = bool(family.attn_proj) and _get_path(blocks[0], f"{family.attn}.{family.attn_proj}") is not None
    kinds = KINDS if has_z else _D_MODEL_KINDS
    return [f"layers.{i}.{kind}" for i in range(len(blocks)) for kind in kinds]


def validate_hooks(model: nn.Module, names: Sequence[str]) -> None:
    """Fail early (before any data is read) if a hook name does not exist on ``model``."""
    _resolve_all(model, names)


def hook_layer(model: nn.Module, name: str) -> int:
    """Index of the block a hook point belongs to: the forward can stop once this block has run.

    Raw module paths outside the blocks (embeddings, final norm) return ``n_layers``: the whole stack must
    run; -1 means the model's depth is unknown (a family missing from FAMILIES without a config).
    """
    return _resolve(model, name).layer


def hook_width(model: nn.Module, name: str) -> int:
    """Last dimension of the activations at a hook point (d_model for named hooks, n_heads · d_head for
    ``attn_z``)."""
    point = _resolve(model, name)
    if point.kind == "attn_z":
        n_heads, d_head = attn_heads(model, point.layer)
        return n_heads * d_head
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if point.kind is not None and hidden is not None:
        return int(hidden)
    # A raw module can have any width: measure it on a one-token input (the forward stops right there).
    device = next(model.parameters()).device
    acts = forward_to_hooks(model, torch.zeros(1, 1, dtype=torch.long, device=device), [name])
    return int(acts[name].shape[-1])


# ----------------------------------------------------------------------------------------------------------
# Reading and replacing activations.


def _primary(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module's output: a tensor, the first item of a tuple, or a ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if (
        isinstance(output, (tuple, list, ModelOutput))
        and len(output) > 0
        and isinstance(output[0], torch.Tensor)
    ):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def _with_primary(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``new``, keeping the container type."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, ModelOutput):
        output[next(iter(output.keys()))] = new
        return output
    if isinstance(output, list):
        return [new, *output[1:]]
    return (new, *output[1:])


_INPUT_KWARGS = ("hidden_states", "input", "x")
"""Keyword names under which a block (``hidden_states``) or a projection (``input``, ``x``) takes input."""


def _input_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor passed to a block or projection: positionally, or as ``hidden_states=`` / ``input=``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in _INPUT_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise TypeError("cannot find the hidden states among a module's inputs")


def _register(point: _Point, fn: Callable[[torch.Tensor], torch.Tensor | None], prepend: bool):
    """Hook ``point`` so ``fn`` sees its tensor; if ``fn`` returns a tensor, it replaces the original."""
    if point.is_input:

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            new = fn(_input_hidden(args, kwargs))
            if new is None:
                return None
            if args and isinstance(args[0], torch.Tensor):
                return (new, *args[1:]), kwargs
            key = next(k for k in _INPUT_KWARGS if isinstance(kwargs.get(k), torch.Tensor))
            return args, {**kwargs, key: new}

        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)

    def hook(module: nn.Module, args: tuple, output: Any):
        new = fn(_primary(output))
        return None if new is None else _with_primary(output, new)

    return point.module.register_forward_hook(hook, prepend=prepend)


@contextmanager
def _capturing(
    model: nn.Module, names: Sequence[str], stop_when_done: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    points = _resolve_all(model, names)
    store: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            store[name] = x.detach()
            if stop_when_done and len(store) == len(points):
                raise _StopForward

        return fn

    handles = [_register(p, make(p.name), prepend=False) for p in points]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model: nn.Module, hooks: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record activations at ``hooks`` during forwards run inside the block.

    Yields a dict that each forward fills with ``hook -> (B, T, d)`` detached tensors (a later forward
    overwrites an earlier one). Captures see values *after* any active :func:`splice`, whatever the nesting
    order, i.e. what the rest of the model actually receives.
    """
    with _capturing(model, hooks) as store:
        yield store


@contextmanager
def splice(model: nn.Module, hook: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the activation at ``hook`` by ``fn(activation)`` ((B, T, d) -> (B, T, d)) inside the block.

    Used to run the model with an SAE's reconstruction (or an ablated / steered version) in place of the
    real activation. The result is cast back to the activation's dtype; a shape change is an error. Splice
    hooks run before capture hooks; with several splices on one point the innermost is applied first.
    """
    point = _resolve(model, hook)

    def replace(x: torch.Tensor) -> torch.Tensor:
        new = fn(x)
        if not isinstance(new, torch.Tensor) or new.shape != x.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"splice function at {hook!r} must return a tensor of shape {tuple(x.shape)}, got {got}"
            )
        return new.to(dtype=x.dtype, device=x.device)

    handle = _register(point, replace, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def forward_to_hooks(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    hooks: Sequence[str],
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run one forward and return ``hook -> (B, T, d)`` activations, stopping after the last one is captured.

    Layers after the deepest hook point, the final norm and the unembedding are never run, which is most of
    the cost when extracting early layers. Runs under ``torch.no_grad`` (not ``inference_mode``: inference
    tensors cannot later be saved for backward, and the trainer trains on these activations).
    """
    if input_ids_BT.ndim != 2:
        raise ValueError(f"input_ids_BT must be (batch, tokens), got shape {tuple(input_ids_BT.shape)}")
    names = list(dict.fromkeys(hooks)) if not isinstance(hooks, str) else hooks
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    with _capturing(model, names, stop_when_done=True) as store, torch.no_grad():
        try:
            model(input_ids=input_ids_BT.to(device), **kwargs)
        except _StopForward:
            pass
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"the forward pass never reached hook point(s) {missing}")
    return {n: store[n] for n in names}
