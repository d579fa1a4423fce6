"""XLA compiler options for jbt's own programs (train and eval steps).

On the CPU backend recent jaxlibs hand dots *and reductions* to YNNPACK. A reduction over a
non-minor axis of a product, such as the RMSNorm scale gradient (a [tokens, D] product summed over
tokens), then runs far slower than XLA's own loop (docs/benchmarks.md, "XLA CPU options"). jbt
keeps YNNPACK for dots only:

- float32: dots and the elementwise work fused around them ("LIBRARY_FUSION_TYPE_DOT");
- bfloat16: single dots ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "single"), which keep bfloat16
  inputs: fast on a CPU with bfloat16 dot instructions (AVX-512 BF16, AMX), or the fused kind
  ("fused"), which computes a bfloat16 dot in float32: faster on a CPU without them (on an AMD
  EPYC with AVX2 only, dots 1.6x, a training step 1.43x: docs/benchmarks.md), and free to keep
  some bfloat16 roundings in float32 (XLA's excess precision). Which one is measured once per CPU
  (bf16_dots(); JBT_BF16_DOTS=single or fused sets it).

The options are passed per program, never through XLA_FLAGS, and are left out where the
installed jaxlib does not know them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax

_YNN = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {"float32": {_YNN: "LIBRARY_FUSION_TYPE_DOT"}}  # bfloat16: BF16_DOTS[bf16_dots()]
BF16_DOTS = {
    "single": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "fused": {_YNN: "LIBRARY_FUSION_TYPE_DOT"},
}
BF16_DOTS_PREFERRED = "single"  # kept unless "fused" measures clearly faster


@functools.cache
def bf16_dots() -> str:
  """The BF16_DOTS kind for bfloat16 programs on this CPU: JBT_BF16_DOTS if set, else the one whose
  gradient through an up and a down projection runs faster here (jbt.model.matmul.grad_seconds),
  measured once per CPU model, features and jaxlib and kept (jbt.runtime.cpu.choose)."""
  forced = os.environ.get("JBT_BF16_DOTS", "")
  if forced:
    if forced not in BF16_DOTS:
      raise ValueError(f"JBT_BF16_DOTS must be one of {', '.join(BF16_DOTS)}, got {forced!r}")
    return forced
  from jbt.model import matmul
  from jbt.runtime import cpu

  usable = {k: v for k, v in BF16_DOTS.items() if _if_accepted(v) is not None}
  if len(usable) < 2:
    return next(iter(usable), BF16_DOTS_PREFERRED)
  timers = {k: functools.partial(matmul.grad_seconds, "bf16_f32", options=v) for k, v in usable.items()}
  return cpu.choose("bf16_dots", timers, prefer=BF16_DOTS_PREFERRED)


@functools.cache
def _accepted(items: tuple[tuple[str, str], ...]) -> bool:
  try:
    jax.jit(lambda x: x.sum(0)).lower(jax.ShapeDtypeStruct((2, 2), "float32")).compile(
        compiler_options=dict(items))
  except Exception:  # an option or value this jaxlib does not know: compile without them
    return False
  return True


def _if_accepted(options: dict[str, Any]) -> dict[str, Any] | None:
  """A copy of options, or None where this jaxlib does not know one of them."""
  return dict(options) if _accepted(tuple(sorted(options.items()))) else None


UPDATE_CPU_OPTIONS = {_YNN: "LIBRARY_FUSION_TYPE_REDUCE"}


def update_options(backend: str | None = None) -> dict[str, Any] | None:
  """Options for the optimizer update's own program on a CPU (jbt.train.step.TwoPrograms):
  YNNPACK's reductions, which compute the update's whole-tree norms (gradient clipping, the
  logged norms) many times faster than XLA's own loops; None elsewhere or where this jaxlib lacks
  the option (the step then stays one program)."""
  if (backend or jax.default_backend()) != "cpu":
    return None
  return _if_accepted(UPDATE_CPU_OPTIONS)


def bf16_dot_options(kind: str) -> dict[str, Any] | None:
  """The CPU options of the BF16_DOTS kind `kind` ("single" or "fused"); None where this jaxlib
  does not know them. (compiler_options() gives those of the kind this CPU runs faster.)"""
  return _if_accepted(BF16_DOTS[kind])


def compiler_options(dtype: str = "float32", backend: str | None = None) -> dict[str, Any] | None:
  """Options for `jax.jit(..., compiler_options=...)` of a model computing in `dtype` on `backend`
  (default: JAX's default backend); None where jbt sets none."""
  if str(dtype) not in ("float32", "bfloat16") or (backend or jax.default_backend()) != "cpu":
    return None
  return _if_accepted(CPU_OPTIONS["float32"]) if str(dtype) == "float32" else bf16_dot_options(bf16_dots())
