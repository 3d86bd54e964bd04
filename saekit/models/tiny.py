"""Tiny random models and a byte-level tokenizer, built in memory with no download.

Tests use them to exercise the real code paths (hook mapping, capture, splice, extraction, splice
fidelity) in milliseconds; users can use them to try a pipeline before loading a real model.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
N_SPECIAL = 3
BYTE_VOCAB = 256 + N_SPECIAL


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per UTF-8 byte plus BOS (id 0), EOS (id 1) and PAD (id 2).

    Like SmolLM2's tokenizer it does not add BOS by itself; packing code prepends it.
    """
    byte_tokens = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    vocab = {BOS: 0, EOS: 1, PAD: 2}
    for i, ch in enumerate(sorted(byte_tokens)):
        vocab[ch] = i + N_SPECIAL
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split("", "isolated"),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD
    )


def tiny_llama(n_layers: int = 4, d_model: int = 32, seed: int = 0, **config: Any) -> LlamaForCausalLM:
    """A randomly initialised Llama-family model (same module layout as SmolLM2); ``config`` overrides
    ``LlamaConfig`` fields (e.g. ``head_dim``)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            "vocab_size": BYTE_VOCAB,
            "hidden_size": d_model,
            "intermediate_size": 2 * d_model,
            "num_hidden_layers": n_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
            "tie_word_embeddings": True,
            **config,
        }
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(n_layers: int = 4, d_model: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2-family model."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=BYTE_VOCAB,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=4,
        n_positions=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return GPT2LMHeadModel(cfg).eval()
