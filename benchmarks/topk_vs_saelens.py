"""saekit's TopK SAE against SAELens's TopK SAE: same activations, same budget, same metric.

Protocol (everything runs one after the other on the same data):

1. Cache ``--tokens`` activations of SmolLM2-135M at ``layers.15.resid_post`` from the built-in ``stdlib``
   text (its train split), and ``--heldout-tokens`` from ``--text`` (default: WikiText-2 validation from the
   project's shared data, text saekit was not developed on; else the stdlib held-out split). Caches live in
   ``--work-dir`` and are reused by later runs with the same settings.
2. Shuffle the training rows once (``--seed``) and write them in that order to one .npy file: both libraries
   read consecutive batches of it, so they see the same batches in the same order.
3. Train saekit's ``TopKSAE`` with ``saekit.train.Trainer`` (its defaults: unit-norm decoder, W_enc = W_decᵀ,
   geometric-median b_dec, normalised AuxK with α = 1/32), then SAELens's ``TopKTrainingSAE`` with its
   ``SAETrainer`` (its defaults: 0.1-norm decoder init with ``rescale_acts_by_decoder_norm``, b_dec = 0, SSE
   AuxK with coefficient 1, gradient-norm clipping at 1) in the separate environment ``--bench-venv``
   (``benchmarks/_saelens_worker.py``). Shared: width, k, tokens, batch size, Adam lr and betas, the
   learning-rate schedule (linear warm-up, constant, linear decay to 0 over the last 20%), the dead-latent
   window in tokens, the torch thread count, and the input scale: saekit estimates s with E‖s x‖² = d on
   its first ``init_tokens`` rows, and SAELens is given that same s (instead of its own E‖x‖ = √d rule).
4. Evaluate both on the same held-out activations with ``saekit.eval.metrics.ReconstructionStats``
   (centred FVU, L0, fraction of latents that never fire on the held-out set).

If ``--bench-venv`` has no sae-lens, the script creates it (``python3 -m venv`` + ``pip install torch==2.13.0
sae-lens==6.54.12``; needs a package index) and says so. Run from the repository root with saekit's venv:

    python benchmarks/topk_vs_saelens.py [--tokens 200000] [--quick] [--text FILE] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from _common import iter_outputs

import saekit
from saekit.activations import open_cache, write_cache
from saekit.eval.metrics import ReconstructionStats
from saekit.sae.topk import TopKConfig, TopKSAE
from saekit.train import TrainConfig, Trainer, geometric_median

REPO = Path(__file__).resolve().parents[1]
HOOK = "layers.15.resid_post"
SAELENS_PINS = ("torch==2.13.0", "sae-lens==6.54.12")
DEFAULT_HELDOUT = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"
EXTRACT_RATE = 600  # tokens/s of SmolLM2 up to layer 15 on 2 CPU cores (for the time estimate only)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens (cached and trained on)")
    ap.add_argument("--heldout-tokens", type=int, default=16_384, help="held-out tokens to evaluate on")
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: 32,768 training, 4,096 held-out tokens"
    )
    ap.add_argument("--text", default=None, help=f"held-out text (default: {DEFAULT_HELDOUT} if present)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8, help="width = expansion x d_model")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-4, help="Adam lr (the default of both libraries)")
    ap.add_argument("--adam-beta1", type=float, default=0.9)
    ap.add_argument("--adam-beta2", type=float, default=0.999)
    ap.add_argument("--warmup-fraction", type=float, default=0.05, help="linear lr warm-up, share of steps")
    ap.add_argument(
        "--dead-window-tokens",
        type=int,
        default=None,
        help="a latent silent for this many tokens is dead (AuxK); default: a tenth of the run",
    )
    ap.add_argument(
        "--saekit-b-dec",
        choices=("geometric_median", "mean", "zeros"),
        default="geometric_median",
        help="ablation: saekit's decoder-bias init (default: its own, the geometric median)",
    )
    ap.add_argument(
        "--saelens-b-dec",
        choices=("zeros", "geometric_median"),
        default="zeros",
        help="ablation: start SAELens's b_dec at zeros (its own default) or at saekit's geometric median",
    )
    ap.add_argument(
        "--saelens-decoder-init-norm",
        default="0.1",
        help="ablation: SAELens's decoder_init_norm, a float or 'none' for its plain Kaiming init "
        "(default: its own 0.1)",
    )
    ap.add_argument(
        "--saekit-grad-clip",
        type=float,
        default=0.0,
        help="ablation: clip saekit's gradient norm at this value (default 0 = off, its own default)",
    )
    ap.add_argument(
        "--saekit-adam-eps",
        type=float,
        default=1e-8,
        help="ablation: saekit's Adam eps (default its own 1e-8)",
    )
    ap.add_argument("--log-every", type=int, default=0, help="print SAELens's batch FVU every n steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = torch's default)")
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "bench_topk_vs_saelens"))
    ap.add_argument("--bench-venv", default=str(REPO / ".bench-venv"), help="environment with sae-lens")
    ap.add_argument("--no-setup", action="store_true", help="fail instead of creating a missing bench venv")
    ap.add_argument("--skip-saelens", action="store_true", help="train and evaluate saekit only")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.heldout_tokens = 32_768, 4_096
    if args.tokens < args.batch_size:
        raise SystemExit(f"--tokens {args.tokens} is less than one batch of {args.batch_size}")
    if args.text is None:
        args.text = str(DEFAULT_HELDOUT) if DEFAULT_HELDOUT.is_file() else "stdlib"
    return args


# -- the benchmark environment -----------------------------------------------------------------------
def bench_python(venv: Path, allow_setup: bool) -> Path:
    """The bench venv's python, after creating the venv if it lacks sae-lens (never touches saekit's)."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import sae_lens; print(sae_lens.__version__)"]
    if py.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    if not allow_setup:
        raise SystemExit(
            f"{venv} has no sae-lens; run without --no-setup or create it (benchmarks/README.md)"
        )
    print(f"{venv} has no sae-lens: creating it (python3 -m venv + pip install {' '.join(SAELENS_PINS)})")
    if not py.is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", *SAELENS_PINS], check=True)
    subprocess.run(probe, check=True)
    return py


# -- activations ------------------------------------------------------------------------------------------
def cached(out: Path, n_tokens: int, source: str, split: str, model_box: list):
    """A complete cache of ``n_tokens`` rows of ``source``/``split`` at HOOK in ``out``, reused if present."""
    try:
        cache = open_cache(out)
        s = cache.manifest["settings"]
        if (s["n_tokens"], s["source"], s["split"]) == (n_tokens, source, split):
            print(f"reusing {cache.n_tokens:,} cached tokens in {out}")
            return cache
    except (ValueError, KeyError):
        pass
    if not model_box:
        from saekit.models import load_model

        model_box.append(load_model("smollm2"))
    print(
        f"extracting {n_tokens:,} tokens of {source} ({split}) into {out} (~{n_tokens / EXTRACT_RATE:.0f} s)"
    )
    return write_cache(
        out, model_box[0], [HOOK], n_tokens=n_tokens, source=source, split=split, overwrite=True
    )


def shuffled_training_rows(cache, n_rows: int, seed: int, path: Path) -> np.ndarray:
    """The first ``n_rows`` of a seeded permutation of the cache's rows, saved to ``path`` (N, d) float32."""
    acts = cache.acts(HOOK)[: len(cache.acts(HOOK))]
    perm = np.random.default_rng(seed).permutation(acts.shape[0])[:n_rows]
    x = np.ascontiguousarray(acts[perm], dtype=np.float32)
    np.save(path, x)
    return x


def init_tokens(steps: int, batch_size: int) -> int:
    """Rows saekit's trainer estimates the scale and b_dec from (its default, capped by the run)."""
    return min(TrainConfig().init_tokens, steps * batch_size)


# -- training -----------------------------------------------------------------------------------------------
def train_saekit(x_ND: np.ndarray, args, steps: int, warmup: int, dead_tokens: int, out: Path) -> dict:
    width = args.expansion * x_ND.shape[1]
    torch.manual_seed(args.seed)  # the initial weights (the trainer seeds only what follows)
    sae = TopKSAE(TopKConfig(d_in=x_ND.shape[1], width=width, k=args.k))
    cfg = TrainConfig(
        total_tokens=steps * args.batch_size,
        batch_size=args.batch_size,
        lr=args.lr,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        warmup_steps=warmup,
        decay="linear",
        decay_start_fraction=0.8,
        final_lr_fraction=0.0,
        b_dec_init=args.saekit_b_dec,
        grad_clip=args.saekit_grad_clip,
        adam_eps=args.saekit_adam_eps,
        init_tokens=init_tokens(steps, args.batch_size),
        dead_tokens=dead_tokens,
        checkpoint_every=0,
        log_every=max(1, steps // 20),
        seed=args.seed,
        threads=args.threads,
        progress=False,
    )
    if out.exists():
        shutil.rmtree(out)  # a checkpoint left there would be resumed instead of a fresh run

    def source(skip_batches: int):
        b = args.batch_size
        for start in range(skip_batches * b, x_ND.shape[0] - b + 1, b):
            yield torch.from_numpy(x_ND[start : start + b])

    summary = Trainer(sae, cfg, out).fit(source)
    return {
        "library": "saekit",
        "version": saekit.__version__,
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "dead_train_fraction": summary["dead_fraction"],
        "norm_scale": summary["norm_scale"],
    }


def train_saelens(
    py: Path, args, width: int, steps: int, warmup: int, dead_tokens: int, scale: float, work: Path
) -> dict:
    out = work / "saelens_run"
    if out.exists():
        shutil.rmtree(out)
    cmd = [
        str(py), str(REPO / "benchmarks" / "_saelens_worker.py"),
        "--train", str(work / "train_shuffled.npy"), "--heldout", str(work / "heldout.npy"),
        "--out", str(out),
        "--width", str(width), "--k", str(args.k), "--steps", str(steps),
        "--batch-size", str(args.batch_size), "--lr", repr(args.lr),
        "--adam-beta1", repr(args.adam_beta1), "--adam-beta2", repr(args.adam_beta2),
        "--warmup-steps", str(warmup), "--decay-steps", str(steps - int(0.8 * steps)),
        "--dead-window-steps", str(max(1, dead_tokens // args.batch_size)),
        "--scale", repr(scale), "--seed", str(args.seed), "--threads", str(torch.get_num_threads()),
    ]  # fmt: skip
    if args.saelens_b_dec == "geometric_median":  # the same centre saekit's trainer starts from
        n_init = init_tokens(steps, args.batch_size)
        rows = torch.from_numpy(np.array(np.load(work / "train_shuffled.npy", mmap_mode="r")[:n_init]))
        np.save(work / "b_dec_init.npy", geometric_median(rows * scale).numpy())
        cmd += ["--b-dec-init", str(work / "b_dec_init.npy")]
    cmd += ["--decoder-init-norm", args.saelens_decoder_init_norm]
    if args.log_every:
        cmd += ["--log-every", str(args.log_every)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["WANDB_MODE"] = "disabled"
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out / "result.json").read_text())


# -- evaluation ---------------------------------------------------------------------------------------------
def eval_saekit(sae_dir: Path, x_ND: np.ndarray, batch: int = 4096) -> dict:
    sae = saekit.load(sae_dir).eval()
    stats = ReconstructionStats()
    with torch.no_grad():
        for start in range(0, x_ND.shape[0], batch):
            x = torch.from_numpy(x_ND[start : start + batch])
            f = sae.encode(x)
            stats.update(x, sae.decode(f), f)
    return stats.result()


def eval_saelens(run: Path, x_ND: np.ndarray, width: int) -> dict:
    """Metrics of the worker's held-out outputs (reconstructions and CSR codes, ``_common.OutputWriter``)."""
    stats = ReconstructionStats()
    for sl, x_hat, f in iter_outputs(run, width):
        stats.update(torch.from_numpy(x_ND[sl]), x_hat, f)
    return stats.result()


def summarize(train: dict, ev: dict) -> dict:
    keep = ("fvu", "mse", "l0", "dead_fraction", "dense_fraction", "cosine", "relative_reconstruction_bias")
    return {**train, "heldout": {k: ev[k] for k in keep}}


def print_table(results: dict[str, dict]) -> None:
    rows = [
        ("training tokens", "tokens", "{:,.0f}"),
        ("training tokens/s (loop)", "tokens_per_s", "{:,.0f}"),
        ("held-out FVU", "fvu", "{:.4f}"),
        ("held-out L0", "l0", "{:.2f}"),
        ("held-out dead fraction", "dead_fraction", "{:.4f}"),
        ("dead fraction at end of training", "dead_train_fraction", "{:.4f}"),
    ]
    names = list(results)
    print(
        "\n"
        + f"{'':34}"
        + "".join(f"{n:>14}" for n in names)
        + ("  saekit/SAELens" if len(names) == 2 else "")
    )
    for label, key, fmt in rows:
        vals = [results[n].get(key, results[n]["heldout"].get(key)) for n in names]
        line = f"{label:34}" + "".join(f"{fmt.format(v):>14}" for v in vals)
        if len(vals) == 2 and vals[1]:
            line += f"  {vals[0] / vals[1]:14.3f}"
        print(line)


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    py = None if args.skip_saelens else bench_python(Path(args.bench_venv), not args.no_setup)

    model_box: list = []
    train_cache = cached(work / "cache_train", args.tokens, "stdlib", "train", model_box)
    heldout_split = "heldout" if args.text == "stdlib" else "all"
    held_cache = cached(work / "cache_heldout", args.heldout_tokens, args.text, heldout_split, model_box)
    model_box.clear()

    steps = len(train_cache.acts(HOOK)) // args.batch_size
    warmup = max(1, round(args.warmup_fraction * steps))
    dead_tokens = args.dead_window_tokens or max(args.batch_size, steps * args.batch_size // 10)
    x_train = shuffled_training_rows(
        train_cache, steps * args.batch_size, args.seed, work / "train_shuffled.npy"
    )
    x_eval = np.ascontiguousarray(held_cache.acts(HOOK)[: len(held_cache.acts(HOOK))], dtype=np.float32)
    np.save(work / "heldout.npy", x_eval)
    width = args.expansion * x_train.shape[1]
    print(
        f"\nTopK width {width}, k {args.k}: {steps} steps x {args.batch_size} = {steps * args.batch_size:,} "
        f"tokens, lr {args.lr}, warm-up {warmup} steps, dead window {dead_tokens:,} tokens, "
        f"{torch.get_num_threads()} threads; held-out {len(x_eval):,} tokens of {args.text}"
    )

    print("\n== saekit ==", flush=True)
    sk = train_saekit(x_train, args, steps, warmup, dead_tokens, work / "saekit_run")
    results = {"saekit": summarize(sk, eval_saekit(work / "saekit_run" / "sae", x_eval))}
    if py is not None:
        print("\n== SAELens ==", flush=True)
        sl = train_saelens(py, args, width, steps, warmup, dead_tokens, sk["norm_scale"], work)
        results["SAELens"] = summarize(sl, eval_saelens(work / "saelens_run", x_eval, width))
    print_table(results)
    record = {
        "settings": {
            "model": "smollm2",
            "hook": HOOK,
            "train_text": "stdlib (train split)",
            "heldout_text": f"{args.text} ({heldout_split})",
            "heldout_tokens": len(x_eval),
            "width": width,
            "k": args.k,
            "batch_size": args.batch_size,
            "steps": steps,
            "lr": args.lr,
            "adam_betas": [args.adam_beta1, args.adam_beta2],
            "warmup_steps": warmup,
            "decay": "linear to 0 over the last 20% of steps",
            "dead_window_tokens": dead_tokens,
            "saekit_b_dec_init": args.saekit_b_dec,
            "saelens_b_dec_init": args.saelens_b_dec,
            "saelens_decoder_init_norm": args.saelens_decoder_init_norm,
            "norm_scale": sk["norm_scale"],
            "threads": torch.get_num_threads(),
            "seed": args.seed,
        },
        "results": results,
        "wall_seconds": time.perf_counter() - t_start,
    }
    if len(results) == 2:
        a, b = results["saekit"], results["SAELens"]
        record["ratio_saekit_over_saelens"] = {
            "fvu": a["heldout"]["fvu"] / b["heldout"]["fvu"],
            "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
        }
        verdict = "meets" if a["heldout"]["fvu"] <= b["heldout"]["fvu"] else "MISSES"
        print(f"\nsaekit {verdict} the bar (held-out FVU <= SAELens's at the same width, k and tokens)")
    print(f"total wall time {record['wall_seconds']:.0f} s")
    for path in [work / "result.json", *([Path(args.json)] if args.json else [])]:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
