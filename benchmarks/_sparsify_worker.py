"""Train and evaluate EleutherAI sparsify's TopK SAE on activations given as .npy files (run by
``train_speed.py``, one process per trainee).

Runs inside the benchmark environment (``.bench-venv``: ``eai-sparsify``, no saekit); ``_common`` (next to
this file) imports only numpy and the standard library at its top.

Training is sparsify's own ``Trainer.fit()`` (sparsify 1.3.3), unchanged: per step it renormalises the
decoder rows, runs ``SparseCoder.forward`` (its ``FusedEncoder`` autograd function: dense encoder GEMM, ReLU,
top-k, a backward that touches only the k selected latents; decoding with ``embedding_bag``) with the loss
FVU + auxk_alpha · AuxK + multi-TopK FVU / 8, removes the decoder gradient parallel to the rows, steps the
optimizer and the scheduler, and updates its dead-latent counters. It sets b_dec to the mean of the first
batch. sparsify's trainer reads activations through forward hooks on a Hugging Face model, so the worker
hands it :class:`ActivationModel`, a stand-in whose single "layer" returns the rows of ``--train`` named by
the token ids: batch i is the "sequence" of row indices i·B … (i+1)·B − 1, one sequence per step. The rows
are the orchestrator's shuffled rows times its input scale s (E‖s x‖² = d), the scale every library gets;
sparsify itself does not normalise its inputs.

What the orchestrator changes from sparsify's defaults, and why (each is a flag here):

* ``--optimizer adam --lr`` with ``--warmup-steps``: the shared Adam, learning rate and schedule (sparsify's
  default is signum, a schedule-free sign-SGD whose lr is 5e-3 / sqrt(M / 2^14)); the Adam schedule is
  replaced by saekit's (linear warm-up, constant, linear decay to 0 over the last 20%), as SAELens is given
  the same. ``--optimizer signum`` without ``--lr`` is sparsify's own default.
* ``--dead-tokens``: the shared dead-latent window (used only when ``--auxk-alpha`` > 0; sparsify's default
  alpha is 0, AuxK off).

Timing: from the call of ``fit()`` to the end of its loop (the final checkpoint write is replaced by a marker
that stops the clock and reads the peak RSS). With the schedule-free optimizer, evaluation uses its averaged
weights (``optimizer.eval()``), which is what sparsify saves.

Outputs in ``--out``: ``result.json`` and the held-out reconstructions and codes in
``_common.OutputWriter``'s format.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # read when sparsify is imported: eager decoder on CPU

import torch
from _common import NpyRows, OutputWriter, lr_factor, peak_rss_mb, rss_now_mb
from torch import nn


class RowServer(nn.Module):
    """The "layer" whose output sparsify's hook trains on: (1, T) row indices -> (1, T, d) rows × scale."""

    def __init__(self, rows: NpyRows, scale: float):
        super().__init__()
        self.rows, self.scale = rows, scale

    def forward(self, ids_1T: torch.Tensor) -> torch.Tensor:
        start, n = int(ids_1T[0, 0]), ids_1T.shape[1]
        if n > 1 and int(ids_1T[0, -1]) != start + n - 1:
            raise ValueError("RowServer expects consecutive row indices")
        x_TD = torch.from_numpy(self.rows.read(start, n))
        return (x_TD * self.scale).unsqueeze(0)


class ActivationModel(nn.Module):
    """The least a sparsify ``Trainer`` needs from a model: ``base_model`` with a named submodule to hook,
    ``device``, ``dummy_inputs`` (it runs them once to read the hook's width) and ``forward(input_ids)``."""

    def __init__(self, rows: NpyRows, scale: float):
        super().__init__()
        self.layer = RowServer(rows, scale)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layer(input_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help=".npy (N, d) float32 training rows, already shuffled")
    ap.add_argument("--heldout", required=True, help=".npy (N_eval, d) float32 held-out rows")
    ap.add_argument("--out", required=True, help="folder for result.json and the held-out outputs")
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, required=True, help="rows (tokens) per step")
    ap.add_argument("--optimizer", choices=("adam", "signum"), default="adam")
    ap.add_argument("--lr", type=float, default=None, help="default: sparsify's rule for the optimizer")
    ap.add_argument("--warmup-steps", type=int, default=0, help="Adam: linear warm-up steps")
    ap.add_argument("--auxk-alpha", type=float, default=0.0, help="AuxK weight (sparsify's default 0)")
    ap.add_argument("--dead-tokens", type=int, required=True, help="dead_feature_threshold in tokens")
    ap.add_argument("--scale", type=float, required=True, help="input scale s with E||s x||^2 = d")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--eval-batch-size", type=int, default=1024)
    args = ap.parse_args()

    import sparsify
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = NpyRows(args.train)
    b = args.batch_size
    if args.steps * b > len(rows):
        raise SystemExit(
            f"{args.steps} steps of {b} rows need {args.steps * b:,} rows; {args.train} has {len(rows):,}"
        )
    model = ActivationModel(rows, args.scale)
    dataset = [{"input_ids": torch.arange(i * b, (i + 1) * b)} for i in range(args.steps)]
    cfg = TrainConfig(
        SparseCoderConfig(num_latents=args.width, k=args.k),
        batch_size=1,  # sequences per step: one "sequence" of b row indices
        loss_fn="fvu",
        optimizer=args.optimizer,
        lr=args.lr,
        lr_warmup_steps=args.warmup_steps,
        auxk_alpha=args.auxk_alpha,
        dead_feature_threshold=args.dead_tokens,
        hookpoints=["layer"],
        init_seeds=[args.seed],
        save_every=args.steps + 1,  # the only save is the one after the loop, replaced below
        log_to_wandb=False,
        save_dir=str(out / "checkpoints"),
    )
    trainer = Trainer(cfg, dataset, model)
    if args.optimizer == "adam":  # the shared schedule instead of sparsify's warm-up + decay over the run
        steps, warmup = args.steps, args.warmup_steps
        trainer.lr_schedulers = [
            torch.optim.lr_scheduler.LambdaLR(trainer.optimizers[0], lambda s: lr_factor(s, steps, warmup))
        ]
    loop_end: dict[str, float] = {}

    def end_of_loop() -> None:  # fit() calls self.save() right after its loop
        loop_end.setdefault("t", time.perf_counter())
        loop_end.setdefault("peak_rss_mb", peak_rss_mb())

    trainer.save = end_of_loop
    rss_before = rss_now_mb()
    t0 = time.perf_counter()
    trainer.fit()
    if "t" not in loop_end:
        raise RuntimeError("sparsify's Trainer.fit() did not call save() after its loop")
    train_seconds = loop_end["t"] - t0
    if trainer.global_step != args.steps:
        raise RuntimeError(f"sparsify trained {trainer.global_step} steps, expected {args.steps}")
    dead_train = int((trainer.num_tokens_since_fired["layer"] > args.dead_tokens).sum())
    for opt in trainer.optimizers:
        if isinstance(opt, ScheduleFreeWrapper):
            opt.eval()  # the averaged weights, which sparsify's checkpoints hold

    sae = trainer.saes["layer"]
    writer = OutputWriter(out, args.width)
    with torch.no_grad():
        for chunk in NpyRows(args.heldout).chunks(args.eval_batch_size):
            x = torch.from_numpy(chunk)
            enc = sae.encode(x * args.scale)
            x_hat = sae.decode(enc.top_acts, enc.top_indices) / args.scale
            writer.add_topk(x_hat.numpy(), enc.top_indices.numpy(), enc.top_acts.numpy())
    writer.close()
    tokens = args.steps * b
    lrs = sorted({g["lr"] for opt in trainer.optimizers for g in opt.param_groups})
    result = {
        "library": "sparsify",
        "version": sparsify.__version__,
        "torch": torch.__version__,
        "arch": "topk",
        "width": args.width,
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "steps": trainer.global_step,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens / train_seconds,
        "peak_rss_mb": loop_end["peak_rss_mb"],
        "rss_before_train_mb": rss_before,
        "dead_train": dead_train,
        "dead_train_fraction": dead_train / args.width,
        "optimizer": type(trainer.optimizers[0]).__name__,
        "final_lrs": lrs,
        "config": {"sparsify": cfg.to_dict(), "worker": vars(args)},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens", "train_seconds", "tokens_per_s", "peak_rss_mb")}))


if __name__ == "__main__":
    main()
