"""Building jbt's C++ kernels (XLA FFI handlers) for the CPU they run on.

Each kernel's source is compiled at first use with the host's C++ compiler for the host's own
instruction set (`-march=native`, or JBT_NATIVE_ARCH_FLAGS to build the code another CPU kind
gets) into jbt's cache (`$JBT_CACHE/kernels`), under a key of the source, the compiler, its
flags, jaxlib's FFI headers and the CPU's flags, so each CPU kind gets its own build. A build is
written under a temporary name and renamed into place, so a concurrent build leaves one whole
library."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import jax

from jbt.atomic import cache_dir

# -ffp-contract=off: no multiply-add fused where the source has a multiply and an add (XLA's CPU
# code fuses none either, which the optimizer kernel's bit-for-bit agreement relies on)
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")

HEADERS = tuple(sorted(Path(__file__).parent.glob("jbt_*.h")))  # shared by the kernels (thread count, vectors)
log = logging.getLogger("jbt")


class BuildError(RuntimeError):
  """A kernel could not be compiled or loaded on this machine."""


def arch_flags() -> list[str]:
  """The target: this CPU (-march=native), or JBT_NATIVE_ARCH_FLAGS (e.g. "-march=x86-64-v3" to build the
  code another CPU kind gets)."""
  return (os.environ.get("JBT_NATIVE_ARCH_FLAGS") or "-march=native").split()


def cpu_flags() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


def compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if not cxx:
    raise BuildError("no C++ compiler found (g++, c++ or clang++; or set CXX)")
  return cxx


@functools.cache
def _compiler_version(cxx: str) -> str:
  try:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.partition("\n")[0]
  except (OSError, subprocess.CalledProcessError) as e:
    raise BuildError(f"the C++ compiler {cxx} does not run: {e}") from e


def library_path(source: Path, stem: str, cxx: str, extra: tuple[str, ...] = ()) -> Path:
  """Where the build of `source` (with `extra` compiler flags) for this machine lives (built by
  build() if missing)."""
  parts = [source.read_text(), *(h.read_text() for h in HEADERS), cxx, _compiler_version(cxx), " ".join([*FLAGS, *extra, *arch_flags()]),
           jax.ffi.include_dir(), jax.__version__, platform.machine(), cpu_flags()]
  key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
  return cache_dir() / "kernels" / f"{stem}_{key}.so"


def build(source: Path, stem: str, cxx: str, what: str, extra: tuple[str, ...] = ()) -> Path:
  """Compiles `source` for this CPU if not already in the cache; returns the library's path."""
  path = library_path(source, stem, cxx, extra)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    cmd = [cxx, *FLAGS, *extra, *arch_flags(), f"-I{Path(__file__).parent}", f"-I{jax.ffi.include_dir()}", str(source), "-o",
           str(out)]
    log.info("%s: compiling the native CPU kernel (%s)", what, path.name)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise BuildError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    os.replace(out, path)  # atomic: a concurrent build leaves one whole library
  return path


def register(path: Path, targets: dict[str, str]) -> None:
  """Loads a built library and registers its FFI handlers (target name: exported symbol) for the CPU."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(path))
  except OSError as e:
    raise BuildError(f"loading {path}: {e}") from e
  for target, symbol in targets.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def loads(load: Callable[[], None], unavailable: str) -> bool:
  """Runs load() (a build and register); False, logging `unavailable` and why, where it fails."""
  try:
    load()
    return True
  except BuildError as e:
    log.warning("%s: %s", unavailable, e)
    return False


def callable_here(switch: str) -> bool:
  """Whether an FFI kernel may be called in the program being traced: the environment variable
  `switch` is not "0", the backend is a CPU, and no mesh of several devices is in use (an FFI call
  is opaque to XLA's partitioner)."""
  if os.environ.get(switch, "1") == "0":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() == "cpu" and (mesh is None or mesh.empty or mesh.size == 1)
