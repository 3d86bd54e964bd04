"""Atomic checkpoint files and the RNG state they carry.

A run can be killed at any moment, including in the middle of writing a checkpoint. The file is written
to a temporary name in the same directory, flushed to disk and renamed over the old one (``os.replace`` is
atomic on POSIX and Windows), so the checkpoint on disk is always a complete older or newer one.

Everything stored is a tensor or a plain Python value, so loading uses ``torch.load(weights_only=True)``
and a checkpoint file cannot run code.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from torch import nn

    from saekit.train.trainer import Trainer

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that readers only ever see a complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a saekit training checkpoint (format {FORMAT_VERSION})")
    return state


def arch_name(sae: nn.Module) -> str:
    return getattr(sae, "arch", type(sae).__name__)


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """Everything the remaining steps of a run depend on, as tensors and plain values."""
    return {
        "format": FORMAT_VERSION,
        "config_hash": trainer.cfg.config_hash(),
        "config": trainer.cfg.result_settings(),
        "sae_arch": arch_name(trainer.sae),
        "sae_cfg": trainer.sae.cfg.to_dict(),
        "sae_state": trainer.sae.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "dead": trainer.dead.state_dict(),
        "rng": get_rng_state(),
        "counters": {name: getattr(trainer, name) for name in _COUNTERS},
        "norm_scale": trainer.norm_scale,
        "init_done": trainer.init_done,
        "log_window": {
            "count": trainer.log_count,
            "sums": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in trainer.log_sums.items()},
        },
    }


_COUNTERS = ("step", "batches_consumed", "tokens", "rows_skipped", "train_seconds")


def restore_trainer(trainer: Trainer, state: dict[str, Any], *, source: str | Path = "checkpoint") -> None:
    """Put ``trainer`` back in the state ``trainer_state`` recorded, after checking that the checkpoint was
    written by the same training settings and the same SAE (anything else would not resume the same run)."""
    saved, now = state["config"], trainer.cfg.result_settings()
    if state["config_hash"] != trainer.cfg.config_hash():
        keys = sorted(set(now) | set(saved))
        diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
        raise ValueError(
            f"{source} was written with different training settings (checkpoint, now): {diff}. "
            "Use the same settings to resume, or another out_dir to start afresh."
        )
    sae = trainer.sae
    if state["sae_arch"] != arch_name(sae) or state["sae_cfg"] != sae.cfg.to_dict():
        raise ValueError(
            f"{source} holds a {state['sae_arch']} SAE with config {state['sae_cfg']}, "
            f"but this run has {arch_name(sae)} with {sae.cfg.to_dict()}"
        )
    sae.load_state_dict(state["sae_state"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.dead.load_state_dict(state["dead"])
    set_rng_state(state["rng"])
    for name in _COUNTERS:
        setattr(trainer, name, state["counters"][name])
    trainer.norm_scale, trainer.init_done = state["norm_scale"], state["init_done"]
    window = state["log_window"]
    trainer.log_count = window["count"]
    trainer.log_sums = {
        k: v.to(trainer.device) if torch.is_tensor(v) else v for k, v in window["sums"].items()
    }


def get_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
