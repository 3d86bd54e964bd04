"""One measured line per architecture: L0, FVU and CE loss recovered on SmolLM2, all through `saekit train`.

Every architecture is trained by the command line a user would type, on the same cached activations
(SmolLM2-135M ``layers.15.resid_post``, built-in ``stdlib`` text, train split), for the same tokens with the
main job's training settings, 8× wide, and evaluated by the train job's own evaluation on held-out text
(default WikiText-2 validation from the project's shared data): L0, centred FVU, and CE loss recovered with
the SAE spliced into the model. The meta-SAE is trained on the TopK run's decoder rows and evaluated on
them (it has no place in the model); the multi-layer SAE reads every layer, so it gets its own smaller
cache of three layers (5, 15, 25).

    python benchmarks/architectures.py [--tokens 100000] [--archs topk gated ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saekit.cli import main as saekit_main
from saekit.jobs import ExtractConfig, run_cache
from saekit.sae import available_architectures

REPO = Path(__file__).resolve().parents[1]
HOOK = "layers.15.resid_post"
DEFAULT_HELDOUT = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"

# Per-architecture options: the sparsity setting each family needs to land near L0 ≈ 32 (TopK-like
# architectures take k = 32 from their defaults).
ARCH_OPTIONS: dict[str, list[str]] = {
    "relu": ["--l1", "4"],
    "gated": ["--l1", "6"],
    "jumprelu": ["--target-l0", "32"],
    "soft_topk": ["--grad-clip", "1.0"],  # as its reference: gradients near the soft threshold scale as 1/α
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="*", default=None, help="default: every registered architecture")
    ap.add_argument("--tokens", type=int, default=100_000, help="training tokens per SAE")
    ap.add_argument("--eval-tokens", type=int, default=4_096)
    ap.add_argument("--text", default=str(DEFAULT_HELDOUT), help="held-out text")
    ap.add_argument(
        "--train-cache", default=None, help="reuse this cache of stdlib (train split) activations"
    )
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "bench_archs"))
    ap.add_argument("--json", default=None)
    return ap.parse_args()


def train_run(arch: str, extra: list[str], args, out: Path) -> dict:
    argv = ["train", "--arch", arch, "--tokens", str(args.tokens), "--eval-tokens", str(args.eval_tokens),
            "--eval-text", args.text, "--progress", "false", "--out", str(out), *extra]  # fmt: skip
    t0 = time.perf_counter()
    if saekit_main(argv) != 0:
        raise SystemExit(f"saekit {' '.join(argv)} failed")
    summary = json.loads((out / "summary.json").read_text())
    ev = summary.get("eval", {})
    return {
        "arch": arch,
        "options": " ".join(extra),
        "l0": ev.get("l0"),
        "fvu": ev.get("fvu"),
        "ce_loss_recovered": ev.get("ce_loss_recovered"),
        "dead_fraction": ev.get("dead_fraction"),
        "train_seconds": summary["train"].get("train_seconds"),
        "wall_seconds": time.perf_counter() - t0,
    }


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    if args.train_cache:
        cache_dir = Path(args.train_cache)
    else:
        cache_dir = work / f"train_{args.tokens}"
        run_cache(ExtractConfig(hook=[HOOK], text="stdlib", split="train"), args.tokens, cache_dir)
    archs = args.archs or available_architectures()
    # The meta-SAE needs a trained base SAE: TopK runs first.
    archs = sorted(archs, key=lambda a: (a != "topk", a == "meta"))
    rows = []
    for arch in archs:
        out = work / arch
        if arch == "meta":
            extra = ["--base-sae", str(work / "topk")]
        elif arch == "multilayer":  # three layers (every layer's evaluation would take an hour on CPU)
            extra = [a for layer in (5, 15, 25) for a in ("--hook", f"layers.{layer}.resid_post")]
        elif arch == "tree_given":  # a fixed two-level tree: a quarter of the latents, three children each
            width = 8 * 576
            tree = work / "given_tree.json"
            tree.parent.mkdir(parents=True, exist_ok=True)
            tree.write_text(json.dumps([-1] * (width // 4) + [i // 3 for i in range(width - width // 4)]))
            extra = ["--cache", str(cache_dir), "--parents-file", str(tree)]
        else:
            extra = ["--cache", str(cache_dir), *ARCH_OPTIONS.get(arch, [])]
        print(f"\n== {arch} {' '.join(extra)} ==", flush=True)
        rows.append(train_run(arch, extra, args, out))

    print(f"\n{'arch':<12} {'L0':>7} {'FVU':>7} {'CE rec.':>8} {'dead':>6} {'train s':>8}  options")
    for r in rows:
        print(
            f"{r['arch']:<12} {_fmt(r['l0'], '7.1f')} {_fmt(r['fvu'], '7.3f')} "
            f"{_fmt(r['ce_loss_recovered'], '8.3f')} {_fmt(r['dead_fraction'], '6.2f')} "
            f"{_fmt(r['train_seconds'], '8.0f')}  {r['options']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
