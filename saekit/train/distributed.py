"""Data-parallel training with ``torch.distributed``, launched by ``torchrun``.

Every rank holds a full copy of the SAE and its optimizer and trains on its *share* of every global batch
of ``batch_size`` rows: rows ``[r·B/W, (r+1)·B/W)`` of the batch a single process would train on (see
:func:`share`), so the union of the ranks' shares is exactly the single-process batch. The trainer
(:class:`saekit.train.trainer.Trainer`) stays one loop; the few points where ranks must agree go through
:class:`Distributed`:

* row counts: each batch's finite rows are counted over all ranks, so NaN policies decide the same way
  everywhere and the token counters are global;
* gradients: the loss terms are means over a rank's rows, so rank r's gradient is weighted by n_r / N
  before they are summed; the result is the gradient of the loss on the global batch, as one process
  computes it (up to float rounding). Terms that are not plain means over rows see only the rank's rows:
  AuxK's normalisation by the residual's variance, and BatchTopK's batch-wide top-k·B selection, which
  is made over each rank's local batch (as in the public anchors' data-parallel code);
* dead latents: a latent fired if it fired on any rank, and tokens are summed (:mod:`.dead`);
* buffers: floating-point buffers that a step changed on some rank (BatchTopK's inference threshold, an
  EMA of the smallest kept activation) are averaged over ranks after the step. This needs no hook in any
  architecture: a buffer that only holds constants never changes and is left alone;
* the initial sample (norm scale, b_dec): the ranks' shares of the first batches are gathered, so every
  rank initialises from the single-process rows; the SAE is then broadcast from rank 0;
* logged values are means over ranks; checkpoints and outputs are written by rank 0 while the others wait
  on a barrier; a checkpoint is read by rank 0 and broadcast, so ranks need no shared file system.

Checkpoints count global batches and rows, so a run resumes with another number of ranks: the batch
sources skip that many global batches and each rank takes its new share. At every checkpoint the ranks'
weights are compared (a few float64 fingerprints per tensor), so an architecture that changes its weights
from its local batch outside the gradient is caught instead of silently diverging.

Backends: ``gloo`` on CPU, ``nccl`` when CUDA is available (the SAE then lives on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-row global batch that ``rank`` of ``world_size`` trains on: contiguous,
    in rank order, sizes differing by at most one, together exactly ``range(n)``."""
    return rank * n // world_size, (rank + 1) * n // world_size


@dataclass
class Distributed:
    """One process's place in a data-parallel run and the collectives the trainer needs."""

    rank: int
    world_size: int
    local_rank: int = 0
    backend: str = "gloo"

    @property
    def device(self) -> torch.device:
        """Where this rank's SAE and the collectives' tensors live."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of an ``n``-row global batch."""
        return share(n, self.rank, self.world_size)

    # -- small collectives ------------------------------------------------------------------------------
    def barrier(self) -> None:
        dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank."""
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather_counts(self, n_good: int, n_bad: int) -> tuple[list[int], list[int]]:
        """Every rank's (finite rows, NaN/Inf rows) of the current batch, indexed by rank."""
        t = torch.zeros(2, self.world_size, dtype=torch.int64, device=self.device)
        t[0, self.rank], t[1, self.rank] = n_good, n_bad
        dist.all_reduce(t)
        return t[0].tolist(), t[1].tolist()

    def fired(self, fired_M: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, int]:
        """Dead-latent statistics of the global batch: fired on any rank; tokens of all ranks."""
        t = torch.cat([fired_M.to(self.device, torch.int64), torch.tensor([n_tokens], device=self.device)])
        dist.all_reduce(t)
        return (t[:-1] > 0).to(fired_M.device), int(t[-1])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for checkpoints and flags, not per-step data)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    # -- gradients, buffers, weights --------------------------------------------------------------------
    def reduce_gradients(self, params: Iterable[nn.Parameter], weight: float) -> None:
        """Replace each gradient by Σ_r weight_r · grad_r, with ``weight`` = this rank's rows / global
        rows. A parameter without a gradient on every rank keeps none (Adam then skips it, as it would in
        one process); one with a gradient on some rank gets the sum, missing ones counting as zero."""
        params = list(params)
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        chosen = [p for p, h in zip(params, has.tolist(), strict=True) if h]
        if not chosen:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in chosen]
        ).mul_(weight)
        dist.all_reduce(flat)
        for p, g in zip(chosen, flat.split([p.numel() for p in chosen]), strict=True):
            p.grad = torch.empty_like(p).copy_(g.view_as(p)) if p.grad is None else p.grad.copy_(g.view_as(p))

    def snapshot_buffers(self, module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) of every floating-point buffer, taken before a step."""
        return [(b, b.detach().clone()) for b in module.buffers() if b.is_floating_point()]

    def average_changed_buffers(
        self, module: nn.Module, snapshot: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Average over ranks the floating-point buffers that the step changed on some rank."""
        if not snapshot:
            return
        changed = torch.tensor(
            [not torch.equal(b, before) for b, before in snapshot], dtype=torch.int32, device=self.device
        )
        dist.all_reduce(changed, op=dist.ReduceOp.MAX)
        moved = [b for (b, _), c in zip(snapshot, changed.tolist(), strict=True) if c]
        if not moved:
            return
        flat = torch.cat([b.detach().reshape(-1).to(self.device, torch.float64) for b in moved])
        dist.all_reduce(flat)
        flat /= self.world_size
        with torch.no_grad():
            for b, v in zip(moved, flat.split([b.numel() for b in moved]), strict=True):
                b.copy_(v.view_as(b))

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_contiguous():
                    dist.broadcast(t.data, src=0)
                else:  # collectives take contiguous tensors (a latent-major W_enc is a transpose)
                    buf = t.data.contiguous()
                    dist.broadcast(buf, src=0)
                    t.data.copy_(buf)

    def check_same_weights(self, module: nn.Module) -> None:
        """Raise, naming the tensor, if any parameter or buffer differs between ranks."""
        names, prints = [], []
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            v = t.detach().reshape(-1).to(self.device, torch.float64)
            ramp = torch.linspace(1.0, 2.0, v.numel(), dtype=torch.float64, device=self.device)
            names.append(name)
            prints.append(torch.stack([v.sum(), (v * v).sum(), (v * ramp).sum()]))
        if not prints:
            return
        hi = torch.stack(prints)
        lo = hi.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        differ = [n for n, h, lw in zip(names, hi, lo, strict=True) if not torch.equal(h, lw)]
        if differ:
            raise RuntimeError(
                f"the SAE's {differ} differ between ranks: this architecture changes its state from each "
                "rank's local batch outside the gradient, which data-parallel training cannot keep in "
                "step; train it in one process"
            )

    # -- values and rows --------------------------------------------------------------------------------
    def mean_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """Each value (tensor scalar or float) averaged over ranks; every rank must hold the same keys."""
        if not values:
            return {}
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        t /= self.world_size
        out: dict[str, Any] = {}
        for k, v in zip(keys, t.tolist(), strict=True):
            old = values[k]
            out[k] = torch.tensor(v, dtype=old.dtype, device=old.device) if torch.is_tensor(old) else v
        return out

    def gather_batches(self, local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The global batches from every rank's shares: batch j is rank 0's j-th share, then rank 1's,
        ... (the single-process batch, since shares are contiguous in rank order)."""
        n, d = len(local), local[0].shape[1] if local else 0
        sizes = torch.zeros(self.world_size, n, dtype=torch.int64, device=self.device)
        sizes[self.rank] = torch.tensor([b.shape[0] for b in local], dtype=torch.int64)
        dist.all_reduce(sizes)
        totals = sizes.sum(dim=1)
        longest = int(totals.max())
        mine = torch.cat(list(local)) if local else torch.empty(0, d, device=self.device)
        padded = torch.zeros(longest, d, dtype=mine.dtype, device=self.device)
        padded[: mine.shape[0]] = mine.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        per_rank = [
            p[: int(totals[r])].split(sizes[r].tolist()) for r, p in enumerate(parts)
        ]  # per_rank[r][j]: rank r's share of batch j
        device = local[0].device if local else self.device
        return [torch.cat([per_rank[r][j] for r in range(self.world_size)]).to(device) for j in range(n)]

    def shard_source(self, source: Callable[[int], Iterable[torch.Tensor]], *, n_blocks: int = 1):
        """A batch source yielding this rank's share of each global batch of ``source`` (which every rank
        reads whole). ``n_blocks``: a batch made of that many equal blocks (a multi-hook SAE's layout) is
        shared block by block, so the share keeps the layout."""

        def ranked(skip_batches: int) -> Iterator[torch.Tensor]:
            for batch in source(skip_batches):
                if n_blocks == 1:
                    lo, hi = self.share(batch.shape[0])
                    yield batch[lo:hi]
                else:
                    blocks = batch.view(n_blocks, batch.shape[0] // n_blocks, *batch.shape[1:])
                    lo, hi = self.share(blocks.shape[1])
                    yield blocks[:, lo:hi].reshape(n_blocks * (hi - lo), *batch.shape[1:])

        return ranked


def from_env(backend: str | None = None, timeout_s: float = 1800.0) -> Distributed | None:
    """The distributed context ``torchrun`` describes in the environment, initialising the default
    process group on first call; None when not launched with more than one process (``WORLD_SIZE``
    unset or 1). ``backend``: default ``nccl`` when CUDA is available, else ``gloo``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun "
            "(e.g. torchrun --nproc_per_node 2 -m saekit train ...)"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if dist.is_initialized():
        backend = dist.get_backend()
    else:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with the "
            f"environment (RANK={rank}, WORLD_SIZE={world})"
        )
    return Distributed(rank, world, local_rank, str(backend))


def shutdown() -> None:
    """Tear the default process group down (at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
