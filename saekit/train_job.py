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
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Iterator
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
    from saekit.analysis.heads import head_metadata, is_attn_z
    from saekit.models import load_model
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
    dist = _distributed(job.e2e.e2e)
    main = dist is None or dist.is_main
    if main:
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
        # extraction into RUN/activations: rank 0 writes the cache, the others then read it
        with _main_first(dist):
            data = _model_data(job, arch_cls.multi_hook, train_cfg.batch_size, train_cfg.seed, out)
    if dist is not None:
        data.source = _rank_source(job, data, arch_cls.multi_hook, train_cfg, dist)
        data.sae = data.sae.to(dist.device)
    if len(data.hooks) == 1 and is_attn_z(data.hooks[0]):  # record the head geometry for per-head attribution
        data.loaded = data.loaded or load_model(data.model_ref)  # (from a cache: reused by the final eval)
        data.metadata.update(head_metadata(data.hooks, data.loaded.model))
    trainer = Trainer(
        data.sae, train_cfg, out, sae_metadata=data.metadata, objective=data.objective, distributed=dist
    )
    train_summary = trainer.fit(data.source)
    if dist is not None:
        _shutdown()
        if not main:  # rank 0 evaluates and reports
            return {"arch": job.arch, "train": _headline(train_summary), "rank": dist.rank}

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
        source = streaming_batch_source(
            loaded, extract, batch_size, seed, stream_buffer_rows(batch_size, job.tokens)
        )
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


STREAM_BUFFER_ROWS = 64 * 1024


def stream_buffer_rows(batch_size: int, tokens: int) -> int:
    """Rows of a streamed run's shuffle buffer: 64k, or the run's tokens when fewer (at least two batches).
    The buffer yields its first batch once full, so a larger one than the run needs would only make the
    model extract more tokens than the run trains on (64k for an 8k-token run)."""
    return min(STREAM_BUFFER_ROWS, max(2 * batch_size, tokens))


# -- data-parallel runs (torchrun) ---------------------------------------------------------------------------
def _distributed(e2e: bool):
    """The torchrun context (None in a single process); e2e training is refused under torchrun."""
    from saekit.train.distributed import from_env

    dist = from_env()
    if dist is not None and e2e:
        raise ValueError("--e2e is not supported under torchrun: run end-to-end training in one process")
    return dist


@contextlib.contextmanager
def _main_first(dist) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (which find rank 0's files done)."""
    if dist is not None and not dist.is_main:
        dist.barrier()
    yield
    if dist is not None and dist.is_main:
        dist.barrier()


def _shutdown() -> None:
    from saekit.train.distributed import shutdown

    shutdown()


def _rank_source(job: TrainJob, data: _Data, multi_hook: bool, train_cfg, dist):
    """This rank's share of every global batch of the job's source. A cache is read with the rank's share
    of the seeded order, a stream is extracted from the rank's share of the contexts, a multi-hook batch
    is shared block by block, in-memory rows are sliced."""
    import torch

    from saekit.activations import open_cache
    from saekit.train.multi import stream_source

    if data.rows is not None:
        return dist.shard_source(data.source)
    batch_size, seed, hooks = train_cfg.batch_size, train_cfg.seed, data.hooks
    if job.stream:
        ex = job.extract
        shards = stream_source(
            data.loaded, hooks, rows_per_hook(batch_size, len(hooks)), seed, text=ex.text, split=ex.split,
            context_len=ex.context_len, model_batch_size=ex.model_batch_size,
            exclude_special=not ex.keep_special, outlier_factor=ex.outlier_factor_or_none,
            buffer_rows=stream_buffer_rows(batch_size, job.tokens), rank=dist.rank,
            world_size=dist.world_size,
        )  # fmt: skip
        return lambda skip: (torch.cat([b[h] for h in hooks]) for b in shards(skip))
    if len(hooks) > 1:
        return dist.shard_source(data.source, n_blocks=len(hooks) if multi_hook else 1)
    cache = open_cache(job.cache or Path(job.out) / "activations")
    opts = {"seed": seed, "epochs": None, "rank": dist.rank, "world_size": dist.world_size}
    return lambda skip: cache.batches(hooks[0], batch_size, skip_batches=skip, **opts)


# -- several SAEs from one pass (saekit train-many; saekit sweep) --------------------------------------------
def run_train_jobs(jobs: list[TrainJob], *, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Train several single-hook ``jobs`` from one pass over their activations (:mod:`saekit.train.multi`),
    then evaluate each: every run folder ends as ``saekit train`` leaves it (run_config.json, sae/,
    metrics, eval.json, summary.json), and each SAE is bit for bit the one ``saekit train`` would give on
    the same batches. The jobs must read the same data (one cache, or one model and text) with one batch
    size and seed; their token budgets may differ. Without a cache and ``stream``, every hook point asked
    for is extracted once into ``cache_dir``. Under torchrun, every rank trains its share, as in
    :func:`run_train_job`."""
    from saekit.activations import open_cache
    from saekit.analysis.heads import head_metadata, is_attn_z
    from saekit.jobs import run_cache
    from saekit.models import hook_width, load_model
    from saekit.sae import load_sae
    from saekit.train import TrainConfig, Trainer
    from saekit.train.multi import MultiTrainer, cache_source, stream_source

    t_start = time.perf_counter()
    cfgs = [TrainConfig.from_dict({**job.train, "total_tokens": job.tokens}) for job in jobs]
    _check_shareable(jobs, cfgs)
    first, batch_size, seed = jobs[0], cfgs[0].batch_size, cfgs[0].seed
    dist = _distributed(False)
    main = dist is None or dist.is_main
    rank = (
        {"rank": 0, "world_size": 1} if dist is None else {"rank": dist.rank, "world_size": dist.world_size}
    )
    if main:
        src = f"cache {first.cache}" if first.cache else f"{first.extract.model} on {first.extract.text}"
        mode = "" if first.cache else (", streamed" if first.stream else f", cached in {cache_dir}")
        print(f"saekit train: {len(jobs)} SAEs from one pass over {src}{mode}:", flush=True)
        for job, cfg in zip(jobs, cfgs, strict=True):
            print(f"  {job.arch} {job.sae} at {job.extract.hook[0]}: {job.tokens:,} tokens in "
                  f"{cfg.total_steps} steps of {batch_size} → {job.out}", flush=True)  # fmt: skip
            Path(job.out).mkdir(parents=True, exist_ok=True)
            save_config_file(Path(job.out) / "run_config.json", job.to_dict())

    loaded, cache = None, None
    if first.cache:
        cache = open_cache(first.cache)
        settings = cache.manifest["settings"]
        model_ref, text = settings["model"].get("source") or settings["model"]["name"], settings["source"]
        hooks = [_cache_hook(cache, job) for job in jobs]
        widths = [cache.widths[h] for h in hooks]
    else:
        model_ref, text = first.extract.model, first.extract.text
        loaded = load_model(model_ref)
        hooks = [job.extract.hook[0] for job in jobs]
        for job, hook in zip(jobs, hooks, strict=True):
            if "*" in hook:
                raise ValueError(f"{job.out}: {job.arch} reads one hook point; {hook!r} names every layer")
        widths = [hook_width(loaded.model, h) for h in hooks]
    saes = [build_sae(job, d, seed) for job, d in zip(jobs, widths, strict=True)]  # bad settings fail early
    all_hooks = list(dict.fromkeys(hooks))
    ex = first.extract
    if cache is not None:
        source = cache_source(cache, all_hooks, batch_size, seed, **rank)
    elif first.stream:
        source = stream_source(
            loaded, all_hooks, batch_size, seed, text=ex.text, split=ex.split, context_len=ex.context_len,
            model_batch_size=ex.model_batch_size, exclude_special=not ex.keep_special,
            outlier_factor=ex.outlier_factor_or_none,
            buffer_rows=stream_buffer_rows(batch_size, max(job.tokens for job in jobs)), **rank,
        )  # fmt: skip
    else:
        if cache_dir is None:
            raise ValueError("several SAEs trained from a model without --stream need a folder to cache into")
        n_tokens = max(job.tokens for job in jobs)
        with _main_first(dist):
            if main:
                print(f"caching {n_tokens:,} tokens' activations of {_hook_list(all_hooks)} into {cache_dir}")
            cache = run_cache(dataclasses.replace(ex, hook=all_hooks), n_tokens, cache_dir, loaded=loaded)
        source = cache_source(cache, all_hooks, batch_size, seed, **rank)

    trainers, datas = [], []
    for job, cfg, sae, hook in zip(jobs, cfgs, saes, hooks, strict=True):
        metadata = _hook_metadata(job, [hook], False, model_ref, text)
        if is_attn_z(hook):  # the head geometry, for per-head attribution (as run_train_job records it)
            loaded = loaded or load_model(model_ref)
            metadata.update(head_metadata([hook], loaded.model))
        if dist is not None:
            sae = sae.to(dist.device)
        trainers.append((hook, Trainer(sae, cfg, job.out, sae_metadata=metadata, distributed=dist)))
        datas.append(_Data(sae, None, metadata, [hook], model_ref, text))
    train_summaries = MultiTrainer(trainers).fit(source)
    train_wall = time.perf_counter() - t_start
    if dist is not None:
        _shutdown()
        if not main:
            return [
                {"arch": j.arch, "train": _headline(s)} for j, s in zip(jobs, train_summaries, strict=True)
            ]

    summaries = []
    for job, data, train_summary in zip(jobs, datas, train_summaries, strict=True):
        t_eval = time.perf_counter()
        out = Path(job.out)
        summary: dict[str, Any] = {"arch": job.arch, "hook": data.hooks[0], "train": _headline(train_summary)}
        if job.eval.eval_tokens > 0:
            data.loaded = loaded = loaded or load_model(model_ref)  # one model for every evaluation
            summary["eval"] = _final_eval(job, data, load_sae(out / "sae"), out)
        # the shared pass's wall time, and this run's own evaluation
        summary["wall_seconds"] = train_wall + time.perf_counter() - t_eval
        summary["trained_with"] = [j.out for j in jobs if j is not job]
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _print_headline(summary, out)
        summaries.append(summary)
    return summaries


SHARED_EXTRACT = ("model", "text", "split", "context_len", "model_batch_size", "dtype", "keep_special",
                  "outlier_factor")  # fmt: skip
"""Extraction settings one pass has for every SAE it feeds (only the hook point may differ)."""


def _check_shareable(jobs: list[TrainJob], cfgs: list) -> None:
    """Refuse, naming the run, what one pass cannot train: SAEs that read several hook points, their own
    rows or token contexts (e2e); different data, batch sizes or seeds; two runs in one folder."""
    from saekit.sae import get_architecture

    if not jobs:
        raise ValueError("no SAEs to train")
    for job in jobs:
        arch_cls = get_architecture(job.arch)
        if job.e2e.e2e or arch_cls.multi_hook or arch_cls.own_training_rows(job.sae) is not None:
            raise ValueError(
                f"{job.out}: {job.arch}{' --e2e' if job.e2e.e2e else ''} does not read one hook point's "
                "activations, so it cannot share a pass; train it alone with `saekit train`"
            )
        if job.cache and job.stream:
            raise ValueError("--cache and --stream exclude each other")
        job.extract.validate()
    first = jobs[0]
    for job, cfg in zip(jobs, cfgs, strict=True):
        checks = {
            "batch_size": (cfg.batch_size, cfgs[0].batch_size),
            "seed (it orders the shared batches)": (cfg.seed, cfgs[0].seed),
            "cache": (job.cache, first.cache),
            "stream": (job.stream, first.stream),
        }
        if not first.cache:
            checks |= {
                f"extract.{k}": (getattr(job.extract, k), getattr(first.extract, k)) for k in SHARED_EXTRACT
            }
        for what, (mine, theirs) in checks.items():
            if mine != theirs:
                raise ValueError(
                    f"SAEs trained from one pass share their {what}: {job.out} has {mine!r}, "
                    f"{first.out} has {theirs!r}"
                )
    outs = [str(Path(j.out).resolve()) for j in jobs]
    if len(set(outs)) != len(outs):
        raise ValueError(
            f"two SAEs would be written to the same folder: {sorted({o for o in outs if outs.count(o) > 1})}"
        )


# -- saekit train-many --------------------------------------------------------------------------------------
SPEC_KEYS = {
    "arch": "architecture (default topk)",
    "hook": "hook point (default: --hook, or the cache's only one)",
    "expansion": "width = expansion × d_in (default: --expansion)",
    "tokens": "training tokens (default: --tokens)",
    "name": "run folder under --out (default: made from the settings)",
}
SHARED_TRAIN = {"batch_size": "the batches are shared", "seed": "it orders the shared batches"}
SPEC_ALIASES = {"l1": "l1_coeff", "l0": "target_l0"}


def parse_sae_spec(text: str) -> dict[str, str]:
    """``"arch=topk,k=32,hook=layers.3.resid_post"`` → ``{"arch": "topk", "k": "32", "hook": ...}``
    (values still text; :func:`spec_job` converts them to each field's type)."""
    spec: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = SPEC_ALIASES.get(key.strip().replace("-", "_"), key.strip().replace("-", "_"))
        if not sep or not key or not value.strip():
            raise ValueError(f"--sae expects KEY=VALUE,KEY=VALUE,... (e.g. arch=topk,k=32), got {text!r}")
        if key in spec:
            raise ValueError(f"--sae {text!r} gives {key} twice")
        spec[key] = value.strip()
    return spec


def spec_job(spec: dict[str, str], base: TrainJob, root: Path) -> TrainJob:
    """The `saekit train` job of one ``--sae`` spec over the shared settings in ``base``: architecture
    options and per-SAE training settings (all but batch_size and seed) from the spec, the rest shared."""
    from saekit.sae import get_architecture
    from saekit.sweep import _convert, _fmt
    from saekit.train import TrainConfig

    spec = dict(spec)
    arch = spec.pop("arch", base.arch)
    arch_cls = get_architecture(arch)
    arch_fields = {f.name for f in dataclasses.fields(arch_cls.config_class)} - {"d_in"}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"total_tokens"}
    hook = spec.pop("hook", base.extract.hook[0])
    name = spec.pop("name", None)
    expansion = float(spec.pop("expansion", base.expansion))
    tokens = int(spec.pop("tokens", base.tokens))
    sae_opts, train_opts = dict(base.sae), dict(base.train)
    for key, value in spec.items():
        if key in SHARED_TRAIN:
            raise ValueError(
                f"--sae cannot set {key}: {SHARED_TRAIN[key]}; give --{key.replace('_', '-')} once"
            )
        if key in arch_fields:
            sae_opts[key] = _convert(arch_cls.config_class, arch, key, value)
        elif key in train_fields:
            train_opts[key] = _convert(TrainConfig, "training", key, value)
        else:
            raise ValueError(
                f"--sae: {arch} has no option {key!r}; keys are {sorted(SPEC_KEYS)}, {arch}'s options "
                f"{sorted(arch_fields)} and training settings {sorted(train_fields - set(SHARED_TRAIN))}"
            )
    if name is None:
        options = [f"{k}{_fmt(v)}" for k, v in sae_opts.items() if k in spec]
        options += [f"{k}{_fmt(v)}" for k, v in train_opts.items() if k in spec]
        name = "-".join([arch, hook, *options, f"x{_fmt(expansion)}"])
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    extract = dataclasses.replace(base.extract, hook=[hook])
    return dataclasses.replace(
        base, arch=arch, sae=sae_opts, train=train_opts, extract=extract, tokens=tokens,
        expansion=expansion, out=str(root / name),
    )  # fmt: skip


def add_train_many_parser(subparsers) -> argparse.ArgumentParser:
    """The `saekit train-many` command: repeated ``--sae`` specs over shared data, training and evaluation
    options (the same names as `saekit train`)."""
    from saekit.config import add_dataclass_args
    from saekit.jobs import EvalConfig, ExtractConfig
    from saekit.train import TrainConfig

    p = subparsers.add_parser(
        "train-many",
        help="train several SAEs (hook points, widths, architectures, settings) from one pass of the model",
        description="Train one SAE per --sae from a single pass over the activations: each batch is read "
        "(or extracted, one model forward for every hook point) once and handed to every SAE, each with "
        "its own optimizer, schedule and run folder OUT/NAME (laid out as `saekit train` leaves it). "
        "--sae takes KEY=VALUE pairs separated by commas: "
        + "; ".join(f"{k}: {v}" for k, v in SPEC_KEYS.items())
        + "; any option of the architecture (k, l1, ...) and any training setting but batch_size and seed "
        "(e.g. lr). Run the same command again to resume.",
    )
    p.add_argument("--sae", action="append", required=True, metavar="KEY=V,...", help="one SAE (repeat)")
    p.add_argument("--out", required=True, help="folder of the runs (OUT/NAME per SAE)")
    p.add_argument("--cache", help="train from this activation cache (made by `saekit cache`)")
    p.add_argument("--stream", action="store_true", help="train straight from the model, without caching")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="training tokens of each SAE")
    p.add_argument("--expansion", type=float, default=DEFAULT_EXPANSION, help="width = expansion × d_in")
    p.add_argument("--arch", default="topk", help="architecture of the SAEs whose --sae names none")
    add_dataclass_args(p.add_argument_group("training (every SAE)"), TrainConfig, skip={"total_tokens"})
    add_dataclass_args(p.add_argument_group("activations (model and text)"), ExtractConfig)
    add_dataclass_args(p.add_argument_group("evaluation (every SAE)"), EvalConfig)
    return p


def cmd_train_many(args: argparse.Namespace) -> int:
    from saekit.train import TrainConfig

    train = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    base = TrainJob(
        arch=args.arch,
        train={**DEFAULT_TRAIN, **{k: v for k, v in train.items() if v is not None}},
        extract=dataclass_from_args(ExtractConfig, args),
        eval=dataclass_from_args(EvalConfig, args),
        tokens=args.tokens,
        expansion=args.expansion,
        cache=args.cache,
        stream=args.stream,
    )
    if args.cache and args.hook is None:  # SAEs naming no hook read the cache's (only) one
        from saekit.activations import open_cache

        hooks = open_cache(args.cache).hooks
        base.extract.hook = hooks[:1] if len(hooks) == 1 else base.extract.hook
    root = Path(args.out)
    jobs = [spec_job(parse_sae_spec(text), base, root) for text in args.sae]
    names = [Path(j.out).name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"two --sae specs give the run name {names}: add name=... to tell them apart")
    run_train_jobs(jobs, cache_dir=root / "activations")
    return 0
