"""Text sources, the built-in standard-library corpus, tokenization and packing into contexts."""

from saekit.data.packing import count_contexts_needed, pack_contexts, special_token_ids, tokenize_batch
from saekit.data.sources import (
    HELDOUT_EVERY,
    MAX_DOC_CHARS,
    SPLITS,
    describe_source,
    iter_texts,
    parse_hf_spec,
    select_split,
)
from saekit.data.stdlib_corpus import describe_stdlib, stdlib_docstrings

__all__ = [
    "HELDOUT_EVERY",
    "MAX_DOC_CHARS",
    "SPLITS",
    "count_contexts_needed",
    "describe_source",
    "describe_stdlib",
    "iter_texts",
    "pack_contexts",
    "parse_hf_spec",
    "select_split",
    "special_token_ids",
    "stdlib_docstrings",
    "tokenize_batch",
]
