"""The jobs behind the CLI commands: cache, train and eval, composed from the library's modules.

Each job takes typed configs (whose field docstrings are the CLI's help) and plain arguments, so the same
job runs from the command line and from Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from saekit.activations.extract import DEFAULT_OUTLIER_FACTOR

DEFAULT_HOOK = "layers.15.resid_post"


@dataclass
class ExtractConfig:
    """Where activations come from: a model, hook points and a text source."""

    model: str = "smollm2"
    """Model: 'smollm2' (the embedded SmolLM2-135M), a local HF model folder, a .gguf file, or a hub id."""
    hook: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    """Hook point(s): layers.{i}.resid_pre|resid_post|mlp_out|attn_out, or a raw module path. Repeatable."""
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
        extract.hook,
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
):
    """Evaluate a raw-activation SAE at ``hook`` on held-out text; returns an ``EvalResult``."""
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
    )


def cache_batch_source(cache, hook: str, batch_size: int, seed: int):
    """A trainer batch source over a cache: shuffled across shards, epochs repeated as needed."""

    def source(skip_batches: int) -> Iterator[torch.Tensor]:
        return cache.batches(hook, batch_size, seed=seed, skip_batches=skip_batches, epochs=None)

    return source


def streaming_batch_source(loaded, extract: ExtractConfig, batch_size: int, seed: int, buffer_rows: int):
    """A trainer batch source straight from the model: extraction → shuffle buffer → batches.

    Resuming after n batches replays the deterministic stream and drops its first n batches (the model is
    run again over that text, so resuming a streamed run costs the extraction time already spent)."""
    from saekit.activations import ShuffleBuffer, iter_source_activations

    hook = extract.hook[0]

    def source(skip_batches: int) -> Iterator[torch.Tensor]:
        chunks = (
            b.acts[hook]
            for b in iter_source_activations(
                loaded,
                [hook],
                source=extract.text,
                split=extract.split,
                context_len=extract.context_len,
                batch_size=extract.model_batch_size,
                exclude_special=not extract.keep_special,
                outlier_factor=extract.outlier_factor_or_none,
            )
        )
        stream = ShuffleBuffer(buffer_rows, batch_size, seed=seed, drop_last=True)(chunks)
        for i, batch in enumerate(stream):
            if i >= skip_batches:
                yield batch

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
    if not hook:
        raise ValueError("the SAE's metadata names no hook point: pass --hook")
    model_meta = meta.get("model", {}) or {}
    model_name = model or model_meta.get("source") or model_meta.get("name") or "smollm2"
    loaded = loaded or load_model(model_name)
    check_hook_width(sae, hook, hook_width(loaded.model, hook))
    return SAEInModel(sae, hook, model_name, loaded, dict(meta.get("extract", {}) or {}))
