"""Block-sparse causal attention as a compiled CPU kernel, called through XLA's FFI.

flash.py's mask, visits and online softmax, computed by native.cc: each (row, query block) is a
task for one of the process's CPUs, and a visited block's matmuls, softmax and mask are vector
code. XLA's CPU backend runs flash's block loop on one thread at a per-op cost above a block's
arithmetic (docs/benchmarks.md); here every core works inside the loop. With bfloat16 inputs on
a CPU with AMX the block matmuls are AMX tile matmuls, with P and dS rounded to bfloat16 for them
as flash rounds them; elsewhere the tiles are float32 (bfloat16 inputs widened), so results agree
with flash to bfloat16 rounding, not bit for bit. Gradients are the same bits every run.

The kernel is compiled at first use with the host's C++ compiler for the host's own instruction
set (`-march=native`) into jbt's cache (`$JBT_CACHE/kernels`, keyed by the source, the compiler,
its flags, jaxlib's FFI headers and the CPU's flags), so each CPU kind gets its own build;
`available()` says whether it could be built here. CPU only; the other backends have their fused
kernels."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jbt.model.attention import fused
from jbt.model.attention.flash import saved_bits
from jbt.model.attention.mask import MaskInfo
from jbt.runtime import kernels
from jbt.runtime.kernels import BuildError  # noqa: F401  (native.BuildError: what a failed build raises)

Array = jax.Array
SOURCE = Path(__file__).with_name("native.cc")
FORWARD, BACKWARD = "jbt_attention_forward", "jbt_attention_backward"
OUT_NAME, LSE_NAME = "native_out", "native_lse"
# q, k and v (after RoPE) are kept for the backward pass under remat "attention" and "dots", so it
# recomputes neither them nor the forward.
INPUT_NAMES = {name: f"native_{name}" for name in ("q", "k", "v")}



def _compiler() -> str:
  return kernels.compiler()


def library_path() -> Path:
  """Where this machine's build lives (built by build() if missing)."""
  return kernels.library_path(SOURCE, "jbt_attention", _compiler())


def build() -> Path:
  """Compiles native.cc for this CPU if not already in the cache; returns the library's path."""
  return kernels.build(SOURCE, "jbt_attention", _compiler(), "attention")


@functools.cache
def _register() -> None:
  kernels.register(build(), {FORWARD: "JbtAttentionForward", BACKWARD: "JbtAttentionBackward"})


@functools.cache
def available() -> bool:
  """Whether the kernel builds and loads here (logs why not)."""
  return kernels.loads(_register, "attention: the native CPU kernel is not available")


def _ids(info: MaskInfo, q: Array, sliding_window: int | None) -> tuple[Array, ...]:
  """The kernel's segment, branch and position ids [B, L] and window [] (int32; zeros for what the
  mask does not use)."""
  B, L = q.shape[:2]
  zeros = jnp.zeros((B, L), jnp.int32)
  branches = zeros if info.branch_ids_BxL is None else info.branch_ids_BxL.astype(jnp.int32)
  windowed = sliding_window is not None or info.window is not None
  if windowed and info.positions_BxL is None:
    raise ValueError("a sliding window needs positions")
  positions = info.positions_BxL.astype(jnp.int32) if windowed else zeros
  window = jnp.zeros((), jnp.int32) if info.window is None else jnp.asarray(info.window, jnp.int32)
  return info.segment_ids_BxL.astype(jnp.int32), branches, positions, window


def _attrs(info: MaskInfo, head_dim: int, sliding_window: int | None, softcap: float | None) -> dict:
  return {"sliding_window": int(sliding_window or 0), "has_branches": info.branch_ids_BxL is not None,
          "scale": 1.0 / math.sqrt(head_dim), "softcap": float(softcap or 0.0)}


def _typed(attrs: dict) -> dict:
  """The FFI attributes' types (native.cc binds int64, bool and float32)."""
  return {"sliding_window": np.int64(attrs["sliding_window"]), "has_branches": bool(attrs["has_branches"]),
          "scale": np.float32(attrs["scale"]), "softcap": np.float32(attrs["softcap"])}


def _forward(q, k, v, ids, attrs):
  B, L, K, G, _ = q.shape
  call = jax.ffi.ffi_call(FORWARD, (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, L, K, G), jnp.float32)))
  return call(q, k, v, *ids, **attrs)


def _backward(q, k, v, ids, out, lse, dout, attrs):
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  return jax.ffi.ffi_call(BACKWARD, shapes)(q, k, v, *ids, out, lse, dout.astype(out.dtype), **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _with_grads(q, k, v, ids, saved, out, lse, attrs_key):
  """out, with the attention's gradients to q, k and v (saved: the named q, k, v; out, lse: the forward's)."""
  del q, k, v, ids, saved, lse, attrs_key
  return out


def _with_grads_fwd(q, k, v, ids, saved, out, lse, attrs_key):
  del q, k, v
  return out, (ids, saved, out, lse)


def _with_grads_bwd(attrs_key, res, dout):
  ids, saved, out, lse = res
  dq, dk, dv = _backward(*saved, ids, out, lse, dout, _typed(dict(attrs_key)))
  none = functools.partial(jax.tree.map, lambda _: None)
  return dq, dk, dv, none(ids), jax.tree.map(jnp.zeros_like, saved), jnp.zeros_like(out), jnp.zeros_like(lse)


_with_grads.defvjp(_with_grads_fwd, _with_grads_bwd)


def native_attention(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, info: MaskInfo, *,
                     sliding_window: int | None = None, softcap: float | None = None,
                     head_dim: int | None = None) -> Array:
  """Masked softmax(q k^T / sqrt(head_dim or H)) v over the blocks the mask leaves, [B, L, K, G, H]
  (jbt.model's mask)."""
  _register()
  if q_BxLxKxGxH.dtype not in (jnp.float32, jnp.bfloat16):  # the kernel reads those two: others go through float32
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    out = native_attention(f32(q_BxLxKxGxH), f32(k_BxLxKxH), f32(v_BxLxKxH), info, sliding_window=sliding_window,
                           softcap=softcap, head_dim=head_dim)
    return out.astype(q_BxLxKxGxH.dtype)
  H = q_BxLxKxGxH.shape[-1]
  if H % 16:  # the kernel's tiles are whole vectors: zeros change neither the scores nor the output
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -H % 16)])  # noqa: E731
    out = native_attention(pad(q_BxLxKxGxH), pad(k_BxLxKxH), pad(v_BxLxKxH), info, sliding_window=sliding_window,
                           softcap=softcap, head_dim=H)
    return out[..., :H]
  ids = tuple(jax.lax.stop_gradient(x) for x in _ids(info, q_BxLxKxGxH, sliding_window))
  attrs = _attrs(info, head_dim or H, sliding_window, softcap)
  # Saved as their bits: a layer scan writes a bfloat16 slice of its stack by converting the whole stack.
  saved = tuple(saved_bits(jax.lax.stop_gradient(x), INPUT_NAMES[n])
                for n, x in zip(("q", "k", "v"), (q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH)))
  out, lse = _forward(*saved, ids, _typed(attrs))
  out, lse = saved_bits(out, OUT_NAME), checkpoint_name(lse, LSE_NAME)
  return _with_grads(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, ids, saved, out, lse, tuple(attrs.items()))


def attend(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, info: MaskInfo, *, sliding_window: int | None,
           block: int, max_segment: int, branches: int = 2, softcap: float | None = None) -> Array:
  """The attention registry's entry point (blocks of 64 tokens; the segments bound the key range).
  Under a mesh each device runs the kernel on its rows and kv heads (shard_map)."""
  del block, max_segment, branches
  seg, br, pos, window = _ids(info, q_BxLxKxGxH, sliding_window)
  has_branches, per_layer = info.branch_ids_BxL is not None, info.window is not None

  def call(q, k, v, seg, br, pos, window_B):
    local = MaskInfo(seg, br if has_branches else None, pos, window=window_B[0] if per_layer else None)
    return native_attention(q, k, v, local, sliding_window=sliding_window, softcap=softcap)

  window_B = jnp.broadcast_to(window, seg.shape[:1])  # per row, so that it shards like them
  return fused._sharded(call, q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, seg, br, pos, window_B)
