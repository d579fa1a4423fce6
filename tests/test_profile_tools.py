"""Where a step's time goes: jbt.runtime.trace's op table (HLO source names and self times from a
real trace), scripts/profile_step.py --trace, and train.profile's setting."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from scripts import profile_step  # noqa: E402

from jbt.errors import JbtError  # noqa: E402
from jbt.runtime import trace  # noqa: E402


def _step(x, w):
  return jnp.tanh(x @ w).sum()


def _rows(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip() and line.split()[0].replace(".", "").isdigit()]


def test_op_times_name_the_source_ops(tmp_path, capsys):
  x, w = jnp.ones((256, 256)), jnp.ones((256, 256)) * 0.01
  compiled = jax.jit(jax.grad(_step, argnums=1)).lower(x, w).compile()
  sources = trace.op_sources(compiled.as_text())
  assert any("dot_general" in s for s in sources.values()), sources
  assert any(s.startswith("bwd ") for s in sources.values()), sources  # the transposed (backward) ops

  profile_step.trace_ops(compiled, (x, w), str(tmp_path), top=5)
  out = capsys.readouterr().out
  assert out.startswith("op self time in the trace:")
  assert "| matmuls |" in out  # the kinds table
  walls = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
           if line.startswith("| ") and line.split("|")[1].strip() in (*trace.WALL_KINDS, "nothing")}
  assert walls["dots"] > 0 and abs(sum(walls.values()) - float(out.split("traced span ")[1].split()[0])) < 0.011
  rows = _rows(out)
  assert 1 <= len(rows) <= 5
  seconds = [float(r.split()[0]) for r in rows]
  assert seconds == sorted(seconds, reverse=True) and seconds[0] > 0
  assert any("dot_general" in r for r in rows), rows
  assert (tmp_path / trace.HLO_FILE).exists()  # --report reads the directory again
  assert trace.report(tmp_path, 5) == out.rstrip("\n")
  with pytest.raises(FileNotFoundError, match="not a JAX profiler trace directory"):
    trace.report(tmp_path / "nothing")


def test_wall_kinds_name_what_runs():
  assert [trace.wall_kind(op) for op in ("ynn_fusion.3", "ffi_call.2", "wrapped_convert.1", "bitcast-convert_bitcast_fusion",
                                         "wrapped_broadcast.5", "bitcast_dynamic-update-slice_fusion.1", "add_fusion")] == [
      "dots", "FFI kernels", "converts", "converts", "zero fills", "stack updates", "other ops"]


def test_profile_steps_are_parsed_and_bad_ones_refused():
  """(A real run's trace: tests/test_train.py's margins test runs with train.profile=2:3.)"""
  from test_train import tiny

  from jbt.train.setup import validate

  assert trace.parse_steps("") is None and trace.parse_steps("3:5") == (3, 5)
  for bad in ("5:3", "0:2", "3", "a:b"):
    with pytest.raises(ValueError, match="START:END"):
      trace.parse_steps(bad)
  cfg = tiny(Path("/nonexistent"), **{"train.profile": "4:2"})
  with pytest.raises(JbtError, match="train.profile: expected START:END"):
    validate(cfg)


def test_op_sources_of_two_programs_are_kept_apart():
  """A two-program step (jbt.train.step.TwoPrograms) writes both programs' HLO into one file;
  their instruction names repeat, so a traced op is looked up by its program (hlo_module) first."""
  x = jnp.ones((64, 64))

  def first_program(x):  # the same computation, so the same instruction names; other source names
    with jax.named_scope("alpha"):
      return jnp.tanh(x) * 2.0

  def second_program(x):
    with jax.named_scope("beta"):
      return jnp.tanh(x) * 2.0

  texts = [jax.jit(f).lower(x).compile().as_text() for f in (first_program, second_program)]
  sources = trace.op_sources("\n".join(texts))
  mine = {k.split("/", 1)[1]: v for k, v in sources.items() if k.startswith("jit_second_program/")}
  shared = [op for op in mine if "beta" in mine[op] and "alpha" in sources.get(f"jit_first_program/{op}", "")]
  assert mine and shared, (sorted(sources), texts)  # the same instruction name in both programs
  op = shared[0]
  event = {"args": {"hlo_op": op, "hlo_module": "jit_second_program"}}
  assert trace._source(sources, event) == (op, sources[f"jit_second_program/{op}"])
  assert trace._source(sources, {"args": {"hlo_op": op}}) == (op, sources[op])  # no module: the first program's
