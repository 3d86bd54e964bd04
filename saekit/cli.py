"""The `saekit` command. Options are generated from the typed configs (saekit.config), so flags and help
cannot drift apart. With no arguments it runs the main job (`saekit train` with its defaults)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from saekit import __version__
from saekit.analysis.features import FeatureConfig
from saekit.bench.synthetic import add_synthetic_parser, cmd_bench_synthetic
from saekit.config import add_dataclass_args, dataclass_from_args, load_config_file
from saekit.jobs import DEFAULT_OUTLIER_FACTOR, EvalConfig, ExtractConfig
from saekit.sweep import add_sweep_parser, cmd_sweep
from saekit.train_job import DEFAULT_RUN_DIR, DEFAULT_TOKENS, add_train_many_parser, cmd_train_many


def _arch_from_argv(argv: list[str]) -> str:
    """The --arch value (needed before parsing, since each architecture brings its own options)."""
    for i, a in enumerate(argv):
        if a == "--arch" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--arch="):
            return a.split("=", 1)[1]
    config = _config_from_argv(argv)
    return str(config.get("arch", "topk")) if config else "topk"


def _config_from_argv(argv: list[str]) -> dict:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return load_config_file(argv[i + 1])
        if a.startswith("--config="):
            return load_config_file(a.split("=", 1)[1])
    return {}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from saekit.sae import available_architectures, get_architecture
    from saekit.train import TrainConfig
    from saekit.train.config import E2EConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="saekit",
        description="Train, evaluate and analyse sparse autoencoders on language-model activations. "
        "With no command, runs the main job: `saekit train` with its defaults (TopK on SmolLM2).",
    )
    parser.add_argument("--version", action="version", version=f"saekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("cache", help="extract activations from a model into an on-disk cache (resumable)")
    add_dataclass_args(p.add_argument_group("activations"), ExtractConfig)
    p.add_argument("--tokens", type=int, default=200_000, help="activations (kept tokens) to cache")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing cache made with other settings"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("info", help="describe an activation cache or a saved SAE")
    p.add_argument("path", help="cache folder or SAE folder")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 checksum")

    arch = _arch_from_argv(argv[1:] if argv and argv[0] == "train" else [])
    try:
        arch_cls = get_architecture(arch)
    except ValueError:
        arch_cls = get_architecture("topk")  # the error is reported after parsing, with the valid names
    p = sub.add_parser(
        "train",
        help="train an SAE (from a cache, or from a model and text) and evaluate it",
        description="Train an SAE. Options depend on --arch; see `saekit train --arch A --help`.",
    )
    p.add_argument(
        "--config", help="JSON/YAML file with sections 'sae', 'train', 'extract', 'eval' (+ 'arch')"
    )
    p.add_argument("--arch", default=None, help=f"architecture: {', '.join(available_architectures())}")
    p.add_argument("--cache", help="train from this activation cache (made by `saekit cache`)")
    p.add_argument("--stream", action="store_true", help="train straight from the model, without caching")
    p.add_argument("--out", default=None, help=f"run folder (default: {DEFAULT_RUN_DIR})")
    p.add_argument("--tokens", type=int, default=None, help=f"training tokens (default: {DEFAULT_TOKENS})")
    p.add_argument("--expansion", type=float, default=None, help="width = expansion × d_in (default 8)")
    add_dataclass_args(
        p.add_argument_group(f"{arch_cls.arch} architecture"),
        arch_cls.config_class,
        skip={"d_in"},
        aliases={"l1": "l1_coeff", "l0": "target_l0"},
    )
    add_dataclass_args(p.add_argument_group("training"), TrainConfig, skip={"total_tokens"})
    add_dataclass_args(p.add_argument_group("end-to-end training (Braun et al. 2024)"), E2EConfig)
    add_dataclass_args(p.add_argument_group("activations (model and text)"), ExtractConfig)
    add_dataclass_args(p.add_argument_group("evaluation"), EvalConfig)

    p = sub.add_parser("eval", help="evaluate a saved SAE in its model on held-out text")
    p.add_argument("sae", help="SAE folder (cfg.json + sae.safetensors) or a run folder holding sae/")
    p.add_argument("--model", default=None, help="model (default: the one the SAE was trained on)")
    p.add_argument(
        "--hook",
        default=None,
        help="hook point (default: the SAE's; each of a multi-layer SAE's hook points)",
    )
    p.add_argument("--text", default=None, help="text (default: held-out split of the SAE's training text)")
    p.add_argument("--tokens", type=int, default=16_384, help="tokens to evaluate on")
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    add_dataclass_args(p.add_argument_group("evaluation"), EvalConfig, skip={"eval_tokens", "eval_text"})
    g = p.add_argument_group("analyses (written beside the SAE, or into --plots-dir)")
    g.add_argument("--afa", action="store_true", help="AFA: εLBO per token (median), ZF plot (zf_plot.png)")
    g.add_argument(
        "--progressive",
        action="store_true",
        help="progressive coding: FVU, L0 and CE loss recovered of the first G latents (progressive.png)",
    )
    g.add_argument(
        "--progressive-widths", type=int, default=6, help="widths G in the geometric grid (default 6)"
    )
    g.add_argument(
        "--progressive-order",
        choices=("auto", "energy", "frequency", "index"),
        default="auto",
        help="latent ranking (default auto: index for Matryoshka, E[f²] otherwise)",
    )
    g.add_argument(
        "--progressive-ce-tokens", type=int, default=2_048, help="tokens for CE per width (default 2048)"
    )
    g.add_argument(
        "--plots-dir", default=None, help="where the analyses' PNGs go (default: the SAE's folder)"
    )

    p = sub.add_parser(
        "steer",
        help="generate from a prompt with and without an SAE latent intervention",
        description="Print the model's greedy continuation of each prompt, then the continuation with the "
        "intervention. add: add SCALE × the latent's unit decoder direction to the hook output (SCALE in "
        "activation units; the typical norm is printed); clamp: set the latent to SCALE in the SAE's code; "
        "ablate: set it to 0. Special tokens and attention sinks are left clean.",
    )
    p.add_argument("sae", help="SAE folder (cfg.json + sae.safetensors) or a run folder holding sae/")
    p.add_argument("prompt", nargs="+", help="prompt(s) to continue")
    p.add_argument("--latent", type=int, action="append", required=True, help="latent id (repeatable)")
    p.add_argument("--scale", type=float, default=None, help="steering scale (add) or value (clamp)")
    p.add_argument("--mode", choices=("add", "clamp", "ablate"), default="add", help="the intervention")
    p.add_argument("--model", default=None, help="model (default: the one the SAE was trained on)")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (both runs use the same one)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument(
        "--no-error",
        action="store_true",
        help="clamp/ablate: replace the activation by the edited reconstruction (drop the SAE's error term)",
    )

    p = sub.add_parser(
        "features",
        help="record what each latent responds to: top contexts, quantile samples, densities, logit effects",
        description="One streaming pass over a text: per latent, the top-activating contexts, uniform "
        "samples grouped by activation quantile, firing density, an activation histogram and the logit "
        "effect of its decoder row. Written to RUN/features (or SAE/features); `saekit report` makes them "
        "a site.",
    )
    _add_feature_source_args(p)
    p.add_argument("--out", default=None, help="records folder (default: RUN/features)")
    add_dataclass_args(p.add_argument_group("records"), FeatureConfig)

    p = sub.add_parser(
        "report",
        help="write a static HTML report of a run: latent index, a page per latent, metrics and plots",
        description="Write RUN/report/index.html: an index of the latents (sortable, searchable by token), "
        "a page per latent and a summary of the run's metrics and plots. Opens from disk, no server. "
        "Computes the feature records first (options below) if the run has none.",
    )
    _add_feature_source_args(p)
    p.add_argument("--out", default=None, help="report folder (default: RUN/report)")
    p.add_argument("--features", default=None, help="feature records folder (default: RUN/features)")
    p.add_argument(
        "--latent-pngs", type=int, default=0, help="also write PNG plots for the N strongest latents"
    )
    add_dataclass_args(p.add_argument_group("records (when computed)"), FeatureConfig)

    add_train_many_parser(sub)
    add_sweep_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks (bench synthetic: ground-truth feature recovery)")
    add_synthetic_parser(bench.add_subparsers(dest="bench", required=True, metavar="BENCH"))
    sub.add_parser("archs", help="list the SAE architectures and their options' defaults")
    _add_format_parsers(sub)
    return parser


def _add_format_parsers(sub) -> None:
    """`saekit import` and `saekit export`: other libraries' SAE formats (saekit.formats)."""
    p = sub.add_parser(
        "import",
        help="convert a SAELens, sparsify, dictionary_learning or Gemma Scope SAE into a saekit SAE folder",
        description="Read another library's SAE (a folder or file, detected by content, or "
        "hf:OWNER/NAME[/SUBFOLDER] on the Hugging Face hub) and save it as a saekit SAE folder, with the "
        "hook point and model it reads in its metadata. `saekit eval` also takes foreign SAEs directly.",
    )
    p.add_argument("src", help="foreign SAE: folder, ae.pt, params.npz or hf:OWNER/NAME[/SUBFOLDER]")
    p.add_argument("out", help="saekit SAE folder to write")
    p.add_argument("--hook", default=None, help="hook point it reads (default: from the foreign config)")
    p.add_argument("--model", default=None, help="model it reads (default: from the foreign config)")
    p = sub.add_parser(
        "export",
        help="write a saekit SAE in another library's format (SAELens: cfg.json + sae_weights.safetensors)",
    )
    p.add_argument("sae", help="SAE folder or run folder (or anything `saekit eval` takes)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--format", choices=("saelens",), default="saelens", help="target format")


def _add_feature_source_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `features` and `report`: which SAE, model, hook and text."""
    from saekit.analysis.jobs import DEFAULT_FEATURE_TOKENS

    p.add_argument("sae", help="run folder (holding sae/) or SAE folder (cfg.json + sae.safetensors)")
    p.add_argument("--model", default=None, help="model (default: the one the SAE was trained on)")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's)")
    p.add_argument("--text", default=None, help="text source (default: the SAE's training text)")
    p.add_argument(
        "--split", choices=("all", "train", "heldout"), default="all", help="documents to read (default: all)"
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_FEATURE_TOKENS,
        help=f"tokens to record (default {DEFAULT_FEATURE_TOKENS:,})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("--") and argv[0] not in ("--help", "-h", "--version"):
        argv = ["train", *argv]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("SAEKIT_DEBUG"):
            raise
        print(f"saekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130


def cmd_cache(args: argparse.Namespace) -> int:
    from saekit.jobs import run_cache

    extract = dataclass_from_args(ExtractConfig, args)
    cache = run_cache(extract, args.tokens, args.out, overwrite=args.overwrite)
    print(cache.describe())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / "cfg.json").is_file() or (path / "sae" / "cfg.json").is_file():
        from saekit.sae import load_sae

        sae = load_sae(path if (path / "cfg.json").is_file() else path / "sae")
        print(f"SAE {sae.arch}: d_in={sae.d_in} width={sae.width}")
        for key, value in sae.cfg.to_dict().items():
            print(f"  {key}: {value}")
        for key, value in getattr(sae, "metadata", {}).items():
            if key != "training":
                print(f"  {key}: {value}")
        structure = sae.describe_structure()
        if structure:
            print(structure)
        from saekit.analysis.heads import describe_heads

        heads = describe_heads(sae)  # SAEs on layers.{i}.attn_z: per-head attribution of the latents
        if heads:
            print(heads)
        return 0
    from saekit.activations import open_cache

    print(open_cache(path, verify="full" if args.verify else "size", allow_incomplete=True).describe())
    return 0


def cmd_archs(args: argparse.Namespace) -> int:
    import dataclasses

    from saekit.config import field_docs
    from saekit.sae import available_architectures, get_architecture

    for name in available_architectures():
        cls = get_architecture(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}")
        docs = field_docs(cls.config_class)
        for f in dataclasses.fields(cls.config_class):
            if f.name in ("d_in", "width"):
                continue
            has_factory = f.default_factory is not dataclasses.MISSING
            default = f.default_factory() if has_factory else f.default
            print(f"    --{f.name.replace('_', '-')} (default {default}): {docs.get(f.name, '')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from saekit.train_job import TrainJob, run_train_job

    file_cfg = load_config_file(args.config) if args.config else {}
    run_train_job(TrainJob.from_args(args, file_cfg))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate as the SAE was trained: on its own rows (no model), at each of its hook points (a multi-hook
    SAE without --hook), or at its hook point."""
    import saekit
    from saekit.eval.analyses import HeldOut, format_analyses
    from saekit.jobs import evaluate_rows, load_sae_in_model, run_eval, run_layerwise_eval

    eval_cfg = dataclass_from_args(EvalConfig, args, eval_tokens=args.tokens, eval_text=args.text or "")
    sae = saekit.load(args.sae)
    rows = type(sae).own_training_rows(sae.cfg.to_dict())
    hooks = (sae.metadata.get("hooks") or []) if type(sae).multi_hook and not args.hook else []
    if (args.afa or args.progressive) and (rows is not None or hooks):
        raise ValueError("--afa and --progressive analyse the SAE at one hook point of its model")
    if rows is not None:
        result = evaluate_rows(sae, rows, what=f"{sae.arch} training rows")
    else:
        run = load_sae_in_model(sae, model=args.model, hook=args.hook or (hooks[0] if hooks else None))
        extract = run.extract
        options = {
            "model": run.model_name,
            "text": extract.get("text", "stdlib"),
            "context_len": extract.get("context_len", 128),
            "loaded": run.loaded,
            "keep_special": extract.get("keep_special", False),
            "outlier_factor": extract.get("outlier_factor", DEFAULT_OUTLIER_FACTOR) or None,
        }
        if hooks:
            result = run_layerwise_eval(run.sae, hooks, eval_cfg, **options)
        else:
            held = HeldOut() if args.afa or args.progressive else None
            result = run_eval(run.sae, run.hook, eval_cfg, **options, on_batch=held)
            if held is not None:
                _run_analyses(args, run, result, held)
    print(result.format_table())
    if getattr(result, "extra", None):
        print(format_analyses(result.extra))
    if args.json:
        result.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


def _run_analyses(args: argparse.Namespace, run, result, held) -> None:
    """``--afa`` and ``--progressive`` on the tokens the evaluation read; results go to ``result.extra``."""
    from saekit.data import special_token_ids
    from saekit.eval.analyses import afa_analysis, progressive_analysis

    sae_path = Path(args.sae)
    plots = Path(args.plots_dir) if args.plots_dir else sae_path if sae_path.is_dir() else sae_path.parent
    if args.afa:
        result.extra["afa"] = afa_analysis(
            run.sae, held, plots / "zf_plot.png", title=f"{run.model_name} {run.hook}"
        )
    if args.progressive:
        result.extra["progressive"] = progressive_analysis(
            run.sae,
            held,
            run.loaded.model,
            run.hook,
            plots / "progressive.png",
            n_widths=args.progressive_widths,
            order_by=args.progressive_order,
            ce_tokens=args.progressive_ce_tokens,
            special_ids=special_token_ids(run.loaded.tokenizer),
        )


def cmd_steer(args: argparse.Namespace) -> int:
    import saekit
    from saekit.analysis.interventions import generate, intervene, typical_norm
    from saekit.data import special_token_ids
    from saekit.jobs import load_sae_in_model

    if args.mode != "ablate" and args.scale is None:
        raise ValueError(f"--mode {args.mode} needs --scale")
    run = load_sae_in_model(saekit.load(args.sae), model=args.model, hook=args.hook)
    sae, hook, model, loaded = run.sae, run.hook, run.model_name, run.loaded
    edit = {
        "add": {"steer": dict.fromkeys(args.latent, args.scale)},
        "clamp": {"clamp": dict.fromkeys(args.latent, args.scale)},
        "ablate": {"ablate": args.latent},
    }[args.mode]
    norm = typical_norm(sae)
    what = {"add": f"add {args.scale} × unit decoder row", "clamp": f"clamp to {args.scale}"}
    print(
        f"{sae.arch} SAE ({sae.width} latents) at {hook} of {model}: {what.get(args.mode, 'ablate')} of "
        f"latent(s) {', '.join(map(str, args.latent))}"
        + (f"; typical activation norm here ≈ {norm:.0f}" if norm else "")
        + (" (error term dropped)" if args.no_error else "")
    )
    gen = dict(
        max_new_tokens=args.max_new_tokens,
        greedy=not args.sample,
        temperature=args.temperature,
        seed=args.seed,
        chat=args.chat,
    )
    skip = special_token_ids(loaded.tokenizer)
    for prompt in args.prompt:
        baseline = generate(loaded.model, loaded.tokenizer, prompt, **gen)
        with intervene(loaded.model, sae, hook, keep_error=not args.no_error, skip_token_ids=skip, **edit):
            steered = generate(loaded.model, loaded.tokenizer, prompt, **gen)
        print(f"\nprompt:   {prompt!r}\nbaseline: {baseline!r}\nsteered:  {steered!r}")
    return 0


def _feature_options(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "hook": args.hook,
        "text": args.text,
        "split": args.split,
        "n_tokens": args.tokens,
        "cfg": dataclass_from_args(FeatureConfig, args),
        "progress": not args.no_progress,
    }


def cmd_features(args: argparse.Namespace) -> int:
    from saekit.analysis.jobs import run_features

    run_features(args.sae, out=args.out, **_feature_options(args))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from saekit.analysis.jobs import run_report

    run_report(
        args.sae,
        out=args.out,
        features=args.features,
        compute=_feature_options(args),
        latent_pngs=args.latent_pngs,
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from saekit.formats import import_sae

    sae = import_sae(args.src, args.out, hook=args.hook, model=args.model)
    meta, source = sae.metadata, sae.metadata.get("imported", {})
    model = (meta.get("model") or {}).get("source", "unknown: pass --model to eval")
    print(f"imported {source.get('format', 'saekit')} SAE as {sae.arch}: d_in={sae.d_in} width={sae.width}")
    print(f"  hook: {meta.get('hook', 'unknown: pass --hook to eval')}  model: {model}")
    for note in source.get("notes", []):
        print(f"  note: {note}")
    print(f"wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from saekit.formats import export_sae

    out = export_sae(args.sae, args.out, format=args.format)
    print(f"wrote {out} ({args.format})")
    return 0


COMMANDS = {
    "import": cmd_import,
    "export": cmd_export,
    "train-many": cmd_train_many,
    "sweep": cmd_sweep,
    "bench": cmd_bench_synthetic,
    "features": cmd_features,
    "report": cmd_report,
    "cache": cmd_cache,
    "info": cmd_info,
    "train": cmd_train,
    "eval": cmd_eval,
    "archs": cmd_archs,
    "steer": cmd_steer,
}

if __name__ == "__main__":
    sys.exit(main())
