"""scripts/profile_step.py's per-op table: HLO source names and self times from a real trace."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts import profile_step  # noqa: E402


def _step(x, w):
  return jnp.tanh(x @ w).sum()


def test_op_times_name_the_source_ops(tmp_path, capsys):
  x, w = jnp.ones((256, 256)), jnp.ones((256, 256)) * 0.01
  compiled = jax.jit(jax.grad(_step, argnums=1)).lower(x, w).compile()
  sources = profile_step.op_sources(compiled.as_text())
  assert any("dot_general" in s for s in sources.values()), sources
  assert any(s.startswith("bwd ") for s in sources.values()), sources  # the transposed (backward) ops

  profile_step.trace_ops(compiled, (x, w), str(tmp_path), top=5)
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("op self time in the traced pass:")
  rows = out[1:]
  assert 1 <= len(rows) <= 5
  seconds = [float(r.split()[0]) for r in rows]
  assert seconds == sorted(seconds, reverse=True) and seconds[0] > 0
  assert any("dot_general" in r for r in rows), rows
