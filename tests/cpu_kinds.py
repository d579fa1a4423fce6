"""Which of the kernel builds for other CPU kinds this CPU can also run."""

from __future__ import annotations

from jbt.runtime import cpu

NEEDS = {"x86-64-v4": "avx512f", "-mavx512bf16": "avx512_bf16", "-mamx-bf16": "amx_bf16"}


def runs_here(arch: str) -> bool:
  """Whether code built with the compiler flags `arch` runs on this CPU (an AVX2-only CPU cannot run
  an AVX-512 build: it stops on an illegal instruction)."""
  have = set(cpu.cpu_info()["features"])
  return all(feature in have for flag, feature in NEEDS.items() if flag in arch)
