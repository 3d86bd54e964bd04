"""What one training step costs: saekit's step against the bare encoder GEMM and against plain autograd.

For each width M (``--widths``, multiples of d) on a random batch shaped like SmolLM2-135M residuals
(d = 576, standard normal, so E‖x‖² = d as after saekit's normalisation), it times:

* ``encoder GEMM``: the bare x W_enc + b_enc, (N, d) × (d, M), the floor of any TopK step (every
  selection needs every pre-activation);
* ``saekit step``: one whole training step as ``saekit.train.Trainer._train_step`` takes it: the SAE's
  forward, backward, the decoder-constraint hooks, an Adam step, and the firing statistics the trainer
  reads (dead latents, L0), with ``--dead`` of the latents marked dead so that AuxK runs;
* ``plain autograd``: the same loss written the obvious way (dense pre-activations, dense code, f W_dec,
  AuxK from the dense matrix, ``f != 0`` for the statistics), with the same optimizer step: the dense path
  that saekit's sparse TopK path and lean dense steps replace.

TopK runs at every width; ReLU+L1, Gated and JumpReLU at ``--dense-widths`` (their steps are dense GEMMs
either way: saekit's gain there is the work autograd wastes, not FLOPs). Each figure is the median of
``--repeats`` runs after one warm-up.

    .venv/bin/python benchmarks/step_cost.py                 # d=576, k=32, batch 4096, M = 8d and 32d
    .venv/bin/python benchmarks/step_cost.py --quick         # batch 1024, M = 8d: seconds

On a shared machine two-thread timings swing from run to run; compare the ratios printed on one line,
which come from interleaved runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from saekit.sae import StepContext
from saekit.sae.base import SAE
from saekit.sae.common import auxk_loss, topk_code
from saekit.sae.gated import GatedConfig, GatedSAE
from saekit.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saekit.sae.relu import ReLUConfig, ReLUSAE
from saekit.sae.topk import TopKConfig, TopKSAE
from saekit.train.allocator import retain_freed_memory
from saekit.train.trainer import AdamAliases


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576, help="input width (SmolLM2-135M: 576)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 32], help="TopK widths, as multiples of d")
    ap.add_argument(
        "--dense-widths", type=int, nargs="*", default=[8], help="ReLU/Gated/JumpReLU widths (×d)"
    )
    ap.add_argument("--dead", type=float, default=0.05, help="fraction of latents marked dead (AuxK runs)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each step (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="batch 1024, widths 8d only, one timed run")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.widths, args.dense_widths, args.repeats = 1024, [8], [8], 1
    return args


# -- the plain-autograd references: each SAE's loss written the obvious way ---------------------------------
def naive_topk(sae: TopKSAE, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = topk_code(pre, sae.cfg.k)
    x_hat = f @ sae.W_dec + sae.b_dec
    loss = (x - x_hat).pow(2).mean()
    if ctx.dead_mask is not None:
        loss = loss + sae.cfg.aux_coeff * auxk_loss(
            pre, ctx.dead_mask, x - x_hat, sae.W_dec, sae.cfg.k_aux_resolved
        )
    return loss, f


def naive_relu(sae: ReLUSAE, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    return (x - x_hat).pow(2).sum(-1).mean() + sae.cfg.l1_coeff * f.sum(-1).mean(), f


def naive_gated(sae: GatedSAE, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x - sae.b_dec
    pi_gate = xc @ sae.W_enc + sae.b_gate
    pi_mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)
    x_hat = f @ sae.W_dec + sae.b_dec
    via = torch.relu(pi_gate)
    aux = (x - via @ sae.W_dec.detach() - sae.b_dec.detach()).pow(2).sum(-1).mean()
    return (x - x_hat).pow(2).sum(-1).mean() + sae.cfg.l1_coeff * via.sum(-1).mean() + aux, f


def naive_jumprelu(sae: JumpReLUSAE, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    from saekit.sae.common import jumprelu, step  # the separate straight-through estimators

    pre = x @ sae.W_enc + sae.b_enc
    theta = sae.log_threshold.exp()
    f = jumprelu(pre, theta, sae.cfg.bandwidth)
    x_hat = f @ sae.W_dec + sae.b_dec
    l0 = step(pre, theta, sae.cfg.bandwidth).sum(-1).mean()
    return (x - x_hat).pow(2).sum(-1).mean() + sae.cfg.l0_coeff * l0, f


# -- one training step, as the trainer takes it ------------------------------------------------------------
def saekit_step(
    sae: SAE, opt: torch.optim.Optimizer, aliases: AdamAliases, x: torch.Tensor, ctx: StepContext
) -> None:
    out = sae(x, ctx)
    opt.zero_grad(set_to_none=True)
    sae.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.before_optimizer_step()
    aliases.take_grads()  # as the trainer does: Adam steps a latent-major W_enc through its alias
    opt.step()
    sae.after_optimizer_step()
    with torch.no_grad():
        fired_M, l0 = out.firing()
        fired_M.sum().item(), l0.item()


def naive_step(
    naive: Callable, sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor, ctx: StepContext
) -> None:
    loss, f = naive(sae, x, ctx)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()
    with torch.no_grad():
        fired = f != 0
        fired.any(0).sum().item(), fired.sum(1).float().mean().item()


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, the functions interleaved run by run (one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(
    arch: str, sae: SAE, naive: Callable, x: torch.Tensor, dead: float, repeats: int
) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    dead_mask = torch.rand(sae.width, generator=g) < dead
    ctx = StepContext(dead_mask=dead_mask)
    # the trainer's optimizer (fused Adam, a transposed parameter stepped through a contiguous alias) for
    # saekit; fused Adam on the parameters themselves for plain autograd, whose W_enc gradient is (d, M).
    # Tiny steps: the weights stay where they started.
    aliases = AdamAliases(sae.parameters())
    opt = torch.optim.Adam(aliases.stepped(sae.parameters()), lr=1e-5, fused=True)
    opt_naive = torch.optim.Adam(sae.parameters(), lr=1e-5, fused=True)
    W, b = sae.W_enc.detach(), torch.zeros(sae.width)
    fns: dict[str, Callable[[], object]] = {
        "gemm": lambda: torch.addmm(b, x, W),
        "saekit": lambda: saekit_step(sae, opt, aliases, x, ctx),
        "naive": lambda: naive_step(naive, sae, opt_naive, x, ctx),
    }
    return median_seconds(fns, repeats)


def main() -> None:
    args = parse_args()
    retain_freed_memory()  # as saekit.train.Trainer does on CPU
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, n = args.d, args.batch
    x = torch.randn(n, d)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"d={d} k={args.k} batch={n} threads={args.threads} torch {torch.__version__}; load {load:.1f}")
    if load > os.cpu_count():  # type: ignore[operator]
        print("  (the machine is busy: timings are noisy; read the ratios)")
    print(
        f"{'arch':<9}{'M':>7}  {'GEMM s':>8}  {'saekit s':>9}  {'autograd s':>10}  "
        f"{'saekit/GEMM':>11}  {'autograd/saekit':>15}  {'tok/s saekit':>12}  {'tok/s autograd':>14}"
    )
    runs = [("topk", w) for w in args.widths] + [
        (a, w) for w in args.dense_widths for a in ("relu", "gated", "jumprelu")
    ]
    for arch, mult in runs:
        m = mult * d
        if arch == "topk":
            sae, naive = TopKSAE(TopKConfig(d_in=d, width=m, k=args.k)), naive_topk
        elif arch == "relu":
            sae, naive = ReLUSAE(ReLUConfig(d_in=d, width=m)), naive_relu
        elif arch == "gated":
            sae, naive = GatedSAE(GatedConfig(d_in=d, width=m)), naive_gated
        else:
            sae, naive = JumpReLUSAE(JumpReLUConfig(d_in=d, width=m)), naive_jumprelu
        sae.train()
        t = bench(arch, sae, naive, x, args.dead, args.repeats)
        print(
            f"{arch:<9}{m:>7}  {t['gemm']:>8.3f}  {t['saekit']:>9.3f}  {t['naive']:>10.3f}  "
            f"{t['saekit'] / t['gemm']:>11.2f}  {t['naive'] / t['saekit']:>15.2f}  "
            f"{n / t['saekit']:>12.0f}  {n / t['naive']:>14.0f}",
            flush=True,
        )
        del sae


if __name__ == "__main__":
    main()
