"""Host memory: glibc's malloc tunables, which glibc reads once, at process start, and handing
kept memory back when the machine runs short.

XLA's CPU runtime allocates a step's temporary buffers (gigabytes for a long packed row) anew at
every step. Under glibc's defaults blocks above 32 MiB are mmap'd and handed back to the kernel
when freed, so every step touches fresh 4 KiB pages: the kernel zeroes each page at its first
touch, and XLA's own zero fills of the layer scan's stacks then run at page-fault speed (about
4 GB/s, 8% of a steady step's gradients program on the AMX Xeon, docs/benchmarks.md).

So jbt keeps freed memory for reuse, the way a framework's caching allocator does: its entry
points (`python -m jbt.train`, the bench and profile scripts) start themselves again, before
anything else runs, under `glibc.malloc.mmap_max=0` (large blocks from the heap), a trim threshold
of 1 TiB (never handed back on its own) and `glibc.malloc.arena_max=1` (one heap for every thread,
so a block one thread frees serves the next step on another). SmolLM2-135M's bench ran 1.07x-1.14x
faster with it on the AMX Xeon. The price is resident memory: the heap keeps the holes between
blocks of different sizes, so the peak grows with the batch shapes a run meets and stops once it
has met them (docs/benchmarks.md: 5.6 GiB instead of 3.8 in the bench, flat over the last 17 of 48
steps; TRL's 7.4). The trainer calls relieve() after every update: where the
machine (or the process's cgroup) has less than an eighth of its memory available, the heap's
free pages go back to the kernel (malloc_trim), so kept memory never pushes a machine into
swapping or its memory limit. JBT_KEEP_MEMORY=0 runs under glibc's defaults; `python -m jbt.plan`
keeps them unless JBT_KEEP_MEMORY=1 asks (it compiles, it does not train). A tunable the user's
GLIBC_TUNABLES already names stays as given.

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


def _glibc() -> bool:
  return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def restart_env(environ: Mapping[str, str], keep: bool = True) -> dict[str, str] | None:
  """The environment to start again under (GLIBC_TUNABLES plus the tunables asked for that it does
  not name yet), or None where this process needs no restart. `keep`: whether memory is kept
  where JBT_KEEP_MEMORY says nothing ("1" keeps it, "0" does not)."""
  if not _glibc():
    return None
  tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  named = {t.split("=", 1)[0] for t in tunables}
  wanted = list(KEEP_TUNABLES) if environ.get(KEEP, "1" if keep else "0") == "1" else []
  if environ.get(HUGEPAGES, "") == "1":
    wanted.append(HUGEPAGE_TUNABLE)
  added = [t for t in wanted if t.split("=", 1)[0] not in named]
  if not added:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(tunables + added)}


def restart(keep: bool = True) -> None:
  """Where kept memory (`keep`, or JBT_KEEP_MEMORY) or JBT_HUGEPAGES=1 asks for tunables this
  process lacks, replace it by the same command under restart_env(); call it first thing in a
  command-line entry point (it never returns where a restart happens, and the restarted process
  finds its tunables in place and goes on)."""
  env = restart_env(os.environ, keep)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)


TIGHT = 8  # relieve() hands memory back where less than 1/TIGHT of the memory is available


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def available_memory(meminfo: str | None = None, cgroup: tuple[str | None, str | None] | None = None) -> tuple[int, int] | None:
  """(available, total) bytes: the tighter of the machine's (/proc/meminfo's MemAvailable and
  MemTotal) and its cgroup's limit (cgroup v2's memory.max less memory.current, or v1's
  limit_in_bytes less usage_in_bytes, where a limit is set); None where neither can be read."""
  text = _read("/proc/meminfo") if meminfo is None else meminfo
  fields = {}
  for line in (text or "").splitlines():
    name, _, rest = line.partition(":")
    if words := rest.split():
      fields[name] = int(words[0]) * 1024
  best = (fields["MemAvailable"], fields["MemTotal"]) if {"MemAvailable", "MemTotal"} <= fields.keys() else None
  if cgroup is None:
    cgroup = (_read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current"))
    if cgroup[0] is None:
      cgroup = (_read("/sys/fs/cgroup/memory/memory.limit_in_bytes"), _read("/sys/fs/cgroup/memory/memory.usage_in_bytes"))
  limit, used = (c.strip() if c else "" for c in cgroup)
  if limit.isdigit() and used.isdigit() and int(limit) < 1 << 60:  # "max" or v1's huge number: no limit
    room = max(int(limit) - int(used), 0)
    if best is None or room < best[0]:
      best = (room, int(limit))
  return best


def relieve(available: tuple[int, int] | None = None) -> bool:
  """Where less than an eighth of the memory is available (`available`: (available, total) bytes,
  available_memory()'s by default), hands the heap's free pages back to the kernel (malloc_trim):
  kept memory gives way before the machine swaps. True where it did."""
  if not _glibc():
    return False
  available = available_memory() if available is None else available
  if available is None or available[0] * TIGHT >= available[1]:
    return False
  import ctypes

  ctypes.CDLL(None).malloc_trim(0)
  return True
