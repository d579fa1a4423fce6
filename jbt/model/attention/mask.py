"""Who attends to whom in jbt's rows: the mask every attention kind computes.

A row holds sequences (segments) side by side; a token attends to earlier tokens of its own
segment. With branch ids (shared prompts: 0 = trunk, 1, 2, ... = branches) it attends to earlier
trunk tokens and earlier tokens of its own branch only. A sliding window bounds how far back by
position. Padding (segment 0) attends to earlier padding, so no row is fully masked and softmax
never sees only -inf; padding outputs are never read.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class MaskInfo(NamedTuple):
  """Per-token arrays the mask is computed from (branch_ids / positions may be None), and the
  dense [B, L, S] mask for kinds that read one (computed once per forward, outside the layers)."""

  segment_ids_BxL: Array
  branch_ids_BxL: Array | None
  positions_BxL: Array | None
  dense_BxLxS: Array | None = None
  window: Array | None = None  # this layer's window, int32 scalar, 0 = full (models with mixed layer kinds)


def layer_window(mask_BxQxS: Array, pos_q_BxQ: Array, pos_k_BxS: Array, window: Array | None) -> Array:
  """The mask restricted to a per-layer window (traced; 0 leaves it whole)."""
  if window is None:
    return mask_BxQxS
  return mask_BxQxS & (((pos_q_BxQ[:, :, None] - pos_k_BxS[:, None, :]) < window) | (window <= 0))


def dense_mask(
    segment_ids_BxL: Array, positions_BxL: Array | None, sliding_window: int | None, branch_ids_BxL: Array | None = None
) -> Array:
  """[B, L, S] boolean: same segment and not in the future (by array index, so packing works);
  with branches, keys in the trunk (branch 0) or in the query's own branch."""
  L = segment_ids_BxL.shape[1]
  idx = jnp.arange(L)
  mask = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  mask &= idx[None, :, None] >= idx[None, None, :]
  if branch_ids_BxL is not None:
    mask &= (branch_ids_BxL[:, None, :] == 0) | (branch_ids_BxL[:, :, None] == branch_ids_BxL[:, None, :])
  if sliding_window is not None:
    mask &= (positions_BxL[:, :, None] - positions_BxL[:, None, :]) < sliding_window
  return mask
