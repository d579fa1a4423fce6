"""Metric sinks: metrics.jsonl (always), TensorBoard and W&B (when configured)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return int(v) if np.issubdtype(v.dtype, np.integer) else float(v)


class MetricsWriter:
  """Writes one JSON line per record. On resume, lines past the restored step are dropped first,
  so the file reads as one uninterrupted run."""

  def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool, wandb_project: str,
               config: dict[str, Any] | None, enabled: bool = True):
    self.enabled = enabled
    self.path = Path(run_dir) / "metrics.jsonl"
    self._tb = None
    self._wandb = None
    if not enabled:
      return
    if self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line).get("step", 0) <= resume_step:
            kept.append(line)
        except ValueError:
          continue  # a line cut by a kill
      self.path.write_text("".join(k + "\n" for k in kept))
    self._f = self.path.open("a")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)
      except ImportError:
        self._tb = None
    if wandb_project:
      import wandb  # the user asked for it: a missing install should be loud

      self._wandb = wandb.init(project=wandb_project, name=Path(run_dir).name, config=config, resume="allow")

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
