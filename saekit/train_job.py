"""`saekit train`: activations (cache or stream) → trainer → saved SAE → held-out evaluation → report.

With no options this is the main job: TopK (k=32, 8× width) on SmolLM2 ``layers.15.resid_post`` over the
built-in corpus, sized to finish in about ten minutes on two CPU cores.

What the SAE trains on follows what its class declares; the trainer itself knows none of it:

* one hook point (most architectures): that hook's activations, from a cache or from the model;
* several hook points (``SAE.multi_hook``: the multi-layer SAE): every hook named by ``--hook``, where ``*``
  stands for every layer (default ``layers.*.resid_post``), extracted in one forward. A batch holds one
  block of rows per hook point, of the same tokens, and ``--tokens`` still counts training rows, so
  tokens / n_hooks model tokens are cached. The final evaluation splices the SAE in at each hook point;
* its own rows (``SAE.own_training_rows``: the meta-SAE reads another SAE's decoder rows): no model and
  no cache; batches are shuffled epochs of the rows, and the final evaluation is reconstruction on them.

With ``--e2e`` (any architecture reading one hook point) the batches are token contexts instead, and the
trainer minimises the KL of the model's next-token distribution with the SAE spliced in
(:mod:`saekit.train.e2e`).
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
    EVERY_LAYER_HOOK,
    EvalConfig,
    ExtractConfig,
    cache_batch_source,
    check_hook_width,
    eval_headline,
    evaluate_rows,
    expand_hooks,
    rows_batch_source,
    rows_per_hook,
    run_eval,
    run_layerwise_eval,
    select_cache_hooks,
    streaming_batch_source,
)
from saekit.train.config import E2EConfig

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
    e2e: E2EConfig = field(default_factory=E2EConfig)

    @classmethod
    def from_args(cls, args: argparse.Namespace, file_cfg: dict[str, Any]) -> TrainJob:
        """Merge defaults < config file < command-line options. Unknown keys are errors naming them."""
        from saekit.sae import get_architecture
        from saekit.train import TrainConfig

        known = {
            "arch",
            "sae",
            "train",
            "extract",
            "eval",
            "tokens",
            "expansion",
            "out",
            "cache",
            "stream",
            "e2e",
        }
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
        extract = dataclass_from_args(ExtractConfig, args, base=file_cfg.get("extract"))
        hook_given = getattr(args, "hook", None) is not None or "hook" in (file_cfg.get("extract") or {})
        if arch_cls.multi_hook and not hook_given:
            extract.hook = [EVERY_LAYER_HOOK]
        return cls(
            arch=arch,
            sae=sae_opts,
            train=train_opts,
            extract=extract,
            eval=dataclass_from_args(EvalConfig, args, base=file_cfg.get("eval")),
            tokens=args.tokens or file_cfg.get("tokens", DEFAULT_TOKENS),
            expansion=args.expansion or file_cfg.get("expansion", DEFAULT_EXPANSION),
            out=args.out or file_cfg.get("out", DEFAULT_RUN_DIR),
            cache=args.cache or file_cfg.get("cache"),
            stream=args.stream or file_cfg.get("stream", False),
            e2e=dataclass_from_args(E2EConfig, args, base=file_cfg.get("e2e")),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_sae(job: TrainJob, d_in: int, seed: int, n_layers: int | None = None):
    """The SAE the job asks for, initialised from ``seed``; impossible settings are rejected here.
    ``n_layers``: the number of hook points a multi-hook SAE reads (its config's ``n_layers``)."""
    import torch

    from saekit.sae import get_architecture

    arch_cls = get_architecture(job.arch)
    opts = dict(job.sae)
    opts.setdefault("width", int(round(job.expansion * d_in)))
    if n_layers is not None:
        if opts.setdefault("n_layers", n_layers) != n_layers:
            raise ValueError(f"n_layers is the number of hook points, {n_layers}; got {opts['n_layers']}")
    cfg = arch_cls.config_class.from_dict({"d_in": d_in, **opts})
    torch.manual_seed(seed)
    return arch_cls(cfg)


@dataclass
class _Data:
    """What the job trains on, resolved before training: the SAE sized to it, batches and provenance."""

    sae: Any
    source: Any
    """The trainer's batch source: skip_batches → iterator of (batch, d) tensors."""
    metadata: dict[str, Any]
    hooks: list[str] = field(default_factory=list)
    """The hook points read, in block order (empty when the SAE trains on its own rows)."""
    model_ref: str = ""
    text: str = ""
    loaded: Any = None
    rows: Any = None
    """The SAE's own training rows, when it has them."""
    objective: Any = None
    """The trainer's objective when it is not the SAE's own loss on activations (e2e training)."""


def run_train_job(job: TrainJob) -> dict[str, Any]:
    """Run the whole job and return a summary with the headline metrics (also written to the run folder)."""
    from saekit.sae import get_architecture, load_sae
    from saekit.train import TrainConfig, Trainer

    t_start = time.perf_counter()
    out = Path(job.out)
    train_cfg = TrainConfig.from_dict({**job.train, "total_tokens": job.tokens})
    job.extract.validate()
    if job.cache and job.stream:
        raise ValueError("--cache and --stream exclude each other")
    arch_cls = get_architecture(job.arch)
    own_rows = arch_cls.own_training_rows(job.sae)
    _print_plan(job, train_cfg, arch_cls.multi_hook, own_rows)
    out.mkdir(parents=True, exist_ok=True)
    save_config_file(out / "run_config.json", job.to_dict())

    if job.e2e.e2e:
        data = _e2e_data(job, arch_cls, own_rows, train_cfg.batch_size, train_cfg.seed)
    elif own_rows is not None:
        data = _own_rows_data(job, own_rows, train_cfg.batch_size, train_cfg.seed)
    elif job.cache:
        data = _cache_data(job, arch_cls.multi_hook, train_cfg.batch_size, train_cfg.seed)
    else:
        data = _model_data(job, arch_cls.multi_hook, train_cfg.batch_size, train_cfg.seed, out)
    trainer = Trainer(data.sae, train_cfg, out, sae_metadata=data.metadata, objective=data.objective)
    train_summary = trainer.fit(data.source)

    hook = data.hooks[0] if len(data.hooks) == 1 else None
    summary: dict[str, Any] = {"arch": job.arch, "hook": hook, "train": _headline(train_summary)}
    if arch_cls.multi_hook:
        summary["hooks"] = data.hooks
    if job.eval.eval_tokens > 0:
        summary["eval"] = _final_eval(job, data, load_sae(out / "sae"), out)
    summary["wall_seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _print_headline(summary, out)
    return summary


# -- the three data paths --------------------------------------------------------------------------------
def _own_rows_data(job: TrainJob, rows, batch_size: int, seed: int) -> _Data:
    import torch

    rows = torch.as_tensor(rows).detach().to("cpu", torch.float32).contiguous()
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(
            f"{job.arch}'s own training rows have shape {tuple(rows.shape)}; expected (N > 0, d)"
        )
    # A dictionary of its own rows (a meta-SAE's decoder rows) gets at most a quarter as many latents as
    # rows (SAEBench's meta-SAE setting) unless --width says otherwise: expansion × d_in could exceed them.
    width = min(int(round(job.expansion * rows.shape[1])), max(1, rows.shape[0] // 4))
    job = dataclasses.replace(job, sae={"width": width, **job.sae})
    sae = build_sae(job, rows.shape[1], seed)
    provenance = {"from": f"{job.arch}.own_training_rows", "n_rows": rows.shape[0], "d": rows.shape[1]}
    return _Data(sae, rows_batch_source(rows, batch_size, seed), {"training_rows": provenance}, rows=rows)


def _cache_data(job: TrainJob, multi_hook: bool, batch_size: int, seed: int) -> _Data:
    from saekit.activations import open_cache

    cache = open_cache(job.cache)
    settings = cache.manifest["settings"]
    model_ref = settings["model"].get("source") or settings["model"]["name"]
    hooks = select_cache_hooks(cache.hooks, job.extract.hook) if multi_hook else [_cache_hook(cache, job)]
    d_in = _common_width({h: cache.widths[h] for h in hooks})
    sae = build_sae(job, d_in, seed, len(hooks) if multi_hook else None)
    source = cache_batch_source(cache, hooks, batch_size, seed)
    metadata = _hook_metadata(job, hooks, multi_hook, model_ref, settings["source"])
    return _Data(sae, source, metadata, hooks, model_ref, settings["source"])


def _model_data(job: TrainJob, multi_hook: bool, batch_size: int, seed: int, out: Path) -> _Data:
    from saekit.jobs import run_cache
    from saekit.models import hook_width, load_model

    loaded = load_model(job.extract.model)
    hooks = expand_hooks(loaded.model, job.extract.hook) if multi_hook else job.extract.hook[:1]
    if not multi_hook and "*" in hooks[0]:
        raise ValueError(f"{job.arch} reads one hook point; {hooks[0]!r} names every layer")
    d_in = _common_width({h: hook_width(loaded.model, h) for h in hooks})
    sae = build_sae(job, d_in, seed, len(hooks) if multi_hook else None)  # bad settings fail here, early
    rows_per_hook(batch_size, len(hooks))  # and so does a batch too small to mix the hook points
    extract = dataclasses.replace(job.extract, hook=hooks)
    if job.stream:
        source = streaming_batch_source(loaded, extract, batch_size, seed, 64 * 1024)
    else:
        # Extract once into the run folder: a killed run resumes the extraction, then the training.
        cache_dir, n_tokens = out / "activations", -(-job.tokens // len(hooks))
        print(f"caching {n_tokens:,} tokens' activations of {_hook_list(hooks)} into {cache_dir}", flush=True)
        source = cache_batch_source(
            run_cache(extract, n_tokens, cache_dir, loaded=loaded), hooks, batch_size, seed
        )
    metadata = _hook_metadata(job, hooks, multi_hook, job.extract.model, job.extract.text)
    return _Data(sae, source, metadata, hooks, job.extract.model, job.extract.text, loaded)


def _e2e_data(job: TrainJob, arch_cls, own_rows, batch_size: int, seed: int) -> _Data:
    from saekit.models import hook_width, load_model
    from saekit.train.e2e import e2e_training

    if job.cache or job.stream or own_rows is not None or arch_cls.multi_hook:
        raise ValueError(
            "--e2e runs the model on token contexts at one hook point: it excludes --cache, --stream and "
            f"architectures that read several hook points or their own rows ({job.arch})"
        )
    loaded = load_model(job.extract.model)
    hook = job.extract.hook[0]
    sae = build_sae(job, hook_width(loaded.model, hook), seed)
    ex = job.extract
    objective, source = e2e_training(
        loaded, hook, job.e2e, text=ex.text, split=ex.split, context_len=ex.context_len,
        batch_size=batch_size, seed=seed, keep_special=ex.keep_special,
        outlier_factor=ex.outlier_factor_or_none,
    )  # fmt: skip
    metadata = _hook_metadata(job, [hook], False, ex.model, ex.text) | {"e2e": dataclasses.asdict(job.e2e)}
    return _Data(sae, source, metadata, [hook], ex.model, ex.text, loaded, objective=objective)


def _hook_metadata(job: TrainJob, hooks: list[str], multi_hook: bool, model_ref: str, text: str):
    where = {"hooks": hooks} if multi_hook else {"hook": hooks[0]}
    return where | {
        "model": {"name": model_ref, "source": model_ref},
        "extract": dataclasses.asdict(job.extract) | {"text": text, "hook": hooks},
    }


def _common_width(widths: dict[str, int]) -> int:
    if len(set(widths.values())) > 1:
        raise ValueError(f"one SAE cannot read hook points of different widths: {widths}")
    return next(iter(widths.values()))


def _cache_hook(cache, job: TrainJob) -> str:
    hooks, wanted = list(cache.hooks), job.extract.hook
    if len(hooks) == 1:
        return hooks[0]
    if wanted and wanted[0] in hooks:
        return wanted[0]
    raise ValueError(f"the cache holds several hook points {hooks}: choose one with --hook")


# -- evaluation and reporting ------------------------------------------------------------------------------
def _final_eval(job: TrainJob, data: _Data, trained, out: Path) -> dict[str, Any]:
    """Evaluate the saved SAE as it was trained (own rows, each hook point, or its hook point); write
    eval.json, print the table, return the summary's headline figures."""
    from saekit.models import hook_width, load_model

    if data.rows is not None:
        print(f"evaluating on its {data.rows.shape[0]:,} training rows ...", flush=True)
        result = evaluate_rows(trained, data.rows, what=f"{job.arch} training rows")
        result.to_json(out / "eval.json")
        print(result.format_table())
        return eval_headline(result)
    loaded = data.loaded or load_model(data.model_ref)
    options = {
        "model": data.model_ref,
        "text": data.text,
        "context_len": job.extract.context_len,
        "keep_special": job.extract.keep_special,
        "outlier_factor": job.extract.outlier_factor_or_none,
    }
    if type(trained).multi_hook:
        print(f"evaluating on {job.eval.eval_tokens:,} held-out tokens at each hook point ...", flush=True)
        layerwise = run_layerwise_eval(trained, data.hooks, job.eval, loaded=loaded, **options)
        layerwise.to_json(out / "eval.json")
        print(layerwise.format_table())
        return layerwise.headline()
    hook = data.hooks[0]
    check_hook_width(trained, hook, hook_width(loaded.model, hook))
    print(f"evaluating on {job.eval.eval_tokens:,} held-out tokens ...", flush=True)
    result = run_eval(trained, hook, job.eval, loaded=loaded, **options)
    result.to_json(out / "eval.json")
    print(result.format_table())
    return eval_headline(result)


def _headline(train_summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "tokens", "train_seconds", "tokens_per_s", "dead_fraction", "norm_scale")
    return {k: train_summary.get(k) for k in keys}


def _hook_list(hooks: list[str]) -> str:
    return hooks[0] if len(hooks) == 1 else f"{len(hooks)} hook points ({hooks[0]} ... {hooks[-1]})"


def _print_plan(job: TrainJob, train_cfg, multi_hook: bool, own_rows) -> None:
    if own_rows is not None:
        src = f"its own training rows ({own_rows.shape[0]:,} × {own_rows.shape[1]})"
    elif job.cache:
        src = f"cache {job.cache}" + (f" hook points {job.extract.hook}" if multi_hook else "")
    else:
        hooks = job.extract.hook if multi_hook else job.extract.hook[:1]
        src = f"{job.extract.model} {', '.join(hooks)} on {job.extract.text}"
    unit = "rows" if multi_hook or own_rows is not None else "tokens"
    blocks = "; each batch: one block of rows per hook point, of the same tokens" if multi_hook else ""
    print(
        f"saekit train: {job.arch} on {src}; {job.tokens:,} {unit} in {train_cfg.total_steps} steps of "
        f"{train_cfg.batch_size}{blocks}; run folder {job.out}",
        flush=True,
    )


def _print_headline(summary: dict[str, Any], out: Path) -> None:
    ev = summary.get("eval", {})

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    parts = [f"L0 {fmt(ev.get('l0'))}", f"FVU {fmt(ev.get('fvu'))}"]
    if "ce_loss_recovered" in ev:
        parts.append(f"CE loss recovered {fmt(ev.get('ce_loss_recovered'))}")
    where = f" (mean over {len(ev['layers'])} hook points)" if "layers" in ev else ""
    print(f"done in {summary['wall_seconds']:.0f} s: " + ", ".join(parts) + f"{where}  →  {out}", flush=True)
