"""Fused attention kernels for TPU (Pallas splash attention) and GPU (Pallas flash attention).

Both kernels take the one mask they know, causal attention within segments (a token sees earlier
tokens with an equal segment id), and never materialise an [L, S] score matrix: memory is linear
in the row length. jbt's rows need two more things:

- Packed rows: many sequences side by side. Segment ids give the mask. The splash kernel also
  gets a static band (no key further back than max_segment - 1, since no sequence is longer), so
  its cost follows the real attention pairs, not the row length squared. The GPU kernel skips
  future key blocks only.
- Shared-prompt rows (branch ids: 0 = trunk, 1, 2, ... = branches): a branch sees the trunk and
  itself, never another branch. The kernels run once per branch b (`branch_calls`) with the
  tokens of every other branch moved into a segment of their own (DEAD), so that call is exact
  for the trunk and branch b; each token's output comes from its own branch's call. The discarded
  outputs get no cotangent and their keys are seen by no kept query, so gradients are exact too.
  Cost: one kernel call per branch (two for chosen / rejected, k for a ranked record's k
  responses; ModelConfig.branches) over the row.

Sliding windows are not supported (the kernels would bound by array index, jbt bounds by
position): `jbt.model.attention.resolve` falls back to "xla" for such models, and says so.

The kernels run in Pallas interpret mode on other backends (tests compare them with the dense
reference on CPU) unless `compile_for(platform)` says the program is being compiled for their
platform (jbt.plan compiles for a TPU on this CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jbt.model.attention.flash import _pad_tokens
from jbt.model.attention.mask import MaskInfo

Array = jax.Array
OUT_NAME = "fused_attention_out"  # what remat "attention" keeps
DEAD = -1  # segment id of the tokens a branch call must not see (and of the padding to a block)
DEFAULT_BLOCK = 128
LANES = 128

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("jbt_fused_platform", default=None)


@contextlib.contextmanager
def compile_for(platform: str):
  """Trace the kernels for `platform` ("tpu" / "gpu") whatever backend this process runs."""
  token = _PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def _interpret(platform: str) -> bool:
  return (_PLATFORM.get() or jax.default_backend()) != platform


def branch_calls(call: Callable[[Array, Array, Array, Array], Array], q_BxLxKxGxH: Array, k_BxLxKxH: Array,
                 v_BxLxKxH: Array, info: MaskInfo, branches: int = 2) -> Array:
  """call(q, k, v, segment_ids) (causal attention within segments), made exact for shared-prompt
  rows of branch ids 1..branches (a pair: chosen and rejected; a ranked record: its responses):
  one call per branch, each token's output taken from its own branch's call."""
  seg_BxL, br_BxL = info.segment_ids_BxL, info.branch_ids_BxL
  if br_BxL is None:
    return call(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, seg_BxL)
  out = None
  for b in range(1, branches + 1):
    seg_b = jnp.where((br_BxL == 0) | (br_BxL == b), seg_BxL, DEAD)
    o = call(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, seg_b)
    out = o if out is None else jnp.where((br_BxL == b)[:, :, None, None, None], o, out)
  return out


def _pad_to_block(x: Array, block: int, value: int) -> Array:
  return _pad_tokens(x, -x.shape[1] % block, value)


def _sharded(fn: Callable[..., Array], q: Array, k: Array, v: Array, *rows: Array) -> Array:
  """fn(q, k, v, *rows) under shard_map over the context mesh (rows over the data axes, kv heads over
  "tensor"; rows: per-row arrays [B, ...] such as segment ids): a kernel opaque to XLA's
  partitioner (Pallas, an FFI call) runs on each device's own shard."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return fn(q, k, v, *rows)
  from jbt.runtime.mesh import DATA_AXES

  data = tuple(a for a in DATA_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  by_rows = data if data and q.shape[0] % math.prod(mesh.shape[a] for a in data) == 0 else None
  tp = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 else None
  heads = tp if tp and k.shape[2] % mesh.shape[tp] == 0 else None
  q_spec, kv_spec = P(by_rows, None, heads, None, None), P(by_rows, None, heads, None)
  row_specs = tuple(P(by_rows, *[None] * (x.ndim - 1)) for x in rows)
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, *row_specs), out_specs=q_spec,
                       check_vma=False)(q, k, v, *rows)


# --- TPU: splash attention ---------------------------------------------------------------------


def _splash_kernel(heads: int, length: int, band: int, block: int, interpret: bool):
  """Built per trace (it holds arrays; a cached one would leak one trace's arrays into the next)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  if 0 < band < length:  # no key further back than band - 1 (no sequence is longer than band)
    one = sm.LocalMask((length, length), window_size=(band - 1, 0), offset=0)
  else:
    one = sm.CausalMask((length, length))
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1, block_sizes=sizes,
                            interpret=interpret)


def splash_call(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, seg_BxL: Array, *, block: int,
                max_segment: int) -> Array:
  """Causal attention within segments through splash attention, one row at a time (vmap)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  B, L, K, G, H = q_BxLxKxGxH.shape
  block = -(-max(block, 1) // LANES) * LANES  # the kernel's blocks are whole multiples of 128 lanes
  q = _pad_to_block(q_BxLxKxGxH * (1.0 / math.sqrt(H)), block, 0)
  k, v, seg = _pad_to_block(k_BxLxKxH, block, 0), _pad_to_block(v_BxLxKxH, block, 0), _pad_to_block(seg_BxL, block, DEAD)
  Lp = q.shape[1]
  kernel = _splash_kernel(K * G, Lp, max_segment, block, _interpret("tpu"))

  def one_row(q_LxKxGxH, k_LxKxH, v_LxKxH, seg_L):
    q_NxLxH = q_LxKxGxH.reshape(Lp, K * G, H).transpose(1, 0, 2)  # head n = kv head n // G
    out_NxLxH = kernel(q_NxLxH, k_LxKxH.transpose(1, 0, 2), v_LxKxH.transpose(1, 0, 2),
                       segment_ids=sk.SegmentIds(q=seg_L, kv=seg_L))
    return out_NxLxH.transpose(1, 0, 2).reshape(Lp, K, G, H)

  return jax.vmap(one_row)(q, k, v, seg)[:, :L]


# --- GPU: Pallas (Triton) flash attention ------------------------------------------------------


def gpu_call(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, seg_BxL: Array, *, block: int,
             max_segment: int) -> Array:
  """Causal attention within segments through jax's Pallas GPU flash-attention kernel (one head
  per query head: k and v are repeated over the G query heads of each kv head)."""
  from jax.experimental.pallas.ops.gpu import attention as ga

  del max_segment  # the kernel bounds its key loop by the diagonal only
  B, L, K, G, H = q_BxLxKxGxH.shape
  block = block if block > 0 else DEFAULT_BLOCK
  q = _pad_to_block(q_BxLxKxGxH, block, 0).reshape(B, -1, K * G, H)
  Lp = q.shape[1]
  k = jnp.repeat(_pad_to_block(k_BxLxKxH, block, 0), G, axis=2)
  v = jnp.repeat(_pad_to_block(v_BxLxKxH, block, 0), G, axis=2)
  seg = _pad_to_block(seg_BxL, block, DEAD)
  small = min(block, 32)
  sizes = ga.BlockSizes(block_q=block, block_k=block, block_q_dkv=small, block_kv_dkv=small, block_q_dq=small,
                        block_kv_dq=small)
  out = ga.mha(q, k, v, seg, sm_scale=1.0 / math.sqrt(H), causal=True, block_sizes=sizes,
               interpret=_interpret("gpu"))
  return out.reshape(B, Lp, K, G, H)[:, :L]


def _attend(call, q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, info: MaskInfo, *,
            sliding_window: int | None, block: int, max_segment: int, branches: int = 2,
            softcap: float | None = None) -> Array:
  if sliding_window is not None or info.window is not None:
    raise ValueError("the fused attention kernels do not support sliding windows; use attention='xla'")
  if softcap is not None:
    raise ValueError("the fused attention kernels do not support attention-logit soft-capping; use attention='xla'")
  kernel = functools.partial(call, block=block, max_segment=max_segment)
  out = branch_calls(functools.partial(_sharded, kernel), q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, info, branches)
  return checkpoint_name(out, OUT_NAME)


splash_attend = functools.partial(_attend, splash_call)
gpu_attend = functools.partial(_attend, gpu_call)

__all__ = ["DEAD", "OUT_NAME", "branch_calls", "compile_for", "gpu_attend", "gpu_call",
           "splash_attend", "splash_call"]
