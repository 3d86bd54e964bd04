"""Training metrics: a JSONL file always, Weights & Biases or TensorBoard only when asked for.

The optional integrations are imported inside the constructor, so saekit never needs them installed and
importing saekit never pays for them. Each JSONL record is one line written and flushed at once; a run
killed mid-line leaves a partial last line, which the readers here skip.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl file (a truncated or corrupt line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only records up to ``last_step``: on resume, the steps after the checkpoint are redone and
    would otherwise be logged twice."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the information as text
    return value


class MetricsLogger:
    """Append records to ``out_dir/metrics.jsonl`` and mirror numeric values to wandb/TensorBoard."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        wandb_project: str | None = None,
        tensorboard: bool = False,
        run_config: dict[str, Any] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / METRICS_NAME
        self._file = open(self.path, "a")
        self._wandb = None
        self._tb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    "wandb_project is set but the wandb package is not installed (pip install wandb)"
                ) from e
            self._wandb = wandb.init(project=wandb_project, config=run_config, dir=str(self.out_dir))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "tensorboard=True needs the tensorboard package (pip install tensorboard)"
                ) from e
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        step = int(record.get("step", 0))
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for key, value in numeric.items():
                if key != "step":
                    self._tb.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
