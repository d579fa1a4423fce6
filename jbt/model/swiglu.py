"""The gated MLP's activation h = silu(g) * u in bfloat16 as a compiled CPU kernel (swiglu.cc,
through XLA's FFI), with its gradient as a second one.

XLA's CPU code computes it, and in the backward pass its gradient and h again (the down
projection's weight gradient needs h, which remat recomputes), as several single-threaded
elementwise passes over [tokens, F] arrays; the kernels make each one vector pass over all cores,
in float32 with one rounding per result as JAX computes it (`tests/test_swiglu.py` compares them).
Used for bfloat16 compute on a CPU without a mesh of several devices (an FFI call is opaque to
XLA's partitioner) where the kernel builds; `usable()` says whether here and now.
JBT_NATIVE_SWIGLU=0 turns it off."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from jbt.model import matmul
from jbt.runtime import kernels

SOURCE = Path(__file__).with_name("swiglu.cc")
FORWARD, BACKWARD, BACKWARD_T = "jbt_swiglu_fwd", "jbt_swiglu_bwd", "jbt_swiglu_bwd_t"


def build() -> Path:
  """This machine's build of the kernel (compiled into jbt's cache if missing)."""
  return kernels.build(SOURCE, "jbt_swiglu", kernels.compiler(), "mlp")


@functools.cache
def available() -> bool:
  """Whether the kernel builds and loads here (logs why not, once)."""
  return kernels.loads(
      lambda: kernels.register(build(), {FORWARD: "JbtSwigluFwd", BACKWARD: "JbtSwigluBwd", BACKWARD_T: "JbtSwigluBwdT"}),
      "mlp: the native CPU SwiGLU is not available (XLA's elementwise code runs instead)")


def usable(g: jax.Array, u: jax.Array) -> bool:
  """bfloat16 g and u of one shape, traced for a CPU outside a mesh of several devices, with the
  kernel built."""
  return (g.dtype == jnp.bfloat16 and u.dtype == jnp.bfloat16 and g.shape == u.shape
          and kernels.callable_here("JBT_NATIVE_SWIGLU") and available())


def _call(target: str, n_out: int, *xs: jax.Array):
  out = jax.ShapeDtypeStruct(xs[0].shape, jnp.bfloat16)
  return jax.ffi.ffi_call(target, (out,) * n_out if n_out > 1 else out, vmap_method="broadcast_all")(*xs)


def _backward_t(g_TxF: jax.Array, u_TxF: jax.Array, dh_TxF: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """dg, du and h transposed ([F, T])."""
  T, F = g_TxF.shape
  out = jax.ShapeDtypeStruct((T, F), jnp.bfloat16)
  return tuple(jax.ffi.ffi_call(BACKWARD_T, (out, out, jax.ShapeDtypeStruct((F, T), jnp.bfloat16)))(g_TxF, u_TxF, dh_TxF))


@jax.custom_vjp
def swiglu(g: jax.Array, u: jax.Array) -> jax.Array:
  """(silu(g) * u) in float32, rounded to bfloat16; g, u bfloat16 of one shape."""
  return _call(FORWARD, 1, g, u)


def _swiglu_fwd(g: jax.Array, u: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _call(FORWARD, 1, g, u), (g, u)


def _swiglu_bwd(res: tuple[jax.Array, jax.Array], dh: jax.Array) -> tuple[jax.Array, jax.Array]:
  g, u = res
  return tuple(_call(BACKWARD, 2, g, u, dh.astype(jnp.bfloat16)))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def gated_down(g_TxF: jax.Array, u_TxF: jax.Array, w_FxD: jax.Array) -> jax.Array:
  """silu(g) * u @ w_down in bfloat16 ([T, F] g, u; float32 w), with matmul's "bf16_f32" dots,
  differentiated as one op: its backward pass needs g, u (kept by remat "dots" as the gate and up
  projections' results) and w, and one kernel gives dg, du and h transposed for the weight
  gradient h^T dy, so h is neither kept nor recomputed. The same values as swiglu() followed by
  jbt.model.matmul.matmul. For 2-D operands where usable(g, u)."""
  h_TxF = jax.lax.stop_gradient(swiglu(g_TxF, u_TxF))
  return _gated_down_grads(g_TxF, u_TxF, w_FxD, matmul.saved_product(h_TxF, w_FxD, jnp.bfloat16, "bf16_f32"))


@jax.custom_vjp
def _gated_down_grads(g_TxF: jax.Array, u_TxF: jax.Array, w_FxD: jax.Array, y_TxD: jax.Array) -> jax.Array:
  """y (computed without gradients), with the gradients of swiglu(g, u) @ w to g, u and w."""
  del g_TxF, u_TxF, w_FxD
  return y_TxD


def _gated_down_fwd(g_TxF, u_TxF, w_FxD, y_TxD):
  return y_TxD, (g_TxF, u_TxF, w_FxD)


def _gated_down_bwd(res, dy_TxD):
  g_TxF, u_TxF, w_FxD = res
  dy_TxD = dy_TxD.astype(jnp.bfloat16)
  # as matmul's "bf16_f32" backward: dh = dy w^T and dw = h^T dy, bfloat16 inputs, float32 sums
  dh_TxF = jax.lax.dot_general(dy_TxD, w_FxD.astype(jnp.bfloat16), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  dg_TxF, du_TxF, hT_FxT = _backward_t(g_TxF, u_TxF, dh_TxF)
  dw_FxD = jax.lax.dot(hT_FxT, dy_TxD, preferred_element_type=jnp.float32).astype(w_FxD.dtype)
  return dg_TxF, du_TxF, dw_FxD, None


_gated_down_grads.defvjp(_gated_down_fwd, _gated_down_bwd)
