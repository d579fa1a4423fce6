"""Batched scoring with a loaded reward model: Scorer for single sequences (label uses it),
PairScorer for preference pairs (evaluate uses it).

Scorer: sequences are sorted by length and cut into batches of a fixed number of rows; each batch
is padded to its longest sequence rounded up to a multiple of `length_multiple` (64), so jit
compiles one program per length bucket, not one per batch.

PairScorer: pairs are sorted by size and laid out as training lays them out (shared_prompt by
default: the prompt once, the two responses as branches), in rows whose length is bucketed as
training buckets them; its forward is the training step's forward.

Rows are split over the data-parallel axes of a mesh (FSDP over all local devices by default, as
training), and results come back in input order.

Shape legend: B rows in a batch, L tokens in a row, N sequences scored, P pairs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding

from jbt.checkpoint.load import is_jbt_dir, load_model
from jbt.errors import JbtError
from jbt.hf.config import is_seq_cls
from jbt.model import ModelConfig, RewardModel
from jbt.model.attention import BLOCK_SPARSE
from jbt.runtime import mesh as mesh_lib

DEFAULT_MESH_SHAPE = (1, -1, 1)  # (data, fsdp, tensor): FSDP over every local device
DTYPES = ("float32", "bfloat16")


@functools.partial(jax.jit, static_argnames=("cfg", "rules"))
def _rewards_B(params: Any, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, positions_BxL: jax.Array,
               pool_index_B: jax.Array, *, cfg: ModelConfig, rules: tuple) -> jax.Array:
  # The rules must be active while tracing so the model's logical constraints resolve to the mesh.
  with nn.logical_axis_rules(rules):
    return RewardModel(cfg).apply({"params": params}, tokens_BxL, segment_ids_BxL, positions_BxL, pool_index_B)


def one_ahead(items: Sequence[Any], dispatch: Any, collect: Any) -> None:
  """dispatch(item) for each item, and collect(item, result) of each, fetched only after the next
  item is dispatched, so the device never idles on the host's copy."""
  pending = None
  for item in items:
    out = dispatch(item)
    if pending is not None:
      collect(*pending)
    pending = (item, out)
  if pending is not None:
    collect(*pending)


def round_up(n: int, multiple: int) -> int:
  """n rounded up to a multiple of `multiple` (at least one multiple)."""
  return max(-(-n // multiple), 1) * multiple


class Scorer:
  """Scores token sequences with one model: `scorer(list_of_id_arrays) -> rewards_N`.

  Each sequence is scored alone, as transformers scores one unpadded sequence: the reward is read
  at its rightmost token whose id is not the model's pad id.
  """

  def __init__(self, cfg: ModelConfig, params: Any, mesh: jax.sharding.Mesh, *,
               rules: Sequence[tuple[str, Any]] = mesh_lib.DEFAULT_RULES, batch_size: int = 16,
               length_multiple: int = 64):
    if batch_size <= 0:
      raise JbtError(f"batch_size must be positive, got {batch_size}")
    if length_multiple <= 0:
      raise JbtError(f"length_multiple must be positive, got {length_multiple}")
    self.cfg = cfg
    self.params = params
    self.mesh = mesh
    self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    self.row_sharding = NamedSharding(mesh, mesh_lib.batch_spec(mesh))
    # Rows are split over the data-parallel devices, so a batch must hold a multiple of them.
    self.batch_size = round_up(batch_size, mesh_lib.data_parallel_size(mesh))
    self.length_multiple = length_multiple

  def _trim(self, sequences: Sequence[Sequence[int] | np.ndarray]) -> list[np.ndarray]:
    """Drops each sequence's trailing pad run: causal attention makes it irrelevant to the reward."""
    pad = self.cfg.pad_token_id
    out = []
    for i, ids in enumerate(sequences):
      ids = np.asarray(ids, dtype=np.int32).reshape(-1)
      real = np.flatnonzero(ids != pad)
      if real.size == 0:
        raise JbtError(f"sequence {i} holds only pad tokens (id {pad}); there is no token to read a reward at")
      out.append(ids[:real[-1] + 1])
    return out

  def _batch(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Host arrays for one batch: one sequence per row at its start, filler rows all padding."""
    B = self.batch_size
    L = round_up(max(len(s) for s in seqs), self.length_multiple)
    tokens_BxL = np.full((B, L), self.cfg.pad_token_id, np.int32)
    segment_ids_BxL = np.zeros((B, L), np.int32)
    positions_BxL = np.zeros((B, L), np.int32)
    pool_index_B = np.arange(B, dtype=np.int32) * L  # filler rows read their first (pad) token
    for row, ids in enumerate(seqs):
      n = len(ids)
      tokens_BxL[row, :n] = ids
      segment_ids_BxL[row, :n] = 1
      positions_BxL[row, :n] = np.arange(n)
      pool_index_B[row] = row * L + n - 1
    return tokens_BxL, segment_ids_BxL, positions_BxL, pool_index_B

  def __call__(self, sequences: Sequence[Sequence[int] | np.ndarray], *, progress: bool | None = None,
               desc: str = "scoring") -> np.ndarray:
    """Rewards (float32 [N], input order) of N token sequences.

    progress: a tqdm bar on stderr; None shows it only when stderr is a terminal.
    """
    from tqdm.auto import tqdm

    seqs = self._trim(sequences)
    rewards_N = np.zeros(len(seqs), np.float32)
    # Longest first: a batch too large for the device fails at once, not at the end of a long job.
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    bar = tqdm(total=len(seqs), desc=desc, unit="seq", disable=None if progress is None else not progress,
               dynamic_ncols=True)
    def dispatch(chunk: list[int]) -> jax.Array:
      arrays = jax.device_put(self._batch([seqs[i] for i in chunk]), self.row_sharding)
      return _rewards_B(self.params, *arrays, cfg=self.cfg, rules=self.rules)

    with jax.set_mesh(self.mesh):
      one_ahead(chunks, dispatch, lambda chunk, out_B: self._collect(rewards_N, chunk, out_B, bar))
    bar.close()
    return rewards_N

  @staticmethod
  def _collect(rewards_N: np.ndarray, chunk: list[int], out_B: jax.Array, bar: Any) -> None:
    rewards_N[chunk] = np.asarray(jax.device_get(out_B))[:len(chunk)]
    bar.update(len(chunk))


class PairScorer:
  """Scores tokenized preference pairs: `scorer(tokenized_pairs) -> rewards_Px2` (chosen, rejected).

  Each member's reward is what it gets scored alone (the layouts guarantee it; see
  jbt.data.layouts), computed with the training step's forward in the training layout, so a pair
  costs what it costs in the training step's forward pass.
  """

  def __init__(self, cfg: ModelConfig, params: Any, mesh: jax.sharding.Mesh, *, max_length: int,
               rules: Sequence[tuple[str, Any]] = mesh_lib.DEFAULT_RULES, pairs_per_batch: int = 16,
               layout: str = "shared_prompt"):
    from jbt.data.layouts import LayoutSettings
    from jbt.runtime import xla_options
    from jbt.train.step import rewards

    if pairs_per_batch <= 0:
      raise JbtError(f"pairs_per_batch must be positive, got {pairs_per_batch}")
    self.cfg, self.params, self.mesh = cfg, params, mesh
    self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    self.dp = mesh_lib.data_parallel_size(mesh)
    # Flash attention's cost follows the segments, not the row: one long row per device is as
    # cheap as many short ones. Plain attention pays L x L per row: rows of at most one pair.
    flash = cfg.attention in BLOCK_SPARSE
    pack_length = -(-pairs_per_batch // self.dp) * 2 * max_length if flash else None
    self.settings = LayoutSettings(layout=layout, pairs_per_batch=pairs_per_batch, max_length=max_length,
                                   length_multiple=64, pack_length=pack_length, row_bucket=1,
                                   length_bucket="geometric", min_rows=self.dp)
    self.row_sharding = NamedSharding(mesh, mesh_lib.batch_spec(mesh))
    self.replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    max_segment = max_length if layout == "packed" else 0

    def fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
      with nn.logical_axis_rules(self.rules):
        return rewards(cfg, params, batch, max_segment)

    self._rewards = jax.jit(fn, compiler_options=xla_options.compiler_options(cfg.dtype))

  def _place(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    from jbt.data import split_batch
    from jbt.train.batches import pad_rows

    dev, _ = split_batch(local)
    rows = -(-dev["tokens"].shape[0] // self.dp) * self.dp
    dev = pad_rows(dev, rows, self.cfg.pad_token_id)
    return {k: jax.device_put(v, self.row_sharding if v.ndim == 2 else self.replicated) for k, v in dev.items()}

  def __call__(self, tok: Any, *, progress: bool | None = None, desc: str = "scoring") -> np.ndarray:
    """float32 [P, 2] rewards of the P pairs of `tok` (a jbt.data.TokenizedPairs), input order."""
    from tqdm.auto import tqdm

    from jbt.data.layouts import make_batch, pair_sizes

    self.settings.check(tok)
    P = self.settings.pairs_per_batch
    rewards_Px2 = np.zeros((len(tok), 2), np.float32)
    # Longest first: a batch too large for the device fails at once; similar sizes share a shape.
    order = np.argsort(-pair_sizes(tok, np.arange(len(tok)), self.settings.layout), kind="stable")
    bar = tqdm(total=len(tok), desc=desc, unit="pair", disable=None if progress is None else not progress,
               dynamic_ncols=True)
    with jax.set_mesh(self.mesh):
      one_ahead([order[i:i + P] for i in range(0, len(tok), P)],
                lambda ids: self._rewards(self.params, self._place(make_batch(tok, ids, self.settings))),
                lambda ids, out: self._collect(rewards_Px2, ids, out, bar))
    bar.close()
    return rewards_Px2

  @staticmethod
  def _collect(rewards_Px2: np.ndarray, ids: np.ndarray, out: tuple[jax.Array, jax.Array], bar: Any) -> None:
    chosen_P, rejected_P = (np.asarray(a) for a in jax.device_get(out))
    rewards_Px2[ids, 0] = chosen_P[:len(ids)]
    rewards_Px2[ids, 1] = rejected_P[:len(ids)]
    bar.update(len(ids))


def load_scorer(path: str | Path, *, batch_size: int = 16, dtype: str = "float32",
                mesh_shape: Sequence[int] = DEFAULT_MESH_SHAPE, length_multiple: int = 64,
                pairs_max_length: int | None = None) -> tuple[Scorer | PairScorer, Any]:
  """(scorer, tokenizer) for an HF reward-model directory (such as a run's FINAL/) or a jbt checkpoint.

  pairs_max_length: None gives a Scorer of single sequences, batch_size rows a batch; an int
  gives a PairScorer of pairs whose members have at most that many tokens, batch_size // 2
  pairs a batch.
  The tokenizer gets jbt's default chat template when it has none, as training formats text.
  Parameters are loaded straight into their shards on the mesh.
  """
  from jbt.data import ensure_chat_template

  path = Path(path)
  if not path.exists():
    raise JbtError(f"{path}: no such model directory or file")
  if dtype not in DTYPES:
    raise JbtError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  mesh = mesh_lib.make_mesh(mesh_shape, mesh_lib.MESH_AXES)
  rules = mesh_lib.DEFAULT_RULES
  m = load_model(path, shardings_fn=lambda c: mesh_lib.model_shardings(c, mesh, rules), dtype=dtype)
  cfg, params, hf_cfg, tokenizer = m.cfg, m.params, m.hf_config, m.tokenizer
  if not is_jbt_dir(path):
    archs = hf_cfg.get("architectures") or []
    if not is_seq_cls(hf_cfg):
      raise JbtError(f"{path}: not a reward model (architectures {archs}, no ...ForSequenceClassification "
                     "head); scoring it would use a random head")
  if tokenizer is None:
    raise JbtError(f"{path}: the checkpoint has no tokenizer/ directory")
  ensure_chat_template(tokenizer)
  if pairs_max_length is not None:
    return PairScorer(cfg, params, mesh, max_length=pairs_max_length, rules=rules,
                      pairs_per_batch=max(batch_size // 2, 1)), tokenizer
  scorer = Scorer(cfg, params, mesh, rules=rules, batch_size=batch_size,
                  length_multiple=length_multiple)
  return scorer, tokenizer


def parse_mesh(text: str) -> tuple[int, ...]:
  """'1,-1,1' -> (1, -1, 1): the (data, fsdp, tensor) sizes of a --mesh option."""
  try:
    shape = tuple(int(x) for x in text.split(","))
  except ValueError:
    raise JbtError(f"--mesh must be three comma-separated sizes for (data, fsdp, tensor), got {text!r}") from None
  if len(shape) != len(mesh_lib.MESH_AXES):
    raise JbtError(f"--mesh must be three comma-separated sizes for (data, fsdp, tensor), got {text!r}")
  return shape
