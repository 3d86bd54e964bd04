"""Activations: extraction from a model, the on-disk cache, its shuffled reader, the streaming shuffle buffer
and the normalization scalar. See each module's docstring for the why."""

from saekit.activations.buffer import ShuffleBuffer
from saekit.activations.cache import FORMAT_VERSION, ActivationCache, CacheError, open_cache, read_manifest
from saekit.activations.extract import (
    DEFAULT_OUTLIER_FACTOR,
    ActivationBatch,
    NormTracker,
    iter_activations,
    iter_source_activations,
)
from saekit.activations.normalize import estimate_norm_scale
from saekit.activations.reader import ShardedArray, shuffled_batches
from saekit.activations.writer import write_cache

__all__ = [
    "DEFAULT_OUTLIER_FACTOR",
    "FORMAT_VERSION",
    "ActivationBatch",
    "ActivationCache",
    "CacheError",
    "NormTracker",
    "ShardedArray",
    "ShuffleBuffer",
    "estimate_norm_scale",
    "iter_activations",
    "iter_source_activations",
    "open_cache",
    "read_manifest",
    "shuffled_batches",
    "write_cache",
]
