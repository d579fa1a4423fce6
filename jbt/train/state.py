"""The train state, its shardings, and building it straight into them.

Shardings come from the logical axis names the model puts on its parameters: the parameter
boxes from eval_shape of init, and the optimizer state from eval_shape of the optimizer's init
over those boxed parameters, so every moment carries its parameter's names (ZeRO-3 style) and
scalars (step counts) are replicated. Nothing is ever built whole on one device.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jbt.model import ModelConfig, abstract_params, init_params
from jbt.runtime.mesh import param_shardings


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # micro-steps done (optimizer steps * grad_accum)
  params: Any
  opt_state: Any


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> TrainState:
  """NamedShardings of every TrainState leaf, from the boxed abstract params and optimizer state."""
  boxed = abstract_params(cfg, boxed=True)
  opt_boxed = jax.eval_shape(tx.init, boxed)
  return TrainState(NamedSharding(mesh, PartitionSpec()), param_shardings(boxed, mesh, rules),
                    param_shardings(opt_boxed, mesh, rules))


def abstract_state(shapes: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: what a checkpoint restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def init_state(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
    *,
    seed: int,
    params: Any | None = None,
) -> tuple[TrainState, TrainState]:
  """A sharded TrainState: random params (jit-initialised straight into shardings) or given ones
  (already placed). Returns (state, state shardings)."""
  shardings = state_shardings(cfg, tx, mesh, rules)
  if params is None:
    params = jax.jit(init_params, static_argnums=0, out_shardings=shardings.params)(cfg, jax.random.key(seed))
  opt_state = jax.jit(lambda p: nn.unbox(tx.init(p)), out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step, params, opt_state), shardings
