"""`saekit train`: activations (cache or stream) → trainer → saved SAE → held-out evaluation → report.

With no options this is the main job: TopK (k=32, 8× width) on SmolLM2 ``layers.15.resid_post`` over the
built-in corpus, sized to finish in about ten minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.config import dataclass_from_args, save_config_file
from saekit.jobs import (
    EvalConfig,
    ExtractConfig,
    cache_batch_source,
    check_hook_width,
    run_eval,
    streaming_batch_source,
)

DEFAULT_RUN_DIR = "runs/topk-smollm2-layers.15"
DEFAULT_TOKENS = 200_000
DEFAULT_EXPANSION = 8.0
# The main job's training settings: small batches and a short warm-up suit a run of ~300k tokens.
DEFAULT_TRAIN = {"batch_size": 1024, "lr": 1e-3, "warmup_steps": 30, "log_every": 10, "checkpoint_every": 50}


@dataclass
class TrainJob:
    arch: str = "topk"
    sae: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tokens: int = DEFAULT_TOKENS
    expansion: float = DEFAULT_EXPANSION
    out: str = DEFAULT_RUN_DIR
    cache: str | None = None
    stream: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, file_cfg: dict[str, Any]) -> TrainJob:
        """Merge defaults < config file < command-line options. Unknown keys are errors naming them."""
        from saekit.sae import get_architecture
        from saekit.train import TrainConfig

        known = {"arch", "sae", "train", "extract", "eval", "tokens", "expansion", "out", "cache", "stream"}
        unknown = sorted(set(file_cfg) - known)
        if unknown:
            raise ValueError(f"unknown sections in the config file: {unknown}; known: {sorted(known)}")
        arch = args.arch or file_cfg.get("arch", "topk")
        arch_cls = get_architecture(arch)
        sae_opts = dict(file_cfg.get("sae", {}))
        for f in dataclasses.fields(arch_cls.config_class):
            if f.name != "d_in" and getattr(args, f.name, None) is not None:
                sae_opts[f.name] = getattr(args, f.name)
        train_opts = {**DEFAULT_TRAIN, **file_cfg.get("train", {})}
        for f in dataclasses.fields(TrainConfig):
            if getattr(args, f.name, None) is not None:
                train_opts[f.name] = getattr(args, f.name)
        return cls(
            arch=arch,
            sae=sae_opts,
            train=train_opts,
            extract=dataclass_from_args(ExtractConfig, args, base=file_cfg.get("extract")),
            eval=dataclass_from_args(EvalConfig, args, base=file_cfg.get("eval")),
            tokens=args.tokens or file_cfg.get("tokens", DEFAULT_TOKENS),
            expansion=args.expansion or file_cfg.get("expansion", DEFAULT_EXPANSION),
            out=args.out or file_cfg.get("out", DEFAULT_RUN_DIR),
            cache=args.cache or file_cfg.get("cache"),
            stream=args.stream or file_cfg.get("stream", False),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_sae(job: TrainJob, d_in: int, seed: int):
    """The SAE the job asks for, initialised from ``seed``; impossible settings are rejected here."""
    import torch

    from saekit.sae import get_architecture

    arch_cls = get_architecture(job.arch)
    opts = dict(job.sae)
    opts.setdefault("width", int(round(job.expansion * d_in)))
    cfg = arch_cls.config_class.from_dict({"d_in": d_in, **opts})
    torch.manual_seed(seed)
    return arch_cls(cfg)


def run_train_job(job: TrainJob) -> dict[str, Any]:
    """Run the whole job and return a summary with the headline metrics (also written to the run folder)."""
    from saekit.activations import open_cache
    from saekit.jobs import run_cache
    from saekit.models import hook_width, load_model
    from saekit.sae import load_sae
    from saekit.train import TrainConfig, Trainer

    t_start = time.perf_counter()
    out = Path(job.out)
    train_cfg = TrainConfig.from_dict({**job.train, "total_tokens": job.tokens})
    extract = job.extract
    extract.validate()
    if job.cache and job.stream:
        raise ValueError("--cache and --stream exclude each other")
    _print_plan(job, train_cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config_file(out / "run_config.json", job.to_dict())

    loaded = None
    if job.cache:
        cache = open_cache(job.cache)
        hook = _cache_hook(cache, extract.hook)
        settings = cache.manifest["settings"]
        model_ref = settings["model"].get("source") or settings["model"]["name"]
        text = settings["source"]
        sae = build_sae(job, cache.widths[hook], train_cfg.seed)
        source = cache_batch_source(cache, hook, train_cfg.batch_size, train_cfg.seed)
    else:
        loaded = load_model(extract.model)
        hook, model_ref, text = extract.hook[0], extract.model, extract.text
        sae = build_sae(job, hook_width(loaded.model, hook), train_cfg.seed)  # bad settings fail here, early
        if job.stream:
            source = streaming_batch_source(loaded, extract, train_cfg.batch_size, train_cfg.seed, 64 * 1024)
        else:
            # Extract once into the run folder: a killed run resumes the extraction, then the training.
            cache_dir = out / "activations"
            print(f"caching {job.tokens:,} activations of {hook} into {cache_dir}", flush=True)
            cache = run_cache(dataclasses.replace(extract, hook=[hook]), job.tokens, cache_dir, loaded=loaded)
            source = cache_batch_source(cache, hook, train_cfg.batch_size, train_cfg.seed)

    metadata = {
        "hook": hook,
        "model": {"name": model_ref, "source": model_ref},
        "extract": dataclasses.asdict(extract) | {"text": text, "hook": [hook]},
    }
    trainer = Trainer(sae, train_cfg, out, sae_metadata=metadata)
    train_summary = trainer.fit(source)

    summary: dict[str, Any] = {"arch": job.arch, "hook": hook, "train": _headline(train_summary)}
    if job.eval.eval_tokens > 0:
        trained = load_sae(out / "sae")
        loaded = loaded or load_model(model_ref)
        check_hook_width(trained, hook, hook_width(loaded.model, hook))
        print(f"evaluating on {job.eval.eval_tokens:,} held-out tokens ...", flush=True)
        result = run_eval(
            trained,
            hook,
            job.eval,
            model=model_ref,
            text=text,
            context_len=extract.context_len,
            loaded=loaded,
            keep_special=extract.keep_special,
            outlier_factor=extract.outlier_factor_or_none,
        )
        result.to_json(out / "eval.json")
        print(result.format_table())
        summary["eval"] = {
            k: result.reconstruction.get(k) for k in ("l0", "fvu", "explained_variance", "dead_fraction")
        }
        if result.splice:
            summary["eval"] |= {k: result.splice.get(k) for k in ("ce_loss_recovered", "delta_ce", "kl")}
    summary["wall_seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _print_headline(summary, out)
    return summary


def _cache_hook(cache, wanted: list[str]) -> str:
    hooks = list(cache.hooks)
    if len(hooks) == 1:
        return hooks[0]
    if wanted and wanted[0] in hooks:
        return wanted[0]
    raise ValueError(f"the cache holds several hook points {hooks}: choose one with --hook")


def _headline(train_summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "tokens", "train_seconds", "tokens_per_s", "dead_fraction", "norm_scale")
    return {k: train_summary.get(k) for k in keys}


def _print_plan(job: TrainJob, train_cfg) -> None:
    src = (
        f"cache {job.cache}"
        if job.cache
        else f"{job.extract.model} {job.extract.hook[0]} on {job.extract.text}"
    )
    print(
        f"saekit train: {job.arch} on {src}; {job.tokens:,} tokens in {train_cfg.total_steps} steps of "
        f"{train_cfg.batch_size}; run folder {job.out}",
        flush=True,
    )


def _print_headline(summary: dict[str, Any], out: Path) -> None:
    ev = summary.get("eval", {})

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    parts = [f"L0 {fmt(ev.get('l0'))}", f"FVU {fmt(ev.get('fvu'))}"]
    if "ce_loss_recovered" in ev:
        parts.append(f"CE loss recovered {fmt(ev.get('ce_loss_recovered'))}")
    print(f"done in {summary['wall_seconds']:.0f} s: " + ", ".join(parts) + f"  →  {out}", flush=True)
