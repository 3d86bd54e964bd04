"""Train and evaluate one SAELens training SAE on activations given as .npy files (run by the orchestrators
``topk_vs_saelens.py`` and ``train_speed.py``, one process per trainee).

This script runs inside the separate benchmark environment (``.bench-venv``, which has ``sae-lens`` and no
saekit), so it imports nothing from saekit; ``_common`` (next to this file) imports only numpy and the
standard library at its top. The orchestrator hands it the activations as a plain ``.npy`` file and reads
back plain ``.npy`` files and a JSON record.

Training uses SAELens's own code end to end: ``TopKTrainingSAE`` (its TopK, its MSE, its AuxK, its
``rescale_acts_by_decoder_norm`` and 0.1 decoder-norm init), ``StandardTrainingSAE`` (ReLU with the L1
weighted by decoder norms) or ``GatedTrainingSAE``, driven by ``SAETrainer.fit()``, which accepts any
iterator of (batch, d) tensors as its data provider; that iterator reads consecutive row blocks of
``--train`` from disk (the orchestrator has already shuffled them, so every library sees the same batches in
the same order). The input scale is the orchestrator's scalar s (E||s x||^2 = d), set on SAELens's
``ActivationScaler`` before ``fit()`` so SAELens neither re-estimates it nor differs from saekit; ``fit()``
folds it into the weights at the end, as SAELens always does, so evaluation feeds raw activations.

Timing covers ``fit()`` only (its loop; the norm estimate is skipped because the scale is given). Peak RSS
is the process's high-water mark (``_common.peak_rss_mb``) read after every training step, so it covers
imports, setup and the loop, not the evaluation after it.

Outputs in ``--out``: ``result.json`` (timings, memory, settings, training-time dead count) and the held-out
reconstructions and codes in ``_common.OutputWriter``'s format, so the orchestrator computes every metric
with saekit's own functions, the same way for every library.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _common import NpyRows, OutputWriter, peak_rss_mb, rss_now_mb

ARCHS = ("topk", "standard", "gated")


def batches(rows: NpyRows, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive (batch_size, d) row blocks read from disk, cycling through the file if more are asked
    for (SAETrainer draws exactly total/batch of them)."""
    for block in rows.batches(batch_size, cycle=True):
        yield torch.from_numpy(block)


def observed_trainer(base: type, log_every: int) -> type:
    """``SAETrainer`` that records the process's peak RSS after every step and, with ``log_every``, prints the
    batch FVU, L0 and dead count every ``log_every`` steps. Observation only: it reads the step's output
    after SAELens's own ``step`` has run."""

    class ObservedTrainer(base):
        peak_rss_mb = 0.0

        def step(self, batch: torch.Tensor):
            out = super().step(batch)
            self.peak_rss_mb = peak_rss_mb()
            if log_every and (self.n_training_steps + 1) % log_every == 0:
                with torch.no_grad():
                    x, x_hat = out.sae_in.double(), out.sae_out.double()
                    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
                    l0 = float((out.feature_acts != 0).sum(-1).float().mean())
                losses = " ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.losses.items())
                print(
                    f"step {self.n_training_steps + 1}: batch fvu {fvu:.4f} l0 {l0:.1f} "
                    f"dead {int(self.dead_neurons.sum())} {losses}",
                    flush=True,
                )
            return out

    return ObservedTrainer


def build_sae(args: argparse.Namespace, d: int):
    """The SAELens training SAE of ``--arch`` with SAELens's defaults except the flags given."""
    init_norm = None if args.decoder_init_norm.lower() == "none" else float(args.decoder_init_norm)
    if args.arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        if args.k is None:
            raise SystemExit("--arch topk needs --k")
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=d, d_sae=args.width, k=args.k, decoder_init_norm=init_norm)
        )
    if args.l1_coefficient is None:
        raise SystemExit(f"--arch {args.arch} needs --l1-coefficient")
    if args.arch == "standard":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

        cfg = StandardTrainingSAEConfig(
            d_in=d, d_sae=args.width, l1_coefficient=args.l1_coefficient, decoder_init_norm=init_norm
        )
        return StandardTrainingSAE(cfg)
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig

    cfg = GatedTrainingSAEConfig(
        d_in=d, d_sae=args.width, l1_coefficient=args.l1_coefficient, decoder_init_norm=init_norm
    )
    return GatedTrainingSAE(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help=".npy (N, d) float32 training rows, already shuffled")
    ap.add_argument("--heldout", required=True, help=".npy (N_eval, d) float32 held-out rows")
    ap.add_argument("--out", required=True, help="folder for result.json and the held-out outputs")
    ap.add_argument("--arch", choices=ARCHS, default="topk", help="SAELens architecture")
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--k", type=int, default=None, help="active latents (topk)")
    ap.add_argument("--l1-coefficient", type=float, default=None, help="L1 coefficient (standard, gated)")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--adam-beta1", type=float, required=True)
    ap.add_argument("--adam-beta2", type=float, required=True)
    ap.add_argument("--warmup-steps", type=int, required=True)
    ap.add_argument("--decay-steps", type=int, required=True, help="linear decay to 0 over the last steps")
    ap.add_argument("--dead-window-steps", type=int, required=True, help="SAELens dead_feature_window")
    ap.add_argument("--scale", type=float, required=True, help="input scale s with E||s x||^2 = d")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--eval-batch-size", type=int, default=1024)
    ap.add_argument(
        "--b-dec-init",
        default=None,
        help="ablation: .npy (d,) decoder bias to start from, in scaled units (default: SAELens's zeros)",
    )
    ap.add_argument(
        "--decoder-init-norm",
        default="0.1",
        help="ablation: the config's decoder_init_norm, a float or 'none' (default: SAELens's 0.1)",
    )
    ap.add_argument("--log-every", type=int, default=0, help="print batch FVU/L0/dead every n steps")
    args = ap.parse_args()

    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = NpyRows(args.train)
    d = rows.shape[1]
    total = args.steps * args.batch_size

    sae = build_sae(args, d)
    if args.b_dec_init:
        with torch.no_grad():
            sae.b_dec.copy_(torch.from_numpy(np.load(args.b_dec_init)).to(sae.b_dec))
    trainer = observed_trainer(SAETrainer, args.log_every)(
        cfg=SAETrainerConfig(
            total_training_samples=total,
            train_batch_size_samples=args.batch_size,
            lr=args.lr,
            lr_end=args.lr,  # the 'constant' scheduler decays from lr (SAELens asserts lr_end is set)
            lr_scheduler_name="constant",
            lr_warm_up_steps=args.warmup_steps,
            lr_decay_steps=args.decay_steps,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            device="cpu",
            dead_feature_window=args.dead_window_steps,
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae=sae,
        data_provider=batches(rows, args.batch_size),
    )
    trainer.activation_scaler.scaling_factor = args.scale
    rss_before = rss_now_mb()
    t0 = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - t0
    dead_train = int(trainer.dead_neurons.sum())
    if trainer.activation_scaler.scaling_factor is not None:
        raise RuntimeError("SAETrainer.fit() did not fold the activation scale into the SAE")

    writer = OutputWriter(out, args.width)
    sae.eval()
    with torch.no_grad():
        for chunk in NpyRows(args.heldout).chunks(args.eval_batch_size):
            x = torch.from_numpy(chunk)
            f_NM = sae.encode(x)
            if args.arch == "topk" and int((f_NM != 0).sum(dim=-1).max()) > args.k:
                raise RuntimeError("SAELens's TopK encode returned more than k non-zero latents")
            writer.add_dense(sae.decode(f_NM).numpy(), f_NM.numpy())
    writer.close()
    result = {
        "library": "SAELens",
        "version": sae_lens.__version__,
        "torch": torch.__version__,
        "arch": args.arch,
        "width": args.width,
        "threads": torch.get_num_threads(),
        "tokens": trainer.n_training_samples,
        "steps": trainer.n_training_steps,
        "train_seconds": train_seconds,
        "tokens_per_s": trainer.n_training_samples / train_seconds,
        "peak_rss_mb": trainer.peak_rss_mb,
        "rss_before_train_mb": rss_before,
        "dead_train": dead_train,
        "dead_train_fraction": dead_train / args.width,
        "config": {
            "sae": {k: v for k, v in sae.cfg.to_dict().items() if k not in ("metadata",) and not callable(v)},
            "trainer": {k: v for k, v in vars(args).items()},
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens", "train_seconds", "tokens_per_s", "peak_rss_mb")}))


if __name__ == "__main__":
    main()
