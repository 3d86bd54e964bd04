"""Other libraries' SAE formats: import SAELens, sparsify, dictionary_learning and Gemma Scope SAEs as saekit
SAEs, and export saekit SAEs to SAELens' folder format.

Each foreign SAE becomes an existing saekit architecture whose ``encode``/``decode`` compute what the foreign
library computes (to float rounding); where a foreign parameterisation differs (no ``b_dec`` subtraction,
codes rescaled by decoder norms) the difference is folded into the weights, and what cannot be represented is
refused with an error naming the field. The mapping tables are in each module's docstring and in
docs/formats.md.

    saekit.load("path/to/saelens_or_sparsify_folder")     # detected by content
    saekit.load("hf:google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")
    import_sae(src, out)                                  # a saekit folder: features/report/info work on it
    export_sae(sae, out, format="saelens")                # SAE.load_from_disk(out) in SAELens
"""

from .common import FormatError
from .dispatch import EXPORTERS, LOADERS, NAMES, detect_format, export_sae, foreign_hint, import_sae, load
from .hub import HubUnavailableError

__all__ = [
    "EXPORTERS",
    "LOADERS",
    "NAMES",
    "FormatError",
    "HubUnavailableError",
    "detect_format",
    "export_sae",
    "foreign_hint",
    "import_sae",
    "load",
]
