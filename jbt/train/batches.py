"""Host batches -> global arrays on the mesh, and the batch iterator a run reads.

Rows and pairs are split over the data-parallel mesh axes (data and fsdp). Every process reads
its own slice of each global batch (grain shards by process); packed batches vary in rows, so
each is padded to a multiple of the process's data-parallel devices and, across processes, to the
largest shape any process has.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict

from jbt import data
from jbt.runtime.mesh import batch_spec, data_parallel_size

ROW_KEYS = ("tokens", "segment_ids", "positions", "branch_ids")  # [R, L]; branch_ids only in shared-prompt rows
PAIR_KEYS = ("chosen_index", "rejected_index", "pair_mask", "pair_margin", "pair_tie", "chosen_response",
             "rejected_response", "pair_unit")  # [P]


def length_bucket(value: str) -> int | str | None:
  """cfg.data.length_bucket as LayoutSettings takes it: "geometric", an int, or None for "none"."""
  from jbt.errors import JbtError

  v = str(value).strip().lower()
  if v in ("none", "", "0"):
    return None
  if v == "geometric":
    return v
  if v.isdigit():
    return int(v)
  raise JbtError(f"data.length_bucket must be geometric, none or a positive integer, got {value!r}")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, process_index: int, process_count: int) -> dict[str, jax.Array]:
  """This process's batch -> global arrays sharded over the batch axes.

  Rows of process p follow those of p-1, so its flat pooling indices shift by p * R * L, and its
  response and unit numbers by p * 2P and p * P.
  Every process must pass the same shapes (the trainer pads rows to the common maximum).
  """
  sharding = NamedSharding(mesh, batch_spec(mesh))
  R, L = local["tokens"].shape
  out = {}
  for k in local:
    if k not in ROW_KEYS and k not in PAIR_KEYS:
      raise ValueError(f"unexpected batch key {k!r}")
    a = np.asarray(local[k])
    if process_count > 1 and k in ("chosen_index", "rejected_index"):
      a = a + process_index * R * L
    elif process_count > 1 and k in ("chosen_response", "rejected_response", "pair_unit"):
      # numbers local to this process's P pairs (at most 2P responses): made unique over processes
      a = a + process_index * len(a) * (2 if k != "pair_unit" else 1)
    out[k] = jax.make_array_from_process_local_data(sharding, a)
  return out


def pad_rows(local: dict[str, np.ndarray], rows: int, pad_token_id: int, length: int | None = None) -> dict[str, np.ndarray]:
  """Pads a batch with padding rows and columns (segment 0) to [rows, length], so that every
  process has the same shape; flat pooling indices are moved to the new row length."""
  R, L = local["tokens"].shape
  length = L if length is None else length
  if (rows, length) == (R, L):
    return local
  out = dict(local)
  widths = ((0, rows - R), (0, length - L))
  out["tokens"] = np.pad(local["tokens"], widths, constant_values=pad_token_id)
  for k in ("segment_ids", "positions", "branch_ids"):
    if k in local:
      out[k] = np.pad(local[k], widths)
  for k in ("chosen_index", "rejected_index"):
    row, t = np.divmod(local[k], L)
    out[k] = (row * length + t).astype(local[k].dtype)
  return out


class Batches:
  """Builds a run's batch iterators and places their host batches on the mesh."""

  def __init__(self, cfg: ConfigDict, mesh: Mesh, pad_token_id: int, flash: bool):
    self.cfg = cfg
    self.mesh = mesh
    self.pad = pad_token_id
    self.flash = flash
    self.rows_multiple = max(data_parallel_size(mesh) // jax.process_count(), 1)

  def iterator(self, tok: Any, *, batch_size: int, epochs: int | None, seed: int) -> Any:
    """The batch iterator, at least one row per data-parallel device. With flash attention (cost
    follows the pairs, not the rows) a packed batch may be one long row per device: pack_length
    defaults to the whole batch."""
    d = self.cfg.data
    pack_length = d.pack_length or None
    if pack_length is None and self.flash:
      per_process = batch_size // jax.process_count()  # units (pairs, or ranked records)
      if d.layout == "shared_prompt":  # a unit: its shared prefix and its responses' rests
        per_unit = data.max_responses(tok) * d.max_length
      else:  # a pair: both members
        per_unit = tok.max_unit_pairs * 2 * d.max_length
      pack_length = -(-per_process // self.rows_multiple) * per_unit
    return data.make_batch_iterator(
        tok, layout=d.layout, batch_size=batch_size, max_length=d.max_length, seed=seed, epochs=epochs,
        process_index=jax.process_index(), process_count=jax.process_count(),
        length_multiple=d.length_multiple or None, pack_length=pack_length, row_bucket=d.row_bucket,
        length_bucket=length_bucket(d.length_bucket), min_rows=self.rows_multiple)

  def place(self, local: dict[str, np.ndarray]) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """(global device arrays, host stats such as n_pairs / n_tokens) of one host batch."""
    dev, stats = data.split_batch(local)
    rows, length = dev["tokens"].shape
    if jax.process_count() > 1:  # every process must contribute the same shape
      from jax.experimental import multihost_utils

      rows, length = (int(x) for x in np.max(multihost_utils.process_allgather(np.int32([rows, length])), axis=0))
    # Packed rows vary in number; the rows of a process are split over its data-parallel devices.
    rows = -(-rows // self.rows_multiple) * self.rows_multiple
    dev = pad_rows(dev, rows, self.pad, length)
    return global_batch(dev, self.mesh, jax.process_index(), jax.process_count()), stats
