"""Checkpoint conversion between Hugging Face and jbt (the library side of convert/*.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jbt.atomic import atomic_dir
from jbt.checkpoint import model_dir
from jbt.checkpoint.load import ShardingsFn, load_model
from jbt.errors import JbtError
from jbt.hf.files import write_hf_dir
from jbt.hf.params import change_head
from jbt.model import ModelConfig


def hf_to_jbt(
    src: str | Path,
    out: str | Path,
    *,
    num_labels: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    shardings_fn: ShardingsFn | None = None,
) -> ModelConfig:
  """Imports an HF directory or GGUF file (or a jbt directory) into a jbt model directory, atomically."""
  out = Path(out)
  if out.is_file():
    raise JbtError(f"{out}: exists and is a file")
  m = load_model(src, shardings_fn=shardings_fn, num_labels=num_labels, seed=seed)
  with atomic_dir(out, overwrite=overwrite) as tmp:
    model_dir.write_model_meta(tmp, m.cfg, m.hf_config, m.tokenizer)
    model_dir.save_params(tmp / "params", m.params)
  return m.cfg


def export_hf(
    cfg: ModelConfig,
    params: Any,
    out: str | Path,
    *,
    hf_config: dict[str, Any] | None,
    tokenizer: Any,
    num_labels: int | None = None,
    overwrite: bool = False,
) -> ModelConfig:
  """Writes an HF ...ForSequenceClassification directory atomically; returns the exported config."""
  if num_labels is not None:
    cfg, params = change_head(cfg, params, num_labels)
  with atomic_dir(Path(out), overwrite=overwrite) as tmp:
    write_hf_dir(cfg, params, tmp, base_config=hf_config, tokenizer=tokenizer)
  return cfg


def jbt_to_hf(ckpt: str | Path, out: str | Path, *, num_labels: int | None = None, overwrite: bool = False) -> ModelConfig:
  """A jbt model directory (or any model jbt loads) -> an HF directory."""
  m = load_model(ckpt)
  return export_hf(m.cfg, m.params, out, hf_config=m.hf_config, tokenizer=m.tokenizer, num_labels=num_labels,
                   overwrite=overwrite)
