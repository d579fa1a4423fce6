"""The projection matmuls, by kind (ModelConfig.matmul); resolve() picks one per backend.

- "xla": x @ w in the compute dtype.
- "bf16_f32": on XLA's CPU backend a bfloat16 x bfloat16 -> bfloat16 dot is computed by converting
  both sides to float32 (float32 speed, plus the converts), while bfloat16 inputs with a float32
  result run several times faster (AVX-512 BF16, AMX). This kind computes the forward and both
  backward dots with bfloat16 inputs and float32 accumulation, and keeps the weight gradient
  float32. The values equal the plain bfloat16 matmul's (XLA's CPU dot accumulates in float32
  too). Float32 compute uses the plain matmul in either kind.
  Each backward dot reads one operand transposed, and XLA folds a transpose into the dot that
  reads it. Its CPU dot is fast when the folded operand is the right-hand one (dx = g w^T) but
  about six times slower when the left-hand one contracts its major axis (dw = x^T g contracts
  the tokens), so dw contracts the tokens split in two ([2, T/2]): XLA then makes one bfloat16
  transposing copy of x and runs a plain dot.
- "bf16_f32_gather": the same dots, with both transposed operands laid out by a gather of the rows
  in order (which XLA does not fold; it runs in float32 inside the gather's fusion).

"auto" on a CPU is whichever of the two bf16_f32 kinds a short measurement on this CPU finds
faster ("bf16_f32" unless the other is clearly so; jbt.runtime.cpu.choose, cached per CPU model,
features and jaxlib). Elsewhere "xla".

Remat "dots" keeps bf16_f32's bfloat16 result as its bits (uint16): XLA's CPU backend updates a
layer scan's stacked bfloat16 residuals by converting the whole stack to float32 and back at every
layer, an integer stack in place. The weight gradients then transpose x with jbt.model.transpose's
kernel, since XLA would fuse the stack's slices into its own transposing copy and run it several
times slower. Where that kernel is not usable (no C++ compiler, a mesh of several devices,
JBT_NATIVE_TRANSPOSE=0) remat keeps the float32 result, updated in place too (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jbt.model import transpose

Array = jax.Array

KINDS = ("xla", "bf16_f32", "bf16_f32_gather")
CPU_KINDS = ("bf16_f32", "bf16_f32_gather")  # what "auto" measures on a CPU, the first preferred
MATMUL_NAME = "matmul_out"  # a custom-VJP matmul's output, which remat "dots" cannot recognise as a dot


def resolve(kind: str, backend: str | None = None) -> str:
  """A kind of KINDS; "auto" becomes the kind for `backend` (JAX's default backend if None): on a
  CPU the faster CPU_KINDS one there, measured once per CPU; "xla" elsewhere."""
  if kind == "auto":
    return measured_cpu_kind() if (backend or jax.default_backend()) == "cpu" else "xla"
  if kind not in KINDS:
    raise ValueError(f"matmul must be auto or one of {', '.join(KINDS)}, got {kind!r}")
  return kind


def _dot_fwd(x_TxI: Array, w_IxO: Array) -> tuple[Array, tuple[Array, Array]]:
  return jax.lax.dot(x_TxI, w_IxO.astype(x_TxI.dtype), preferred_element_type=jnp.float32), (x_TxI, w_IxO)


def _transposed(a_MxN: Array) -> Array:
  """a.T laid out row-major by a gather of its rows in order, which XLA does not fold into the
  dot that reads it."""
  return jnp.take(a_MxN.T, jnp.arange(a_MxN.shape[1]), axis=0)


def _token_split(T: int) -> int:
  """The smallest factor of T in 2..16, or 1 where there is none."""
  return next((c for c in range(2, 17) if T % c == 0), 1)


def tokens_contracted(x_TxI: Array, g_TxO: Array) -> Array:
  """x^T g in float32: x transposed by jbt.model.transpose's kernel and a plain dot where it is
  usable; else with the tokens split in two or more ([c, T/c]), which XLA's CPU backend computes
  as a bfloat16 transposing copy and a plain dot, or a gathered transpose where T has no small
  factor."""
  if transpose.usable(x_TxI):
    return jax.lax.dot(transpose.transpose(x_TxI), g_TxO, preferred_element_type=jnp.float32)
  T, c = x_TxI.shape[0], _token_split(x_TxI.shape[0])
  if c == 1:
    return jax.lax.dot(_transposed(x_TxI), g_TxO, preferred_element_type=jnp.float32)
  return jax.lax.dot_general(x_TxI.reshape(c, T // c, -1), g_TxO.reshape(c, T // c, -1),
                             (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32)


def _bwd_folded(res: tuple[Array, Array], g_TxO: Array) -> tuple[Array, Array]:
  x_TxI, w_IxO = res
  g_TxO = g_TxO.astype(x_TxI.dtype)
  dx_TxI = jax.lax.dot_general(g_TxO, w_IxO.astype(x_TxI.dtype), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
  return dx_TxI.astype(x_TxI.dtype), tokens_contracted(x_TxI, g_TxO).astype(w_IxO.dtype)


def _bwd_gathered(res: tuple[Array, Array], g_TxO: Array) -> tuple[Array, Array]:
  x_TxI, w_IxO = res
  g_TxO = g_TxO.astype(x_TxI.dtype)
  dx_TxI = jax.lax.dot(g_TxO, _transposed(w_IxO.astype(x_TxI.dtype)), preferred_element_type=jnp.float32)
  dw_IxO = jax.lax.dot(_transposed(x_TxI), g_TxO, preferred_element_type=jnp.float32)
  return dx_TxI.astype(x_TxI.dtype), dw_IxO.astype(w_IxO.dtype)


def _dot_f32_acc(bwd: Callable) -> Callable[[Array, Array], Array]:
  """x @ w with bfloat16 inputs and the float32 result (cast by the caller), differentiated by `bwd`."""
  f = jax.custom_vjp(lambda x_TxI, w_IxO: _dot_fwd(x_TxI, w_IxO)[0])
  f.defvjp(_dot_fwd, bwd)
  return f


_BWD = {"bf16_f32": _bwd_folded, "bf16_f32_gather": _bwd_gathered}
_DOTS = {k: _dot_f32_acc(bwd) for k, bwd in _BWD.items()}


def _saved_bits(y: Array) -> Array:
  """checkpoint_name(y, MATMUL_NAME) with y kept as its bits (an unsigned integer of its width),
  for a value with no gradient: a layer scan writes a slice of an integer stack in place, where
  XLA's CPU backend rewrites a bfloat16 stack whole at every layer."""
  bits = jnp.dtype(f"uint{8 * y.dtype.itemsize}")
  return jax.lax.bitcast_convert_type(checkpoint_name(jax.lax.bitcast_convert_type(y, bits), MATMUL_NAME), y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _with_grads(x_TxI: Array, w_IxO: Array, y_TxO: Array, kind: str) -> Array:
  """y (x @ w, computed without gradients), with the gradients of x @ w to x and w."""
  del x_TxI, w_IxO, kind
  return y_TxO


def _with_grads_fwd(x_TxI: Array, w_IxO: Array, y_TxO: Array, kind: str) -> tuple[Array, tuple[Array, Array]]:
  del kind
  return y_TxO, (x_TxI, w_IxO)


def _with_grads_bwd(kind: str, res: tuple[Array, Array], g_TxO: Array) -> tuple[Array, Array, None]:
  return (*_BWD[kind](res, g_TxO), None)


_with_grads.defvjp(_with_grads_fwd, _with_grads_bwd)


def matmul(x_TxI: Array, w_IxO: Array, dt: jnp.dtype, kind: str = "xla") -> Array:
  """x @ w in the compute dtype `dt`, for a float32 parameter w, computed the `kind` way."""
  if dt == jnp.float32 or kind == "xla":
    return x_TxI @ w_IxO.astype(dt)
  x_TxI = x_TxI.astype(dt)
  if not transpose.usable(x_TxI):
    return checkpoint_name(_DOTS[kind](x_TxI, w_IxO), MATMUL_NAME).astype(dt)
  # Remat "dots" keeps the bits of the compute-dtype result the layer goes on with: half the
  # float32 result's bytes, the same values. (XLA fuses such a stack's slices into its own
  # transposing copies of the weight gradients, several times slower, so only with the native
  # transpose.)
  return _with_grads(x_TxI, w_IxO, saved_product(x_TxI, w_IxO, dt, kind), kind)


def saved_product(x_TxI: Array, w_IxO: Array, dt: jnp.dtype, kind: str) -> Array:
  """x @ w in `dt` without gradients, kept by remat "dots" as its bits (for a custom VJP that
  differentiates it; `kind` one of the bf16_f32 kinds)."""
  return _saved_bits(jax.lax.stop_gradient(_DOTS[kind](x_TxI, w_IxO)).astype(dt))


def grad_seconds(kind: str, tokens: int = 1024, hidden: int = 576, inner: int = 1536, repeats: int = 5,
                 options: dict | None = None) -> float:
  """Best of `repeats` timings of one gradient through an up and a down projection (hidden <->
  inner, bfloat16 compute) computed the `kind` way, compiled with `options` (default: jbt's CPU
  compiler options)."""
  from jbt.runtime import xla_options

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (tokens, hidden), jnp.bfloat16)
  w1 = jax.random.normal(k2, (hidden, inner), jnp.float32) * 0.05
  w2 = jax.random.normal(k3, (inner, hidden), jnp.float32) * 0.05

  def loss(x, w1, w2):
    return matmul(matmul(x, w1, jnp.bfloat16, kind), w2, jnp.bfloat16, kind).astype(jnp.float32).sum()

  f = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w1, w2).compile(
      compiler_options=xla_options.compiler_options("bfloat16") if options is None else options)
  jax.block_until_ready(f(x, w1, w2))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(x, w1, w2))
    best = min(best, time.perf_counter() - start)
  return best


@functools.cache
def measured_cpu_kind() -> str:
  """The CPU_KINDS kind whose gradient runs faster on this CPU (measured once, then cached), under
  the bfloat16 dot kind chosen for it (jbt.runtime.xla_options.bf16_dots)."""
  from jbt.runtime import cpu, xla_options

  dots = xla_options.bf16_dots()
  name = "matmul" if dots == "single" else f"matmul ({dots} bf16 dots)"
  return cpu.choose(name, {k: functools.partial(grad_seconds, k) for k in CPU_KINDS}, prefer=CPU_KINDS[0])
