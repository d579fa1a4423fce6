"""The train state, its shardings, and building it straight into them.

Shardings come from the logical axis names the model puts on its parameters: the parameter
boxes from eval_shape of init, and the optimizer state from eval_shape of the optimizer's init
over those boxed parameters, so every moment carries its parameter's names (ZeRO-3 style) and
scalars (step counts) are replicated. Nothing is ever built whole on one device.

`mask` (jbt.train.trainable) says which params train: the optimizer state covers those only.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jbt.model import ModelConfig, abstract_params, lora
from jbt.runtime.mesh import param_shardings
from jbt.train import trainable


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # micro-steps done (optimizer steps * grad_accum)
  params: Any  # all of them, trainable and frozen
  opt_state: Any  # of the trainable params only (None in the frozen places)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]], mask: Any | None = None) -> TrainState:
  """NamedShardings of every TrainState leaf, from the boxed abstract params and optimizer state
  (mask: the trainable params, default all)."""
  boxed = abstract_params(cfg, boxed=True)
  mask = trainable.trainable_mask(cfg) if mask is None else mask
  opt_boxed = jax.eval_shape(tx.init, trainable.split(boxed, mask)[0])
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
    mask: Any | None = None,
    frozen_dtype: str = "float32",
) -> tuple[TrainState, TrainState]:
  """A sharded TrainState: random params (jit-initialised straight into shardings) or given ones
  (already placed). Returns (state, state shardings). frozen_dtype: how the frozen params are
  stored (bfloat16 halves their memory; they only feed the compute-dtype matmuls)."""
  mask = trainable.trainable_mask(cfg) if mask is None else mask
  shardings = state_shardings(cfg, tx, mesh, rules, mask)
  if params is None:
    params = jax.jit(lora.init_with_adapters, static_argnums=0, out_shardings=shardings.params)(cfg, jax.random.key(seed))
  opt_state = jax.jit(lambda p: nn.unbox(tx.init(trainable.split(p, mask)[0])), out_shardings=shardings.opt_state)(params)
  if frozen_dtype != "float32":
    def cast_frozen(p: Any) -> Any:
      t, f = trainable.split(p, mask)
      return trainable.merge(mask, t, jax.tree.map(lambda x: x.astype(frozen_dtype), f))

    params = jax.jit(cast_frozen, out_shardings=shardings.params, donate_argnums=0)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step, params, opt_state), shardings
