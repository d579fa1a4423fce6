"""jbt model checkpoints: an orbax parameter tree beside the model config and the tokenizer.

Layout of a model directory (what convert/hf_to_jbt.py writes):

    jbt_model.json   {"model": ModelConfig fields, "hf_config": the source's HF config}
    params/          orbax checkpoint of the float32 parameter tree
    tokenizer/       tokenizer files (save_pretrained), pad aligned with the model's pad_token_id
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from jbt.errors import JbtError
from jbt.model import ModelConfig, abstract_params

MODEL_FILE = "jbt_model.json"


def write_model_meta(out: Path, cfg: ModelConfig, hf_config: dict[str, Any] | None, tokenizer: Any) -> None:
  """The non-tensor half of a model directory: config JSON and tokenizer."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {"model": cfg.to_json(), "hf_config": hf_config or {}}
  (out / MODEL_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out / "tokenizer"))


def read_model_meta(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
  f = Path(path) / MODEL_FILE
  if not f.exists():
    raise JbtError(f"{path}: not a jbt checkpoint (no {MODEL_FILE})")
  try:
    meta = json.loads(f.read_text())
  except ValueError as e:
    raise JbtError(f"{f}: invalid JSON ({e})") from None
  try:
    cfg = ModelConfig.from_json(meta.get("model", {}))
  except (TypeError, ValueError) as e:
    raise JbtError(f"{f}: {e}") from None
  return cfg, meta.get("hf_config") or {}


def save_params(path: Path, params: Any) -> None:
  """Synchronous orbax save of a parameter tree (sharded arrays are written shard by shard)."""
  import orbax.checkpoint as ocp

  ckptr = ocp.StandardCheckpointer()
  ckptr.save(Path(path).absolute(), params)
  ckptr.wait_until_finished()


def restore_params(path: Path, cfg: ModelConfig, shardings: Any | None = None) -> Any:
  """Restores params straight into `shardings` (a params-shaped tree; None: default device)."""
  import orbax.checkpoint as ocp

  abstract = abstract_params(cfg)
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: dev, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  try:
    return ocp.StandardCheckpointer().restore(Path(path).absolute(), target)
  except Exception as e:
    raise JbtError(f"{path}: cannot restore parameters ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_model_dir(path: str | Path, shardings_fn: Any = None) -> tuple[ModelConfig, Any, dict[str, Any], Path]:
  """(model config, params, HF config, tokenizer dir) of a jbt model directory.

  `shardings_fn(cfg)` returns the params' shardings once the config is known.
  """
  path = Path(path)
  if not path.exists():
    raise JbtError(f"{path}: no such checkpoint directory")
  cfg, hf_config = read_model_meta(path)
  shardings = shardings_fn(cfg) if shardings_fn is not None else None
  params = restore_params(path / "params", cfg, shardings)
  return cfg, params, hf_config, path / "tokenizer"
