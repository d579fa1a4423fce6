"""The model families jbt maps to and from Hugging Face: one spec each, the list defined here once.

A family spec says which transformers classes it is, which ModelConfig feature flags its HF
config sets, which keys of config.json are its own on export, and its parameter table rows
(jbt.hf.params.standard_rows unless the family lays its tensors out differently, e.g. fused
projections). Shared helpers: layer_windows / export_layer_types (config.json's layer_types <->
ModelConfig's sliding_window / per-layer layer_windows). To add a family: one spec below, the model features it needs (jbt/model), and a
tiny model in tests/tinymodels.py (the tests loop over FAMILIES and fail on a family without one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from jbt.errors import JbtError
from jbt.model import ModelConfig


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_windows(hf: Mapping[str, Any], window: int | None) -> dict[str, Any]:
  """sliding_window for models whose layers all slide, layer_windows for those that mix sliding and
  full layers (config.json's layer_types), neither for full attention everywhere."""
  n = int(hf["num_hidden_layers"])
  types = list(hf.get("layer_types") or ["sliding_attention"] * n)
  if len(types) != n or set(types) - set(LAYER_TYPES):
    raise JbtError(f"{hf.get('model_type')} config: layer_types must be {n} of {', '.join(LAYER_TYPES)}, got {types}")
  if not window or "sliding_attention" not in types:
    return dict(sliding_window=None, layer_windows=None)
  if "full_attention" not in types:
    return dict(sliding_window=int(window), layer_windows=None)
  return dict(sliding_window=None, layer_windows=tuple(int(window) if t == "sliding_attention" else 0 for t in types))


def export_layer_types(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  """layer_types and sliding_window of config.json, the inverse of layer_windows."""
  windows = cfg.layer_windows or (cfg.sliding_window or 0,) * cfg.num_layers
  hf.update(sliding_window=cfg.max_window, layer_types=[LAYER_TYPES[w > 0] for w in windows])


def _sliding_window_qwen(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Qwen2 / Qwen3: windows only where use_sliding_window is set; without layer_types, the layers
  from max_window_layers on slide (as transformers derives them)."""
  window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
  if window and not hf.get("layer_types"):
    first = int(hf.get("max_window_layers", 28))  # transformers' default
    hf = dict(hf, layer_types=[LAYER_TYPES[i >= first] for i in range(int(hf["num_hidden_layers"]))])
  return layer_windows(hf, window)


def _export_sliding_window_qwen(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  export_layer_types(cfg, hf)
  hf["use_sliding_window"] = cfg.max_window is not None
  if cfg.sliding_window is not None:
    hf["max_window_layers"] = 0


@dataclasses.dataclass(frozen=True)
class Family:
  """What jbt needs to know about one Hugging Face model family."""

  name: str  # config.json's model_type
  architecture: str  # the ...ForSequenceClassification class written on export
  # HF config dict -> the ModelConfig feature fields this family sets (sizes, rope and pad are common)
  features: Callable[[Mapping[str, Any]], dict[str, Any]]
  # writes this family's own keys into the exported config.json dict
  export: Callable[[ModelConfig, dict[str, Any]], None]
  # ModelConfig -> parameter table rows; None: jbt.hf.params.standard_rows
  rows: Callable[[ModelConfig], list[Any]] | None = None


def _llama_features(hf: Mapping[str, Any]) -> dict[str, Any]:
  bias = bool(hf.get("attention_bias", False))
  return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _llama_export(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


def _mistral_features(hf: Mapping[str, Any]) -> dict[str, Any]:
  window = hf.get("sliding_window")
  return dict(_llama_features(hf), sliding_window=int(window) if window else None)


def _mistral_export(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  hf["sliding_window"] = cfg.sliding_window


def _qwen2_features(hf: Mapping[str, Any]) -> dict[str, Any]:
  return dict(qkv_bias=True, o_bias=False, mlp_bias=False, **_sliding_window_qwen(hf))


def _qwen3_features(hf: Mapping[str, Any]) -> dict[str, Any]:
  bias = bool(hf.get("attention_bias", False))
  return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True, **_sliding_window_qwen(hf))


def _qwen3_export(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  hf.update(attention_bias=cfg.qkv_bias)
  _export_sliding_window_qwen(cfg, hf)


def _olmo2_features(hf: Mapping[str, Any]) -> dict[str, Any]:
  bias = bool(hf.get("attention_bias", False))
  return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True, qk_norm_scope="projection",
              pre_norms=False, post_norms=True, norm_scale_f32=True)


def _olmo2_export(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  hf.update(attention_bias=cfg.qkv_bias)


def _phi3_features(hf: Mapping[str, Any]) -> dict[str, Any]:
  rope = hf.get("rope_parameters") or {}
  window = hf.get("sliding_window")
  return dict(qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=int(window) if window else None,
              partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))))


def _phi3_export(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  hf.update(sliding_window=cfg.sliding_window, partial_rotary_factor=cfg.partial_rotary_factor)
  hf["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor


def _phi3_rows(cfg: ModelConfig) -> list[Any]:
  """Phi-3's fused tensors: q, k, v rows in one qkv_proj, gate then up rows in one gate_up_proj."""
  from jbt.hf.params import TRANSPOSE, fused, in_proj, standard_rows

  N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  L = "model.layers.{i}."
  split = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
  return [e for e in standard_rows(cfg) if not e.hf_key.endswith(split)] + [
      fused(L + "self_attn.qkv_proj.weight",
            [("attn/q", N * H, in_proj(N, H)), ("attn/k", K * H, in_proj(K, H)), ("attn/v", K * H, in_proj(K, H))]),
      fused(L + "mlp.gate_up_proj.weight", [("mlp/gate", F, TRANSPOSE), ("mlp/up", F, TRANSPOSE)]),
  ]


def _gemma2_features(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Gemma 2: (1 + w) norms before and after attention and MLP, embeddings times sqrt(D), GeGLU,
  logits over sqrt(query_pre_attn_scalar) and soft-capped, alternating sliding and full layers."""
  act = hf.get("hidden_activation") or hf.get("hidden_act")
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise JbtError(f"{hf.get('model_type')} config: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
  bias = bool(hf.get("attention_bias", False))
  cap = hf.get("attn_logit_softcapping")
  return dict(qkv_bias=bias, o_bias=bias, mlp_bias=False, pre_norms=True, post_norms=True, norm_scale_f32=True,
              norm_offset=1.0, embed_scale=True, mlp_activation="gelu_tanh",
              query_scale=float(hf["query_pre_attn_scalar"]), attn_softcap=float(cap) if cap else None,
              **layer_windows(hf, hf.get("sliding_window")))


def _gemma2_export(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  export_layer_types(cfg, hf)
  if hf["sliding_window"] is None:  # transformers needs one even when no layer slides: its default
    hf.pop("sliding_window")
  scalar = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim
  hf.update(attention_bias=cfg.qkv_bias, hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=cfg.attn_softcap,
            query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar)


def _gemma3_features(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Gemma 3 text: Gemma 2's layout with per-head (1 + w) q/k norms, no soft-capping by default,
  and its own rope (base, scaling) on the sliding layers."""
  from jbt.hf.config import rope_scaling

  if hf.get("use_bidirectional_attention"):
    raise JbtError(f"{hf.get('model_type')} config: use_bidirectional_attention is not supported (causal only)")
  rope = hf.get("rope_parameters") or {}
  full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
  name = str(hf.get("model_type"))
  local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4)))
  return dict(_gemma2_features(hf), qk_norm=True, rope_theta=float(full.get("rope_theta", 1e6)),
              rope_scaling=rope_scaling(full, name, hf), local_rope=(local_theta, rope_scaling(local, name, hf)))


def _gemma3_export(cfg: ModelConfig, hf: dict[str, Any]) -> None:
  from jbt.hf.config import rope_parameters

  _gemma2_export(cfg, hf)
  local = cfg.local_rope or (cfg.rope_theta, cfg.rope_scaling)
  hf["rope_parameters"] = {"full_attention": rope_parameters(cfg.rope_theta, cfg.rope_scaling, hf),
                           "sliding_attention": rope_parameters(*local, hf)}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaForSequenceClassification", _llama_features, _llama_export),
    Family("mistral", "MistralForSequenceClassification", _mistral_features, _mistral_export),
    Family("qwen2", "Qwen2ForSequenceClassification", _qwen2_features, _export_sliding_window_qwen),
    Family("qwen3", "Qwen3ForSequenceClassification", _qwen3_features, _qwen3_export),
    Family("olmo2", "Olmo2ForSequenceClassification", _olmo2_features, _olmo2_export),
    Family("phi3", "Phi3ForSequenceClassification", _phi3_features, _phi3_export, _phi3_rows),
    Family("gemma2", "Gemma2ForSequenceClassification", _gemma2_features, _gemma2_export),
    Family("gemma3_text", "Gemma3TextForSequenceClassification", _gemma3_features, _gemma3_export),
)}


def default_features(name: str) -> dict[str, Any]:
  """The feature flags of a family's model as transformers configures it by default (for a model
  trained from scratch: a random "olmo2" model has OLMo 2's norms, and exports as one). Sliding
  windows are left out: like the sizes, they are the random config's own choice."""
  import transformers

  features = get(name).features(transformers.AutoConfig.for_model(name).to_dict())
  features.pop("sliding_window", None)
  features.pop("layer_windows", None)
  return features


def get(name: str | None, where: str = "") -> Family:
  """The spec of family `name`, or a JbtError listing the supported ones."""
  if name not in FAMILIES:
    raise JbtError(f"{where}unsupported architecture: model_type {name!r}; supported: {', '.join(FAMILIES)}")
  return FAMILIES[name]
