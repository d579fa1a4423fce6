"""The projection matmuls, by kind (ModelConfig.matmul); resolve() picks one per backend.

- "xla": x @ w in the compute dtype.
- "bf16_f32": on XLA's CPU backend a bfloat16 x bfloat16 -> bfloat16 dot is computed by converting
  both sides to float32 (float32 speed, plus the converts), while bfloat16 inputs with a float32
  result run at about twice float32's speed. This kind computes the forward and both backward
  dots with bfloat16 inputs and float32 accumulation, and keeps the weight gradient float32. The
  values equal the plain bfloat16 matmul's (XLA's CPU dot accumulates in float32 too). Float32
  compute uses the plain matmul in either kind.

Remat "dots" keeps bf16_f32's float32 result, not its bfloat16 cast: XLA's CPU backend updates
a layer scan's stacked bfloat16 residuals by converting the whole stack to float32 and back at
every layer, while a float32 stack is updated in place (docs/benchmarks.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

KINDS = ("xla", "bf16_f32")
DEFAULT_BY_BACKEND = {"cpu": "bf16_f32"}  # others: "xla"
MATMUL_NAME = "matmul_out"  # a custom-VJP matmul's output, which remat "dots" cannot recognise as a dot


def resolve(kind: str, backend: str | None = None) -> str:
  """A kind of KINDS; "auto" becomes the default of `backend` (JAX's default backend if None)."""
  if kind == "auto":
    return DEFAULT_BY_BACKEND.get(backend or jax.default_backend(), "xla")
  if kind not in KINDS:
    raise ValueError(f"matmul must be auto or one of {', '.join(KINDS)}, got {kind!r}")
  return kind


@jax.custom_vjp
def _dot_f32_acc(x_TxI: Array, w_IxO: Array) -> Array:
  """x @ w with bfloat16 inputs and the float32 result (cast by the caller)."""
  return jax.lax.dot(x_TxI, w_IxO.astype(x_TxI.dtype), preferred_element_type=jnp.float32)


def _dot_f32_acc_fwd(x_TxI: Array, w_IxO: Array) -> tuple[Array, tuple[Array, Array]]:
  return _dot_f32_acc(x_TxI, w_IxO), (x_TxI, w_IxO)


def _transposed(a_MxN: Array) -> Array:
  """a.T laid out row-major. XLA folds a plain transpose into the dot that reads it, and its CPU
  backend then computes that (transposed-operand) bfloat16 dot in float32; a gather of the rows
  in order is not folded, so the dot keeps bfloat16 inputs."""
  return jnp.take(a_MxN.T, jnp.arange(a_MxN.shape[1]), axis=0)


def _dot_f32_acc_bwd(res: tuple[Array, Array], g_TxO: Array) -> tuple[Array, Array]:
  x_TxI, w_IxO = res
  g_TxO = g_TxO.astype(x_TxI.dtype)
  dx_TxI = jax.lax.dot(g_TxO, _transposed(w_IxO.astype(x_TxI.dtype)), preferred_element_type=jnp.float32)
  dw_IxO = jax.lax.dot(_transposed(x_TxI), g_TxO, preferred_element_type=jnp.float32)
  return dx_TxI.astype(x_TxI.dtype), dw_IxO.astype(w_IxO.dtype)


_dot_f32_acc.defvjp(_dot_f32_acc_fwd, _dot_f32_acc_bwd)


def matmul(x_TxI: Array, w_IxO: Array, dt: jnp.dtype, kind: str = "xla") -> Array:
  """x @ w in the compute dtype `dt`, for a float32 parameter w, computed the `kind` way."""
  if dt == jnp.float32 or kind == "xla":
    return x_TxI @ w_IxO.astype(dt)
  return checkpoint_name(_dot_f32_acc(x_TxI.astype(dt), w_IxO), MATMUL_NAME).astype(dt)
