"""The jobs behind the CLI commands: cache, train and eval, composed from the library's modules.

Each job takes typed configs (whose field docstrings are the CLI's help) and plain arguments, so the same
job runs from the command line and from Python.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from saekit.activations.extract import DEFAULT_OUTLIER_FACTOR

DEFAULT_HOOK = "layers.15.resid_post"
EVERY_LAYER_HOOK = "layers.*.resid_post"
"""What a multi-hook SAE (``SAE.multi_hook``) trains on when no hook point is given: every layer's output."""


@dataclass
class ExtractConfig:
    """Where activations come from: a model, hook points and a text source."""

    model: str = "smollm2"
    """Model: 'smollm2' (the embedded SmolLM2-135M), a local HF model folder, a .gguf file, or a hub id."""
    hook: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    """Hook point(s): layers.{i}.resid_pre|resid_post|mlp_out|attn_out|attn_z (attn_z: the per-head outputs
    before the attention output projection), or a raw module path; * for the layer
    means every layer (layers.*.resid_post). Repeatable. A multi-layer SAE (--arch multilayer) trains on
    all of them (default: layers.*.resid_post); other SAEs on the first."""
    text: str = "stdlib"
    """Text: 'stdlib' (docstrings of Python's standard library), a .txt/.jsonl/.parquet file or folder, or
    hf:NAME[:CONFIG][:SPLIT] for a Hugging Face dataset."""
    split: Literal["train", "heldout", "all"] = "train"
    """Which documents of the text to read: 'heldout' is every 10th document, 'train' the rest."""
    context_len: int = 128
    """Tokens per packed context (BOS included)."""
    model_batch_size: int = 16
    """Contexts per model forward pass."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of cached activations."""
    keep_special: bool = False
    """Keep activations at special tokens (BOS, EOS, ...); by default they are excluded as outliers."""
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR
    """Exclude positions whose activation norm exceeds this multiple of the running median norm
    (attention sinks); 0 keeps every position."""

    def validate(self) -> None:
        if not self.hook:
            raise ValueError("at least one --hook is needed")
        if self.context_len < 2 or self.model_batch_size <= 0:
            raise ValueError("context_len must be >= 2 and model_batch_size positive")
        if self.outlier_factor != 0 and self.outlier_factor <= 1:
            raise ValueError(
                f"outlier_factor must be > 1 (or 0 to keep everything), got {self.outlier_factor}"
            )

    @property
    def outlier_factor_or_none(self) -> float | None:
        return self.outlier_factor or None


def expand_hooks(model, patterns: Sequence[str]) -> list[str]:
    """Hook names with ``*`` standing for the layer number replaced by every layer of ``model``, in layer
    order, repeats removed: ``layers.*.resid_post`` → ``layers.0.resid_post``, ``layers.1.resid_post``, …"""
    from saekit.models import n_layers

    names: list[str] = []
    for p in patterns:
        names += [p.replace("*", str(i)) for i in range(n_layers(model))] if "*" in p else [p]
    return list(dict.fromkeys(names))


def select_cache_hooks(cache_hooks: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The cache's hook points matching ``patterns`` (``*`` as in :func:`expand_hooks`), in cache order."""
    chosen = [h for h in cache_hooks if any(fnmatch.fnmatchcase(h, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"no hook point of the cache matches {list(patterns)}; it holds {list(cache_hooks)}")
    return chosen


def run_cache(
    extract: ExtractConfig, n_tokens: int, out_dir: str | Path, *, overwrite: bool = False, loaded=None
):
    """Extract ``n_tokens`` activations into a resumable on-disk cache and return the opened cache."""
    from saekit.activations import write_cache
    from saekit.models import load_model

    extract.validate()
    loaded = loaded or load_model(extract.model)
    return write_cache(
        out_dir,
        loaded,
        expand_hooks(loaded.model, extract.hook),
        n_tokens=n_tokens,
        source=extract.text,
        split=extract.split,
        context_len=extract.context_len,
        batch_size=extract.model_batch_size,
        dtype=extract.dtype,
        exclude_special=not extract.keep_special,
        outlier_factor=extract.outlier_factor_or_none,
        overwrite=overwrite,
    )


@dataclass
class EvalConfig:
    """Held-out evaluation of an SAE inside its model."""

    eval_tokens: int = 8_192
    """Held-out tokens to evaluate on (0 skips the evaluation)."""
    eval_text: str = ""
    """Text to evaluate on (default: the held-out split of the training text)."""
    eval_batch_size: int = 8
    """Contexts per forward pass during evaluation."""
    splice_special: bool = False
    """Also splice the SAE in at special-token and outlier positions (default: they keep their clean
    value)."""
    ablation: Literal["zero", "mean"] = "zero"
    """What replaces the hook point's output for the 'ablated' reference of CE loss recovered."""
    no_splice: bool = False
    """Skip the splice into the model (reconstruction metrics only; no CE/KL)."""


def run_eval(
    sae,
    hook: str,
    eval_cfg: EvalConfig,
    *,
    model: str,
    text: str,
    context_len: int = 128,
    loaded=None,
    keep_special: bool = False,
    outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR,
    on_batch=None,
):
    """Evaluate a raw-activation SAE at ``hook`` on held-out text; returns an ``EvalResult``.
    ``on_batch`` is passed to :func:`saekit.eval.evaluate.evaluate_sae`."""
    from saekit.data import iter_texts, pack_contexts
    from saekit.eval.evaluate import evaluate_sae
    from saekit.models import load_model

    loaded = loaded or load_model(model)
    source = eval_cfg.eval_text or text
    split = "all" if eval_cfg.eval_text else "heldout"
    contexts = pack_contexts(iter_texts(source, split), loaded.tokenizer, context_len)
    return evaluate_sae(
        sae,
        loaded.model,
        loaded.tokenizer,
        hook,
        contexts,
        n_tokens=eval_cfg.eval_tokens,
        batch_size=eval_cfg.eval_batch_size,
        exclude_special=not keep_special,
        outlier_factor=outlier_factor,
        splice_special=eval_cfg.splice_special,
        ablation=eval_cfg.ablation,
        run_splice=not eval_cfg.no_splice,
        model_name=loaded.name,
        text_source=f"{source} ({split})",
        on_batch=on_batch,
    )


def eval_headline(result) -> dict[str, Any]:
    """The figures of an ``EvalResult`` that a run's summary.json reports."""
    rec, splice = result.reconstruction, result.splice
    out = {k: rec.get(k) for k in ("l0", "fvu", "explained_variance", "dead_fraction")}
    if splice:
        out |= {k: splice.get(k) for k in ("ce_loss_recovered", "delta_ce")} | {"kl": splice.get("kl_sae")}
    return out


MEAN_KEYS = ("fvu", "explained_variance", "l0", "ce_loss_recovered", "delta_ce", "kl")


@dataclass
class LayerwiseEval:
    """One evaluation per hook point of a multi-hook SAE (the MLSAE's layerwise FVU, L0, CE loss recovered
    and KL when splicing at each layer), and their unweighted mean over hook points."""

    results: dict[str, Any]
    """hook point → its ``EvalResult``."""

    def mean(self) -> dict[str, float | None]:
        """Mean over hook points of each headline figure (None where a hook point lacks it)."""
        heads = [eval_headline(r) for r in self.results.values()]
        out: dict[str, float | None] = {}
        for k in MEAN_KEYS:
            values = [h.get(k) for h in heads]
            ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            out[k] = math.fsum(values) / len(values) if ok and values else None  # type: ignore[arg-type]
        return out

    def headline(self) -> dict[str, Any]:
        """summary.json's ``eval``: the means, and each hook point's headline under ``layers``."""
        return {**self.mean(), "layers": {h: eval_headline(r) for h, r in self.results.items()}}

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean(), "layers": {h: r.to_dict() for h, r in self.results.items()}}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    def format_table(self) -> str:
        """One row per hook point and a last row with the means."""
        cols = ("hook", *MEAN_KEYS)
        rows = [[h, *(eval_headline(r).get(k) for k in MEAN_KEYS)] for h, r in self.results.items()]
        rows.append(["mean", *self.mean().values()])
        text = [[c if isinstance(c, str) else "-" if c is None else f"{c:.4g}" for c in row] for row in rows]
        widths = [max(len(r[i]) for r in [list(cols), *text]) for i in range(len(cols))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [cols, *text]]
        return "\n".join(line.rstrip() for line in lines)


def run_layerwise_eval(
    sae, hooks: Sequence[str], eval_cfg: EvalConfig, *, loaded, **options: Any
) -> LayerwiseEval:
    """:func:`run_eval` at each hook point (``options`` as there), splicing the SAE in at one at a time."""
    from saekit.models import hook_width

    results = {}
    for hook in hooks:
        check_hook_width(sae, hook, hook_width(loaded.model, hook))
        print(f"evaluating at {hook} ...", flush=True)
        results[hook] = run_eval(sae, hook, eval_cfg, loaded=loaded, **options)
    return LayerwiseEval(results)


@torch.no_grad()
def evaluate_rows(sae, rows: torch.Tensor | np.ndarray, *, what: str, batch_size: int = 4096):
    """Reconstruction metrics of ``sae`` on in-memory rows (an SAE trained on its own rows: no model, no
    splice), as an ``EvalResult`` so it prints and saves like any evaluation."""
    from saekit.eval.evaluate import EvalResult
    from saekit.eval.metrics import sae_reconstruction

    start = time.perf_counter()
    rows = torch.as_tensor(rows).detach().to(next(sae.parameters()))
    reconstruction = sae_reconstruction(sae, rows, batch_size=batch_size, center=rows.mean(dim=0))
    return EvalResult(
        model="-",
        hook="-",
        text_source=what,
        n_tokens=rows.shape[0],
        splice_mode="none",
        ablation="-",
        reconstruction=reconstruction,
        splice=None,
        sae={"arch": sae.arch, "d_in": sae.d_in, "width": sae.width},
        settings={"batch_size": batch_size},
        elapsed_s=time.perf_counter() - start,
    )


def rows_per_hook(batch_size: int, n_hooks: int) -> int:
    """Tokens per batch when each brings one row per hook point (the batch holds this × n_hooks rows)."""
    if batch_size < n_hooks:
        raise ValueError(f"batch_size {batch_size} is smaller than the {n_hooks} hook points it must mix")
    return batch_size // n_hooks


def cache_batch_source(cache, hooks: str | Sequence[str], batch_size: int, seed: int):
    """A trainer batch source over a cache: shuffled across shards, epochs repeated as needed.

    With several hook points a batch is one block per hook, in order, of the same tokens (the layout
    ``SAE.multi_hook`` architectures read): each hook's stream is shuffled with the same seed, which orders
    the rows of every hook alike because they share the cache layout (checked on every batch). The
    streams' shuffle buffers share the usual 64k rows between them."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if len(hooks) == 1:
        return lambda skip: cache.batches(hooks[0], batch_size, seed=seed, skip_batches=skip, epochs=None)
    n = rows_per_hook(batch_size, len(hooks))
    opts = {"seed": seed, "epochs": None, "return_rows": True, "buffer_rows": max(n, 65_536 // len(hooks))}

    def source(skip_batches: int) -> Iterator[torch.Tensor]:
        streams = [cache.batches(h, n, skip_batches=skip_batches, **opts) for h in hooks]
        for parts in zip(*streams, strict=False):
            rows = parts[0][1]
            if any(not torch.equal(r, rows) for _, r in parts[1:]):
                raise RuntimeError(f"the hook points {hooks} of {cache.dir} do not share one row order")
            yield torch.cat([x for x, _ in parts])

    return source


def streaming_batch_source(loaded, extract: ExtractConfig, batch_size: int, seed: int, buffer_rows: int):
    """A trainer batch source straight from the model: extraction → shuffle buffer → batches.

    Every hook point in ``extract.hook`` is read; with several, a batch is one block per hook of the same
    tokens, as :func:`cache_batch_source` gives (the buffer shuffles tokens with all their hooks' rows).
    Resuming after n batches replays the deterministic stream and drops its first n batches (the model is
    run again over that text, so resuming a streamed run costs the extraction time already spent)."""
    from saekit.activations import ShuffleBuffer, iter_source_activations

    hooks = list(extract.hook)
    n = rows_per_hook(batch_size, len(hooks))
    capacity = max(2 * n, buffer_rows // len(hooks))

    def source(skip_batches: int) -> Iterator[torch.Tensor]:
        chunks = (
            torch.cat([b.acts[h] for h in hooks], dim=1)  # (tokens, n_hooks · d)
            for b in iter_source_activations(
                loaded,
                hooks,
                source=extract.text,
                split=extract.split,
                context_len=extract.context_len,
                batch_size=extract.model_batch_size,
                exclude_special=not extract.keep_special,
                outlier_factor=extract.outlier_factor_or_none,
            )
        )
        stream = ShuffleBuffer(capacity, n, seed=seed, drop_last=True)(chunks)
        for i, batch in enumerate(stream):
            if i >= skip_batches:
                yield batch.view(n, len(hooks), -1).transpose(0, 1).reshape(n * len(hooks), -1)

    return source


def rows_batch_source(rows: torch.Tensor, batch_size: int, seed: int):
    """A trainer batch source over rows held in memory (``SAE.own_training_rows``): a stream of epochs,
    each a seeded permutation of all rows, cut into full batches. Resuming computes where it was."""
    n_rows = rows.shape[0]
    if n_rows == 0:
        raise ValueError("no training rows")

    def permutation(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n_rows)

    def source(skip_batches: int) -> Iterator[torch.Tensor]:
        epoch, pos = divmod(skip_batches * batch_size, n_rows)
        perm = permutation(epoch)
        while True:
            parts, need = [], batch_size
            while need:
                take = min(need, n_rows - pos)
                parts.append(perm[pos : pos + take])
                pos, need = pos + take, need - take
                if pos == n_rows:
                    epoch, pos = epoch + 1, 0
                    perm = permutation(epoch)
            yield rows[torch.from_numpy(np.concatenate(parts))]

    return source


def check_hook_width(sae, hook: str, width: int) -> None:
    """An SAE evaluated at a hook point of another width is an error naming both."""
    if sae.d_in != width:
        raise ValueError(
            f"the SAE reads d_in={sae.d_in} activations but hook point {hook!r} has width {width}"
        )


@dataclass
class SAEInModel:
    """A saved SAE with the model and hook point it reads, resolved from its metadata unless overridden."""

    sae: torch.nn.Module
    hook: str
    model_name: str
    loaded: object
    extract: dict = field(default_factory=dict)
    """The extraction settings the SAE was trained with (text, context length, excluded positions)."""


def load_sae_in_model(
    sae: torch.nn.Module, *, model: str | None = None, hook: str | None = None, loaded=None
) -> SAEInModel:
    """Load the model ``sae`` was trained on (or ``model``/``loaded``) and check the hook point's width, so
    every command that runs an SAE inside its model resolves both the same way."""
    from saekit.models import hook_width, load_model

    meta = getattr(sae, "metadata", {}) or {}
    hook = hook or meta.get("hook")
    if not hook and meta.get("hooks"):
        raise ValueError(f"the SAE reads several hook points: pass --hook, one of {meta['hooks']}")
    if not hook:
        raise ValueError("the SAE's metadata names no hook point: pass --hook")
    model_meta = meta.get("model", {}) or {}
    model_name = model or model_meta.get("source") or model_meta.get("name") or "smollm2"
    loaded = loaded or load_model(model_name)
    check_hook_width(sae, hook, hook_width(loaded.model, hook))
    return SAEInModel(sae, hook, model_name, loaded, dict(meta.get("extract", {}) or {}))
