"""A 2-D transpose as a compiled CPU kernel (transpose.cc, through XLA's FFI), for the weight
gradients' x^T g (jbt.model.matmul.tokens_contracted).

XLA's CPU backend folds the transpose of x into a copy fused with whatever computes x (in a layer
scan's backward pass: the slices of the saved stacks and the recomputed elementwise work) and runs
that fusion at a fraction of memory speed. The kernel's operand is a materialized x, which it reads
in blocks; its result feeds a plain dot. Used on a CPU without a mesh of several devices (an FFI
call is opaque to XLA's partitioner); `usable()` says whether here and now. JBT_NATIVE_TRANSPOSE=0
turns it off (XLA's transposing copies, and remat "dots" keeps float32 matmul results)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax

from jbt.runtime import kernels

SOURCE = Path(__file__).with_name("transpose.cc")
TARGET = "jbt_transpose"


@functools.cache
def available() -> bool:
  """Whether the kernel builds and loads here (logs why not, once)."""
  return kernels.loads(
      lambda: kernels.register(kernels.build(SOURCE, "jbt_transpose", kernels.compiler(), "matmul"), {TARGET: "JbtTranspose"}),
      "matmul: the native CPU transpose is not available (XLA's transposing copy runs instead)")


def usable(x: jax.Array) -> bool:
  """A 2-D array of 2- or 4-byte elements, traced for a CPU outside a mesh of several devices,
  with the kernel built."""
  return x.ndim == 2 and x.dtype.itemsize in (2, 4) and kernels.callable_here("JBT_NATIVE_TRANSPOSE") and available()


def transpose(x_RxC: jax.Array) -> jax.Array:
  """x.T, laid out row-major ([C, R])."""
  R, C = x_RxC.shape
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((C, R), x_RxC.dtype))(x_RxC)
