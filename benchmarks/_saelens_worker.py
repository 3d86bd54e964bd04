"""Train and evaluate SAELens's TopK SAE on activations given as .npy files (run by topk_vs_saelens.py).

This script runs inside the separate benchmark environment (``.bench-venv``, which has ``sae-lens`` and no
saekit), so it imports nothing from saekit: the orchestrator hands it the activations as plain ``.npy``
files and reads back plain ``.npy`` files and a JSON record.

Training uses SAELens's own code end to end: ``TopKTrainingSAE`` (its TopK, its MSE, its AuxK, its
``rescale_acts_by_decoder_norm`` and 0.1 decoder-norm init) driven by ``SAETrainer.fit()``, which accepts
any iterator of (batch, d) tensors as its data provider; that iterator walks the rows of ``--train`` in
file order (the orchestrator has already shuffled them, so both libraries see the same batches in the same
order). The input scale is the orchestrator's scalar s (E||s x||^2 = d), set on SAELens's
``ActivationScaler`` before ``fit()`` so SAELens neither re-estimates it nor differs from saekit; ``fit()``
folds it into the weights at the end, as SAELens always does, so evaluation feeds raw activations.

Outputs in ``--out``: ``result.json`` (timings, settings, training-time dead count), ``x_hat.npy`` (the
held-out reconstructions), ``f_idx.npy``/``f_val.npy`` (the k selected latents per held-out token and
their values after ReLU), so the orchestrator computes every metric with saekit's own functions.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


def batches(x_ND: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive (batch_size, d) row blocks, cycling through the file if more are asked for."""
    n = (x_ND.shape[0] // batch_size) * batch_size
    if n == 0:
        raise ValueError(f"{x_ND.shape[0]} training rows are fewer than one batch of {batch_size}")
    while True:
        for start in range(0, n, batch_size):
            yield torch.from_numpy(np.ascontiguousarray(x_ND[start : start + batch_size]))


def logging_trainer(base: type, every: int) -> type:
    """``SAETrainer`` that also prints the batch FVU, L0 and dead count every ``every`` steps (observation
    only: it reads the step's output after SAELens's own ``step`` has run)."""

    class LoggingTrainer(base):
        def step(self, batch: torch.Tensor):
            out = super().step(batch)
            if (self.n_training_steps + 1) % every == 0:
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

    return LoggingTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help=".npy (N, d) float32 training rows, already shuffled")
    ap.add_argument("--heldout", required=True, help=".npy (N_eval, d) float32 held-out rows")
    ap.add_argument("--out", required=True, help="folder for result.json and the held-out outputs")
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
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
    ap.add_argument("--eval-batch-size", type=int, default=4096)
    ap.add_argument(
        "--b-dec-init",
        default=None,
        help="ablation: .npy (d,) decoder bias to start from, in scaled units (default: SAELens's zeros)",
    )
    ap.add_argument(
        "--decoder-init-norm",
        default="0.1",
        help="ablation: TopKTrainingSAEConfig.decoder_init_norm, a float or 'none' (default: SAELens's 0.1)",
    )
    ap.add_argument("--log-every", type=int, default=0, help="print batch FVU/L0/dead every n steps")
    args = ap.parse_args()

    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train = np.load(args.train)  # in RAM, like the orchestrator does for saekit
    d = x_train.shape[1]
    total = args.steps * args.batch_size

    init_norm = None if args.decoder_init_norm.lower() == "none" else float(args.decoder_init_norm)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=d, d_sae=args.width, k=args.k, decoder_init_norm=init_norm)
    )
    if args.b_dec_init:
        with torch.no_grad():
            sae.b_dec.copy_(torch.from_numpy(np.load(args.b_dec_init)).to(sae.b_dec))
    trainer_cls = logging_trainer(SAETrainer, args.log_every) if args.log_every else SAETrainer
    trainer = trainer_cls(
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
        data_provider=batches(x_train, args.batch_size),
    )
    trainer.activation_scaler.scaling_factor = args.scale
    t0 = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - t0
    dead_train = int(trainer.dead_neurons.sum())
    if trainer.activation_scaler.scaling_factor is not None:
        raise RuntimeError("SAETrainer.fit() did not fold the activation scale into the SAE")

    x_eval = np.load(args.heldout)
    sae.eval()
    x_hat_parts, idx_parts, val_parts = [], [], []
    with torch.no_grad():
        for start in range(0, x_eval.shape[0], args.eval_batch_size):
            x = torch.from_numpy(np.ascontiguousarray(x_eval[start : start + args.eval_batch_size]))
            f_NM = sae.encode(x)
            x_hat_parts.append(sae.decode(f_NM).numpy())
            val_NK, idx_NK = f_NM.topk(args.k, dim=-1)  # TopK keeps k entries (some may be 0 after ReLU)
            idx_parts.append(idx_NK.numpy().astype(np.int32))
            val_parts.append(val_NK.numpy())
            if int((f_NM != 0).sum(dim=-1).max()) > args.k:
                raise RuntimeError("SAELens's TopK encode returned more than k non-zero latents")
    np.save(out / "x_hat.npy", np.concatenate(x_hat_parts))
    np.save(out / "f_idx.npy", np.concatenate(idx_parts))
    np.save(out / "f_val.npy", np.concatenate(val_parts))
    result = {
        "library": "sae_lens",
        "version": sae_lens.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tokens": trainer.n_training_samples,
        "steps": trainer.n_training_steps,
        "train_seconds": train_seconds,
        "tokens_per_s": trainer.n_training_samples / train_seconds,
        "dead_train": dead_train,
        "dead_train_fraction": dead_train / args.width,
        "config": {
            "sae": {k: v for k, v in sae.cfg.to_dict().items() if k not in ("metadata",) and not callable(v)},
            "trainer": {k: v for k, v in vars(args).items()},
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens", "train_seconds", "tokens_per_s", "dead_train")}))


if __name__ == "__main__":
    main()
