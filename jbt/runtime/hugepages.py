"""Host memory settings that have to be in place when the process starts.

XLA's CPU runtime allocates a step's temporary buffers (gigabytes for a long packed row) anew at
every step, and glibc hands such large blocks back to the kernel when they are freed, so every
step touches fresh 4 KiB pages: hundreds of thousands of page faults a step. glibc's
`glibc.malloc.hugetlb=1` tunable (glibc 2.35 and newer) asks for transparent huge pages on those
blocks instead (the measured fault counts and times are in docs/benchmarks.md). A
tunable is read once, at process start, so `python -m jbt.train` starts itself again with it
set, before anything else runs. JBT_NO_HUGEPAGES=1 turns this off; where GLIBC_TUNABLES already
names the tunable, or the C library is not glibc, nothing changes.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OFF = "JBT_NO_HUGEPAGES"


def hugepage_env(environ: Mapping[str, str]) -> dict[str, str] | None:
  """The environment to start again under, or None where this process needs no restart."""
  if sys.platform != "linux" or environ.get(OFF, "") not in ("", "0") or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return None
  if platform.libc_ver()[0] != "glibc":
    return None
  env = dict(environ)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  env["GLIBC_TUNABLES"] = ":".join(tunables + [f"{TUNABLE}=1"])
  return env


def restart_with_hugepages() -> None:
  """Replace this process by the same command under hugepage_env(); call it first thing in a
  command-line entry point (it never returns where a restart happens)."""
  env = hugepage_env(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
