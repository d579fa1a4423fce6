"""Metric sinks: metrics.jsonl (always), TensorBoard and W&B (when configured)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def read_metrics(path: Path) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl in file order; a line cut by a kill (or not a metrics row) is
  skipped. Raises FileNotFoundError when there is no file."""
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
      rows.append(row)
  return rows


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return int(v) if np.issubdtype(v.dtype, np.integer) else float(v)


class MetricsWriter:
  """Writes one JSON line per record. On resume, lines past the restored step are dropped first,
  so the file reads as one uninterrupted run."""

  def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool, wandb_project: str,
               config: dict[str, Any] | None, enabled: bool = True):
    self.enabled = enabled
    run_dir = run_dir if hasattr(run_dir, "read_text") else Path(run_dir)  # a local or an epath (remote) path
    self.path = run_dir / "metrics.jsonl"
    self._tb = None
    self._wandb = None
    if not enabled:
      return
    if self.path.exists():
      kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
      self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    self._f = self.path.open("a")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
      except ImportError:
        self._tb = None
    if wandb_project:
      import wandb  # the user asked for it: a missing install should be loud

      self._wandb = wandb.init(project=wandb_project, name=run_dir.name, config=config, resume="allow")

  def write(self, step: int, metrics: dict[str, Any]) -> dict[str, float | int]:
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    if not self.enabled:
      return row
    self._f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                              for k, v in row.items()}) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)
    if self._wandb is not None:
      self._wandb.log(row, step=step)
    return row

  def close(self) -> None:
    if not self.enabled:
      return
    self._f.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
