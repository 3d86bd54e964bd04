"""Model loading (embedded SmolLM2, GGUF files, folders, hub ids) and model-independent hook points."""

from saekit.models.hooks import (
    FAMILIES,
    KINDS,
    Family,
    capture,
    forward_to_hooks,
    hook_layer,
    hook_points,
    hook_width,
    n_layers,
    splice,
    validate_hooks,
)
from saekit.models.loading import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelUnavailableError,
    cache_root,
    load_model,
    smollm2_gguf_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "KINDS",
    "Family",
    "LoadedModel",
    "ModelUnavailableError",
    "cache_root",
    "capture",
    "forward_to_hooks",
    "hook_layer",
    "hook_points",
    "hook_width",
    "load_model",
    "n_layers",
    "smollm2_gguf_path",
    "splice",
    "validate_hooks",
]
