"""The SAE-core claims on SmolLM2 activations: Gated against ReLU+L1 at matched L0 (FVU and shrinkage γ),
and JumpReLU's L0 against the L0 it is tuned for.

Protocol: one training cache (SmolLM2-135M ``layers.15.resid_post``, built-in ``stdlib`` text, train split)
and one held-out cache (``--text``, default WikiText-2 validation from the project's shared data: text saekit
was not developed on). Every SAE is 8× wide, trained with saekit's Trainer for the same tokens, batch size,
Adam settings and schedule, then evaluated on the held-out activations with ``ReconstructionStats``
(centred FVU, L0, γ = E‖x̂‖²/E⟨x, x̂⟩). ReLU+L1 and Gated are swept over their L1 coefficient; ReLU's FVU
and γ at each Gated run's L0 are interpolated (linearly in log L0) between the two ReLU runs around it.

    python benchmarks/core_claims.py [--tokens 200000] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from saekit.activations import open_cache
from saekit.eval.metrics import sae_reconstruction
from saekit.jobs import ExtractConfig, run_cache
from saekit.sae import get_architecture
from saekit.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
HOOK = "layers.15.resid_post"
DEFAULT_HELDOUT = REPO.parent / "shared" / "data" / "wikitext2_valid.txt"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens per SAE")
    ap.add_argument("--heldout-tokens", type=int, default=16_384)
    ap.add_argument("--quick", action="store_true", help="smoke run: 32k training tokens, 4k held out")
    ap.add_argument("--text", default=str(DEFAULT_HELDOUT), help="held-out text")
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "bench_core"))
    ap.add_argument("--relu-l1", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--gated-l1", type=float, nargs="*", default=[1.5, 3.0, 6.0])
    ap.add_argument("--jumprelu-l0", type=float, nargs="*", default=[32.0])
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--train-cache", default=None, help="reuse this cache of stdlib (train split) activations at HOOK"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.heldout_tokens = 32_768, 4_096
    return args


def cache(work: Path, name: str, text: str, split: str, n_tokens: int):
    extract = ExtractConfig(hook=[HOOK], text=text, split=split)
    return run_cache(extract, n_tokens, work / name)


def train(arch: str, sae_opts: dict, x_source, d_in: int, args, out: Path):
    arch_cls = get_architecture(arch)
    torch.manual_seed(0)
    sae = arch_cls(arch_cls.config_class.from_dict({"d_in": d_in, "width": 8 * d_in, **sae_opts}))
    steps = args.tokens // args.batch_size
    # The GDM recipe for Gated and JumpReLU (Adam beta1 = 0) is used for every run, so only the SAE differs.
    cfg = TrainConfig(
        total_tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        adam_beta1=0.0,
        warmup_steps=max(1, steps // 20),
        sparsity_warmup_steps=max(1, steps // 10),
        log_every=max(1, steps // 10),
        checkpoint_every=0,
        progress=False,
        dead_tokens=args.tokens // 10,
    )
    t0 = time.perf_counter()
    Trainer(sae, cfg, out).fit(x_source)
    from saekit.sae import load_sae

    return load_sae(out / "sae"), time.perf_counter() - t0


@torch.no_grad()
def evaluate(sae, x_ND: np.ndarray) -> dict:
    r = sae_reconstruction(sae, torch.from_numpy(x_ND))
    return {k: r[k] for k in ("l0", "fvu", "relative_reconstruction_bias", "dead_fraction")}


def interpolate_at_l0(points: list[dict], l0: float, key: str) -> float | None:
    """``key`` of the sweep at ``l0``, linear in log L0 between the two neighbours (None outside)."""
    pts = sorted(points, key=lambda p: p["l0"])
    for lo, hi in zip(pts, pts[1:], strict=False):
        if lo["l0"] <= l0 <= hi["l0"]:
            t = (math.log(l0) - math.log(lo["l0"])) / (math.log(hi["l0"]) - math.log(lo["l0"]))
            return lo[key] + t * (hi[key] - lo[key])
    return None


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir)
    t_start = time.perf_counter()
    if args.train_cache:
        train_cache = open_cache(args.train_cache)
        if train_cache.n_tokens < args.tokens or HOOK not in train_cache.hooks:
            raise SystemExit(f"{args.train_cache} lacks {args.tokens:,} tokens at {HOOK}")
    else:
        train_cache = cache(work, f"train_{args.tokens}", "stdlib", "train", args.tokens)
    held_cache = cache(work, f"heldout_{args.heldout_tokens}", args.text, "all", args.heldout_tokens)
    x_eval = np.ascontiguousarray(held_cache.acts(HOOK)[: held_cache.n_tokens], dtype=np.float32)
    d_in = x_eval.shape[1]
    train_cache = open_cache(train_cache.dir)

    def source(skip_batches: int):
        return train_cache.batches(HOOK, args.batch_size, seed=0, skip_batches=skip_batches)

    runs = [("relu", {"l1_coeff": c}) for c in args.relu_l1]
    runs += [("gated", {"l1_coeff": c}) for c in args.gated_l1]
    runs += [("jumprelu", {"target_l0": t}) for t in args.jumprelu_l0]
    results = []
    for arch, opts in runs:
        name = f"{arch}_" + "_".join(f"{k}{v:g}" for k, v in opts.items())
        out = work / "runs" / f"{name}_{args.tokens}"
        if (out / "checkpoint.pt").exists():
            (out / "checkpoint.pt").unlink()  # always retrain: the figures are timed
        sae, seconds = train(arch, opts, source, d_in, args, out)
        row = {"arch": arch, **opts, **evaluate(sae, x_eval), "train_seconds": seconds}
        results.append(row)
        print(json.dumps(row), flush=True)

    relu = [r for r in results if r["arch"] == "relu"]
    claims = []
    print(f"\n{'run':28} {'L0':>8} {'FVU':>8} {'gamma':>7} {'dead':>6}")
    for r in results:
        label = r["arch"] + " " + ", ".join(f"{k}={r[k]:g}" for k in ("l1_coeff", "target_l0") if k in r)
        print(f"{label:28} {r['l0']:8.1f} {r['fvu']:8.4f} {r['relative_reconstruction_bias']:7.3f} "
              f"{r['dead_fraction']:6.3f}")  # fmt: skip
    print("\nGated against ReLU+L1 at the same L0 (ReLU interpolated in log L0):")
    for g in (r for r in results if r["arch"] == "gated"):
        fvu, gamma = (interpolate_at_l0(relu, g["l0"], k) for k in ("fvu", "relative_reconstruction_bias"))
        if fvu is None:
            print(f"  gated λ={g['l1_coeff']:g}: L0 {g['l0']:.1f} is outside the ReLU sweep's L0 range")
            continue
        claim = {
            "gated_l1": g["l1_coeff"],
            "l0": g["l0"],
            "fvu_gated": g["fvu"],
            "fvu_relu_at_l0": fvu,
            "gamma_gated": g["relative_reconstruction_bias"],
            "gamma_relu_at_l0": gamma,
            "lower_fvu": g["fvu"] < fvu,
            "gamma_closer_to_1": abs(g["relative_reconstruction_bias"] - 1) < abs(gamma - 1),
        }
        claims.append(claim)
        print(
            f"  L0 {g['l0']:6.1f}: FVU gated {g['fvu']:.4f} vs relu {fvu:.4f} "
            f"({'lower' if claim['lower_fvu'] else 'NOT lower'}); γ gated {claim['gamma_gated']:.3f} vs relu "
            f"{gamma:.3f} ({'closer to 1' if claim['gamma_closer_to_1'] else 'NOT closer to 1'})"
        )
    print("\nJumpReLU against its target L0:")
    for j in (r for r in results if r["arch"] == "jumprelu"):
        err = abs(j["l0"] - j["target_l0"]) / j["target_l0"]
        claims.append({"jumprelu_target_l0": j["target_l0"], "l0": j["l0"], "relative_error": err})
        print(
            f"  target {j['target_l0']:g}: L0 {j['l0']:.1f} ({100 * err:.0f}% off; within 20%: {err <= 0.2})"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "runs": results, "claims": claims}, indent=2)
        )


if __name__ == "__main__":
    main()
