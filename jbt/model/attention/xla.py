"""Attention as plain XLA ops: softmax over each query block's causal keys, from a dense mask.

Shapes follow jbt.model: B rows, L query tokens, S key tokens, K key/value heads, G query heads
per kv head, H head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jbt.model.attention.mask import MaskInfo

Array = jax.Array
OUT_NAME = "attention_out"  # what remat "attention" keeps


def _attend(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxLxS: Array) -> Array:
  H = q_BxLxKxGxH.shape[-1]
  logits_BxKxGxLxS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BxLxKxGxH, k_BxSxKxH).astype(jnp.float32)
  logits_BxKxGxLxS *= 1.0 / math.sqrt(H)
  # A finite fill (not -inf) keeps gradients finite; every row has at least its diagonal.
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
  return jnp.einsum("BKGLS,BSKH->BLKGH", probs_BxKxGxLxS, v_BxSxKxH)


def blocked_attention(
    q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, mask_BxLxS: Array, block: int, max_segment: int
) -> Array:
  """Causal attention computed block by block, skipping key blocks the mask rules out by shape.

  Query block [qs, qe) only needs keys before qe (causal) and, when no segment is longer than
  max_segment, none before qs - max_segment + 1 (same segment). Long packed rows then cost a
  fraction of the dense L x L scores, in time and in saved activations. The mask still decides;
  the skipped blocks are exactly those it would zero. block <= 0 or L <= block: dense.
  """
  L = q_BxLxKxGxH.shape[1]
  if block <= 0 or L <= block:
    return _attend(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxS)
  outs = []
  for qs in range(0, L, block):
    qe = min(qs + block, L)
    ks = 0 if max_segment <= 0 else max(0, (qs - max_segment + 1) // block * block)
    outs.append(_attend(q_BxLxKxGxH[:, qs:qe], k_BxLxKxH[:, ks:qe], v_BxLxKxH[:, ks:qe], mask_BxLxS[:, qs:qe, ks:qe]))
  return jnp.concatenate(outs, axis=1)


def attend(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, info: MaskInfo, *, sliding_window: int | None,
           block: int, max_segment: int) -> Array:
  """The registry's entry point: info.dense_BxLxS holds the mask (sliding window included)."""
  del sliding_window
  out = blocked_attention(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, info.dense_BxLxS, block, max_segment)
  return checkpoint_name(out, OUT_NAME)
