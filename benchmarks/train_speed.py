"""Training speed, memory and quality of saekit against SAELens and sparsify, one run after another on the
same activations (issue 6).

Protocol:

1. Activations: SmolLM2-135M ``layers.15.resid_post`` (d = 576), the built-in ``stdlib`` text's train split
   for training and ``--text`` (default WikiText-2 validation from the project's shared data) for held-out
   evaluation. The caches ``topk_vs_saelens.py`` writes (``runs/bench_topk_vs_saelens/cache_*``) are reused
   when they hold enough tokens; otherwise they are extracted.
2. The training rows are shuffled once (``--seed``) into one ``.npy`` file; every trainee reads it front to
   back in batches of ``--batch-size``, so all see the same batches in the same order. The input scale s
   (E‖s x‖² = d, on the first 32,768 rows: saekit's rule and code) is computed here and given to the peers.
3. Runs: TopK (k = 32) at 8× and 32× width, ReLU+L1 and Gated at 8×. Each trainee (saekit too) is its own
   subprocess, so that its peak RSS (VmHWM, read at the end of its training loop) is its own:
   saekit with ``saekit.train.Trainer`` (this script with ``--worker-spec``), SAELens 6.54.12 with its
   ``SAETrainer`` (``_saelens_worker.py``), sparsify 1.3.3 (EleutherAI, PyPI ``eai-sparsify``) with its
   ``Trainer`` (``_sparsify_worker.py``, TopK only: sparsify has no ReLU or Gated SAE). The peers run in the
   benchmark environment ``--bench-venv``, created or extended here (pinned versions) when it lacks them.
4. Each worker times its training loop only (no setup, data-dependent initialisation or evaluation), then
   writes its held-out reconstructions and codes; this script computes held-out FVU and L0 from them with
   ``saekit.eval.metrics.ReconstructionStats``, the same code for every library.
5. The saekit worker also times the bare encoder GEMM ``x @ W_enc + b`` on one training batch at the run's
   width and reports saekit's mean step time over it: how close a step is to the cost that cannot go away.

Held equal: width, k, training tokens and their order, batch size, Adam (lr, betas, eps), the learning-rate
schedule (linear warm-up over 5% of the steps, constant, linear decay to 0 over the last 20%), the
dead-latent window in tokens, torch threads, the input scale, the L1 coefficient of ReLU+L1 and Gated. Every
other choice is each library's own default; :data:`DIFFERENCES` lists them and the output prints them.

    .venv/bin/python benchmarks/train_speed.py [--quick] [--runs topk-8x topk-32x relu-8x gated-8x] \\
        [--libraries saekit SAELens sparsify] [--tokens 200000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_HELDOUT,
    HOOK,
    REPO,
    NpyRows,
    OutputWriter,
    bench_python,
    ensure_cache,
    iter_outputs,
    peak_rss_mb,
    rss_now_mb,
    shuffled_training_rows,
    worker_env,
)

RUNS: dict[str, tuple[str, int]] = {  # name -> (architecture, expansion factor)
    "topk-8x": ("topk", 8),
    "topk-32x": ("topk", 32),
    "relu-8x": ("relu", 8),
    "gated-8x": ("gated", 8),
}
LIBRARIES = ("saekit", "SAELens", "sparsify")
PEERS = {"topk": ("SAELens", "sparsify"), "relu": ("SAELens",), "gated": ("SAELens",)}
SAELENS_ARCH = {"topk": "topk", "relu": "standard", "gated": "gated"}
INIT_TOKENS = 32_768  # saekit's TrainConfig.init_tokens: rows the input scale and b_dec are estimated on
# The dead-latent window every trainee gets. A window shorter than the gaps between a rare latent's firings
# makes AuxK retrain latents that are only quiet (with a tenth of a 10^5-token run, 46 % of saekit's latents
# at 32x counted as dead): 10M tokens is Gao et al.'s, saekit's and sparsify's default.
DEAD_WINDOW_TOKENS = 10_000_000

DIFFERENCES = [
    "saekit TopK: unit-norm decoder, W_enc = W_dec^T / sqrt(3) init, geometric-median b_dec, MSE (mean over "
    "dims) + AuxK normalised by the residual variance (alpha 1/32, k_aux d/2), sparse decode, no gradient "
    "clipping",
    "SAELens TopK: decoder rows initialised at norm 0.1 with rescale_acts_by_decoder_norm, b_dec 0, summed "
    "squared error + unnormalised AuxK (coefficient 1), gradient-norm clipping at 1, dense decode",
    "sparsify TopK: nn.Linear encoder init with W_dec = W_enc (unit rows), b_dec = mean of the first batch, "
    "loss = FVU of the batch, AuxK off (its default auxk_alpha 0; --sparsify-auxk-alpha), FusedEncoder "
    "(backward over the k selected latents only) and embedding_bag decode; its default optimizer is "
    "schedule-free signum, replaced by the shared Adam and schedule (--sparsify-optimizer signum: its own)",
    "ReLU+L1: saekit's unit-norm decoder with plain L1 on f; SAELens's StandardTrainingSAE with L1 weighted "
    "by decoder norms (free decoder, rows initialised at norm 0.1); both SSE summed over dims, same lambda",
    "Gated: saekit shares one GEMM between gate and magnitude paths and freezes the decoder in the auxiliary "
    "term; SAELens computes the gate GEMM twice (forward and aux loss) plus the magnitude GEMM and lets aux "
    "gradients reach the decoder; L1 weighted by decoder norms in SAELens, plain (unit-norm rows) in saekit",
    "every library keeps its own dead-latent bookkeeping (same window; before a window's worth of tokens "
    "saekit counts a latent that has never fired as dead, so its AuxK can act within the run, while the "
    "peers count none), logging and checkpoint-free loop; the peers' "
    "progress bars (tqdm) stay on, saekit's is off (its default in library use is on)",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens per trainee")
    ap.add_argument("--heldout-tokens", type=int, default=16_384, help="held-out tokens to evaluate on")
    ap.add_argument(
        "--quick", action="store_true", help="development run: 16,384 training and 4,096 held-out tokens"
    )
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs")
    ap.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    ap.add_argument("--text", default=None, help=f"held-out text (default: {DEFAULT_HELDOUT} if present)")
    ap.add_argument("--k", type=int, default=32, help="TopK: active latents per token")
    ap.add_argument(
        "--saekit-init-encoder-scale",
        type=float,
        default=None,
        help="saekit TopK init_encoder_scale (default: saekit's, 1/sqrt(3); Gao et al.: 1)",
    )
    ap.add_argument("--relu-l1", type=float, default=1.0, help="ReLU+L1: lambda (saekit's default)")
    ap.add_argument("--gated-l1", type=float, default=3.0, help="Gated: lambda (saekit's default)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-4, help="Adam lr (saekit's and SAELens's default)")
    ap.add_argument("--adam-beta1", type=float, default=0.9)
    ap.add_argument("--adam-beta2", type=float, default=0.999)
    ap.add_argument("--warmup-fraction", type=float, default=0.05, help="linear lr warm-up, share of steps")
    ap.add_argument(
        "--dead-window-tokens",
        type=int,
        default=DEAD_WINDOW_TOKENS,
        help="dead-latent window in tokens (default 10M: Gao et al.'s, saekit's and sparsify's default)",
    )
    ap.add_argument(
        "--sparsify-optimizer",
        choices=("adam", "signum"),
        default="adam",
        help="adam: the shared Adam, lr and schedule; signum: sparsify's own default (schedule-free "
        "sign-SGD, lr 5e-3/sqrt(M/2^14))",
    )
    ap.add_argument(
        "--sparsify-auxk-alpha", type=float, default=0.0, help="sparsify's auxk_alpha (its default 0)"
    )
    ap.add_argument("--gemm-seconds", type=float, default=1.0, help="time budget of the GEMM baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for all (0 = torch's default)")
    ap.add_argument(
        "--cache-dir",
        default=str(REPO / "runs" / "bench_topk_vs_saelens"),
        help="folder of cache_train/ and cache_heldout/ (shared with topk_vs_saelens.py)",
    )
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "bench_train_speed"))
    ap.add_argument("--bench-venv", default=str(REPO / ".bench-venv"), help="environment of the peers")
    ap.add_argument("--no-setup", action="store_true", help="fail instead of creating/extending the venv")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)  # internal: run saekit's trainee
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.heldout_tokens = 16_384, 4_096
    if args.tokens < args.batch_size:
        raise SystemExit(f"--tokens {args.tokens} is less than one batch of {args.batch_size}")
    if args.text is None:
        args.text = str(DEFAULT_HELDOUT) if DEFAULT_HELDOUT.is_file() else "stdlib"
    return args


# -- the saekit trainee (runs in its own process, like the peers) ------------------------------------------
def build_saekit_sae(spec: dict[str, Any]):
    """saekit's SAE of ``spec['arch']`` with its defaults except width, k and lambda."""
    from saekit.sae.gated import GatedConfig, GatedSAE
    from saekit.sae.relu import ReLUConfig, ReLUSAE
    from saekit.sae.topk import TopKConfig, TopKSAE

    d, width = spec["d"], spec["width"]
    if spec["arch"] == "topk":
        scale = spec.get("init_encoder_scale")
        extra = {} if scale is None else {"init_encoder_scale": scale}
        return TopKSAE(TopKConfig(d_in=d, width=width, k=spec["k"], **extra))
    if spec["arch"] == "relu":
        return ReLUSAE(ReLUConfig(d_in=d, width=width, l1_coeff=spec["l1"]))
    if spec["arch"] == "gated":
        return GatedSAE(GatedConfig(d_in=d, width=width, l1_coeff=spec["l1"]))
    raise ValueError(f"unknown architecture {spec['arch']!r}")


def time_gemm(x_BD, W_DM, b_M, budget_s: float) -> float:
    """Median seconds of ``x @ W + b`` (one addmm, no autograd), repeated for about ``budget_s``."""
    import torch

    with torch.no_grad():
        for _ in range(2):  # warm-up: first calls allocate and pick kernels
            torch.addmm(b_M, x_BD, W_DM)
        times: list[float] = []
        t_end = time.perf_counter() + budget_s
        while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
            t0 = time.perf_counter()
            torch.addmm(b_M, x_BD, W_DM)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saekit_worker(spec_path: str) -> None:
    """Train one saekit SAE as ``spec_path`` says, time its loop and the bare encoder GEMM, write outputs."""
    import torch

    import saekit
    from saekit.train import TrainConfig, Trainer

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(spec["threads"])
    rows = NpyRows(spec["train"])
    spec["d"] = rows.shape[1]
    b, steps = spec["batch_size"], spec["steps"]
    torch.manual_seed(spec["seed"])  # the initial weights (the trainer seeds only what follows)
    sae = build_saekit_sae(spec)
    cfg = TrainConfig(
        total_tokens=steps * b,
        batch_size=b,
        lr=spec["lr"],
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        warmup_steps=spec["warmup_steps"],
        decay="linear",
        decay_start_fraction=0.8,
        final_lr_fraction=0.0,
        init_tokens=min(INIT_TOKENS, steps * b),
        dead_tokens=spec["dead_tokens"],
        checkpoint_every=0,
        log_every=max(1, steps // 20),
        eval_every=steps,  # one on_eval call, after the last step: reads the peak RSS of the loop
        seed=spec["seed"],
        threads=spec["threads"],
        progress=False,
    )
    loop_peak: dict[str, float] = {}

    def at_end(trainer: Trainer, step: int) -> None:
        loop_peak["mb"] = peak_rss_mb()

    def source(skip_batches: int):
        return (torch.from_numpy(block) for block in rows.batches(b, start_batch=skip_batches))

    rss_before = rss_now_mb()
    summary = Trainer(sae, cfg, out / "run", on_eval=at_end).fit(source)

    x_BD = torch.from_numpy(rows.read(0, b)) * summary["norm_scale"]
    W_DM = sae.W_enc.detach()
    gemm_s = time_gemm(x_BD, W_DM, torch.zeros(W_DM.shape[1]), spec["gemm_seconds"])
    step_s = summary["train_seconds"] / summary["steps"]

    folded = saekit.load(out / "run" / "sae").eval()
    writer = OutputWriter(out, spec["width"])
    with torch.no_grad():
        for chunk in NpyRows(spec["heldout"]).chunks(1024):
            x = torch.from_numpy(chunk)
            f = folded.encode(x)
            writer.add_dense(folded.decode(f).numpy(), f.numpy())
    writer.close()
    result = {
        "library": "saekit",
        "version": saekit.__version__,
        "torch": torch.__version__,
        "arch": spec["arch"],
        "width": spec["width"],
        "threads": torch.get_num_threads(),
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "peak_rss_mb": loop_peak["mb"],
        "rss_before_train_mb": rss_before,
        "dead_train_fraction": summary["dead_fraction"],
        "norm_scale": summary["norm_scale"],
        "step_seconds": step_s,
        "gemm_seconds": gemm_s,
        "step_over_gemm": step_s / gemm_s,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens", "train_seconds", "tokens_per_s", "peak_rss_mb")}))


# -- the orchestrator ---------------------------------------------------------------------------------------
def input_scale(x_ND: np.ndarray) -> float:
    """s with E‖s x‖² = d on the rows saekit's trainer estimates it from, with saekit's own function."""
    import torch

    from saekit.activations.normalize import estimate_norm_scale

    rows = torch.from_numpy(x_ND[:INIT_TOKENS])
    return float(estimate_norm_scale([rows], d=rows.shape[1], max_rows=rows.shape[0]))


def worker_command(lib: str, arch: str, width: int, out: Path, ctx: dict[str, Any], py: Path | None):
    """The command line of one trainee."""
    args, steps = ctx["args"], ctx["steps"]
    common = {"train": str(ctx["train"]), "heldout": str(ctx["heldout"]), "out": str(out)}
    if lib == "saekit":
        spec = {
            **common,
            "arch": arch,
            "width": width,
            "k": args.k,
            "init_encoder_scale": args.saekit_init_encoder_scale,
            "l1": args.relu_l1 if arch == "relu" else args.gated_l1,
            "steps": steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "betas": [args.adam_beta1, args.adam_beta2],
            "warmup_steps": ctx["warmup"],
            "dead_tokens": ctx["dead_tokens"],
            "seed": args.seed,
            "threads": ctx["threads"],
            "gemm_seconds": args.gemm_seconds,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        return [sys.executable, str(Path(__file__).resolve()), "--worker-spec", str(out / "spec.json")]
    assert py is not None
    shared = [
        "--train", common["train"], "--heldout", common["heldout"], "--out", common["out"],
        "--width", str(width), "--steps", str(steps), "--batch-size", str(args.batch_size),
        "--scale", repr(ctx["scale"]), "--seed", str(args.seed), "--threads", str(ctx["threads"]),
    ]  # fmt: skip
    if lib == "SAELens":
        cmd = [
            str(py),
            str(REPO / "benchmarks" / "_saelens_worker.py"),
            *shared,
            "--arch",
            SAELENS_ARCH[arch],
        ]
        cmd += ["--k", str(args.k)] if arch == "topk" else []
        if arch != "topk":
            cmd += ["--l1-coefficient", repr(args.relu_l1 if arch == "relu" else args.gated_l1)]
        return cmd + [
            "--lr", repr(args.lr), "--adam-beta1", repr(args.adam_beta1),
            "--adam-beta2", repr(args.adam_beta2), "--warmup-steps", str(ctx["warmup"]),
            "--decay-steps", str(steps - int(0.8 * steps)),
            "--dead-window-steps", str(max(1, ctx["dead_tokens"] // args.batch_size)),
        ]  # fmt: skip
    cmd = [str(py), str(REPO / "benchmarks" / "_sparsify_worker.py"), *shared, "--k", str(args.k)]
    cmd += ["--optimizer", args.sparsify_optimizer, "--dead-tokens", str(ctx["dead_tokens"])]
    cmd += ["--auxk-alpha", repr(args.sparsify_auxk_alpha)]
    if args.sparsify_optimizer == "adam":
        cmd += ["--lr", repr(args.lr), "--warmup-steps", str(ctx["warmup"])]
    return cmd


def heldout_metrics(out: Path, x_eval: np.ndarray, width: int) -> dict[str, float]:
    """Held-out metrics of a worker's outputs, computed with saekit's ReconstructionStats."""
    import torch

    from saekit.eval.metrics import ReconstructionStats

    stats = ReconstructionStats()
    for sl, x_hat, f in iter_outputs(out, width):
        stats.update(torch.from_numpy(x_eval[sl]), x_hat, f)
    r = stats.result()
    return {k: r[k] for k in ("fvu", "mse", "l0", "dead_fraction", "cosine")}


def run_trainee(lib: str, run: str, arch: str, width: int, ctx: dict[str, Any], py: Path | None) -> dict:
    out = Path(ctx["work"]) / run / lib
    if out.exists():
        shutil.rmtree(out)  # a saekit checkpoint left there would be resumed instead of a fresh run
    cmd = worker_command(lib, arch, width, out, ctx, py)
    print(f"\n== {run}: {lib} ==", flush=True)
    env = dict(os.environ) if lib == "saekit" else worker_env()
    subprocess.run(cmd, check=True, env=env)
    result = json.loads((out / "result.json").read_text())
    if lib == "saekit" and abs(result["norm_scale"] / ctx["scale"] - 1) > 1e-5:
        print(f"warning: saekit's trainer used input scale {result['norm_scale']}, the peers {ctx['scale']}")
    result["heldout"] = heldout_metrics(out, ctx["x_eval"], width)
    result["run"] = run
    return result


def ratio_rows(results: list[dict]) -> list[dict]:
    """Table rows: one per trainee, with saekit/peer tokens/s on each peer's row."""
    rows = []
    for r in results:
        sk = next((s for s in results if s["run"] == r["run"] and s["library"] == "saekit"), None)
        ratio = sk["tokens_per_s"] / r["tokens_per_s"] if sk and r["library"] != "saekit" else None
        rows.append({**r, "ratio": ratio})
    return rows


def format_table(results: list[dict]) -> str:
    """The results as a Markdown table (pasted as is into docs/performance.md)."""
    head = (
        "| run | library | width | tokens/s | peak RSS MB | RSS before loop MB | held-out FVU | L0 "
        "| saekit/peer tokens/s |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ratio_rows(results):
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else ""
        lines.append(
            f"| {r['run']} | {r['library']} | {r['width']:,} | {r['tokens_per_s']:,.0f} | "
            f"{r['peak_rss_mb']:,.0f} | {r['rss_before_train_mb']:,.0f} | {r['heldout']['fvu']:.4f} | "
            f"{r['heldout']['l0']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def format_gemm(results: list[dict]) -> str:
    lines = [
        "| run | width | saekit step ms | encoder GEMM ms | step / GEMM |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["library"] == "saekit":
            lines.append(
                f"| {r['run']} | {r['width']:,} | {1e3 * r['step_seconds']:.1f} | "
                f"{1e3 * r['gemm_seconds']:.1f} | {r['step_over_gemm']:.2f} |"
            )
    return "\n".join(lines)


def verdicts(results: list[dict]) -> list[str]:
    """The issue's bars, each 'meets' or 'MISSES' with its figures (only for the runs that were made)."""
    out: list[str] = []
    by_run: dict[str, dict[str, dict]] = {}
    for r in results:
        by_run.setdefault(r["run"], {})[r["library"]] = r
    for run, libs in by_run.items():
        sk = libs.get("saekit")
        peers = {k: v for k, v in libs.items() if k != "saekit"}
        if sk is None or not peers:
            continue
        arch = RUNS[run][0]
        if arch == "topk":
            fastest = max(peers.values(), key=lambda p: p["tokens_per_s"])
            ratio = sk["tokens_per_s"] / fastest["tokens_per_s"]
            ok = ratio >= 2
            out.append(
                f"{'meets' if ok else 'MISSES'}: {run} tokens/s >= 2x the faster peer "
                f"({fastest['library']}): {ratio:.2f}x"
            )
            worst = [p["library"] for p in peers.values() if sk["heldout"]["fvu"] > p["heldout"]["fvu"]]
            fvus = ", ".join(f"{k} {v['heldout']['fvu']:.4f}" for k, v in peers.items())
            out.append(
                f"{'meets' if not worst else 'MISSES'}: {run} held-out FVU <= every peer's "
                f"(saekit {sk['heldout']['fvu']:.4f}; {fvus})"
            )
        else:
            ratio = sk["tokens_per_s"] / peers["SAELens"]["tokens_per_s"] if "SAELens" in peers else None
            if ratio is not None:
                out.append(
                    f"{'meets' if ratio >= 1 else 'MISSES'}: {run} not slower than SAELens: {ratio:.2f}x"
                )
        heavier = [k for k, v in peers.items() if sk["peak_rss_mb"] >= v["peak_rss_mb"]]
        rss = ", ".join(f"{k} {v['peak_rss_mb']:,.0f}" for k, v in peers.items())
        out.append(
            f"{'meets' if not heavier else 'MISSES'}: {run} peak RSS below the peers' "
            f"(saekit {sk['peak_rss_mb']:,.0f} MB; {rss})"
        )
    for r in results:
        if r["library"] == "saekit" and r["run"] == "topk-32x":
            verdict = "meets" if r["step_over_gemm"] <= 1.5 else "MISSES"
            out.append(f"{verdict}: topk-32x step <= 1.5x encoder GEMM: {r['step_over_gemm']:.2f}x")
    return out


def main() -> None:
    args = parse_args()
    if args.worker_spec:
        saekit_worker(args.worker_spec)
        return
    import torch

    t_start = time.perf_counter()
    threads = args.threads or torch.get_num_threads()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    peers_needed = sorted({p for run in args.runs for p in PEERS[RUNS[run][0]] if p in args.libraries})
    need = tuple({"SAELens": "sae_lens", "sparsify": "sparsify"}[p] for p in peers_needed)
    py = bench_python(Path(args.bench_venv), not args.no_setup, need) if need else None

    model_box: list = []
    cache_dir = Path(args.cache_dir)
    train_cache = ensure_cache(cache_dir / "cache_train", args.tokens, "stdlib", "train", model_box)
    heldout_split = "heldout" if args.text == "stdlib" else "all"
    held_cache = ensure_cache(
        cache_dir / "cache_heldout", args.heldout_tokens, args.text, heldout_split, model_box
    )
    model_box.clear()

    steps = args.tokens // args.batch_size
    warmup = max(1, round(args.warmup_fraction * steps))
    x_train = shuffled_training_rows(
        train_cache, steps * args.batch_size, args.seed, work / "train_shuffled.npy"
    )
    scale = input_scale(x_train)
    d = x_train.shape[1]
    del x_train
    x_eval = np.ascontiguousarray(held_cache.acts(HOOK)[: args.heldout_tokens], dtype=np.float32)
    np.save(work / "heldout.npy", x_eval)
    ctx = {
        "args": args,
        "steps": steps,
        "warmup": warmup,
        "dead_tokens": args.dead_window_tokens,
        "threads": threads,
        "scale": scale,
        "work": work,
        "train": work / "train_shuffled.npy",
        "heldout": work / "heldout.npy",
        "x_eval": x_eval,
    }
    print(
        f"\n{steps} steps x {args.batch_size} = {steps * args.batch_size:,} training tokens of d = {d}; "
        f"Adam lr {args.lr}, warm-up {warmup} steps, dead window {args.dead_window_tokens:,} tokens, "
        f"input scale {scale:.5f}, {threads} threads; held-out {len(x_eval):,} tokens of {args.text}"
        + (" [QUICK RUN]" if args.quick else "")
    )

    results = []
    for run in args.runs:
        arch, expansion = RUNS[run]
        for lib in ("saekit", *PEERS[arch]):
            if lib in args.libraries:
                results.append(run_trainee(lib, run, arch, expansion * d, ctx, py))

    print("\nTraining speed (loop only), peak RSS of each trainee's process, held-out FVU and L0\n")
    print(format_table(results))
    if any(r["library"] == "saekit" for r in results):
        print("\nsaekit's mean step time against the bare encoder GEMM x @ W_enc + b (same batch, width)\n")
        print(format_gemm(results))
    bars = verdicts(results)
    if bars:
        print("\nThe issue's bars:")
        print("\n".join(f"  {b}" for b in bars))
    print("\nWhat differs between the libraries (each keeps its own defaults):")
    print("\n".join(f"  - {line}" for line in DIFFERENCES))
    record = {
        "settings": {
            "model": "smollm2",
            "hook": HOOK,
            "quick": args.quick,
            "train_text": "stdlib (train split)",
            "heldout_text": f"{args.text} ({heldout_split})",
            "heldout_tokens": len(x_eval),
            "tokens": steps * args.batch_size,
            "steps": steps,
            "batch_size": args.batch_size,
            "k": args.k,
            "saekit_init_encoder_scale": args.saekit_init_encoder_scale,
            "relu_l1": args.relu_l1,
            "gated_l1": args.gated_l1,
            "lr": args.lr,
            "adam_betas": [args.adam_beta1, args.adam_beta2],
            "warmup_steps": warmup,
            "decay": "linear to 0 over the last 20% of steps",
            "dead_window_tokens": args.dead_window_tokens,
            "input_scale": scale,
            "threads": threads,
            "seed": args.seed,
            "sparsify_optimizer": args.sparsify_optimizer,
            "sparsify_auxk_alpha": args.sparsify_auxk_alpha,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "results": ratio_rows(results),
        "bars": bars,
        "differences": DIFFERENCES,
        "wall_seconds": time.perf_counter() - t_start,
    }
    print(f"\ntotal wall time {record['wall_seconds']:.0f} s")
    for path in [work / "result.json", *([Path(args.json)] if args.json else [])]:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
