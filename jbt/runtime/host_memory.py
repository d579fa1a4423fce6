"""Host memory settings that have to be in place when the process starts: glibc's malloc tunables,
which glibc reads once, at process start.

XLA's CPU runtime allocates a step's temporary buffers (gigabytes for a long packed row) anew at
every step. glibc serves blocks above 32 MiB by mmap and hands them back to the kernel when they
are freed, so every step touches fresh 4 KiB pages: the kernel zeroes each page at its first
touch, and XLA's own zero fills of the layer scan's stacks then run at page-fault speed (about
4 GB/s, 8% of a steady step's gradients program on the AMX Xeon, docs/benchmarks.md). By
default that is how jbt runs: glibc's defaults, nothing restarts.

With JBT_KEEP_MEMORY=1, jbt's entry points (`python -m jbt.train`, `python -m jbt.plan`, the
bench and profile scripts) start themselves again, before anything else runs, under tunables that
keep freed memory for reuse, the way a framework's caching allocator does:
`glibc.malloc.mmap_max=0` (large blocks from the heap), a trim threshold of 1 TiB (never handed
back) and `glibc.malloc.arena_max=1` (one heap for every thread, so a block one thread frees
serves the next step on another). SmolLM2-135M's bench ran 1.08x, 1.14x and 1.07x faster with it
on the AMX Xeon, but its peak resident memory grew with the number of batch shapes the run met
(the heap keeps the holes between blocks of different sizes): 4.9-5.6 GiB instead of 3.8 over
9 shapes, 6.2 GiB instead of 3.9 over 11, against TRL's 7.1. A long run meets more shapes, so
this is asked for, not the default. A tunable the user's GLIBC_TUNABLES already names stays as
given.

Huge pages: `glibc.malloc.hugetlb=1` asks for transparent huge pages on large blocks instead, a
few thousand faults a step instead of hundreds of thousands. That paid while a step rewrote whole
stacks every layer (1.1x in docs/benchmarks.md's earlier passes, on both CPU kinds); with today's
step it costs (4 KiB pages ran 1.09-1.20x faster in three rounds of `scripts/bench.py --variants
jbt-shared,jbt-shared-hugepages` on the AMX Xeon, and the kernel's huge-page work also slows
compiling), so only JBT_HUGEPAGES=1 asks for it. Where the C library is not glibc nothing changes.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

KEEP = "JBT_KEEP_MEMORY"
HUGEPAGES = "JBT_HUGEPAGES"
KEEP_TUNABLES = ("glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 40}", "glibc.malloc.arena_max=1")
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def restart_env(environ: Mapping[str, str]) -> dict[str, str] | None:
  """The environment to start again under (GLIBC_TUNABLES plus the tunables asked for that it does
  not name yet), or None where this process needs no restart."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return None
  tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  named = {t.split("=", 1)[0] for t in tunables}
  wanted = list(KEEP_TUNABLES) if environ.get(KEEP, "") == "1" else []
  if environ.get(HUGEPAGES, "") == "1":
    wanted.append(HUGEPAGE_TUNABLE)
  added = [t for t in wanted if t.split("=", 1)[0] not in named]
  if not added:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(tunables + added)}


def restart() -> None:
  """Where JBT_KEEP_MEMORY=1 or JBT_HUGEPAGES=1 asks for tunables this process lacks, replace it
  by the same command under restart_env(); call it first thing in a command-line entry point (it never returns where a restart
  happens, and the restarted process finds its tunables in place and goes on)."""
  env = restart_env(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
