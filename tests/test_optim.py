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
