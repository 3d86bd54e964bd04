"""Switch SAE with sparse dispatch against a dense TopK SAE of the same width: FLOPs and CPU time.

Both SAEs see the same random batch shaped like SmolLM2-135M residuals (d = 576, standard normal, so
E‖x‖² = d as after saekit's normalisation) and run one forward + backward of their training loss; the
script reports the median wall time over ``--repeats`` runs after one warm-up, and the FLOPs per token
counted analytically (a multiply-add is 2 FLOPs; top-k, softmax and elementwise work are not counted):

    TopK (saekit.sae.topk.TopKSAE, AuxK off)   encoder 2dM forward + 4dM backward (dense autograd),
                                               decoder 2kd + 4kd (embedding_bag reads k rows)
    Switch, E experts of m = M/E latents       router 6dE, encoder 6dm (the token's block only),
                                               decoder 6kd

so the FLOP ratio is (M + k) / (E + M/E + k), largest near E = √M. A third row per run, "switch, dense
masked", times the reference's way of computing the same Switch SAE (full encoder, then mask: the
forward and gradients that the tests check the sparse dispatch against), to show what the dispatch buys.

    .venv/bin/python benchmarks/switch_dispatch.py            # M = 18432 (32 x 576), E in 4, 16, 64: 1-2 min
    .venv/bin/python benchmarks/switch_dispatch.py --quick    # M = 4608, batch 1024: a few seconds

On a machine whose cores are busy, two-thread timings swing by several times from run to run (the
script warns when the load average says so); ``--threads 1`` is then the steadier comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from saekit.sae.switch import SwitchConfig, SwitchSAE
from saekit.sae.topk import TopKConfig, TopKSAE


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576, help="input width (SmolLM2-135M: 576)")
    ap.add_argument("--width", type=int, default=32 * 576, help="latents M, the same for both SAEs")
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], help="Switch expert counts E")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per SAE (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="M = 4608, batch 1024, E in 4, 16, one timed run")
    args = ap.parse_args()
    if args.quick:
        args.width, args.batch, args.experts, args.repeats = 8 * 576, 1024, [4, 16], 1
    return args


def flops_topk(d: int, width: int, k: int) -> float:
    return 6 * d * width + 6 * k * d


def flops_switch(d: int, width: int, k: int, experts: int) -> float:
    return 6 * d * experts + 6 * d * (width // experts) + 6 * k * d


def dense_masked_loss(sae: SwitchSAE, x_ND: torch.Tensor) -> torch.Tensor:
    """The Switch loss computed as the reference code does: the dense encoder over all M latents,
    masked to the routed block, then top-k and a dense decode."""
    cfg = sae.cfg
    z_NM = torch.relu((x_ND - sae.b_dec) @ sae.W_enc)
    p_NE, gate_N, expert_N = sae.route(x_ND)
    mask_NE = torch.zeros_like(p_NE).scatter(-1, expert_N[:, None], gate_N[:, None])
    a_NM = z_NM * mask_NE.repeat_interleave(cfg.expert_width, dim=1)
    vals_NK, idx_NK = a_NM.topk(cfg.k, dim=-1, sorted=False)
    x_hat_ND = torch.zeros_like(a_NM).scatter(-1, idx_NK, vals_NK) @ sae.W_dec + sae.b_dec
    recon = (x_ND - x_hat_ND).pow(2).sum(-1).mean()
    return recon + cfg.lb_alpha * cfg.d_in * sae.load_balance(p_NE, expert_N)


def time_fwd_bwd(sae: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median seconds of loss_fn() + backward over ``repeats`` runs, after one warm-up run."""
    times = []
    for i in range(repeats + 1):
        sae.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss_fn().backward()
        if i > 0:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, M, k, B = args.d, args.width, args.k, args.batch
    x_ND = torch.randn(B, d)
    print(f"d={d}  M={M}  k={k}  batch={B}  threads={torch.get_num_threads()}  fp32 CPU")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores - args.threads + 0.5:
        hint = "; --threads 1 is steadier" if args.threads > 1 else ""
        print(f"warning: load average {load:.1f} on {cores} cores: timings are noisy{hint}")

    rows = []  # (name, E, MFLOP/token, seconds, note)
    dense = TopKSAE(TopKConfig(d_in=d, width=M, k=k, aux_coeff=0.0))
    t_topk = time_fwd_bwd(dense, lambda: dense(x_ND).loss, args.repeats)
    rows.append(("topk (dense encoder)", "-", flops_topk(d, M, k) / 1e6, t_topk, ""))

    reference_experts = args.experts[len(args.experts) // 2]
    for E in args.experts:
        sae = SwitchSAE(SwitchConfig(d_in=d, width=M, n_experts=E, k=k))
        with torch.no_grad():
            share = torch.bincount(sae.route(x_ND)[2], minlength=E).max().item() / B
        note = f"busiest expert {share:.0%} of tokens"
        t = time_fwd_bwd(sae, lambda sae=sae: sae(x_ND).loss, args.repeats)
        rows.append(("switch (sparse dispatch)", str(E), flops_switch(d, M, k, E) / 1e6, t, note))
        if E == reference_experts:
            t_ref = time_fwd_bwd(sae, lambda sae=sae: dense_masked_loss(sae, x_ND), args.repeats)
            rows.append(("switch, dense masked (reference)", str(E), flops_topk(d, M, k) / 1e6, t_ref, ""))

    flops_ref = rows[0][2]
    header = (
        f"{'SAE':34} {'E':>3} {'MFLOP/tok':>10} {'FLOP ratio':>10} {'fwd+bwd s':>10} "
        f"{'tok/s':>9} {'time ratio':>10}"
    )
    print(header + "\n" + "-" * len(header))
    for name, E, mflop, t, note in rows:
        print(
            f"{name:34} {E:>3} {mflop:10.1f} {flops_ref / mflop:9.1f}x {t:10.3f} {B / t:9.0f} "
            f"{t_topk / t:9.1f}x  {note}"
        )
    print("ratios: TopK / row (higher = cheaper than the dense TopK SAE of the same width)")


if __name__ == "__main__":
    main()
