"""The sparse training path of the TopK family: encode, select, decode and back-propagate without ever
keeping a dense (N × M) matrix for the backward pass (specs/performance.md has the cost model).

Per token, with d inputs, M latents and k selected entries, a dense TopK step costs ≈ 12·d·M FLOPs; this
path costs 2·d·M (the encoder GEMM, which every selection needs) plus O(k·d):

* :func:`sparse_encode` computes the pre-activations π = (x − b_dec) W_enc + b_enc chunk by chunk of
  tokens (the chunk buffer is reused, so memory stays bounded), lets each :class:`Selector` pick entries
  from every chunk (per-token top-k, batch top-k, AuxK's top-k_aux among dead latents, ...), and keeps
  only the selected values. Its backward (:class:`_SelectedPreacts`) is sparse: with g the gradient of
  the selected values, ∂x = Σ g·W_enc[:, c] (a bag-sum over W_encᵀ rows), ∂W_enc[:, c] = Σ g·x_c (a
  bag-sum over input rows, bagged by latent), ∂b_enc = Σ g per latent and ∂b_dec = −W_enc ∂b_enc (a
  matrix-vector product instead of OpenAI's / autograd's N × d reduction). Every selection that receives
  a gradient reaches the encoder, AuxK's included: sparsify's fused encoder drops exactly that gradient.
* :func:`sparse_decode` is Σ vals · W_dec[cols] per token (``embedding_bag``). Its backward
  (:class:`_SparseDecode`) computes ∂vals as a sampled product (only the S selected (token, latent) dot
  products of ∂x̂ with W_dec rows) and ∂W_dec as a bag-sum of ∂x̂ rows per latent, with no scatter into a
  dense gradient row by row (what made autograd's ``embedding_bag`` backward the slow part).

Kernels are chosen per call from the tensors' device by :func:`kernels_for`, never bound at import, so a
GPU implementation (Triton, CUDA) can be registered for its device type with :func:`register_kernels`
while CPU tensors keep working. The pure-torch kernels run on any device. Every function here is tested
against plain dense autograd in float64, AuxK included (tests/test_sparse_path.py).

COO convention: a selection is ``(rows, cols, vals)`` with ``rows`` ascending; columns inside a row are
ascending too when the selectors here produce them (CSR order), but the kernels do not rely on it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

COO = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(rows, cols, vals)``: S entries of an (N, M) matrix, rows ascending."""

Selection = COO | torch.Tensor
"""What a selector gives back: COO entries, or a dense (N, B) block (:class:`DenseColumns`)."""

CHUNK_ELEMENTS = 1 << 25
"""Pre-activation entries computed at once (128 MiB in float32): bounds the encoder's working memory
while each chunk's GEMM stays large enough to run at full speed."""


# -- kernels, chosen per call from the device -----------------------------------------------------------
@dataclass(frozen=True)
class SparseKernels:
    """The two sparse products the path is made of, for one device type."""

    bag_sum: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``(index (S,), offsets (B,), table (R, d), weights (S,)) -> (B, d)``: bag b sums
    ``weights[s] · table[index[s]]`` over s in ``offsets[b] … offsets[b+1]`` (the last bag runs to S)."""
    sampled_dot: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``(crow (B+1,), cols (S,), a (B, d), table (R, d)) -> (S,)``: ``a[b] · table[cols[s]]`` for the
    entries s of row b (CSR row pointers ``crow``)."""


def _bag_sum_torch(index: torch.Tensor, offsets: torch.Tensor, table: torch.Tensor, weights: torch.Tensor):
    if index.numel() == 0:
        return table.new_zeros(offsets.shape[0], table.shape[1])
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


def _sampled_dot_gather(crow: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, table: torch.Tensor):
    """Row-gather then dot, chunked so the (S, d) gathers stay bounded. Works on every device and dtype."""
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=cols.device), crow.diff())
    out = a.new_empty(cols.shape[0])
    step = max(1, CHUNK_ELEMENTS // (4 * max(1, a.shape[1])))
    for s in range(0, cols.shape[0], step):
        e = s + step
        out[s:e] = torch.linalg.vecdot(a.index_select(0, rows[s:e]), table.index_select(0, cols[s:e]))
    return out


def _sampled_dot_torch(crow: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, table: torch.Tensor):
    """CPU float32/float64: ``torch.sparse.sampled_addmm`` (≈ 7× faster than gathering rows, measured at
    N=4096, d=576, k=32); it does not need sorted or unique columns within a row on CPU. Elsewhere (other
    dtypes, other devices, whose sparse kernels may assume CSR invariants) the gather fallback."""
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or cols.numel() == 0:
        return _sampled_dot_gather(crow, cols, a, table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow, cols, a.new_zeros(cols.shape[0]), (a.shape[0], table.shape[0]), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, a, table.t(), beta=0.0).values()


TORCH_KERNELS = SparseKernels(bag_sum=_bag_sum_torch, sampled_dot=_sampled_dot_torch)
_KERNELS: dict[str, SparseKernels] = {}


def register_kernels(device_type: str, kernels: SparseKernels) -> None:
    """Use ``kernels`` for tensors on ``device_type`` (``"cuda"``, ...). Register only kernels that have
    passed tests/test_sparse_path.py on that device."""
    _KERNELS[device_type] = kernels


def kernels_for(t: torch.Tensor) -> SparseKernels:
    """The kernels for ``t``'s device, looked up at call time (pure torch unless one was registered)."""
    return _KERNELS.get(t.device.type, TORCH_KERNELS)


def _crow(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers (n_rows + 1,) of ascending ``rows``."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def stable_argsort(keys: torch.Tensor) -> torch.Tensor:
    """``torch.argsort(keys, stable=True)`` for a 1-D tensor. On CPU it runs on one thread: torch's
    multi-threaded 1-D sort took 240–360 ms for 131k int64 keys on 2 busy cores, against 3–7 ms on one
    (measured with torch 2.13; the 2-D per-row sorts and top-k do not have the problem)."""
    threads = torch.get_num_threads()
    if keys.device.type != "cpu" or threads == 1:
        return torch.argsort(keys, stable=True)
    torch.set_num_threads(1)
    try:
        return torch.argsort(keys, stable=True)
    finally:
        torch.set_num_threads(threads)


def _bag_by(keys: torch.Tensor, n_bags: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, offsets)`` that group entries by ``keys`` (stable) into ``n_bags`` bags."""
    order = stable_argsort(keys)
    return order, _crow(keys[order], n_bags)[:-1]


# -- decode ---------------------------------------------------------------------------------------------
_NO_INDEX = torch.empty(0, dtype=torch.long)


class _SparseDecode(torch.autograd.Function):
    """x̂[n] = Σ_{s: rows_s = n} vals_s · W_dec[cols_s], and optionally ê = f_NB W_dec[block_idx] for a
    dense block of codes on a few latents (AuxK's dead block); sparse backward (module docstring). Both
    products write their W_dec gradient into one buffer, so a step touches the (M, d) gradient once."""

    @staticmethod
    def forward(ctx, rows, cols, vals, W_dec_MD, n_rows, block_idx, f_NB):  # noqa: D102 (autograd API)
        crow = _crow(rows, n_rows)
        ctx.save_for_backward(rows, cols, vals, W_dec_MD, crow, block_idx, f_NB)
        x_hat = kernels_for(W_dec_MD).bag_sum(cols, crow[:-1], W_dec_MD, vals)
        return x_hat, f_NB @ W_dec_MD.index_select(0, block_idx)

    @staticmethod
    def backward(ctx, grad_ND, grad_block_ND):  # noqa: D102
        rows, cols, vals, W_dec_MD, crow, block_idx, f_NB = ctx.saved_tensors
        kern, grad_ND = kernels_for(grad_ND), grad_ND.contiguous()
        grad_vals = grad_W = grad_f = None
        if ctx.needs_input_grad[2]:
            grad_vals = kern.sampled_dot(crow, cols, grad_ND, W_dec_MD).to(vals.dtype)
        if ctx.needs_input_grad[3]:
            order, offsets = _bag_by(cols, W_dec_MD.shape[0])
            grad_W = kern.bag_sum(rows[order], offsets, grad_ND, vals[order])
            if block_idx.numel():
                grad_W.index_add_(0, block_idx, f_NB.t() @ grad_block_ND)
        if ctx.needs_input_grad[6]:
            grad_f = grad_block_ND @ W_dec_MD.index_select(0, block_idx).t()
        return None, None, grad_vals, grad_W, None, None, grad_f


def sparse_decode(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_rows: int, W_dec_MD: torch.Tensor
) -> torch.Tensor:
    """``dense(rows, cols, vals) @ W_dec`` (no bias), reading only the selected decoder rows.

    ``rows`` must be ascending. Gradients flow to ``vals`` and ``W_dec``; a token without entries decodes
    to 0."""
    return sparse_decode_with_block(rows, cols, vals, n_rows, W_dec_MD)[0]


def sparse_decode_with_block(
    rows: torch.Tensor,
    cols: torch.Tensor,
    vals: torch.Tensor,
    n_rows: int,
    W_dec_MD: torch.Tensor,
    block_idx: torch.Tensor | None = None,
    f_NB: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_decode` and ``f_NB @ W_dec[block_idx]`` (an empty (0, d) tensor without a block) as one
    autograd step, so that W_dec's gradient from both is one tensor instead of two added together."""
    if block_idx is None:
        block_idx = _NO_INDEX.to(W_dec_MD.device)
        f_NB = W_dec_MD.new_empty(0, 0)
    assert f_NB is not None
    return _SparseDecode.apply(
        rows, cols, vals.to(W_dec_MD.dtype), W_dec_MD, n_rows, block_idx, f_NB.to(W_dec_MD.dtype)
    )


# -- encode ---------------------------------------------------------------------------------------------
class PreRows:
    """Full pre-activation rows on demand (``pre_rows(rows) -> (len(rows), M)``), for
    :meth:`Selector.finish`; ``width`` is M."""

    def __init__(self, xc_ND: torch.Tensor, W_enc_DM: torch.Tensor, b_enc_M: torch.Tensor | None):
        self.xc, self.W, self.b = xc_ND, W_enc_DM, b_enc_M
        self.width = W_enc_DM.shape[1]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        x_rD = self.xc.index_select(0, rows)
        return x_rD @ self.W if self.b is None else torch.addmm(self.b, x_rD, self.W)


class Selector(Protocol):
    """Picks entries of the pre-activation matrix, seeing it one chunk of tokens at a time."""

    def chunk(self, pre_nM: torch.Tensor, row0: int) -> Any:
        """Read rows ``row0 …`` of the pre-activations (a buffer reused for the next chunk: keep nothing
        that aliases it) and return what :meth:`finish` needs."""
        ...

    def finish(self, parts: list[Any], pre_rows: PreRows) -> Selection:
        """The selection over the whole batch as COO with the selected *pre-activation* values (or a
        dense block, :class:`DenseColumns`).
        ``pre_rows(rows)`` recomputes full pre-activation rows when the chunks' summaries were not enough."""
        ...


TOPK_GROUPS = 8
"""Column groups :func:`row_topk` prunes with (measured best of 4–64 at M = 4,608 and 18,432, k = 32)."""


def row_topk(x_nM: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_nM.topk(k, dim=-1, sorted=False)`` over the last dimension: the same entries (any of the equal
    ones where values tie), faster on CPU for wide rows. torch's CPU top-k partially sorts a copy of every
    whole row; here the row is cut into ``G`` strided slices of ``B = M/G`` columns, their elementwise max
    (one vectorised pass) gives each column group {c, c + B, …} its maximum, and only the k groups with the
    largest maxima can hold the row's top k (the k-th largest entry is at least the k-th largest group
    maximum, and every other group's entries are at most that), so the top k are taken among those k·G
    candidates. 1.3–1.9× faster than ``topk`` at k = 32, M = 4,608–18,432 on 2 cores. Elsewhere (other
    devices, narrow or ragged rows) it is ``topk`` itself."""
    m, groups = x_nM.shape[-1], TOPK_GROUPS
    if x_nM.device.type != "cpu" or m % groups or m // groups < 8 * k or not x_nM.is_contiguous():
        return x_nM.topk(k, dim=-1, sorted=False)
    width = m // groups
    group_max_nB = x_nM.unflatten(-1, (groups, width)).amax(dim=-2)
    best_nK = group_max_nB.topk(k, dim=-1, sorted=False)[1]
    cand_nC = (best_nK.unsqueeze(-1) + torch.arange(0, m, width, device=x_nM.device)).flatten(-2)
    vals_nK, pick_nK = x_nM.gather(-1, cand_nC).topk(k, dim=-1, sorted=False)
    return vals_nK, cand_nC.gather(-1, pick_nK)


def _sort_cols(vals_nK: torch.Tensor, idx_nK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx_nK, perm = idx_nK.sort(dim=-1)
    return vals_nK.gather(-1, perm), idx_nK


def _per_row_coo(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> COO:
    vals_NK = torch.cat([p[0] for p in parts])
    idx_NK = torch.cat([p[1] for p in parts])
    n, k = idx_NK.shape
    rows = torch.arange(n, device=idx_NK.device).repeat_interleave(k)
    return rows, idx_NK.flatten(), vals_NK.flatten()


@dataclass
class TopKSelect:
    """The k largest pre-activations of every token (ReLU is the caller's)."""

    k: int

    def chunk(self, pre_nM: torch.Tensor, row0: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _sort_cols(*row_topk(pre_nM, self.k))

    def finish(self, parts, pre_rows) -> COO:
        return _per_row_coo(parts)


class DeadTopKSelect:
    """AuxK's selection: each token's ``k_aux`` largest pre-activations among the ``dead_M`` latents
    (all of them when fewer are dead), keeping only the positive ones (the backward's cost is per entry,
    and many dead latents' pre-activations are negative). Reads only the dead columns."""

    def __init__(self, dead_M: torch.Tensor, k_aux: int):
        self.dead_idx = dead_M.nonzero().flatten()
        self.k = min(k_aux, self.dead_idx.numel())

    def chunk(self, pre_nM: torch.Tensor, row0: int) -> tuple[torch.Tensor, torch.Tensor]:
        vals, local = pre_nM.index_select(1, self.dead_idx.to(pre_nM.device)).topk(
            self.k, dim=-1, sorted=False
        )
        return _sort_cols(vals, self.dead_idx.to(pre_nM.device)[local])

    def finish(self, parts, pre_rows) -> COO:
        rows, cols, vals = _per_row_coo(parts)
        keep = vals > 0  # AuxK's ReLU zeroes the others: they add nothing forward and get no gradient
        return rows[keep], cols[keep], vals[keep]


class DenseColumns:
    """Not a selection but a block: every pre-activation of the latents ``idx``, as a dense (N, B) tensor
    (AuxK's dead block when a token keeps a large share of it). Its gradient reaches the encoder through
    the same sparse backward as the selections', as two small GEMMs over the block."""

    def __init__(self, idx: torch.Tensor):
        self.idx = idx

    def chunk(self, pre_nM: torch.Tensor, row0: int) -> torch.Tensor:
        return pre_nM.index_select(1, self.idx.to(pre_nM.device))

    def finish(self, parts, pre_rows) -> torch.Tensor:
        return torch.cat(parts)


@dataclass
class BatchTopKSelect:
    """The k·N largest pre-activations of the whole (N, M) batch (Bussmann et al.), found without a top-k
    over all N·M entries (1.9 s for N = 4096, M = 18432 on 2 CPU cores): each chunk keeps its rows'
    ``candidates · k`` largest entries, the batch top-k runs over those, and a row whose every candidate
    was selected above the threshold (it may hold more) is recomputed in full and selected again. Exact up
    to ties, like any top-k. The COO is sorted by (row, col), like
    :func:`saekit.sae.common.batch_topk_relu`'s."""

    k: int
    candidates: int = 4

    def chunk(self, pre_nM: torch.Tensor, row0: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = min(pre_nM.shape[1], self.candidates * self.k)
        return pre_nM.topk(c, dim=-1, sorted=False)

    def finish(self, parts, pre_rows) -> COO:
        vals_NC = torch.cat([p[0] for p in parts])
        idx_NC = torch.cat([p[1] for p in parts])
        n, c = vals_NC.shape
        m = pre_rows.width
        n_sel = min(self.k * n, n * m)
        rows_NC = torch.arange(n, device=vals_NC.device)[:, None].expand(n, c)
        flat_vals, flat_rows, flat_cols = vals_NC.flatten(), rows_NC.flatten(), idx_NC.flatten()
        top = flat_vals.topk(n_sel, sorted=False)
        if c < m:
            saturated = (vals_NC.min(dim=1).values > top.values.min()).nonzero().flatten()
            if saturated.numel():  # these rows may hold more than their candidates: take them whole
                full_sM = pre_rows(saturated)
                keep = ~torch.isin(flat_rows, saturated)
                flat_vals = torch.cat([flat_vals[keep], full_sM.flatten()])
                flat_rows = torch.cat([flat_rows[keep], saturated.repeat_interleave(m)])
                flat_cols = torch.cat(
                    [flat_cols[keep], torch.arange(m, device=saturated.device).repeat(len(saturated))]
                )
                top = flat_vals.topk(n_sel, sorted=False)
        key = flat_rows[top.indices] * m + flat_cols[top.indices]
        order = stable_argsort(key)
        key = key[order]
        return key // m, key % m, top.values[order]


@torch.no_grad()
def select_chunked(
    xc_ND: torch.Tensor,
    W_enc_DM: torch.Tensor,
    b_enc_M: torch.Tensor | None,
    selectors: Sequence[Selector],
    chunk_rows: int | None = None,
) -> list[Selection]:
    """Run every selector over π = xc W_enc + b_enc, computed ``chunk_rows`` tokens at a time into one
    reused buffer (default: :data:`CHUNK_ELEMENTS` entries per chunk). No gradient."""
    n, m = xc_ND.shape[0], W_enc_DM.shape[1]
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, m))
    buf = xc_ND.new_empty(min(step, n), m)
    parts: list[list[Any]] = [[] for _ in selectors]
    for start in range(0, n, step):
        x_nD = xc_ND[start : start + step]
        pre_nM = buf[: x_nD.shape[0]]
        if b_enc_M is None:
            torch.mm(x_nD, W_enc_DM, out=pre_nM)
        else:
            torch.addmm(b_enc_M, x_nD, W_enc_DM, out=pre_nM)
        for sel, acc in zip(selectors, parts, strict=True):
            acc.append(sel.chunk(pre_nM, start))
    del buf
    pre_rows = PreRows(xc_ND, W_enc_DM, b_enc_M)
    return [sel.finish(acc, pre_rows) for sel, acc in zip(selectors, parts, strict=True)]


class _SelectedPreacts(torch.autograd.Function):
    """The entries (rows, cols) of π = (x − b_dec) W_enc + b_enc, already computed (``vals``) by
    :func:`select_chunked`, and a dense block π[:, block_idx] (``block_NB``, possibly empty); backward as
    in the module docstring for every entry of every selection, plus two small GEMMs for the block, all
    into one gradient per parameter."""

    @staticmethod
    def forward(ctx, x_ND, W_enc_DM, b_enc_M, b_dec_D, rows, cols, vals, xc_ND, block_idx, block_NB):  # noqa: D102
        ctx.save_for_backward(xc_ND, W_enc_DM, rows, cols, block_idx)
        return vals.clone(), block_NB.clone()

    @staticmethod
    def backward(ctx, grad_S, grad_NB):  # noqa: D102
        xc_ND, W_enc_DM, rows, cols, block_idx = ctx.saved_tensors
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        kern, grad_S = kernels_for(grad_S), grad_S.contiguous()
        n, m = xc_ND.shape[0], W_enc_DM.shape[1]
        block = block_idx.numel() > 0
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        if need_W:  # ∂W_encᵀ[c] = Σ_{s: cols_s = c} g_s · xc[rows_s]
            order, offsets = _bag_by(cols, m)
            grad_W_MD = kern.bag_sum(rows[order], offsets, xc_ND, grad_S[order])
            if block:
                grad_W_MD.index_add_(0, block_idx, grad_NB.t() @ xc_ND)
            grad_W = grad_W_MD.t()
        if need_b_enc or need_b_dec:
            grad_M = grad_S.new_zeros(m).index_add_(0, cols, grad_S)
            if block:
                grad_M.index_add_(0, block_idx, grad_NB.sum(dim=0))
            grad_b_enc = grad_M if need_b_enc else None
            grad_b_dec = -(W_enc_DM @ grad_M) if need_b_dec else None
        if need_x:  # ∂x[n] = Σ_{s: rows_s = n} g_s · W_enc[:, cols_s]
            order, offsets = _bag_by(rows, n)
            grad_x = kern.bag_sum(cols[order], offsets, W_enc_DM.t(), grad_S[order])
            if block:
                grad_x.addmm_(grad_NB, W_enc_DM.index_select(1, block_idx).t())
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None, None, None, None


def sparse_encode(
    x_ND: torch.Tensor,
    W_enc_DM: torch.Tensor,
    b_enc_M: torch.Tensor | None,
    b_dec_D: torch.Tensor | None,
    selectors: Sequence[Selector],
    chunk_rows: int | None = None,
) -> list[Selection]:
    """The selections of π = (x − b_dec) W_enc + b_enc (either bias may be None), one per selector: COO
    whose values are the selected pre-activations (before any ReLU), or the (N, B) block of a
    :class:`DenseColumns` (at most one), with a sparse backward to x, W_enc, b_enc and b_dec. The dense π is
    never kept: only (x − b_dec) and the indices are saved."""
    with torch.no_grad():
        xc_ND = x_ND if b_dec_D is None else x_ND - b_dec_D
        results = select_chunked(xc_ND, W_enc_DM, b_enc_M, selectors, chunk_rows)
    inputs = (x_ND, W_enc_DM, b_enc_M, b_dec_D)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        return results
    coos = [r for r in results if isinstance(r, tuple)]
    blocks = [(sel, r) for sel, r in zip(selectors, results, strict=True) if isinstance(r, torch.Tensor)]
    if len(blocks) > 1:
        raise ValueError("sparse_encode takes at most one DenseColumns selector")
    block_idx = blocks[0][0].idx.to(x_ND.device) if blocks else _NO_INDEX.to(x_ND.device)
    block_NB = blocks[0][1] if blocks else xc_ND.new_empty(xc_ND.shape[0], 0)
    rows = torch.cat([c[0] for c in coos])
    cols = torch.cat([c[1] for c in coos])
    vals, block_NB = _SelectedPreacts.apply(
        *inputs, rows, cols, torch.cat([c[2] for c in coos]), xc_ND, block_idx, block_NB
    )
    pieces = iter(vals.split([c[2].shape[0] for c in coos]))
    return [block_NB if isinstance(r, torch.Tensor) else (r[0], r[1], next(pieces)) for r in results]
