"""What the CPU is, how fast XLA multiplies on it (the figures a CPU benchmark names), and the
CPU-specific choices jbt makes by measuring them once per CPU.

Sessions and users land on different x86 CPUs (AMD Zen with AVX-512 BF16, Intel Xeon with AMX),
whose bfloat16 matmul speeds differ several-fold, so a speed figure means little without the
CPU's model and features beside it, and a step's speed is best read as a share of the dot rate
XLA reaches on the same CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from jbt.atomic import atomic_file, cache_dir
from jbt.errors import JbtError

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


def choices_path() -> Path:
  """Where measured CPU choices are kept: $JBT_CPU_CHOICES, else cpu_choices.json in $JBT_CACHE or
  $XDG_CACHE_HOME/jbt (~/.cache/jbt)."""
  if os.environ.get("JBT_CPU_CHOICES"):
    return Path(os.environ["JBT_CPU_CHOICES"]).expanduser()
  return cache_dir() / "cpu_choices.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
  """An exclusive lock on path's lock file, so that processes starting together on one machine
  measure once and agree; no lock where the directory cannot be written."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path.with_name(path.name + ".lock"), "a")
  except OSError:
    yield
    return
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def _read(path: Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return data if isinstance(data, dict) else {}


def choose(name: str, timers: dict[str, Callable[[], float]], prefer: str, margin: float = 0.1) -> str:
  """The option of `timers` to use on this CPU for choice `name`: each timer returns the seconds
  its option takes; `prefer` is kept unless another is faster by more than `margin` (so that
  noise does not flip it). Measured once per CPU model, features, jax and jaxlib and kept in
  choices_path() (with the times, for reading), so every later process makes the same choice."""
  import jax
  import jaxlib

  info = cpu_info()
  key = f"{name} | {info['model']} | {' '.join(info['features'])} | jax {jax.__version__} jaxlib {jaxlib.__version__}"
  path = choices_path()
  log = logging.getLogger("jbt")
  with _locked(path):
    known = _read(path).get(key)
    if isinstance(known, dict) and known.get("choice") in timers:
      return known["choice"]
    seconds = {option: timer() for option, timer in timers.items()}
    best = min(seconds, key=seconds.get)
    choice = best if seconds[best] < (1 - margin) * seconds[prefer] else prefer
    data = _read(path)
    data[key] = {"choice": choice, "seconds": seconds}
    try:
      with atomic_file(path) as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
    except (OSError, JbtError) as e:
      log.warning("%s: could not keep the measured %s choice (%s)", path, name, getattr(e, "strerror", None) or e)
  print(f"{name}: {choice} on this CPU (measured once: "
        + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items()) + f"; kept in {path})", file=sys.stderr)
  return choice
