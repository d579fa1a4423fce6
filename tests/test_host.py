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
  assert host.restart_env({"A": "1"}) is None  # the default: glibc's own settings, no restart
  assert host.restart_env({host.KEEP: "0", host.HUGEPAGES: "0"}) is None
  assert host.restart_env({host.HUGEPAGES: "1"}) == {host.HUGEPAGES: "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
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

  assert run(**{host.KEEP: "1"}) == [KEEP, "arg"]
  assert marker.read_text() == "run\nrun\n"  # started twice: the restart, then no further one
  assert run(**{host.KEEP: "1", host.HUGEPAGES: "1"}) == [KEEP + ":glibc.malloc.hugetlb=1", "arg"]
  assert marker.read_text().count("run") == 4
  assert run() == ["none", "arg"]  # the default: no restart
  assert marker.read_text().count("run") == 5


def test_kept_memory_is_what_the_restarted_process_runs_under():
  """The tunables take effect: with JBT_KEEP_MEMORY=1 a 64 MiB block comes from the heap (freed, it
  stays there for the next one); under glibc's defaults it is a mapping of its own, handed back
  when freed."""
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

  assert in_heap(**{host.KEEP: "1"}) == ["True"]
  assert in_heap() == ["False"]


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
