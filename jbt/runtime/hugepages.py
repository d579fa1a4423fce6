"""Host memory settings that have to be in place when the process starts.

XLA's CPU runtime allocates a step's temporary buffers (gigabytes for a long packed row) anew at
every step, and glibc hands such large blocks back to the kernel when they are freed, so every
step touches fresh 4 KiB pages. glibc's `glibc.malloc.hugetlb=1` tunable (glibc 2.35 and newer)
asks for transparent huge pages on those blocks instead: a few thousand faults a step instead of
hundreds of thousands. That paid while a step rewrote whole stacks every layer (1.1x in
docs/benchmarks.md's earlier passes, on both CPU kinds); with today's step it costs: on the AMX
Xeon, 4 KiB pages ran 1.14x, 1.20x and 1.09x faster in three rounds of `scripts/bench.py
--variants jbt-shared-4k,jbt-shared-hugepages`, and the huge pages' kernel work (compaction,
zeroing 2 MiB at a time) also slows compiling. So it is asked for, not the default:
JBT_HUGEPAGES=1 makes `python -m jbt.train` (and the other entry points that call
restart_with_hugepages first) start itself again under the tunable, before anything else runs. A
tunable is read once, at process start; where GLIBC_TUNABLES already names it, or the C library
is not glibc, nothing changes.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
ON = "JBT_HUGEPAGES"


def hugepage_env(environ: Mapping[str, str]) -> dict[str, str] | None:
  """The environment to start again under, or None where this process needs no restart."""
  if sys.platform != "linux" or environ.get(ON, "") != "1" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return None
  if platform.libc_ver()[0] != "glibc":
    return None
  env = dict(environ)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  env["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
  return env


def restart_with_hugepages() -> None:
  """Where JBT_HUGEPAGES=1, replace this process by the same command under hugepage_env(); call it
  first thing in a command-line entry point (it never returns where a restart happens)."""
  env = hugepage_env(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
