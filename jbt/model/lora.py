"""LoRA adapters as parameters of their own, beside the weights they adapt.

A target projection `name` (q, k, v, o, gate, up, down) of a layer gets `{name}_lora_a`
[in..., R] and `{name}_lora_b` [R, out...] next to its weight (with the scanned layer axis first,
like every layer parameter), and computes x W + (x A) B * scale (jbt.model.decoder). A is drawn
as PEFT draws it (kaiming-uniform), B is zero, so an adapted model starts as its base.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from jbt.model.config import ModelConfig
from jbt.model.decoder import abstract_params, init_params

ADAPTER_MARK = "_lora_"


def is_adapter(path: tuple[str, ...]) -> bool:
  return ADAPTER_MARK in path[-1]


def _items(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
  """(path, leaf) of a nested dict of params."""
  if isinstance(tree, dict):
    return [kv for k, v in tree.items() for kv in _items(v, (*prefix, k))]
  return [(prefix, tree)]


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in items:
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _node(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def split(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(base params, adapter params), as two nested dicts."""
  items = _items(params)
  return _nest([kv for kv in items if not is_adapter(kv[0])]), _nest([kv for kv in items if is_adapter(kv[0])])


def combine(base: Any, adapters: Any) -> dict[str, Any]:
  return _nest(_items(base) + _items(adapters))


def init_adapters(cfg: ModelConfig, key: jax.Array) -> dict[str, Any]:
  """The adapter params alone (jit it with out_shardings; XLA drops the unused base init)."""
  return split(init_params(cfg, key))[1]


def init_with_adapters(cfg: ModelConfig, key: jax.Array) -> dict[str, Any]:
  """Random params: the base as a model without adapters draws it from `key` (so a LoRA run and a
  full fine-tune of the same seed share their base), adapters from a key of their own."""
  base = init_params(cfg.replace(lora_rank=0), key)
  return combine(base, init_adapters(cfg, jax.random.fold_in(key, 1)) if cfg.lora_rank else {})


def add_adapters(cfg: ModelConfig, params: Any, seed: int, shardings: Any | None = None) -> dict[str, Any]:
  """Base params (loaded) plus freshly drawn adapters, placed in their shardings when given."""
  if not cfg.lora_rank:
    return params
  key = jax.random.fold_in(jax.random.key(seed), 1)
  out_sh = split(shardings)[1] if shardings is not None else None
  adapters = jax.jit(init_adapters, static_argnums=0, out_shardings=out_sh)(cfg, key)
  return combine(params, adapters)


def merged(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """(config without adapters, host float32 params with W + scale * A @ B folded in); a model
  without adapters comes back as it is."""
  if not cfg.lora_rank:
    return cfg, params
  base, adapters = split(params)
  base = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), base)
  for path, a in _items(adapters):
    if not path[-1].endswith(ADAPTER_MARK + "a"):
      continue
    name = path[-1][: -len(ADAPTER_MARK + "a")]
    b = np.asarray(jax.device_get(_node(adapters, (*path[:-1], f"{name}{ADAPTER_MARK}b"))), np.float32)
    a = np.asarray(jax.device_get(a), np.float32)
    parent = _node(base, path[:-1])
    w = parent[name]
    lead = 1 if path[0] == "layers" else 0  # scanned layers: a leading layer axis on all three
    n = a.shape[0] if lead else 1
    R = a.shape[-1]
    a_NxIxR = a.reshape(n, math.prod(a.shape[lead:-1]), R)
    b_NxRxO = b.reshape(n, R, math.prod(b.shape[lead + 1:]))
    parent[name] = (w + np.float32(cfg.lora_scale) * np.matmul(a_NxIxR, b_NxRxO).reshape(w.shape)).astype(np.float32)
  return cfg.replace(lora_rank=0), base


def num_adapter_params(cfg: ModelConfig) -> int:
  return sum(math.prod(a.shape) for p, a in _items(abstract_params(cfg)) if is_adapter(p))
