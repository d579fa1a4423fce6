"""Reward normalisation statistics: stored in a model's config, used by jbt.label and jbt.evaluate.

A Bradley-Terry reward is defined up to a constant: its scale and offset drift from run to run,
so thresholds and mixtures of reward models need them pinned. At the end of training jbt stores
the mean and (population) standard deviation of the final model's rewards over the eval pairs'
responses (both members of every eval pair) in the exported config, under NORM_KEY:

    "jbt_reward_normalization": {"mean": float, "std": float, "responses": int, "source": str}

in FINAL/config.json and in final/'s jbt meta (its "hf_config"). `python -m jbt.evaluate
--calibrate` recomputes them on the pairs it scores and writes them to the model's config.
The model itself is unchanged: transformers still scores the raw reward (the logits are never
altered); `jbt.label --normalize` writes (reward - mean) / std, and `jbt.evaluate` reports the
normalised means beside the raw ones when a model has the statistics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jbt.errors import JbtError

NORM_KEY = "jbt_reward_normalization"


def record(mean: float, std: float, responses: int, source: str) -> dict[str, Any]:
  """The stored statistics (NORM_KEY's value)."""
  return {"mean": float(mean), "std": float(std), "responses": int(responses), "source": source}


def stats(rewards: Any, source: str) -> dict[str, Any]:
  """mean, population std and count of a set of rewards."""
  r = np.asarray(rewards, np.float64).ravel()
  if r.size == 0:
    raise JbtError("no rewards to compute normalisation statistics from")
  return record(r.mean(), r.std(), r.size, source)


def _config_file(model: Path) -> tuple[Path, bool]:
  """(the JSON file holding the model's config, whether it is a jbt meta file)."""
  from jbt.checkpoint.model_dir import MODEL_FILE

  if (model / MODEL_FILE).is_file():
    return model / MODEL_FILE, True
  if (model / "config.json").is_file():
    return model / "config.json", False
  raise JbtError(f"{model}: no config.json or {MODEL_FILE} to read or store normalisation statistics in")


def read(model: str | Path) -> dict[str, Any] | None:
  """The model's stored statistics, or None."""
  f, meta = _config_file(Path(model))
  d = json.loads(f.read_text())
  got = (d.get("hf_config") or {}).get(NORM_KEY) if meta else d.get(NORM_KEY)
  return got if isinstance(got, dict) and {"mean", "std"} <= set(got) else None


def write(model: str | Path, st: dict[str, Any]) -> Path:
  """Stores st in the model's config (atomically); returns the file written."""
  from jbt.atomic import atomic_file

  f, meta = _config_file(Path(model))
  d = json.loads(f.read_text())
  if meta:
    d.setdefault("hf_config", {})[NORM_KEY] = st
  else:
    d[NORM_KEY] = st
  with atomic_file(f) as out:
    out.write(json.dumps(d, indent=2, sort_keys=True))
  return f


def apply(rewards: Any, st: dict[str, Any]) -> np.ndarray:
  """(reward - mean) / std; a zero std (all rewards equal) divides by 1."""
  std = float(st["std"])
  return (np.asarray(rewards, np.float64) - float(st["mean"])) / (std if std > 0 and math.isfinite(std) else 1.0)
