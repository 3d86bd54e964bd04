"""Logit effects: the tokens each latent's decoder row promotes and suppresses through the unembedding.

A latent adds ``f · W_dec[m]`` to the residual stream; read straight through the unembedding (skipping the
layers between the hook point and the output, the "direct path"), that changes the logits by
``f · W_dec[m] @ W_U.T``. The final norm's elementwise weight g is folded in (``(W_dec[m] ∘ g) @ W_U.T``),
since every logit passes through it; its division by the RMS/standard deviation is a positive per-token
scale that changes no ranking and is left out, as is its bias (the same for every latent). Each row is then
centred over the vocabulary, because a shift of all logits by one constant changes no probability.
Values are logit change per unit of latent activation.
"""

from __future__ import annotations

import torch
from torch import nn


def _final_norm_weight(model: nn.Module) -> torch.Tensor | None:
    """The weight of the final norm before the unembedding (Llama ``model.norm``, GPT-2 ``ln_f``), if any."""
    base = getattr(model, "base_model", model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        module = getattr(base, name, None)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.detach()
    return None


@torch.no_grad()
def logit_effects(
    W_dec_MD: torch.Tensor, model: nn.Module, k: int, *, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(up_ids, up_values, down_ids, down_values), each (M, k): the k most promoted and most suppressed
    tokens per latent. None when the decoder rows are not residual-stream vectors (their width differs from
    the unembedding's), e.g. an SAE on an MLP's hidden layer. Works in chunks of latents so the (M, vocab)
    matrix is never held whole."""
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None or getattr(unembed, "weight", None) is None:
        return None
    W_U_VD = unembed.weight.detach().float()
    if W_U_VD.shape[1] != W_dec_MD.shape[1]:
        return None
    g_D = _final_norm_weight(model)
    if g_D is not None and g_D.shape[0] == W_U_VD.shape[1]:
        W_U_VD = W_U_VD * g_D.float().to(W_U_VD.device)
    k = min(k, W_U_VD.shape[0])
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    for start in range(0, W_dec_MD.shape[0], chunk):
        rows_CD = W_dec_MD[start : start + chunk].detach().float().to(W_U_VD.device)
        eff_CV = rows_CD @ W_U_VD.T
        eff_CV -= eff_CV.mean(dim=1, keepdim=True)
        up_v, up_i = eff_CV.topk(k, dim=1)
        down_v, down_i = (-eff_CV).topk(k, dim=1)
        for out, t in zip(outs, (up_i, up_v, down_i, -down_v), strict=True):
            out.append(t.cpu())
    up_i, up_v, down_i, down_v = (torch.cat(o) for o in outs)
    return up_i, up_v, down_i, down_v
