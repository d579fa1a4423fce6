"""What the CPU is and how fast XLA multiplies on it: the figures a CPU benchmark names.

Sessions and users land on different x86 CPUs (AMD Zen with AVX-512 BF16, Intel Xeon with AMX),
whose bfloat16 matmul speeds differ several-fold, so a speed figure means little without the
CPU's model and features beside it, and a step's speed is best read as a share of the dot rate
XLA reaches on the same CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# The features that decide bfloat16 matmul speed on x86.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
  """{"model": str, "features": [the FEATURES present], "cores": int} from /proc/cpuinfo (or the
  given text); "unknown" and [] where it cannot be read."""
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      cpuinfo = ""
  model, flags, cores = "unknown", set(), 0
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and model == "unknown":
      model = " ".join(value.split())
    elif key == "flags" and not flags:
      flags = set(value.split())
    elif key == "processor":
      cores += 1
  return {"model": model, "features": [f for f in FEATURES if f in flags], "cores": cores}


def describe(info: dict[str, Any] | None = None) -> str:
  """One line: "CPU: AMD EPYC (2 cores; avx2 avx512f avx512_bf16)"."""
  info = info or cpu_info()
  return f"CPU: {info['model']} ({info['cores']} cores; {' '.join(info['features']) or 'none of ' + ', '.join(FEATURES)})"


def dot_rate(m: int = 2048, k: int = 576, n: int = 1536, seconds: float = 1.0) -> float:
  """GFLOP/s of an [m, k] x [k, n] product with bfloat16 inputs and a float32 result, compiled
  with jbt's bfloat16 CPU options (the way the train step's matmuls run), timed for about
  `seconds` after a warm-up call."""
  import jax
  import jax.numpy as jnp

  from jbt.runtime import xla_options

  a = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
  f = f.lower(a, b).compile(compiler_options=xla_options.compiler_options("bfloat16"))
  f(a, b).block_until_ready()
  reps, start = 0, time.perf_counter()
  while True:
    f(a, b).block_until_ready()
    reps += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return 2.0 * m * k * n * reps / elapsed / 1e9
