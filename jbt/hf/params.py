"""The one mapping between Hugging Face tensors and jbt parameters, used in both directions.

`param_table(cfg)` is a declarative list of entries (HF key, jbt paths, transform). An entry maps
one HF tensor to one jbt parameter, or to several (a fused projection such as Phi-3's qkv_proj,
split by rows on import and concatenated again on export, bit-exact). Import reads HF tensors one
at a time and places each straight into its sharded layout; export walks the same table
backwards. Key sets and shapes are checked in full before a single tensor is copied. RoPE needs no
permutation: jbt uses HF's rotate_half layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from jbt.errors import JbtError
from jbt.hf import families
from jbt.hf.sources import TensorSource
from jbt.model import ModelConfig, abstract_params, lora

# HF keys a causal-LM or base checkpoint may carry that the reward model does not use.
IGNORED_HF_KEYS = ("lm_head.weight",)
Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
  """A pair of inverse maps between one HF tensor and one jbt tensor (per layer)."""

  to_jbt: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda a: a, lambda a: a)
TRANSPOSE = Transform(lambda a: a.T, lambda a: a.T)


def in_proj(heads: int, head_dim: int) -> Transform:
  """HF [heads*H, D] (out, in) <-> jbt [D, heads, H]."""
  return Transform(
      lambda a: a.T.reshape(a.shape[1], heads, head_dim),
      lambda a: a.reshape(a.shape[0], heads * head_dim).T,
  )


def out_proj(heads: int, head_dim: int) -> Transform:
  """HF [D, heads*H] <-> jbt [heads, H, D]."""
  return Transform(
      lambda a: a.T.reshape(heads, head_dim, a.shape[0]),
      lambda a: a.reshape(heads * head_dim, a.shape[-1]).T,
  )


def head_bias(heads: int, head_dim: int) -> Transform:
  return Transform(lambda a: a.reshape(heads, head_dim), lambda a: a.reshape(heads * head_dim))


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor <-> one or more jbt parameters (the parts of a fused tensor, in row order)."""

  hf_key: str  # may contain {i}: one HF tensor per layer, stacked on jbt's leading layer axis
  paths: tuple[Path_, ...]  # jbt parameter paths under params
  to_jbt: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[[Sequence[np.ndarray]], np.ndarray]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf_key


def one(path: str, hf_key: str, transform: Transform) -> Entry:
  """An entry for one HF tensor that is one jbt parameter."""
  return Entry(hf_key, (tuple(path.split("/")),), lambda a: (transform.to_jbt(a),), lambda parts: transform.to_hf(parts[0]))


def fused(hf_key: str, parts: Sequence[tuple[str, int, Transform]]) -> Entry:
  """An entry for one HF tensor whose leading (output) axis concatenates several jbt parameters:
  parts are (jbt path, rows of the HF tensor, transform of that slice), in order."""
  bounds = np.cumsum([0] + [rows for _, rows, _ in parts])

  def to_jbt(a: np.ndarray) -> tuple[np.ndarray, ...]:
    if a.shape[0] != bounds[-1]:
      raise ValueError(f"{hf_key}: {a.shape[0]} rows, expected {bounds[-1]}")
    return tuple(tr.to_jbt(a[lo:hi]) for (_, _, tr), lo, hi in zip(parts, bounds[:-1], bounds[1:]))

  def to_hf(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([tr.to_hf(x) for (_, _, tr), x in zip(parts, arrays)], axis=0)

  return Entry(hf_key, tuple(tuple(p.split("/")) for p, _, _ in parts), to_jbt, to_hf)


def standard_rows(cfg: ModelConfig) -> list[Entry]:
  """Llama-style tensors (separate q/k/v/o and gate/up/down), with the biases and q/k norms the
  config's feature flags ask for. Layer paths are relative ("attn/q"); param_table places them."""
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  L = "model.layers.{i}."
  rows = [
      one("embed", "model.embed_tokens.weight", IDENTITY),
      one("final_norm/scale", "model.norm.weight", IDENTITY),
      one("score", "score.weight", TRANSPOSE),
      one("attn/q", L + "self_attn.q_proj.weight", in_proj(N, H)),
      one("attn/k", L + "self_attn.k_proj.weight", in_proj(K, H)),
      one("attn/v", L + "self_attn.v_proj.weight", in_proj(K, H)),
      one("attn/o", L + "self_attn.o_proj.weight", out_proj(N, H)),
      one("mlp/gate", L + "mlp.gate_proj.weight", TRANSPOSE),
      one("mlp/up", L + "mlp.up_proj.weight", TRANSPOSE),
      one("mlp/down", L + "mlp.down_proj.weight", TRANSPOSE),
  ]
  rows += [one(path, L + hf + ".weight", IDENTITY) for path, hf in _layer_norm_names(cfg)]
  if cfg.qkv_bias:
    rows += [one("attn/q_bias", L + "self_attn.q_proj.bias", head_bias(N, H)),
             one("attn/k_bias", L + "self_attn.k_proj.bias", head_bias(K, H)),
             one("attn/v_bias", L + "self_attn.v_proj.bias", head_bias(K, H))]
  if cfg.o_bias:
    rows.append(one("attn/o_bias", L + "self_attn.o_proj.bias", IDENTITY))
  if cfg.mlp_bias:
    rows += [one("mlp/gate_bias", L + "mlp.gate_proj.bias", IDENTITY),
             one("mlp/up_bias", L + "mlp.up_proj.bias", IDENTITY),
             one("mlp/down_bias", L + "mlp.down_proj.bias", IDENTITY)]
  if cfg.qk_norm:
    whole = cfg.qk_norm_scope == "projection"  # HF [N*H] <-> jbt [N, H]
    rows += [one("attn/q_norm/scale", L + "self_attn.q_norm.weight", head_bias(N, H) if whole else IDENTITY),
             one("attn/k_norm/scale", L + "self_attn.k_norm.weight", head_bias(K, H) if whole else IDENTITY)]
  return rows


def _layer_norm_names(cfg: ModelConfig) -> list[tuple[str, str]]:
  """(jbt path, HF module) of a layer's norms: HF names them by position, so a post-attention norm
  is Llama's pre-MLP norm but OLMo 2's and Gemma 2's norm of the attention's output."""
  if cfg.pre_norms and cfg.post_norms:  # Gemma 2 / 3
    return [("attn_norm/scale", "input_layernorm"), ("post_attn_norm/scale", "post_attention_layernorm"),
            ("mlp_norm/scale", "pre_feedforward_layernorm"), ("post_mlp_norm/scale", "post_feedforward_layernorm")]
  if cfg.post_norms:  # OLMo 2
    return [("post_attn_norm/scale", "post_attention_layernorm"), ("post_mlp_norm/scale", "post_feedforward_layernorm")]
  return [("attn_norm/scale", "input_layernorm"), ("mlp_norm/scale", "post_attention_layernorm")]


def param_table(cfg: ModelConfig) -> list[Entry]:
  """The declarative HF <-> jbt table for one model config (its family's rows)."""
  family = families.get(cfg.family)
  rows = (family.rows or standard_rows)(cfg)
  prefix = ("layers",) if cfg.scan_layers else ("layer_{i}",)
  return [dataclasses.replace(e, paths=tuple(prefix + p for p in e.paths)) if e.per_layer else e for e in rows]


def _strip_prefix(keys: set[str]) -> str:
  """HF checkpoints of the base model have no 'model.' prefix; causal-LM and seq-cls ones do."""
  return "" if any(k.startswith("model.") for k in keys) else "model."


def _get_path(tree: Any, path: Path_, layer: int | None) -> Any:
  node = tree
  for p in path:
    node = node[p.format(i=layer) if layer is not None else p]
  return node


def _layer_shape(cfg: ModelConfig, abstract: Any, path: Path_, per_layer: bool) -> tuple[int, ...]:
  """The shape of one layer's (or a global) parameter: scanned stacks lose their layer axis."""
  shp = tuple(_get_path(abstract, path, 0 if per_layer else None).shape)
  return shp[1:] if per_layer and cfg.scan_layers else shp


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF key -> shape for every tensor the table maps, derived from the jbt parameter shapes."""
  abstract = abstract_params(cfg)
  out = {}
  for e in param_table(cfg):
    zeros = [np.zeros(_layer_shape(cfg, abstract, p, e.per_layer), np.float32) for p in e.paths]
    hf_shape = tuple(e.to_hf(zeros).shape)
    for i in range(cfg.num_layers) if e.per_layer else [None]:
      out[e.hf_key.format(i=i) if e.per_layer else e.hf_key] = hf_shape
  return out


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
  abstract = abstract_params(cfg)

  def read(e: Entry, layer: int | None) -> tuple[np.ndarray, ...]:
    key = e.hf_key.format(i=layer) if layer is not None else e.hf_key
    if key in fresh:
      shp = _layer_shape(cfg, abstract, e.paths[0], False)
      return ((np.random.default_rng(seed).standard_normal(shp) * cfg.initializer_range).astype(np.float32),)
    return e.to_jbt(source.get(key[len(prefix):] if prefix else key))

  def host_tensors() -> Iterable[tuple[Path_, np.ndarray]]:
    for e in param_table(cfg):
      if not e.per_layer:
        yield from zip(e.paths, read(e, None))
      elif cfg.scan_layers:  # stacked on a leading layer axis
        layers = [read(e, i) for i in range(cfg.num_layers)]
        for k, path in enumerate(e.paths):
          yield path, np.stack([parts[k] for parts in layers])
      else:
        for i in range(cfg.num_layers):
          for path, a in zip(e.paths, read(e, i)):
            yield tuple(p.format(i=i) for p in path), a

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
  """jbt params -> HF ...ForSequenceClassification state dict (float32 numpy, host). LoRA
  adapters are merged into their weights (in float32), so the result needs no PEFT."""
  cfg, params = lora.merged(cfg, params)
  out: dict[str, np.ndarray] = {}
  for e in param_table(cfg):
    if e.per_layer and cfg.scan_layers:
      stacks = [np.asarray(jax.device_get(_get_path(params, p, None))) for p in e.paths]
      for i in range(cfg.num_layers):
        out[e.hf_key.format(i=i)] = np.ascontiguousarray(e.to_hf([s[i] for s in stacks]))
    elif e.per_layer:
      for i in range(cfg.num_layers):
        parts = [np.asarray(jax.device_get(_get_path(params, p, i))) for p in e.paths]
        out[e.hf_key.format(i=i)] = np.ascontiguousarray(e.to_hf(parts))
    else:
      parts = [np.asarray(jax.device_get(_get_path(params, p, None))) for p in e.paths]
      out[e.hf_key] = np.ascontiguousarray(e.to_hf(parts))
  return out


def change_head(cfg: ModelConfig, params: Any, num_labels: int) -> tuple[ModelConfig, Any]:
  """Re-shapes the reward head so the reward logit is unchanged (2 -> 1: keep logit 1's row;
  1 -> 2: the reward becomes logit 1, logit 0 is zero, as HALOs reads it)."""
  if num_labels == cfg.num_labels:
    return cfg, params
  w = np.asarray(jax.device_get(params["score"]))[:, cfg.reward_label]
  new = np.zeros((w.shape[0], num_labels), np.float32)
  new[:, 1 if num_labels == 2 else 0] = w
  return cfg.replace(num_labels=num_labels), {**params, "score": jax.numpy.asarray(new)}
