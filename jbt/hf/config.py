"""Hugging Face config.json <-> ModelConfig: the fields every family shares, then the family's own."""

from __future__ import annotations

import math
from typing import Any, Mapping

from jbt.errors import JbtError
from jbt.hf import families
from jbt.model import ModelConfig


def longrope_attention_factor(factor: float | None, max_positions: int, old_len: int) -> float:
  """transformers' default LongRoPE attention factor (from the context extension ratio)."""
  factor = factor if factor is not None else max_positions / old_len
  return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))


def rope_scaling(rope: Mapping[str, Any], family: str, hf: Mapping[str, Any]) -> tuple | None:
  """ModelConfig.rope_scaling from one config.json rope_parameters dict (unsupported: JbtError)."""
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return None
  if rope_type in ("longrope", "su"):  # Phi-3 / Phi-4-mini; "su" is its old name
    old_len = int(rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"])
    scale = rope.get("attention_factor")
    if scale is None:
      scale = longrope_attention_factor(rope.get("factor"), int(hf["max_position_embeddings"]), old_len)
    return ("longrope", tuple(float(f) for f in rope["short_factor"]), tuple(float(f) for f in rope["long_factor"]),
            old_len, float(scale))
  if rope_type == "linear":
    return ("linear", float(rope["factor"]))
  if rope_type == "llama3":
    return ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
            float(rope["original_max_position_embeddings"]))
  raise JbtError(f"unsupported rope type {rope_type!r} in the {family} config (supported: default, linear, llama3, "
                 "longrope)")


def is_seq_cls(hf: Mapping[str, Any]) -> bool:
  """Whether the config is a ...ForSequenceClassification model's (carries a reward head)."""
  return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def model_config_from_hf(hf: Mapping[str, Any], *, num_labels: int | None = None, **overrides: Any) -> ModelConfig:
  """ModelConfig from a Hugging Face config dict. Unsupported features are a JbtError."""
  family = families.get(hf.get("model_type"))
  D, N = hf["hidden_size"], hf["num_attention_heads"]
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  if hf.get("pad_token_id") is None and hf.get("eos_token_id") is None:
    raise JbtError("the model config has neither pad_token_id nor eos_token_id; set one of them")
  eos = hf.get("eos_token_id")
  pad = hf.get("pad_token_id")
  if pad is None:  # HALOs' rule: pad falls back to eos
    pad = eos[0] if isinstance(eos, list) else eos
  if num_labels is None:  # to_dict() keeps id2label, not num_labels
    own = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
    num_labels = own if is_seq_cls(hf) else 2
  fields = dict(
      family=family.name,
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(D),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=int(N),
      num_kv_heads=int(hf.get("num_key_value_heads") or N),
      head_dim=int(hf.get("head_dim") or D // N),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rope_scaling=rope_scaling(rope, family.name, hf),
      num_labels=int(num_labels),
      pad_token_id=int(pad),
      initializer_range=float(hf.get("initializer_range", 0.02)),
  )
  fields.update(family.features(hf))
  fields.update(overrides)
  return ModelConfig(**fields)


def rope_parameters(theta: float, scaling: tuple | None, hf: dict[str, Any]) -> dict[str, Any]:
  """config.json's rope_parameters for one (rope_theta, ModelConfig.rope_scaling); LongRoPE also
  writes hf's original_max_position_embeddings."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
  if scaling and scaling[0] == "linear":
    rope.update(rope_type="linear", factor=scaling[1])
  elif scaling and scaling[0] == "longrope":
    _, short, long_, old_len, scale = scaling
    rope.update(rope_type="longrope", short_factor=list(short), long_factor=list(long_),
                original_max_position_embeddings=old_len)
    hf["original_max_position_embeddings"] = old_len
    max_positions = int(hf.get("max_position_embeddings") or old_len)
    if scale != longrope_attention_factor(None, max_positions, old_len):  # else transformers derives it
      rope["attention_factor"] = scale
  elif scaling:
    _, f, lo, hi, old = scaling
    rope.update(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                original_max_position_embeddings=int(old))
  return rope


def hf_config_for_export(cfg: ModelConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The config.json of the exported ...ForSequenceClassification model.

  Starts from the imported model's config (keeps bos/eos, max positions, ...) or, for a model
  trained from scratch, from transformers' defaults for the family.
  """
  import transformers

  family = families.get(cfg.family)
  hf = dict(base or {})
  hf.pop("rope_scaling", None)
  rope = rope_parameters(cfg.rope_theta, cfg.rope_scaling, hf)
  hf.update(
      model_type=family.name,
      architectures=[family.architecture],
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps,
      rope_parameters=rope,
      pad_token_id=cfg.pad_token_id,
      num_labels=cfg.num_labels,
      id2label={str(i): f"LABEL_{i}" for i in range(cfg.num_labels)},
      label2id={f"LABEL_{i}": i for i in range(cfg.num_labels)},
      initializer_range=cfg.initializer_range,
  )
  family.export(cfg, hf)
  # Round-trip through transformers so the dict is complete and valid for this version.
  kwargs = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version", "_name_or_path")}
  out = transformers.AutoConfig.for_model(family.name, **kwargs).to_dict()
  out["architectures"] = [family.architecture]
  return out
