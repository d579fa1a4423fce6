"""The one mapping between Hugging Face checkpoints and jbt parameters, used in both directions.

`param_table(cfg)` is a declarative list of (jbt path, HF key, transform). Import reads HF
tensors one at a time and places each straight into its sharded layout; export walks the same
table backwards. Key sets and shapes are checked in full before a single tensor is copied.
RoPE needs no permutation: jbt uses HF's rotate_half layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from jbt.errors import JbtError
from jbt.model import ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}
# HF keys a causal-LM or base checkpoint may carry that the reward model does not use.
IGNORED_HF_KEYS = ("lm_head.weight",)


@dataclasses.dataclass(frozen=True)
class Transform:
  """A pair of inverse maps between one HF tensor and one jbt tensor (per layer)."""

  to_jbt: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda a: a, lambda a: a)
TRANSPOSE = Transform(lambda a: a.T, lambda a: a.T)


def _in_proj(heads: int, head_dim: int) -> Transform:
  """HF [heads*H, D] (out, in) <-> jbt [D, heads, H]."""
  return Transform(
      lambda a: a.T.reshape(a.shape[1], heads, head_dim),
      lambda a: a.reshape(a.shape[0], heads * head_dim).T,
  )


def _out_proj(heads: int, head_dim: int) -> Transform:
  """HF [D, heads*H] <-> jbt [heads, H, D]."""
  return Transform(
      lambda a: a.T.reshape(heads, head_dim, a.shape[0]),
      lambda a: a.reshape(heads * head_dim, a.shape[-1]).T,
  )


def _head_bias(heads: int, head_dim: int) -> Transform:
  return Transform(lambda a: a.reshape(heads, head_dim), lambda a: a.reshape(heads * head_dim))


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple[str, ...]  # jbt parameter path under params
  hf_key: str  # may contain {i}: one HF tensor per layer, stacked on jbt's leading layer axis
  transform: Transform

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_key


def param_table(cfg: ModelConfig) -> list[Entry]:
  """The declarative HF <-> jbt table for one model config."""
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  L = "model.layers.{i}."
  rows: list[tuple[str, str, Transform]] = [
      ("embed", "model.embed_tokens.weight", IDENTITY),
      ("final_norm/scale", "model.norm.weight", IDENTITY),
      ("score", "score.weight", TRANSPOSE),
      ("attn_norm/scale", L + "input_layernorm.weight", IDENTITY),
      ("mlp_norm/scale", L + "post_attention_layernorm.weight", IDENTITY),
      ("attn/q", L + "self_attn.q_proj.weight", _in_proj(N, H)),
      ("attn/k", L + "self_attn.k_proj.weight", _in_proj(K, H)),
      ("attn/v", L + "self_attn.v_proj.weight", _in_proj(K, H)),
      ("attn/o", L + "self_attn.o_proj.weight", _out_proj(N, H)),
      ("mlp/gate", L + "mlp.gate_proj.weight", TRANSPOSE),
      ("mlp/up", L + "mlp.up_proj.weight", TRANSPOSE),
      ("mlp/down", L + "mlp.down_proj.weight", TRANSPOSE),
  ]
  if cfg.qkv_bias:
    rows += [
        ("attn/q_bias", L + "self_attn.q_proj.bias", _head_bias(N, H)),
        ("attn/k_bias", L + "self_attn.k_proj.bias", _head_bias(K, H)),
        ("attn/v_bias", L + "self_attn.v_proj.bias", _head_bias(K, H)),
    ]
  if cfg.o_bias:
    rows.append(("attn/o_bias", L + "self_attn.o_proj.bias", IDENTITY))
  if cfg.mlp_bias:
    rows += [
        ("mlp/gate_bias", L + "mlp.gate_proj.bias", IDENTITY),
        ("mlp/up_bias", L + "mlp.up_proj.bias", IDENTITY),
        ("mlp/down_bias", L + "mlp.down_proj.bias", IDENTITY),
    ]
  if cfg.qk_norm:
    rows += [
        ("attn/q_norm/scale", L + "self_attn.q_norm.weight", IDENTITY),
        ("attn/k_norm/scale", L + "self_attn.k_norm.weight", IDENTITY),
    ]
  table = []
  for path, key, tr in rows:
    if "{i}" in key:
      prefix = ("layers",) if cfg.scan_layers else ("layer_{i}",)
      table.append(Entry(prefix + tuple(path.split("/")), key, tr))
    else:
      table.append(Entry(tuple(path.split("/")), key, tr))
  return table


# ---------------------------------------------------------------------------------------------
# Configs


def model_config_from_hf(hf: Mapping[str, Any], *, num_labels: int | None = None, **overrides: Any) -> ModelConfig:
  """ModelConfig from a Hugging Face config dict. Unsupported features are a JbtError."""
  family = hf.get("model_type")
  if family not in ARCHITECTURES:
    raise JbtError(
        f"unsupported architecture: model_type {family!r} (architectures {hf.get('architectures')}); "
        f"supported: {', '.join(ARCHITECTURES)}"
    )
  D, N = hf["hidden_size"], hf["num_attention_heads"]
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    rope_scaling = None
  elif rope_type == "linear":
    rope_scaling = ("linear", float(rope["factor"]))
  elif rope_type == "llama3":
    rope_scaling = (
        "llama3",
        float(rope["factor"]),
        float(rope["low_freq_factor"]),
        float(rope["high_freq_factor"]),
        float(rope["original_max_position_embeddings"]),
    )
  else:
    raise JbtError(f"unsupported rope type {rope_type!r} in the {family} config (supported: default, linear, llama3)")
  sliding_window = None
  if family == "mistral":
    sliding_window = hf.get("sliding_window")
  elif hf.get("use_sliding_window") and hf.get("sliding_window"):
    kinds = set(hf.get("layer_types") or ["sliding_attention"])
    if kinds != {"sliding_attention"}:
      raise JbtError(f"{family} config mixes sliding and full attention layers; jbt supports one kind for all layers")
    sliding_window = hf["sliding_window"]
  if hf.get("pad_token_id") is None and hf.get("eos_token_id") is None:
    raise JbtError("the model config has neither pad_token_id nor eos_token_id; set one of them")
  eos = hf.get("eos_token_id")
  pad = hf.get("pad_token_id")
  if pad is None:  # HALOs' rule: pad falls back to eos
    pad = eos[0] if isinstance(eos, list) else eos
  if num_labels is None:  # to_dict() keeps id2label, not num_labels
    own = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
    num_labels = own if _is_seq_cls(hf) else 2
  fields = dict(
      family=family,
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(D),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=int(N),
      num_kv_heads=int(hf.get("num_key_value_heads") or N),
      head_dim=int(hf.get("head_dim") or D // N),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope_theta),
      rope_scaling=rope_scaling,
      qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
      o_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=family == "qwen3",
      sliding_window=int(sliding_window) if sliding_window else None,
      num_labels=int(num_labels),
      pad_token_id=int(pad),
      initializer_range=float(hf.get("initializer_range", 0.02)),
  )
  fields.update(overrides)
  return ModelConfig(**fields)


def _is_seq_cls(hf: Mapping[str, Any]) -> bool:
  return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def hf_config_for_export(cfg: ModelConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The config.json of the exported ...ForSequenceClassification model.

  Starts from the imported model's config (keeps bos/eos, max positions, ...) or, for a model
  trained from scratch, from transformers' defaults for the family.
  """
  import transformers

  hf = dict(base or {})
  hf.pop("rope_scaling", None)
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling and cfg.rope_scaling[0] == "linear":
    rope.update(rope_type="linear", factor=cfg.rope_scaling[1])
  elif cfg.rope_scaling:
    _, f, lo, hi, old = cfg.rope_scaling
    rope.update(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                original_max_position_embeddings=int(old))
  hf.update(
      model_type=cfg.family,
      architectures=[ARCHITECTURES[cfg.family]],
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
  if cfg.family == "llama":
    hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.family == "qwen3":
    hf.update(attention_bias=cfg.qkv_bias)
  if cfg.family == "mistral":
    hf["sliding_window"] = cfg.sliding_window
  elif cfg.family in ("qwen2", "qwen3"):
    hf.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
    hf.pop("layer_types", None)
    if cfg.sliding_window is not None:
      hf["max_window_layers"] = 0
  # Round-trip through transformers so the dict is complete and valid for this version.
  kwargs = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version", "_name_or_path")}
  out = transformers.AutoConfig.for_model(cfg.family, **kwargs).to_dict()
  out["architectures"] = [ARCHITECTURES[cfg.family]]
  return out


def _strip_prefix(keys: set[str]) -> str:
  """HF checkpoints of the base model have no 'model.' prefix; causal-LM and seq-cls ones do."""
  return "" if any(k.startswith("model.") for k in keys) else "model."


# ---------------------------------------------------------------------------------------------
# Tensor sources


class TensorSource:
  """Read-only access to named HF tensors, one at a time, as float32 numpy arrays."""

  def keys(self) -> set[str]:
    raise NotImplementedError

  def shape(self, key: str) -> tuple[int, ...]:
    raise NotImplementedError

  def get(self, key: str) -> np.ndarray:
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Import and export


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF key -> shape for every tensor the table maps, derived from the jbt parameter shapes."""
  abstract = abstract_params(cfg)
  out = {}
  for e in param_table(cfg):
    shp = _get_path(abstract, e.path, 0 if e.per_layer else None).shape
    if e.per_layer:
      one = tuple(shp[1:]) if cfg.scan_layers else tuple(shp)
      hf_shape = e.transform.to_hf(np.zeros(one, np.float32)).shape
      for i in range(cfg.num_layers):
        out[e.hf_key.format(i=i)] = tuple(hf_shape)
    else:
      out[e.hf_key] = tuple(e.transform.to_hf(np.zeros(shp, np.float32)).shape)
  return out


def abstract_params(cfg: ModelConfig) -> Any:
  """Parameter shapes (jax.ShapeDtypeStruct, with logical-axis boxes stripped), without allocating."""
  import flax.linen as nn

  from jbt.sharding import boxed_abstract_params

  return nn.unbox(boxed_abstract_params(cfg))


def _get_path(tree: Any, path: tuple[str, ...], layer: int | None) -> Any:
  node = tree
  for p in path:
    node = node[p.format(i=layer) if layer is not None else p]
  return node


def check_source(cfg: ModelConfig, source: TensorSource, where: str, *, allow_missing_head: bool) -> list[str]:
  """Compares key sets and shapes; raises one JbtError listing the problems. Returns missing keys
  that will be freshly initialised (the reward head of a causal-LM checkpoint)."""
  prefix = _strip_prefix(source.keys())
  have = {(k if not prefix else prefix + k) for k in source.keys()}
  want = expected_hf_shapes(cfg)
  missing = sorted(set(want) - have)
  fresh = [k for k in missing if k == "score.weight" and allow_missing_head]
  missing = [k for k in missing if k not in fresh]
  extra = sorted(k for k in have - set(want) if k not in IGNORED_HF_KEYS and not k.endswith("rotary_emb.inv_freq"))
  problems = []
  if missing:
    problems.append(f"missing keys {_few(missing)}")
  if extra:
    problems.append(f"unexpected keys {_few(extra)}")
  for k in sorted(set(want) & have):
    got = source.shape(k[len(prefix):] if prefix and k.startswith(prefix) else k)
    if tuple(got) != want[k]:
      problems.append(f"shape mismatch for {k}: checkpoint {tuple(got)}, config {want[k]}")
  if problems:
    raise JbtError(f"{where}: " + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
  return fresh


def _few(keys: list[str], n: int = 4) -> str:
  return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_params(
    cfg: ModelConfig,
    source: TensorSource,
    *,
    where: str,
    shardings: Any | None = None,
    allow_missing_head: bool = True,
    seed: int = 0,
) -> Any:
  """HF tensors -> jbt params, each placed straight into its sharding (never whole on one device).

  `shardings` is a params-shaped tree of jax.sharding.Sharding (None: default device). A missing
  reward head (causal-LM checkpoint) is drawn from normal(0, initializer_range) with `seed`.
  """
  fresh = check_source(cfg, source, where, allow_missing_head=allow_missing_head)
  prefix = _strip_prefix(source.keys())

  def read(key: str) -> np.ndarray:
    return source.get(key[len(prefix):] if prefix else key)

  abstract = abstract_params(cfg)

  def host_tensors() -> Iterable[tuple[tuple[str, ...], np.ndarray]]:
    for e in param_table(cfg):
      if not e.per_layer:
        if e.hf_key in fresh:
          shp = _get_path(abstract, e.path, None).shape
          rng = np.random.default_rng(seed)
          yield e.path, (rng.standard_normal(shp) * cfg.initializer_range).astype(np.float32)
        else:
          yield e.path, e.transform.to_jbt(read(e.hf_key))
      elif cfg.scan_layers:  # stacked on a leading layer axis
        yield e.path, np.stack([e.transform.to_jbt(read(e.hf_key.format(i=i))) for i in range(cfg.num_layers)])
      else:
        for i in range(cfg.num_layers):
          yield tuple(p.format(i=i) for p in e.path), e.transform.to_jbt(read(e.hf_key.format(i=i)))

  # One tensor at a time on the host; each device receives only the slices it owns.
  params: dict[str, Any] = {}
  for path, host in host_tensors():
    expect = _get_path(abstract, path, None)
    if tuple(host.shape) != tuple(expect.shape):
      raise JbtError(f"{where}: {'/'.join(path)} has shape {host.shape}, expected {expect.shape}")
    host = np.ascontiguousarray(host, dtype=np.float32)
    sharding = _get_path(shardings, path, None) if shardings is not None else None
    if sharding is None:
      arr = jax.device_put(host)
    else:
      arr = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = arr
  return params


def to_hf_state_dict(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
  """jbt params -> HF ...ForSequenceClassification state dict (float32 numpy, host)."""
  out: dict[str, np.ndarray] = {}
  for e in param_table(cfg):
    if e.per_layer and cfg.scan_layers:
      stacked = np.asarray(jax.device_get(_get_path(params, e.path, None)))
      for i in range(cfg.num_layers):
        out[e.hf_key.format(i=i)] = np.ascontiguousarray(e.transform.to_hf(stacked[i]))
    elif e.per_layer:
      for i in range(cfg.num_layers):
        a = np.asarray(jax.device_get(_get_path(params, e.path, i)))
        out[e.hf_key.format(i=i)] = np.ascontiguousarray(e.transform.to_hf(a))
    else:
      a = np.asarray(jax.device_get(_get_path(params, e.path, None)))
      out[e.hf_key] = np.ascontiguousarray(e.transform.to_hf(a))
  return out
