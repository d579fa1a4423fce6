"""jbt.xla_options: the CPU compiler options jbt's steps compile with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbt.runtime import xla_options


def test_options_only_for_cpu_and_known_dtypes():
  assert xla_options.compiler_options("float32", backend="gpu") is None
  assert xla_options.compiler_options("float32", backend="tpu") is None
  assert xla_options.compiler_options("float16", backend="cpu") is None
  assert xla_options.compiler_options("float32", backend="cpu") == xla_options.CPU_OPTIONS["float32"]
  assert xla_options.compiler_options("bfloat16", backend="cpu") == xla_options.CPU_OPTIONS["bfloat16"]


def test_unknown_option_is_left_out(monkeypatch):
  monkeypatch.setitem(xla_options.CPU_OPTIONS, "float32", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_KIND"})
  assert xla_options.compiler_options("float32", backend="cpu") is None


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_product_reduction_stays_with_xla(dtype):
  """The RMSNorm scale gradient's shape of reduction: a product summed over a non-minor axis.
  With jbt's options it is XLA's own loop, not a YNNPACK fusion, and the value is unchanged."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=(1, 256, 64)), jnp.float32) for _ in range(2))
  f = jax.jit(lambda a, b: (a * b).sum(1), compiler_options=xla_options.compiler_options(dtype))
  compiled = f.lower(a, b).compile()
  assert "__ynn_fusion" not in compiled.as_text()
  np.testing.assert_allclose(compiled(a, b), (np.asarray(a) * np.asarray(b)).sum(1), rtol=1e-5, atol=1e-5)
