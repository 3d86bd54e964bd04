"""Tokenization and packing of documents into fixed-length contexts.

Documents are tokenized in batches (fast tokenizers parallelise a batch in Rust), joined into one
token stream with the EOS token after every document, and the stream is cut into contexts of
`context_len` tokens; the last, partial context is dropped so every context has the same length and
no padding is ever needed. With `prepend_bos` each context is ``[BOS] + (context_len - 1)`` stream
tokens, which is what models trained with a BOS (SmolLM2, Llama) see at position 0; the tokenizers of
those models often don't add BOS themselves, so it is added here and only here.

Choices worth knowing:
- The tokenizer adds no special tokens (``add_special_tokens=False``), and special-token *text* inside a
  document (a docstring that mentions ``"<s>"`` or ``"<|endoftext|>"``) is tokenized as plain text
  (``split_special_tokens=True``), so control tokens only ever appear where packing puts them.
- Documents are tokenized whole, without truncation, so they are usually longer than the model's
  maximum length; that is harmless because no context is longer than `context_len`. Transformers'
  warning about it ("Token indices sequence length is longer ...") is turned off with
  ``verbose=False``, the tokenizer's own switch for exactly that warning.
- A tokenizer without a BOS token: contexts are all stream tokens, and a warning says so.
- A tokenizer without an EOS token: documents are concatenated with no separator, and a warning says so.
- Deterministic: the same texts, tokenizer and settings give the same contexts.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator

import torch


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, PAD, UNK and `all_special_ids`).

    Analysis code uses this to leave control tokens out of statistics and top-activation contexts.
    """
    ids: set[int] = set()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    for value in getattr(tokenizer, "all_special_ids", None) or ():
        if isinstance(value, int):
            ids.add(value)
    return ids


def count_contexts_needed(n_tokens: int, context_len: int, *, skip_first: int = 0) -> int:
    """How many contexts of `context_len` give at least `n_tokens` usable positions when the first
    `skip_first` positions of each context are not used (e.g. 1 to leave out BOS activations)."""
    usable = context_len - skip_first
    if usable <= 0:
        raise ValueError(f"context_len {context_len} leaves no positions after skipping {skip_first}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    return math.ceil(n_tokens / usable)


def tokenize_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: no special tokens added, special-token text kept as text, no truncation
    and no warning about sequences longer than the model's maximum length."""
    if not texts:
        return []
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        split_special_tokens=True,
        truncation=False,
        padding=False,
        return_attention_mask=False,
        verbose=False,
    )
    return encoded["input_ids"]


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def pack_contexts(
    texts: Iterable[str],
    tokenizer,
    context_len: int,
    *,
    prepend_bos: bool = True,
    batch_docs: int = 64,
) -> Iterator[torch.Tensor]:
    """Yield LongTensor contexts of shape (context_len,) packed from `texts` (see the module docstring).

    Streams: memory holds one batch of `batch_docs` documents and less than one context of leftover
    tokens. Empty documents (no tokens) are skipped and get no EOS.
    """
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    name = type(tokenizer).__name__
    if prepend_bos and bos is None:
        warnings.warn(
            f"{name} has no BOS token; packing contexts without a leading BOS", UserWarning, stacklevel=2
        )
        prepend_bos = False
    if eos is None:
        warnings.warn(
            f"{name} has no EOS token; documents are concatenated with no separator",
            UserWarning,
            stacklevel=2,
        )
    body_len = context_len - 1 if prepend_bos else context_len
    if body_len < 1:
        raise ValueError(
            f"context_len must be >= {2 if prepend_bos else 1} (prepend_bos={prepend_bos}), got {context_len}"
        )
    return _pack(texts, tokenizer, context_len, body_len, bos if prepend_bos else None, eos, batch_docs)


def _pack(
    texts: Iterable[str],
    tokenizer,
    context_len: int,
    body_len: int,
    bos: int | None,
    eos: int | None,
    batch_docs: int,
) -> Iterator[torch.Tensor]:
    pending: list[int] = []  # stream tokens not yet emitted; fewer than body_len between batches
    for batch in _batched(texts, batch_docs):
        for ids in tokenize_batch(tokenizer, batch):
            if not ids:
                continue
            pending.extend(ids)
            if eos is not None:
                pending.append(eos)
        n_full = len(pending) // body_len
        if n_full == 0:
            continue
        body_CT = torch.tensor(pending[: n_full * body_len], dtype=torch.long).view(n_full, body_len)
        del pending[: n_full * body_len]
        if bos is not None:
            contexts_CT = torch.empty(n_full, context_len, dtype=torch.long)
            contexts_CT[:, 0] = bos
            contexts_CT[:, 1:] = body_CT
        else:
            contexts_CT = body_CT
        # Yield independent tensors so a consumer keeping one context doesn't pin the whole batch.
        for row in contexts_CT:
            yield row.clone()
