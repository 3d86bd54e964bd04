"""The jobs behind `saekit features` and `saekit report`: find the SAE and its run, load the model and the
text the SAE names, and write feature records or the report next to the run.

Where things go: for a run folder ``RUN`` (holding ``sae/``), records go to ``RUN/features`` and the report to
``RUN/report``. A run's ``sae/`` folder counts as the run. For a bare SAE folder (``cfg.json`` inside),
records and report go inside that folder (``SAE/features``, ``SAE/report``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saekit.activations.extract import DEFAULT_OUTLIER_FACTOR
from saekit.analysis.features import FeatureConfig
from saekit.analysis.records import META_FILE, FeatureRecords, load_records

FEATURES_DIR, REPORT_DIR = "features", "report"
RUN_MARKERS = ("run_config.json", "metrics.jsonl", "summary.json", "train_summary.json")
DEFAULT_FEATURE_TOKENS = 32_768


def locate(path: str | Path) -> tuple[Path, Path]:
    """(SAE folder, home folder) for a run folder, a run's ``sae/`` folder or a bare SAE folder."""
    path = Path(path)
    if (path / "sae" / "cfg.json").is_file():
        return path / "sae", path
    if (path / "cfg.json").is_file():
        parent = path.parent
        if path.name == "sae" and any((parent / m).exists() for m in RUN_MARKERS):
            return path, parent
        return path, path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(
        f"{path} is neither a run folder (holding sae/cfg.json) nor an SAE folder (holding cfg.json)"
    )


def run_features(
    sae_path: str | Path,
    *,
    model: str | None = None,
    hook: str | None = None,
    text: str | None = None,
    split: str = "all",
    n_tokens: int = DEFAULT_FEATURE_TOKENS,
    cfg: FeatureConfig | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    loaded: Any = None,
) -> FeatureRecords:
    """Compute and save the feature records of the SAE at ``sae_path`` (see :mod:`saekit.analysis.features`).

    Model, hook point, text, context length and the excluded positions default to what the SAE was trained
    with (its ``cfg.json`` metadata); ``loaded`` is an already loaded model to use instead of ``model``."""
    from saekit.data import iter_texts, pack_contexts
    from saekit.jobs import load_sae_in_model
    from saekit.sae import load_sae

    from .features import collect_features

    if n_tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {n_tokens}")
    cfg = cfg or FeatureConfig()
    cfg.validate()
    sae_dir, home = locate(sae_path)
    sae = load_sae(sae_dir)
    run = load_sae_in_model(sae, model=model, hook=hook, loaded=loaded)
    hook, model_name, loaded, extract = run.hook, run.model_name, run.loaded, run.extract
    text = text or extract.get("text", "stdlib")
    context_len = int(extract.get("context_len", 128))
    outlier = extract.get("outlier_factor", DEFAULT_OUTLIER_FACTOR) or None
    out = Path(out) if out else home / FEATURES_DIR
    print(
        f"saekit features: {sae.width:,} latents of {sae_dir} at {hook} of {model_name}, "
        f"{n_tokens:,} tokens of {text} ({split}) → {out}",
        flush=True,
    )
    contexts = pack_contexts(iter_texts(text, split), loaded.tokenizer, context_len)
    records = collect_features(
        sae,
        loaded.model,
        loaded.tokenizer,
        hook,
        contexts,
        n_tokens=n_tokens,
        cfg=cfg,
        exclude_special=not extract.get("keep_special", False),
        outlier_factor=outlier,
        meta={
            "sae": {
                "path": str(sae_dir),
                "arch": sae.arch,
                "d_in": sae.d_in,
                "width": sae.width,
                "sha256": _sae_hash(sae_dir),
            },
            "model": model_name,
            "text": text,
            "split": split,
            "context_len": context_len,
        },
        progress=progress,
    )
    records.save(out)
    s = records.summary
    dead = int((s["fires"] == 0).sum())
    print(
        f"recorded {records.meta['n_tokens']:,} tokens in {records.meta['seconds']:.0f} s: "
        f"{dead:,} of {records.width:,} latents never fired; median density of the others "
        f"{_median_alive(s['density']):.2e}  →  {out}",
        flush=True,
    )
    return records


def _sae_hash(sae_dir: Path) -> str:
    from saekit.models.loading import sha256_file
    from saekit.sae.io import WEIGHTS_FILE

    return sha256_file(sae_dir / WEIGHTS_FILE)


def _median_alive(density) -> float:
    import numpy as np

    alive = density[density > 0]
    return float(np.median(alive)) if alive.size else 0.0


def find_records(home: Path, sae_dir: Path) -> Path | None:
    """The records folder of a run or SAE, if one was computed (also looks inside a run's sae/)."""
    for candidate in (home / FEATURES_DIR, sae_dir / FEATURES_DIR):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def run_report(
    path: str | Path,
    *,
    out: str | Path | None = None,
    features: str | Path | None = None,
    compute: dict[str, Any] | None = None,
    latent_pngs: int = 0,
) -> Path:
    """Write the static report of a run (or SAE folder) and return its ``index.html``.

    Records come from ``features`` or the run's ``features/`` folder; when there are none they are computed
    first with :func:`run_features` and the options in ``compute`` (model, hook, text, split, n_tokens).
    ``latent_pngs`` also writes PNG plots for that many latents (by decreasing maximum activation)."""
    from saekit.analysis.report import write_report

    sae_dir, home = locate(path)
    records_dir = Path(features) if features else find_records(home, sae_dir)
    if records_dir is None:
        opts = dict(compute or {})
        print(
            f"no feature records in {home / FEATURES_DIR} yet: computing them first "
            f"(the same as `saekit features {path}`)",
            flush=True,
        )
        run_features(path, **opts)
        records_dir = home / FEATURES_DIR
    else:
        print(f"using the feature records in {records_dir} (`saekit features` recomputes them)", flush=True)
    records = load_records(records_dir, arrays=True)
    recorded = (records.meta.get("sae") or {}).get("sha256")
    if recorded and recorded != _sae_hash(sae_dir):
        print(
            f"warning: the feature records in {records_dir} were computed for other SAE weights than "
            f"{sae_dir} holds now; run `saekit features {path}` to recompute them",
            flush=True,
        )
    out = Path(out) if out else home / REPORT_DIR
    index = write_report(records, out, run_dir=home, latent_pngs=latent_pngs)
    print(f"report for {records.width:,} latents: open {index.resolve().as_uri()}", flush=True)
    return index
