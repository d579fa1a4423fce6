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
  assert xla_options.compiler_options("bfloat16", backend="cpu") == xla_options.BF16_DOTS[xla_options.bf16_dots()]


@pytest.fixture
def fresh_bf16_dots(monkeypatch, tmp_path):
  """bf16_dots() measured anew, its choice kept in a fresh file."""
  monkeypatch.setenv("JBT_CPU_CHOICES", str(tmp_path / "choices.json"))
  monkeypatch.delenv("JBT_BF16_DOTS", raising=False)
  xla_options.bf16_dots.cache_clear()
  yield
  xla_options.bf16_dots.cache_clear()


@pytest.mark.parametrize("fused_seconds, expected", [(0.06, "fused"), (0.095, "single"), (0.2, "single")])
def test_bf16_dots_are_the_faster_kind_measured_once(fresh_bf16_dots, monkeypatch, tmp_path, fused_seconds, expected):
  """The bfloat16 dot kind is measured (a gradient under each kind's options) and the faster one
  taken, single dots unless fused ones are faster by more than 10%; the choice is kept, so a later
  process does not measure again."""
  from jbt.model import matmul

  measured = []

  def seconds(kind, options=None):
    measured.append(options)
    return fused_seconds if options == xla_options.BF16_DOTS["fused"] else 0.1

  monkeypatch.setattr(matmul, "grad_seconds", seconds)
  assert xla_options.bf16_dots() == expected
  assert sorted(map(str, measured)) == sorted(map(str, xla_options.BF16_DOTS.values()))
  assert expected in (tmp_path / "choices.json").read_text()
  xla_options.bf16_dots.cache_clear()
  measured.clear()
  assert xla_options.bf16_dots() == expected and not measured  # kept: not measured again
  assert xla_options.compiler_options("bfloat16", backend="cpu") == xla_options.BF16_DOTS[expected]


def test_bf16_dots_set_by_the_environment(fresh_bf16_dots, monkeypatch):
  from jbt.model import matmul

  monkeypatch.setattr(matmul, "grad_seconds", lambda *a, **k: pytest.fail("measured although JBT_BF16_DOTS is set"))
  for kind in xla_options.BF16_DOTS:
    monkeypatch.setenv("JBT_BF16_DOTS", kind)
    xla_options.bf16_dots.cache_clear()
    assert xla_options.compiler_options("bfloat16", backend="cpu") == xla_options.BF16_DOTS[kind]
  monkeypatch.setenv("JBT_BF16_DOTS", "fast")
  xla_options.bf16_dots.cache_clear()
  with pytest.raises(ValueError, match="JBT_BF16_DOTS must be one of single, fused, got 'fast'"):
    xla_options.bf16_dots()


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


def test_update_options_only_for_cpu(monkeypatch):
  assert xla_options.update_options("gpu") is None and xla_options.update_options("tpu") is None
  assert xla_options.update_options("cpu") == xla_options.UPDATE_CPU_OPTIONS
  monkeypatch.setattr(xla_options, "UPDATE_CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_KIND"})
  assert xla_options.update_options("cpu") is None  # unknown to this jaxlib: the step stays one program


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's two-program step")
def test_two_program_step_trains_as_the_one_program_step():
  """On a CPU jbt.train runs the step as two programs (gradients, then the update compiled with
  YNNPACK's reductions); two steps of it give the one-program step's params, optimizer state and
  metrics."""
  from jbt import model
  from jbt.configs import default
  from jbt.runtime import mesh as mesh_lib
  from jbt.train import optim
  from jbt.train.state import init_state, state_shardings
  from jbt.train.step import TwoPrograms, jit_train_step, make_train_step

  cfg = default.get_config()
  mc = model.ModelConfig(dtype="float32", num_layers=2)
  tx, lr = optim.make_optimizer(cfg.opt, 10)
  mesh = mesh_lib.make_mesh([1, 1, 1], devices=jax.devices()[:1])
  rules = mesh_lib.DEFAULT_RULES
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, mc.vocab_size, (4, 16)).astype(np.int32)
  batch = dict(tokens=tokens, segment_ids=np.ones_like(tokens), positions=np.tile(np.arange(16, dtype=np.int32), (4, 1)),
               chosen_index=np.arange(2, dtype=np.int32) * 16 + 15, rejected_index=np.arange(2, 4, dtype=np.int32) * 16 + 15,
               pair_mask=np.ones(2, np.float32))
  results = []
  for two in (False, True):
    with jax.set_mesh(mesh):
      state, _ = init_state(mc, tx, mesh, rules, seed=0)
      start = jax.device_get(state.params)
      if two:
        jitted = jit_train_step(cfg, mc, tx, lr, mesh, rules, state_shardings(mc, tx, mesh, rules))
        assert isinstance(jitted, TwoPrograms)
        step = jitted.lower(state, batch).compile()
        assert "ENTRY" in step.as_text()
      else:
        step = jax.jit(make_train_step(mc, tx, lr))
      for _ in range(2):
        state, metrics = step(state, batch)
    results.append(jax.device_get((state, metrics)))
  (s1, m1), (s2, m2) = results
  assert int(s1.step) == int(s2.step) == 2
  assert set(m1) == set(m2) and {"grad_norm", "param_norm", "update_norm", "loss/train", "n_pairs"} <= set(m1)
  for a, b in zip(jax.tree.leaves((s1.params, s1.opt_state, m1)), jax.tree.leaves((s2.params, s2.opt_state, m2))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert not np.allclose(s2.params["score"], start["score"])  # it trained


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's two-program step")
def test_the_update_program_is_compiled_once_for_every_batch_shape():
  from jbt.train.step import TwoPrograms

  calls = []

  def gradients(state, batch):
    return {"w": state["w"] * batch.sum()}, {"n": batch.sum()}

  def update(state, grads, metrics):
    calls.append(1)  # traced once per compile
    return {"w": state["w"] - grads["w"]}, metrics

  two = TwoPrograms(jax.jit(gradients), jax.jit(update, donate_argnums=0))
  state = {"w": jnp.ones(3)}
  for n in (2, 5, 2):
    state, metrics = two.lower(state, jnp.ones(n)).compile()(state, jnp.ones(n))
    assert float(metrics["n"]) == n
  assert len(calls) == 1  # three batches, two shapes, one update program
  np.testing.assert_allclose(state["w"], ((1 - 2) * (1 - 5)) * (1 - 2) * np.ones(3))
