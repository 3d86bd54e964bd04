"""Sparse autoencoder architectures behind one interface (:mod:`saekit.sae.base`).

Importing this package imports every module in it, and so registers every architecture: an architecture
is one new file here, and ``get_architecture(name)`` finds it.
"""

import importlib
import pkgutil

from .base import SAE, SAEConfig, SAEOutput, StepContext, available_architectures, get_architecture, register
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .gated import GatedConfig, GatedSAE
from .io import load_sae, save_sae
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .relu import ReLUConfig, ReLUSAE
from .topk import TopKConfig, TopKSAE

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

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
