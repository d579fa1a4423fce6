"""The jitted Bradley-Terry train step and eval step (pure functions of state and batch)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jbt.loss import bt_loss, bt_sums
from jbt.model import ModelConfig, RewardModel
from jbt.train.state import TrainState


def rewards(cfg: ModelConfig, params: Any, batch: dict[str, jax.Array], max_segment: int = 0) -> tuple[jax.Array, jax.Array]:
  """(chosen rewards [P], rejected rewards [P]) from one forward over all rows.

  max_segment bounds the length of one sequence in a row (packed rows: max_length), which lets
  attention skip key blocks; 0 means no bound.
  """
  index_2P = jnp.concatenate([batch["chosen_index"], batch["rejected_index"]])
  r_2P = RewardModel(cfg, max_segment).apply({"params": params}, batch["tokens"], batch["segment_ids"],
                                             batch["positions"], index_2P, batch.get("branch_ids"))
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

  Metrics: HALOs' names (`loss/train`, `rewards_train/...`), grad / param / update norms, the
  learning rate, and `n_pairs` (real pairs in the batch; the host adds it up).
  nan_at_step >= 0 poisons the rewards of that (micro) step with NaN: a fault-injection hook
  for testing the trainer's divergence stop.
  """

  def loss_fn(params: Any, batch: dict[str, jax.Array], step: jax.Array):
    chosen_P, rejected_P = rewards(cfg, params, batch, max_segment)
    if nan_at_step >= 0:
      chosen_P = jnp.where(step == nan_at_step, jnp.nan, chosen_P)
    return bt_loss(chosen_P, rejected_P, batch["pair_mask"], margin=margin, center_coef=center_coef)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, state.step)
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
  """bt_sums of a batch (sums, not means), so the host can add batches and divide once."""

  def step(params: Any, batch: dict[str, jax.Array]):
    chosen_P, rejected_P = rewards(cfg, params, batch, max_segment)
    return bt_sums(chosen_P, rejected_P, batch["pair_mask"].astype(jnp.float32), margin=margin)

  return step
