"""Sparse autoencoder architectures behind one interface (:mod:`saekit.sae.base`).

Importing this package registers every architecture, so ``get_architecture(name)`` finds them all.
"""

from . import batchtopk, gated, jumprelu, relu, topk  # noqa: F401  (registers the architectures)
from .base import SAE, SAEConfig, SAEOutput, StepContext, available_architectures, get_architecture, register
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .gated import GatedConfig, GatedSAE
from .io import load_sae, save_sae
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .relu import ReLUConfig, ReLUSAE
from .topk import TopKConfig, TopKSAE

__all__ = [
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "StepContext",
    "available_architectures",
    "get_architecture",
    "register",
    "save_sae",
    "load_sae",
    "ReLUConfig",
    "ReLUSAE",
    "TopKConfig",
    "TopKSAE",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
]
