"""The `saekit` command. Options are generated from the typed configs (saekit.config), so flags and help
cannot drift apart. With no arguments it runs the main job (`saekit train` with its defaults)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from saekit import __version__
from saekit.config import add_dataclass_args, dataclass_from_args, load_config_file
from saekit.jobs import DEFAULT_OUTLIER_FACTOR, EvalConfig, ExtractConfig
from saekit.train_job import DEFAULT_RUN_DIR, DEFAULT_TOKENS


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
    add_dataclass_args(p.add_argument_group("activations (model and text)"), ExtractConfig)
    add_dataclass_args(p.add_argument_group("evaluation"), EvalConfig)

    p = sub.add_parser("eval", help="evaluate a saved SAE in its model on held-out text")
    p.add_argument("sae", help="SAE folder (cfg.json + sae.safetensors) or a run folder holding sae/")
    p.add_argument("--model", default=None, help="model (default: the one the SAE was trained on)")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's)")
    p.add_argument("--text", default=None, help="text (default: held-out split of the SAE's training text)")
    p.add_argument("--tokens", type=int, default=16_384, help="tokens to evaluate on")
    p.add_argument("--json", default=None, help="write the result as JSON to this file")
    add_dataclass_args(p.add_argument_group("evaluation"), EvalConfig, skip={"eval_tokens", "eval_text"})

    sub.add_parser("archs", help="list the SAE architectures and their options' defaults")
    return parser


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
            print(f"    --{f.name.replace('_', '-')} (default {f.default}): {docs.get(f.name, '')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from saekit.train_job import TrainJob, run_train_job

    file_cfg = load_config_file(args.config) if args.config else {}
    run_train_job(TrainJob.from_args(args, file_cfg))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from saekit.jobs import check_hook_width, run_eval
    from saekit.models import hook_width, load_model
    from saekit.sae import load_sae

    path = Path(args.sae)
    sae = load_sae(path / "sae" if (path / "sae" / "cfg.json").is_file() else path)
    meta = getattr(sae, "metadata", {}) or {}
    hook = args.hook or meta.get("hook")
    model = (
        args.model or meta.get("model", {}).get("source") or meta.get("model", {}).get("name") or "smollm2"
    )
    if not hook:
        raise ValueError("the SAE's metadata names no hook point: pass --hook")
    eval_cfg = dataclass_from_args(EvalConfig, args, eval_tokens=args.tokens, eval_text=args.text or "")
    loaded = load_model(model)
    check_hook_width(sae, hook, hook_width(loaded.model, hook))
    extract = meta.get("extract", {})
    result = run_eval(
        sae,
        hook,
        eval_cfg,
        model=model,
        text=extract.get("text", "stdlib"),
        context_len=extract.get("context_len", 128),
        loaded=loaded,
        keep_special=extract.get("keep_special", False),
        outlier_factor=extract.get("outlier_factor", DEFAULT_OUTLIER_FACTOR) or None,
    )
    print(result.format_table())
    if args.json:
        result.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


COMMANDS = {"cache": cmd_cache, "info": cmd_info, "train": cmd_train, "eval": cmd_eval, "archs": cmd_archs}

if __name__ == "__main__":
    sys.exit(main())
