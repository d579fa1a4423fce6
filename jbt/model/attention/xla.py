"""Attention as plain XLA ops: softmax over each query block's causal keys, from a dense mask.

Shapes follow jbt.model: B rows, L query tokens, S key tokens, K key/value heads, G query heads
per kv head, H head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jbt.model.attention.mask import MaskInfo, layer_window

Array = jax.Array
OUT_NAME = "attention_out"  # what remat "attention" keeps


def _attend(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxLxS: Array,
            softcap: float | None = None) -> Array:
  H = q_BxLxKxGxH.shape[-1]
  logits_BxKxGxLxS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BxLxKxGxH, k_BxSxKxH).astype(jnp.float32)
  logits_BxKxGxLxS *= 1.0 / math.sqrt(H)
  if softcap is not None:  # Gemma 2: cap * tanh(logits / cap), before the mask
    logits_BxKxGxLxS = jnp.tanh(logits_BxKxGxLxS / softcap) * softcap
  # A finite fill (not -inf) keeps gradients finite; every row has at least its diagonal.
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
  return jnp.einsum("BKGLS,BSKH->BLKGH", probs_BxKxGxLxS, v_BxSxKxH)


MAX_GROUPS = 8  # key ranges a row's query blocks are grouped into: each group compiles once


def _group(q: Array, k: Array, v: Array, mask: Array, block: int, softcap: float | None) -> Array:
  """Query blocks of one group against the group's keys, one block at a time (a scan) and each
  recomputed in the backward pass (checkpoint), so only one block's scores are ever live."""
  B, n = q.shape[0], q.shape[1] // block
  if n <= 1:
    return _attend(q, k, v, mask, softcap)
  q_N = jnp.moveaxis(q.reshape(B, n, block, *q.shape[2:]), 1, 0)
  mask_N = jnp.moveaxis(mask.reshape(B, n, block, mask.shape[-1]), 1, 0)
  out_N = jax.lax.map(jax.checkpoint(lambda qm: _attend(qm[0], k, v, qm[1], softcap)), (q_N, mask_N))
  return jnp.moveaxis(out_N, 0, 1).reshape(q.shape[:2] + out_N.shape[3:])


def blocked_attention(
    q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, mask_BxLxS: Array, block: int, max_segment: int,
    softcap: float | None = None,
) -> Array:
  """Causal attention computed block by block, skipping key blocks the mask rules out by shape.

  Query block [qs, qe) only needs keys before qe (causal) and, when no segment is longer than
  max_segment, none before qs - max_segment + 1 (same segment). Long packed rows then cost a
  fraction of the dense L x L scores, in time and in saved activations. The mask still decides;
  the skipped blocks are exactly those it would zero. block <= 0 or L <= block: dense.

  The blocks are grouped into at most MAX_GROUPS runs that share one key range (the widest their
  blocks need: at most 1 / (2 * MAX_GROUPS) of the dense work is spent on keys a block could
  skip), and each run is a scan over its blocks with every block recomputed in the backward
  pass: the program stays small however long the row (an unrolled block per 128 queries took
  minutes to compile for TPU at 8k tokens) and only one block's L-wide scores are live.
  """
  L = q_BxLxKxGxH.shape[1]
  if block <= 0 or L <= block:
    return _attend(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxS, softcap)
  n_blocks = -(-L // block)
  per_group = -(-n_blocks // MAX_GROUPS)
  outs = []
  for first in range(0, n_blocks, per_group):
    qs, qe = first * block, min((first + per_group) * block, L)
    ks = 0 if max_segment <= 0 else max(0, (qs - max_segment + 1) // block * block)
    whole = qs + (qe - qs) // block * block  # the group's last block may be short (L % block)
    for a, b in ((qs, whole), (whole, qe)):
      if b > a:
        outs.append(_group(q_BxLxKxGxH[:, a:b], k_BxLxKxH[:, ks:qe], v_BxLxKxH[:, ks:qe],
                           mask_BxLxS[:, a:b, ks:qe], block, softcap))
  return jnp.concatenate(outs, axis=1)


def attend(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, info: MaskInfo, *, sliding_window: int | None,
           block: int, max_segment: int, branches: int = 2, softcap: float | None = None) -> Array:
  """The registry's entry point: info.dense_BxLxS holds the mask (a static sliding window and any
  number of branches included); a per-layer window (info.window) is applied to it here."""
  del sliding_window, branches
  mask_BxLxS = layer_window(info.dense_BxLxS, info.positions_BxL, info.positions_BxL, info.window)
  out = blocked_attention(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxS, block, max_segment, softcap)
  return checkpoint_name(out, OUT_NAME)
