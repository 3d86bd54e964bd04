"""Switch SAE (Mudide, Engels, Michaud, Tegmark, Schroeder de Witt, ICLR 2025, arXiv 2410.08201; spec §5).

A router sends each token to one of E expert blocks of m = M/E contiguous latents; only that block
encodes it, with a TopK SAE of its own:

    p = softmax((x − b_router) W_router)  ∈ Δ^E,    e = argmax_i p_i,    g = p_e   (1 with ``heaviside``)
    z = ReLU((x − b_dec) W_enc^(e))  ∈ R^m          (no encoder bias, as the reference)
    f = g · TopK_k(z)  in block e, 0 elsewhere,      x̂ = f W_dec + b_dec
    L = ‖x − x̂‖²  (summed over dims, mean over the batch: the reference's scale)  +  α · d · L_lb
    L_lb = E · Σ_i F_i P_i,   F_i = share of the batch routed to i,   P_i = mean over the batch of p_i

L_lb = 1 when routing is uniform (F = P = 1/E); the reference calls 1 its minimum, which is only
approximately true: it dips below 1 when the busiest expert gets the least confident tokens.
Scaling the code by g = p_e is what gives the router a reconstruction gradient; F_i is a count and gets
none, so L_lb trains the router through P_i only (Switch Transformer's loss).

The reference (amudide/switch_sae ``trainers/switch.py``) computes the full dense encoder and then masks
it. Here dispatch is sparse: tokens are sorted by expert and each group meets only its expert's encoder
columns (:class:`ExpertEncode`, whose backward writes the encoder gradient block by block instead of
materialising one dense (d, M) gradient per expert), and decoding reads only the k selected decoder rows
(:func:`saekit.sae.sparse.sparse_decode`, with its sparse backward); the output carries the code as COO.
Forward and every gradient equal those of the dense masked computation (tested in
float64). Per token the encoder costs 2d(E + M/E) FLOPs forward instead of 2dM (spec §5.4).

Choices and defaults (the spec's, unless noted):

* α = ``lb_alpha`` = 3, the value of every training script of the reference (its trainer default is 0.01).
  The reference trained on raw GPT-2 residuals; saekit's inputs have E‖x‖² = d, which makes the
  reconstruction term smaller next to α·d·L_lb than it was there.
* E = 16 experts (the reference's default; its width-matched sweeps use 16–128). k = 32 (saekit's TopK
  default, one of the paper's k values; the reference's trainer default is 100). k ≤ M/E is required:
  a token never has more than its block to choose from.
* No AuxK: the reference computes one but does not add it to the loss ("NO AUX LOSS").
* Init: unit-norm decoder rows with W_enc = W_decᵀ (the reference copies the encoder into the decoder);
  W_router ~ U(−1/√d, 1/√d), torch's ``nn.Linear`` default that the reference relies on; b_dec and
  b_router both at the trainer's centre (geometric median) in ``init_from_data``.
* Decoder rows unit-norm (constraint hooks). The reference also clips gradients at norm 1 and uses
  lr = 2e-4/√(M/2¹⁴); both are trainer settings (``grad_clip``, ``lr``), not part of this module.
* Latents must stay in their expert blocks, so ``permutable_latents`` is False and
  ``saekit.eval.progressive.permute_latents`` refuses to reorder them (truncation needs no reordering).
* Variants of the reference not implemented: ``switch1on`` (one always-on expert), ``moe`` (top-e experts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import SAE, SAEConfig, SAEOutput, SparseCode, StepContext, register
from .common import UnitNormDecoder, sparse_decode, sse, tied_init, topk_relu, topk_to_coo


@dataclass
class SwitchConfig(SAEConfig):
    n_experts: int = 16
    """E, the number of expert blocks; each owns width / E contiguous latents (width must divide evenly)."""
    k: int = 32
    """Active latents per token, all inside the token's expert block (k ≤ width / n_experts)."""
    lb_alpha: float = 3.0
    """α, the load-balancing coefficient: the loss adds α · d_in · L_lb (0 turns the term off)."""
    heaviside: bool = False
    """Gate the chosen expert's code by 1 instead of its router probability (the router then learns only
    from the load-balancing loss)."""

    def validate(self) -> None:
        super().validate()
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if self.width % self.n_experts:
            raise ValueError(
                f"width={self.width} must be a multiple of n_experts={self.n_experts} (equal expert blocks)"
            )
        if not 0 < self.k <= self.width // self.n_experts:
            raise ValueError(
                f"k must be in [1, width / n_experts = {self.width // self.n_experts}] (a token uses one "
                f"expert block), got k={self.k}"
            )
        if self.lb_alpha < 0:
            raise ValueError(f"lb_alpha must be >= 0, got {self.lb_alpha}")

    @property
    def expert_width(self) -> int:
        return self.width // self.n_experts


class ExpertEncode(torch.autograd.Function):
    """Grouped matmul: ``pre[n] = xs[n] @ W_enc[:, block(n)]`` for tokens sorted by expert, where expert i
    owns rows ``sum(counts[:i]) … sum(counts[:i+1])`` of ``xs`` and columns ``i·m … (i+1)·m`` of ``W_enc``.

    Autograd through E slices of ``W_enc`` would allocate a dense (d, M) gradient per slice; this backward
    writes each expert's block of one gradient: ∂W^(i) = xs_iᵀ g_i, ∂xs_i = g_i W^(i)ᵀ."""

    @staticmethod
    def forward(ctx, xs_ND: torch.Tensor, W_enc_DM: torch.Tensor, counts: list[int], m: int) -> torch.Tensor:
        ctx.save_for_backward(xs_ND, W_enc_DM)
        ctx.counts, ctx.m = counts, m
        pre_Nm = xs_ND.new_empty(xs_ND.shape[0], m)
        for i, start, end in _spans(counts):
            torch.matmul(xs_ND[start:end], W_enc_DM[:, i * m : (i + 1) * m], out=pre_Nm[start:end])
        return pre_Nm

    @staticmethod
    def backward(ctx, grad_Nm: torch.Tensor):
        xs_ND, W_enc_DM = ctx.saved_tensors
        m, grad_Nm = ctx.m, grad_Nm.contiguous()
        grad_x = torch.empty_like(xs_ND) if ctx.needs_input_grad[0] else None  # every row is written
        grad_W = torch.zeros_like(W_enc_DM) if ctx.needs_input_grad[1] else None
        for i, start, end in _spans(ctx.counts):
            W_Dm, g_nm = W_enc_DM[:, i * m : (i + 1) * m], grad_Nm[start:end]
            if grad_x is not None:
                torch.matmul(g_nm, W_Dm.t(), out=grad_x[start:end])
            if grad_W is not None:
                grad_W[:, i * m : (i + 1) * m] = xs_ND[start:end].t() @ g_nm
        return grad_x, grad_W, None, None


def _spans(counts: list[int]):
    """(expert, first row, end row) of each non-empty expert group in the sorted batch."""
    start = 0
    for i, n in enumerate(counts):
        if n:
            yield i, start, start + n
        start += n


@register("switch")
class SwitchSAE(UnitNormDecoder, SAE):
    config_class = SwitchConfig
    cfg: SwitchConfig
    # The router's tensors have no latent axis, even when E or d_in happens to equal the width.
    latent_axes = {"W_router": None, "b_router": None}
    permutable_latents = False  # each expert owns a contiguous block of latents

    def __init__(self, cfg: SwitchConfig):
        super().__init__(cfg)
        W_enc, W_dec = tied_init(cfg.d_in, cfg.width)
        self.W_enc = nn.Parameter(W_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        bound = 1 / math.sqrt(cfg.d_in)
        self.W_router = nn.Parameter(torch.empty(cfg.d_in, cfg.n_experts).uniform_(-bound, bound))
        self.b_router = nn.Parameter(torch.zeros(cfg.d_in))

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p_NE, gate_N, expert_N)``: router probabilities, the chosen expert's gate g and its index."""
        p_NE = torch.softmax((x_ND - self.b_router) @ self.W_router, dim=-1)
        top_p_N, expert_N = p_NE.max(dim=-1)
        gate_N = torch.ones_like(top_p_N) if self.cfg.heaviside else top_p_N
        return p_NE, gate_N, expert_N

    def dispatch(
        self, x_ND: torch.Tensor, gate_N: torch.Tensor, expert_N: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's code in its expert's block: ``(vals_NK, cols_NK)``, with global latent indices.

        Tokens are grouped by expert (stable sort), encoded by :class:`ExpertEncode`, top-k'd inside the
        block, and put back in batch order."""
        m = self.cfg.expert_width
        order_N = torch.argsort(expert_N, stable=True)
        counts = torch.bincount(expert_N, minlength=self.cfg.n_experts).tolist()
        pre_Nm = ExpertEncode.apply((x_ND - self.b_dec)[order_N], self.W_enc, counts, m)
        vals_NK, idx_NK = topk_relu(pre_Nm, self.cfg.k)
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(len(order_N), device=order_N.device)
        vals_NK = vals_NK[inverse_N] * gate_N[:, None]
        return vals_NK, idx_NK[inverse_N] + expert_N[:, None] * m

    def dense_code(self, vals_NK: torch.Tensor, cols_NK: torch.Tensor) -> torch.Tensor:
        """(N, M) code from its k entries per token, scattered in place (no copy of an (N, M) tensor)."""
        return vals_NK.new_zeros(vals_NK.shape[0], self.cfg.width).scatter_(-1, cols_NK, vals_NK)

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        _, gate_N, expert_N = self.route(x_ND)
        return self.dense_code(*self.dispatch(x_ND, gate_N, expert_N))

    def decode(self, f_NM: torch.Tensor) -> torch.Tensor:
        return f_NM @ self.W_dec + self.b_dec

    def load_balance(self, p_NE: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        """L_lb = E · Σ_i F_i P_i (1 when routing is uniform); gradient through P only."""
        frac_E = torch.bincount(expert_N, minlength=self.cfg.n_experts).to(p_NE.dtype) / len(expert_N)
        return self.cfg.n_experts * (frac_E * p_NE.mean(dim=0)).sum()

    def forward(self, x_ND: torch.Tensor, ctx: StepContext | None = None) -> SAEOutput:
        p_NE, gate_N, expert_N = self.route(x_ND)
        vals_NK, cols_NK = self.dispatch(x_ND, gate_N, expert_N)
        rows, cols, vals = topk_to_coo(vals_NK, cols_NK)
        x_hat_ND = sparse_decode(rows, cols, vals, x_ND.shape[0], self.W_dec) + self.b_dec
        code = SparseCode(rows, cols, vals, (x_ND.shape[0], self.width))  # f is built only if read
        l_lb = self.load_balance(p_NE, expert_N)
        losses = {"recon": sse(x_ND, x_hat_ND)}
        if self.cfg.lb_alpha > 0:
            losses["load_balance"] = self.cfg.lb_alpha * self.cfg.d_in * l_lb
        metrics = {"l0": (vals > 0).sum().detach() / x_ND.shape[0], "l_lb": l_lb.detach()}
        return SAEOutput(x_hat_ND, None, losses, metrics, code=code)

    def init_from_data(self, sample: torch.Tensor, b_dec_init: torch.Tensor | None) -> None:
        """b_dec and b_router both start at the centre (the reference's geometric median of a batch)."""
        super().init_from_data(sample, b_dec_init)
        if b_dec_init is not None:
            with torch.no_grad():
                self.b_router.copy_(b_dec_init.to(self.b_router))

    def fold_input_scale(self, scale: float) -> None:
        """The router reads x − b_router: scale W_router up and b_router down as the encoder's pair."""
        super().fold_input_scale(scale)
        with torch.no_grad():
            self.W_router.mul_(scale)
            self.b_router.div_(scale)
