"""Train state, the jitted Bradley-Terry step, evaluation, and host batches -> global arrays."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jbt import loss as loss_lib
from jbt.model import ModelConfig, RewardModel

ROW_KEYS = ("tokens", "segment_ids", "positions", "branch_ids")  # [R, L]; branch_ids only in shared-prompt rows
PAIR_KEYS = ("chosen_index", "rejected_index", "pair_mask")  # [P]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def batch_spec(mesh: Mesh) -> PartitionSpec:
  """Rows and pairs are split over the data-parallel axes (data and fsdp)."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return PartitionSpec(axes)


def rewards(cfg: ModelConfig, params: Any, batch: dict[str, jax.Array], max_segment: int = 0) -> tuple[jax.Array, jax.Array]:
  """(chosen rewards [P], rejected rewards [P]) from one forward over all rows.

  max_segment bounds the length of one sequence in a row (packed rows: max_length), which lets
  attention skip key blocks; 0 means no bound.
  """
  index_2P = jnp.concatenate([batch["chosen_index"], batch["rejected_index"]])
  r_2P = RewardModel(cfg, max_segment).apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"], index_2P,
                                batch.get("branch_ids"))
  P = batch["chosen_index"].shape[0]
  return r_2P[:P], r_2P[P:]


def make_train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    lr_fn: Callable[[Any], Any],
    *,
    margin: float = 0.0,
    center_coef: float = 0.0,
    grad_accum: int = 1,
    nan_at_step: int = -1,
    max_segment: int = 0,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The step function (jit it with shardings and donation at the call site).

  nan_at_step >= 0 poisons the rewards of that (micro) step with NaN: a fault-injection hook
  for testing the trainer's divergence stop.
  """

  def loss_fn(params: Any, batch: dict[str, jax.Array], step: jax.Array):
    chosen_P, rejected_P = rewards(cfg, params, batch, max_segment)
    if nan_at_step >= 0:
      chosen_P = jnp.where(step == nan_at_step, jnp.nan, chosen_P)
    return loss_lib.bt_loss(chosen_P, rejected_P, batch["pair_mask"], margin=margin, center_coef=center_coef)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"{k}/train" if k == "loss" else f"rewards_train/{k}": v for k, v in m.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    metrics["update_norm"] = optax.tree.norm(updates)
    metrics["counters/lr"] = lr_fn(state.step // grad_accum)
    metrics["n_pairs"] = batch["pair_mask"].sum()
    return TrainState(state.step + 1, params, opt_state), metrics

  return step


def make_eval_step(
    cfg: ModelConfig, margin: float = 0.0, max_segment: int = 0
) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """Sums (not means) over real pairs, so the host can add batches and divide once."""

  def step(params: Any, batch: dict[str, jax.Array]):
    chosen_P, rejected_P = rewards(cfg, params, batch, max_segment)
    mask_P = batch["pair_mask"].astype(jnp.float32)
    margins_P = chosen_P - rejected_P
    return {
        "loss": (-jax.nn.log_sigmoid(margins_P - margin) * mask_P).sum(),
        "chosen": (chosen_P * mask_P).sum(),
        "rejected": (rejected_P * mask_P).sum(),
        "margins": (margins_P * mask_P).sum(),
        "accuracies": ((margins_P > 0) * mask_P).sum(),
        "n": mask_P.sum(),
    }

  return step


def init_state(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    param_shardings: Any,
    mesh: Mesh,
    *,
    seed: int,
    params: Any | None = None,
) -> tuple[TrainState, Any]:
  """A sharded TrainState: random params (jit-initialised straight into shardings) or given ones.

  Returns (state, state shardings).
  """
  tok = jnp.zeros((1, 1), jnp.int32)
  if params is None:
    init = jax.jit(lambda k: nn.unbox(RewardModel(cfg).init(k, tok, tok, tok)["params"]), out_shardings=param_shardings)
    params = init(jax.random.key(seed))
  opt_shapes = jax.eval_shape(tx.init, params)
  opt_shardings = optimizer_shardings(opt_shapes, params, param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  replicated = NamedSharding(mesh, PartitionSpec())
  state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), params, opt_state)
  shardings = TrainState(replicated, param_shardings, opt_shardings)
  return state, shardings


def optimizer_shardings(opt_shapes: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Optimizer moments take their parameter's sharding (ZeRO-3 style); scalars are replicated."""
  by_shape: dict[tuple, Any] = {}
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings)):
    by_shape.setdefault((tuple(p.shape), str(p.dtype)), s)
  param_struct = jax.tree.structure(params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def subtree(node: Any) -> Any:
    # Moments (mu, nu, accumulators) are params-shaped subtrees: map them leaf to leaf.
    if jax.tree.structure(node) == param_struct:
      return param_shardings
    return None

  def walk(node: Any) -> Any:
    sub = subtree(node)
    if sub is not None:
      return sub
    if isinstance(node, jax.ShapeDtypeStruct):
      return by_shape.get((tuple(node.shape), str(node.dtype)), replicated) if node.shape else replicated
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node and (
        jax.tree.structure(x) == param_struct or isinstance(x, jax.ShapeDtypeStruct)))
    return jax.tree_util.tree_unflatten(treedef, [walk(c) for c in children])

  return walk(opt_shapes)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, process_index: int, process_count: int) -> dict[str, jax.Array]:
  """This process's batch -> global arrays sharded over the batch axes.

  Rows of process p follow those of p-1, so its flat pooling indices shift by p * R * L.
  Every process must pass the same shapes (the trainer pads rows to the common maximum).
  """
  sharding = NamedSharding(mesh, batch_spec(mesh))
  R, L = local["tokens"].shape
  out = {}
  for k in local:
    if k not in ROW_KEYS and k not in PAIR_KEYS:
      raise ValueError(f"unexpected batch key {k!r}")
    a = np.asarray(local[k])
    if k in ("chosen_index", "rejected_index") and process_count > 1:
      a = a + process_index * R * L
    out[k] = jax.make_array_from_process_local_data(sharding, a)
  return out


def pad_rows(local: dict[str, np.ndarray], rows: int, pad_token_id: int, length: int | None = None) -> dict[str, np.ndarray]:
  """Pads a batch with padding rows and columns (segment 0) to [rows, length], so that every
  process has the same shape; flat pooling indices are moved to the new row length."""
  R, L = local["tokens"].shape
  length = L if length is None else length
  if (rows, length) == (R, L):
    return local
  out = dict(local)
  widths = ((0, rows - R), (0, length - L))
  out["tokens"] = np.pad(local["tokens"], widths, constant_values=pad_token_id)
  for k in ("segment_ids", "positions", "branch_ids"):
    if k in local:
      out[k] = np.pad(local[k], widths)
  for k in ("chosen_index", "rejected_index"):
    row, t = np.divmod(local[k], L)
    out[k] = (row * length + t).astype(local[k].dtype)
  return out


@functools.lru_cache(maxsize=None)
def device_peak_flops() -> float | None:
  """Dense bf16 peak of one device, for MFU; None where unknown (CPU)."""
  kind = jax.devices()[0].device_kind.lower()
  table = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
           "v5 lite": 197e12, "v5e": 197e12, "v5p": 459e12, "v4": 275e12, "v6": 918e12}
  for k, v in table.items():
    if k in kind:
      return v
  return None


def train_flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
  """6N for the matmuls (no LM head) plus causal attention scores and values (forward + backward)."""
  n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # the embedding is a gather
  attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len  # 12 * ... * L / 2 (causal)
  return 6 * n + attn
