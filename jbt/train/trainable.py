"""Which parameters train, and the split of the params the step differentiates and the optimizer
keeps state for.

The mask is a params-shaped tree of Python bools. With LoRA (model lora_rank > 0) the trainable
params are the adapters and the reward head; otherwise all of them. `train.freeze` then freezes
more, by spec:

    "embed"       the token embedding
    "head_only"   everything but the reward head (score)
    "layers:N"    the first N decoder layers
    other         a regular expression matched (in full) against "/"-joined param paths, such as
                  "layers/attn/.*" or "final_norm/scale"

Frozen params get no gradient and no optimizer state: jax.grad and the optimizer see only the
trainable half (`split`), whose frozen places hold None. One exception: "layers:N" on scanned
layers (one array per weight for all layers) freezes rows of the stacks: the step zeroes those
rows' gradients and updates (`zero_rows`), so they stay bit for bit, but their (zero) optimizer
state is kept.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax

from jbt.errors import JbtError
from jbt.model import ModelConfig, abstract_params, lora

HEAD = "score"


def _matches(spec: str, path: tuple[str, ...]) -> bool:
  name = "/".join(path)
  if spec == "embed":
    return name == "embed"
  if spec == "head_only":
    return name != HEAD
  if spec.startswith("layers:"):
    m = re.match(r"layer_(\d+)$", path[0])
    return m is not None and int(m.group(1)) < int(spec.split(":", 1)[1])
  return re.fullmatch(spec, name) is not None


def _specs(freeze: Sequence[str] | str) -> tuple[str, ...]:
  return (freeze,) if isinstance(freeze, str) else tuple(freeze)


def check_specs(freeze: Sequence[str], cfg: ModelConfig | None = None) -> None:
  """Each spec is well formed (and, with `cfg`, freezes something); a JbtError otherwise."""
  freeze = _specs(freeze)
  for spec in freeze:
    if spec.startswith("layers:"):
      n = spec.split(":", 1)[1]
      if not n.isdigit():
        raise JbtError(f"train.freeze: {spec!r}: expected layers:N with N a number of layers")
      if cfg is not None and not 0 < int(n) <= cfg.num_layers:
        raise JbtError(f"train.freeze: {spec!r}: the model has {cfg.num_layers} layers")
    elif spec not in ("embed", "head_only"):
      try:
        re.compile(spec)
      except re.error as e:
        raise JbtError(f"train.freeze: {spec!r} is neither embed, head_only, layers:N nor a regular expression ({e})") from None
  if cfg is not None:
    paths = [p for p, _ in lora._items(abstract_params(cfg))]
    for spec in freeze:
      if not spec.startswith("layers:") and not any(_matches(spec, p) for p in paths):
        raise JbtError(f"train.freeze: {spec!r} matches no parameter (paths look like "
                       f"{', '.join('/'.join(p) for p in paths[:4])}, ...)")


def trainable_mask(cfg: ModelConfig, freeze: Sequence[str] = ()) -> dict[str, Any]:
  """Params-shaped tree of bools: True where a parameter trains."""
  freeze = _specs(freeze)
  check_specs(freeze, cfg)

  def trains(path: tuple[str, ...]) -> bool:
    if cfg.lora_rank and not (lora.is_adapter(path) or path == (HEAD,)):
      return False
    return not any(_matches(s, path) for s in freeze)

  mask = lora._nest([(p, trains(p)) for p, _ in lora._items(abstract_params(cfg))])
  if not any(jax.tree.leaves(mask)):
    raise JbtError(f"train.freeze {list(freeze)} leaves no parameter to train")
  return mask


def frozen_rows(cfg: ModelConfig, freeze: Sequence[str] = ()) -> int:
  """Leading layers frozen inside scanned stacks ("layers:N" with model.scan_layers)."""
  if not cfg.scan_layers:
    return 0
  return max((int(s.split(":", 1)[1]) for s in _specs(freeze) if s.startswith("layers:")), default=0)


def zero_rows(tree: Any, n: int) -> Any:
  """The first n rows of every scanned-layer stack in `tree` (params-shaped, None holes) zeroed."""
  if not n:
    return tree

  def zero(path: Any, x: Any) -> Any:
    if path[0].key != "layers":
      return x
    keep = (jax.numpy.arange(x.shape[0]) >= n).reshape((-1,) + (1,) * (x.ndim - 1))
    return jax.numpy.where(keep, x, jax.numpy.zeros_like(x))

  return jax.tree_util.tree_map_with_path(zero, tree)


def split(tree: Any, mask: Any) -> tuple[Any, Any]:
  """(trainable, frozen): two trees of `tree`'s structure with None in the other's places."""
  return (jax.tree.map(lambda m, x: x if m else None, mask, tree),
          jax.tree.map(lambda m, x: None if m else x, mask, tree))


def merge(mask: Any, trainable: Any, frozen: Any) -> Any:
  """Inverse of split."""
  return jax.tree.map(lambda m, a, b: a if m else b, mask, trainable, frozen)


def describe(cfg: ModelConfig, mask: Any, state: Any, rows: int = 0) -> str:
  """One start-up line: trainable and frozen parameter counts, and the optimizer state's bytes
  (of the actual state, all devices together)."""
  n_train, n_frozen = counts(mask, state.params, rows)
  opt_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))
  what = (f"LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)} + head" if cfg.lora_rank
          else "all" if not n_frozen else "all but train.freeze")
  return (f"parameters: {n_train:,} trainable ({what}), {n_frozen:,} frozen; "
          f"optimizer state {opt_bytes / 2**20:.2f} MiB")


def counts(mask: Any, params: Any, rows: int = 0) -> tuple[int, int]:
  """(trainable, frozen) parameter counts; rows: leading layers frozen in the scanned stacks."""
  t, f = split(params, mask)
  size = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))  # noqa: E731
  in_rows = sum(int(x.size) // x.shape[0] * rows for x in jax.tree.leaves(t.get("layers", {}))) if rows else 0
  return size(t) - in_rows, size(f) + in_rows
