"""XLA compiler options for jbt's own programs (train and eval steps).

On the CPU backend recent jaxlibs hand dots *and reductions* to YNNPACK. A reduction over a
non-minor axis of a product, such as the RMSNorm scale gradient (a [tokens, D] product summed over
tokens), then runs far slower than XLA's own loop (docs/benchmarks.md, "XLA CPU options"). jbt
keeps YNNPACK for dots only:

- float32: dots and the elementwise work fused around them ("LIBRARY_FUSION_TYPE_DOT");
- bfloat16: single dots ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"), since the fused kind computes a
  bfloat16 dot in float32 while a single one keeps bfloat16 inputs.

The options are passed per program, never through XLA_FLAGS, and are left out where the
installed jaxlib does not know them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

_YNN = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {
    "float32": {_YNN: "LIBRARY_FUSION_TYPE_DOT"},
    "bfloat16": {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


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


def compiler_options(dtype: str = "float32", backend: str | None = None) -> dict[str, Any] | None:
  """Options for `jax.jit(..., compiler_options=...)` of a model computing in `dtype` on `backend`
  (default: JAX's default backend); None where jbt sets none."""
  options = CPU_OPTIONS.get(str(dtype))
  if options is None or (backend or jax.default_backend()) != "cpu":
    return None
  return _if_accepted(options)
