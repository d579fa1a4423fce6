"""jbt.train.optim's clipping gives optax.clip_by_global_norm's result."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbt.train.optim import clip_by_global_norm


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_clip_matches_optax(scale):
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(rng.normal(size=(7, 5)) * scale, jnp.float32),
           "b": [jnp.asarray(rng.normal(size=(11,)) * scale, jnp.float32)]}
  ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  tx = clip_by_global_norm(1.0)
  got, _ = tx.update(grads, tx.init(grads))
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
  norm = float(optax.tree.norm(got))
  assert norm <= 1.0 + 1e-5 and (norm < 0.99 if scale == 1e-3 else norm > 0.99)


def _opt(**kw):
  from ml_collections import ConfigDict

  base = dict(lr=1e-3, warmup_ratio=0.5, warmup_start=0.1, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip=1.0,
              grad_accum=1, fused_update="auto")
  return ConfigDict({**base, **kw})


def _fused_or_skip(opt, lr):
  from jbt.train import fused_update

  if not fused_update.available():
    pytest.skip("no C++ compiler builds the fused update here")
  return fused_update.plan(opt, lr, 1, 0, backend="cpu")


@pytest.mark.parametrize("clip,weight_decay", [(0.0, 0.01), (0.0, 0.0), (1.0, 0.01)])
def test_fused_update_gives_optax_results(clip, weight_decay):
  """The kernel's params and moments are optax's (its update and apply_updates jitted as they
  are) over warm-up steps, with clipping on and off: without clipping the moments are the same
  bits and all but a few in a thousand params (XLA's compiled division rounds those differently in
  the last place); with it, the global norm's last bit depends on how XLA compiles its reduction.
  The norms agree."""
  from jbt.train import optim

  opt = _opt(clip=clip, weight_decay=weight_decay)
  tx, lr = optim.make_optimizer(opt, 10)
  fused = _fused_or_skip(opt, lr)
  rng = np.random.default_rng(0)
  # a leaf longer than the kernel's chunk with a ragged tail, a small one, and a frozen (None) one
  params = {"a": jnp.asarray(rng.normal(size=(300, 70)), jnp.float32),
            "b": {"c": jnp.asarray(rng.normal(size=(100_003,)), jnp.float32), "d": None}}
  ref_p, ref_s = params, tx.init(params)
  update, apply = jax.jit(tx.update), jax.jit(optax.apply_updates)
  run = jax.jit(fused.update)
  for step in range(6):  # each step from the same params and state (the reference's)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * (0.01 if step % 2 else 3.0), jnp.float32),
                         params)
    got_p, got_s, updates_sq, params_sq = run(grads, ref_s, ref_p)
    updates, ref_s = update(grads, ref_s, ref_p)
    ref_p = apply(ref_p, updates)
    for x, y in zip(jax.tree.leaves((got_p, got_s)), jax.tree.leaves((ref_p, ref_s))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=3e-7, atol=1e-9, err_msg=f"step {step}")
    if not clip:  # (a clipping factor one unit off in its last place moves many elements' last bit)
      for x, y in zip(jax.tree.leaves(got_s), jax.tree.leaves(ref_s)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"step {step}")
      for x, y in zip(jax.tree.leaves(got_p), jax.tree.leaves(ref_p)):
        assert (np.asarray(x) == np.asarray(y)).mean() > 0.99, step  # an operation out of order moves far more
    np.testing.assert_allclose(np.sqrt(float(updates_sq)), float(optax.tree.norm(updates)), rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(float(params_sq)), float(optax.tree.norm(ref_p)), rtol=1e-6)
  assert jax.tree.structure(got_s) == jax.tree.structure(ref_s)


def test_fused_update_runs_in_place_and_the_same_on_any_thread_count(monkeypatch):
  """Donated params and moments are updated in their own buffers (no copies in the program), and
  the sums are the same bits with one thread or several."""
  from jbt.train import optim

  opt = _opt()
  tx, lr = optim.make_optimizer(opt, 10)
  fused = _fused_or_skip(opt, lr)
  params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(400_000,)), jnp.float32)}
  grads = jax.tree.map(lambda x: x * 0.5, params)
  # params, then the state, in and out (as a train step's state), so donation pairs each with itself
  run = jax.jit(lambda p, s, g: fused.update(g, s, p), donate_argnums=(0, 1))
  hlo = run.lower(params, tx.init(params), grads).compile().as_text()
  assert "jbt_adamw" in hlo and not [line for line in hlo.splitlines() if "f32[400000]{0} copy(" in line]
  sums = []
  for threads in ("1", "3"):
    monkeypatch.setenv("JBT_NATIVE_THREADS", threads)
    _, _, uu, pp = run(jax.tree.map(jnp.copy, params), tx.init(params), grads)
    sums.append((float(uu), float(pp)))
  assert sums[0] == sums[1]


def test_fused_update_plan_says_when_it_applies():
  from jbt.train import fused_update, optim

  opt = _opt()
  _, lr = optim.make_optimizer(opt, 10)
  fused = _fused_or_skip(opt, lr)
  assert isinstance(fused, fused_update.AdamW) and fused.clip == 1.0
  assert fused_update.plan(opt, lr, 8, 0, backend="cpu") is None  # a mesh of several devices: optax's
  assert fused_update.plan(opt, lr, 1, 2, backend="cpu") is None  # frozen rows of a layer stack
  assert fused_update.plan(opt, lr, 1, 0, backend="tpu") is None
  assert fused_update.plan(_opt(grad_accum=2), lr, 1, 0, backend="cpu") is None
  assert fused_update.plan(_opt(fused_update="off"), lr, 1, 0, backend="cpu") is None
  with pytest.raises(ValueError, match="opt.fused_update must be one of auto, off"):
    fused_update.plan(_opt(fused_update="on"), lr, 1, 0, backend="cpu")
