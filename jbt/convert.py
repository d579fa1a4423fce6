"""Checkpoint conversion between Hugging Face and jbt (the library side of convert/*.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jbt import checkpoint, hf, hf_io
from jbt.errors import JbtError
from jbt.model import ModelConfig


def hf_to_jbt(
    src: str | Path,
    out: str | Path,
    *,
    num_labels: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    shardings_fn: Any = None,
) -> ModelConfig:
  """Imports an HF directory or GGUF file into a jbt model directory, atomically."""
  out = Path(out)
  if out.is_file():
    raise JbtError(f"{out}: exists and is a file")
  cfg, source, hf_cfg, tokenizer, has_head = hf_io.read_hf(src, num_labels=num_labels)
  shardings = shardings_fn(cfg) if shardings_fn is not None else None
  params = hf.load_params(cfg, source, where=str(src), shardings=shardings, allow_missing_head=not has_head, seed=seed)
  if num_labels is not None and num_labels != cfg.num_labels:  # the checkpoint's own head, resized
    cfg, params = hf_io.change_head(cfg, params, num_labels)
  with hf_io.atomic_dir(out, overwrite=overwrite) as tmp:
    checkpoint.write_model_meta(tmp, cfg, hf_cfg, tokenizer)
    checkpoint.save_params(tmp / "params", params)
  return cfg


def load_any(path: str | Path, shardings_fn: Any = None) -> tuple[ModelConfig, Any, dict[str, Any], Any]:
  """(config, params, HF config, tokenizer) from a jbt model directory or an HF directory/GGUF."""
  import transformers

  path = Path(path)
  if (path / checkpoint.MODEL_FILE).exists():
    cfg, params, hf_cfg, tok_dir = checkpoint.load_model_dir(path, shardings_fn)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.exists() else None
    return cfg, params, hf_cfg, tokenizer
  cfg, source, hf_cfg, tokenizer, has_head = hf_io.read_hf(path)
  shardings = shardings_fn(cfg) if shardings_fn is not None else None
  params = hf.load_params(cfg, source, where=str(path), shardings=shardings, allow_missing_head=not has_head)
  return cfg, params, hf_cfg, tokenizer


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
    cfg, params = hf_io.change_head(cfg, params, num_labels)
  with hf_io.atomic_dir(Path(out), overwrite=overwrite) as tmp:
    hf_io.write_hf_dir(cfg, params, tmp, base_config=hf_config, tokenizer=tokenizer)
  return cfg


def jbt_to_hf(ckpt: str | Path, out: str | Path, *, num_labels: int | None = None, overwrite: bool = False) -> ModelConfig:
  cfg, params, hf_cfg, tokenizer = load_any(ckpt)
  return export_hf(cfg, params, out, hf_config=hf_cfg, tokenizer=tokenizer, num_labels=num_labels, overwrite=overwrite)
