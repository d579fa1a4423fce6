"""jbt.runtime.hugepages (the restart under glibc's huge-page tunable) and jbt.runtime.cpu."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from jbt.runtime import hugepages as host

glibc = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")


@glibc
def test_hugepage_env_adds_the_tunable_when_asked_and_keeps_the_rest():
  on = {host.ON: "1"}
  assert host.hugepage_env({"A": "1", **on}) == {"A": "1", **on, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = host.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", **on})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert host.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", **on}) is None  # the user's choice stands
  assert host.hugepage_env({"A": "1"}) is None  # not asked for: 4 KiB pages, no restart
  assert host.hugepage_env({host.ON: "0"}) is None


@glibc
def test_restart_runs_the_same_command_once_under_the_tunable_when_asked(tmp_path):
  marker = tmp_path / "runs"
  code = ("import os, sys; from jbt.runtime import hugepages as host; open(sys.argv[1], 'a').write('run\\n'); "
          "host.restart_with_hugepages(); print(os.environ['GLIBC_TUNABLES'], sys.argv[2])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.ON)}
  env[host.ON] = "1"
  out = subprocess.run([sys.executable, "-c", code, str(marker), "arg"], capture_output=True, text=True, env=env,
                       check=True).stdout
  assert out.split() == ["glibc.malloc.hugetlb=1", "arg"]
  assert marker.read_text() == "run\nrun\n"  # started twice: the restart, then no further one
  del env[host.ON]  # the default: no restart
  out = subprocess.run([sys.executable, "-c", code.replace("os.environ['GLIBC_TUNABLES']", "'none'"), str(marker),
                        "arg"], capture_output=True, text=True, env=env, check=True).stdout
  assert out.split() == ["none", "arg"] and marker.read_text() == "run\nrun\nrun\n"


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
