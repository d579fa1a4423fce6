"""jbt.runtime.host_memory (the restart under glibc's malloc tunables) and jbt.runtime.cpu."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from jbt.runtime import host_memory as host

glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")
KEEP = ":".join(host.KEEP_TUNABLES)


@glibc
def test_restart_env_adds_the_tunables_asked_for_and_respects_the_users():
  on = {host.KEEP: "1"}
  assert host.restart_env({"A": "1", **on}) == {"A": "1", **on, "GLIBC_TUNABLES": KEEP}
  assert KEEP == "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.arena_max=1"
  env = host.restart_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4", **on})  # the user's own arena count stands
  assert env["GLIBC_TUNABLES"] == ("glibc.malloc.arena_max=4:glibc.malloc.mmap_max=0:"
                                   "glibc.malloc.trim_threshold=1099511627776")
  assert host.restart_env({"GLIBC_TUNABLES": KEEP, **on}) is None  # already in place: no further restart
  assert host.restart_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": KEEP}  # the default keeps memory
  assert host.restart_env({"A": "1"}, keep=False) is None  # jbt.plan's default: glibc's own settings
  assert host.restart_env({host.KEEP: "1"}, keep=False)["GLIBC_TUNABLES"] == KEEP
  assert host.restart_env({host.KEEP: "0", host.HUGEPAGES: "0"}) is None
  assert host.restart_env({host.KEEP: "0", host.HUGEPAGES: "1"}) == {host.KEEP: "0", host.HUGEPAGES: "1",
                                                                     "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  both = host.restart_env({host.HUGEPAGES: "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", **on})
  assert both["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0:" + KEEP  # the user's huge-page choice stands


@glibc
def test_restart_runs_the_same_command_once_under_the_tunables(tmp_path):
  marker = tmp_path / "runs"
  code = ("import os, sys; from jbt.runtime import host_memory as host; open(sys.argv[1], 'a').write('run\\n'); "
          "host.restart(); print(os.environ.get('GLIBC_TUNABLES', 'none'), sys.argv[2])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.KEEP, host.HUGEPAGES)}

  def run(**extra):
    return subprocess.run([sys.executable, "-c", code, str(marker), "arg"], capture_output=True, text=True,
                          env={**env, **extra}, check=True).stdout.split()

  assert run() == [KEEP, "arg"]
  assert marker.read_text() == "run\nrun\n"  # started twice: the restart, then no further one
  assert run(**{host.HUGEPAGES: "1"}) == [KEEP + ":glibc.malloc.hugetlb=1", "arg"]
  assert marker.read_text().count("run") == 4
  assert run(**{host.KEEP: "0"}) == ["none", "arg"]  # glibc's defaults: no restart
  assert marker.read_text().count("run") == 5


def test_kept_memory_is_what_the_restarted_process_runs_under():
  """The tunables take effect: by default a 64 MiB block comes from the heap (freed, it stays there
  for the next one); under glibc's defaults (JBT_KEEP_MEMORY=0) it is a mapping of its own, handed
  back when freed."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    pytest.skip("needs glibc")
  code = ("import ctypes; from jbt.runtime import host_memory as host; host.restart(); "
          "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; a = libc.malloc(64 << 20); "
          "spans = [l.split()[0].split('-') for l in open('/proc/self/maps') if l.rstrip().endswith('[heap]')]; "
          "print(any(int(lo, 16) <= a < int(hi, 16) for lo, hi in spans))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.KEEP, host.HUGEPAGES)}

  def in_heap(**extra):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **extra},
                          check=True).stdout.split()

  assert in_heap() == ["True"]
  assert in_heap(**{host.KEEP: "0"}) == ["False"]


def test_available_memory_is_the_tighter_of_the_machine_and_its_cgroup():
  meminfo = "MemTotal:       24683664 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n"
  machine = (20000000 * 1024, 24683664 * 1024)
  assert host.available_memory(meminfo, (None, None)) == machine
  assert host.available_memory(meminfo, ("max\n", "5000\n")) == machine  # cgroup v2 without a limit
  assert host.available_memory(meminfo, ("9223372036854771712\n", "5000\n")) == machine  # v1's "no limit"
  assert host.available_memory(meminfo, (f"{8 << 30}\n", f"{7 << 30}\n")) == (1 << 30, 8 << 30)
  assert host.available_memory(meminfo, (f"{64 << 30}\n", f"{1 << 30}\n")) == machine  # the machine is tighter
  assert host.available_memory("", (None, None)) is None
  assert host.available_memory("", ("100", "120")) == (0, 100)
  assert host.available_memory() is not None or sys.platform != "linux"


@glibc
def test_relieve_hands_kept_memory_back_only_when_memory_is_short():
  """In a process that keeps freed memory, 256 MiB written and freed stays resident; relieve()
  leaves it while an eighth or more of the memory is available and hands it back below that."""
  code = ("import ctypes, sys; from jbt.runtime import host_memory as host; host.restart(); "
          "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; n = 256 << 20; a = libc.malloc(n); "
          "ctypes.memset(a, 1, n); libc.free(ctypes.c_void_p(a)); "
          "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20; r0 = rss(); "
          "ample = host.relieve((1 << 30, 8 << 30)); r1 = rss(); short = host.relieve((1 << 30, 9 << 30)); "
          "print(ample, short, r0 - r1, r1 - rss())")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.KEEP, host.HUGEPAGES)}
  ample, short, kept_drop, relieved_drop = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
  assert (ample, short) == ("False", "True")
  assert int(kept_drop) < 16 and int(relieved_drop) > 200, (kept_drop, relieved_drop)


def test_cpu_info_names_the_model_and_the_matmul_features():
  from jbt.runtime import cpu

  text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
          "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
          "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\nflags\t\t: fpu\n")
  info = cpu.cpu_info(text)
  assert info == {"model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cores": 2,
                  "features": ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]}
  assert cpu.describe(info) == ("CPU: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (2 cores; avx2 avx512f "
                                "avx512_bf16 amx_tile amx_bf16 amx_int8)")
  assert cpu.cpu_info("")["model"] == "unknown"
  assert cpu.dot_rate(64, 32, 48, seconds=0.05) > 0


def test_a_measured_cpu_choice_is_made_once_kept_and_needs_a_clear_margin(tmp_path, monkeypatch):
  from jbt.runtime import cpu

  monkeypatch.setenv("JBT_CPU_CHOICES", str(tmp_path / "choices.json"))
  calls = []

  def timer(name, seconds):
    return lambda: calls.append(name) or seconds

  # "b" is 5% faster: not enough to leave the preferred "a"
  assert cpu.choose("t1", {"a": timer("a", 1.0), "b": timer("b", 0.95)}, prefer="a") == "a"
  # 30% faster: chosen, and kept: a second call measures nothing and agrees even if times change
  assert cpu.choose("t2", {"a": timer("a", 1.0), "b": timer("b", 0.7)}, prefer="a") == "b"
  n = len(calls)
  assert cpu.choose("t2", {"a": timer("a", 0.1), "b": timer("b", 0.7)}, prefer="a") == "b"
  assert len(calls) == n == 4
  kept = (tmp_path / "choices.json").read_text()
  assert '"choice": "b"' in kept and "t2 | " in kept and "jaxlib" in kept
  # a damaged file is measured again, not an error
  (tmp_path / "choices.json").write_text("{not json")
  assert cpu.choose("t2", {"a": timer("a", 1.0), "b": timer("b", 0.5)}, prefer="a") == "b" and len(calls) == 6


def test_the_cpu_matmul_kind_is_measured_and_both_kinds_compute_the_same_gradient():
  import jax.numpy as jnp

  from jbt.model import matmul

  assert matmul.resolve("auto", "cpu") in matmul.CPU_KINDS
  assert all(matmul.grad_seconds(k, tokens=64, hidden=32, inner=48, repeats=1) > 0 for k in matmul.CPU_KINDS)
  import jax
  x = jax.random.normal(jax.random.key(0), (64, 32), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (32, 48), jnp.float32)
  grads = [jax.grad(lambda x, w, k=k: matmul.matmul(x, w, jnp.bfloat16, k).astype(jnp.float32).sum(), (0, 1))(x, w)
           for k in matmul.CPU_KINDS]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
