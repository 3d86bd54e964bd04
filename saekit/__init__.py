"""saekit: train, evaluate and analyse sparse autoencoders on neural-network activations.

The two calls most users need from Python:

* ``saekit.load(path)`` → a saved SAE (``encode``, ``decode``, ``forward``) that takes raw activations;
* ``saekit.open_cache(path)`` → an activation cache: token ids and, per hook point, an (N, d) memory-mapped
  array aligned with them.
"""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load an SAE: a saekit folder (cfg.json + sae.safetensors) or a run folder holding sae/; another
    library's SAE, detected by content (a SAELens or sparsify folder, a dictionary_learning ae.pt, a Gemma
    Scope params.npz; see docs/formats.md); or ``hf:OWNER/NAME[/SUBFOLDER]`` on the Hugging Face hub."""
    from saekit.formats import load as _load

    return _load(path, device=device)


def open_cache(path, verify="size"):
    """Open an activation cache made by ``saekit cache`` (see :mod:`saekit.activations`)."""
    from saekit.activations import open_cache as _open

    return _open(path, verify=verify)


__all__ = ["load", "open_cache", "__version__"]
