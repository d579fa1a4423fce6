"""The jitted Bradley-Terry train step and eval step (pure functions of state and batch)."""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from jbt.loss import bt_loss, bt_sums, plackett_luce_loss, response_sums
from jbt.model import ModelConfig, RewardModel
from jbt.runtime import mesh as mesh_lib
from jbt.runtime import xla_options
from jbt.train import fused_update, trainable
from jbt.train.state import TrainState


def ruled(fn: Any, rules: tuple) -> Any:
  """fn traced under the config's logical-axis rules, so the model's constraints meet the mesh
  (named as fn: a program's name says which part of the step it is)."""
  @functools.wraps(fn)
  def wrapped(*args):
    with nn.logical_axis_rules(rules):
      return fn(*args)
  return wrapped


def max_segment(cfg: ConfigDict) -> int:
  """Packed rows hold members of at most max_length tokens; attention skips keys further back."""
  return cfg.data.max_length if cfg.data.layout == "packed" else 0


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
    margin_from_data: bool = False,
    tie_nu: float | None = None,
    center_coef: float = 0.0,
    ranking: str = "all_pairs",
    grad_accum: int = 1,
    nan_at_step: int = -1,
    max_segment: int = 0,
    mask: Any | None = None,
    frozen_rows: int = 0,
    fused: fused_update.AdamW | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
  """The step function (jit it with shardings and donation at the call site).

  Metrics: HALOs' names (`loss/train`, `rewards_train/...`), grad / param / update norms, the
  learning rate, and `n_pairs` (real pairs in the batch; the host adds it up).
  nan_at_step >= 0 poisons the rewards of that (micro) step with NaN: a fault-injection hook
  for testing the trainer's divergence stop. ranking="plackett_luce" trains on Plackett-Luce's
  likelihood of each ranked record's order instead (jbt.loss.ranking); the metrics stay pairwise.
  mask (jbt.train.trainable): the params that train,
  default all; the others get no gradient and no update, and pass through bit for bit, as do the
  first frozen_rows layers of scanned stacks (train.freeze "layers:N").
  fused (jbt.train.fused_update.plan): the update as one kernel pass with tx's results, instead
  of tx's own update.
  """
  mask = trainable.trainable_mask(cfg) if mask is None else mask

  def loss_fn(params: Any, batch: dict[str, jax.Array], step: jax.Array):
    chosen_P, rejected_P = rewards(cfg, params, batch, max_segment)
    if nan_at_step >= 0:
      chosen_P = jnp.where(step == nan_at_step, jnp.nan, chosen_P)
    m = margin + batch["pair_margin"] if margin_from_data else margin  # per pair: -log sigmoid(r_c - r_r - m_i)
    ties = dict(tie_P=batch["pair_tie"], tie_nu=tie_nu) if tie_nu is not None else {}  # data.ties=tie_loss
    loss, metrics = bt_loss(chosen_P, rejected_P, batch["pair_mask"], margin=m, center_coef=center_coef, **ties)
    if ranking == "plackett_luce":
      decided = batch["pair_mask"] * (1.0 - batch["pair_tie"])
      loss = loss - metrics["loss"] + plackett_luce_loss(chosen_P.astype(jnp.float32), rejected_P.astype(jnp.float32),
                                                          batch["chosen_response"], decided)
      metrics["loss"] = loss
    return loss, metrics

  def trainable_loss(train_p: Any, frozen_p: Any, batch: dict[str, jax.Array], step: jax.Array):
    return loss_fn(trainable.merge(mask, train_p, frozen_p), batch, step)

  def gradients(state: TrainState, batch: dict[str, jax.Array]):
    """(the trainable params' gradients, the loss metrics): the model's part of the step."""
    train_p, frozen_p = trainable.split(state.params, mask)
    (_, m), grads = jax.value_and_grad(trainable_loss, has_aux=True)(train_p, frozen_p, batch, state.step)
    metrics = {f"{k}/train" if k == "loss" else f"rewards_train/{k}": v for k, v in m.items()}
    metrics["n_pairs"] = batch["pair_mask"].sum()
    return trainable.zero_rows(grads, frozen_rows), metrics

  def update(state: TrainState, grads: Any, metrics: dict[str, jax.Array]):
    """The optimizer's part: the new state, and the metrics with the norms and learning rate."""
    train_p, frozen_p = trainable.split(state.params, mask)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    if fused is not None:
      new_p, opt_state, updates_sq, params_sq = fused.update(grads, state.opt_state, train_p)
      params = trainable.merge(mask, new_p, frozen_p)
      metrics["param_norm"] = jnp.sqrt(params_sq + optax.tree.norm(frozen_p, squared=True))
      metrics["update_norm"] = jnp.sqrt(updates_sq)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, train_p)
      updates = trainable.zero_rows(updates, frozen_rows)  # AdamW's weight decay would move them too
      params = trainable.merge(mask, optax.apply_updates(train_p, updates), frozen_p)
      metrics["param_norm"] = optax.tree.norm(params)
      metrics["update_norm"] = optax.tree.norm(updates)
    metrics["counters/lr"] = lr_fn(state.step // grad_accum)
    return TrainState(state.step + 1, params, opt_state), metrics

  def step(state: TrainState, batch: dict[str, jax.Array]):
    return update(state, *gradients(state, batch))

  step.parts = (gradients, update)  # for running the two as separate programs (jit_train_step)
  return step


def make_eval_step(
    cfg: ModelConfig, margin: float = 0.0, max_segment: int = 0
) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """bt_sums of a batch (sums, not means), so the host can add batches and divide once, and
  response_sums: the sum and sum of squares of every distinct response's reward, best-of-k."""

  def step(params: Any, batch: dict[str, jax.Array]):
    chosen_P, rejected_P = rewards(cfg, params, batch, max_segment)
    mask_P = batch["pair_mask"].astype(jnp.float32)
    sums = bt_sums(chosen_P, rejected_P, mask_P, margin=margin)
    # moments of every response's reward (the normalisation statistics, jbt.tools.normalization), best-of-k
    sums.update(response_sums(chosen_P, rejected_P, batch))
    return sums

  return step


def jit_train_step(cfg: ConfigDict, model_cfg: ModelConfig, tx: optax.GradientTransformation, lr_fn: Callable,
                   mesh: Any, rules: tuple, state_sh: TrainState, backend: str | None = None) -> Any:
  """A run's train step, jitted with its shardings and the state donated: what jbt.train runs
  and what jbt.plan compiles for other hardware (backend: the platform it compiles for)."""
  frozen_rows = trainable.frozen_rows(model_cfg, cfg.train.get("freeze", ()))
  fused = fused_update.plan(cfg.opt, lr_fn, mesh.size, frozen_rows, backend)
  step = make_train_step(model_cfg, tx, lr_fn, margin=cfg.loss.margin,
                         margin_from_data=cfg.loss.get("margin_from_data", False),
                         tie_nu=cfg.loss.get("tie_nu", 1.0) if cfg.data.get("ties", "drop") == "tie_loss" else None,
                         center_coef=cfg.loss.center_coef, ranking=cfg.loss.get("ranking", "all_pairs"),
                         grad_accum=cfg.opt.grad_accum, nan_at_step=cfg.train.get("inject_nan_at_step", -1),
                         max_segment=max_segment(cfg),
                         mask=trainable.trainable_mask(model_cfg, cfg.train.get("freeze", ())),
                         frozen_rows=frozen_rows, fused=fused)
  batch_sh = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(mesh))
  options = xla_options.compiler_options(model_cfg.dtype, backend)
  update_options = xla_options.update_options(backend)
  if update_options is None:
    return jax.jit(ruled(step, rules), in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=0, compiler_options=options)
  gradients, update = step.parts
  return TwoPrograms(
      jax.jit(ruled(gradients, rules), in_shardings=(state_sh, batch_sh), compiler_options=options),
      jax.jit(ruled(update, rules), out_shardings=(state_sh, None), donate_argnums=0,
              compiler_options=update_options))


class TwoPrograms:
  """The train step as two programs, the model's gradients and the optimizer's update, each
  compiled with its own options (xla_options.update_options: on a CPU the update's whole-tree
  norms run several times faster with reductions that the model's program must not take). It
  stands where the one jitted step would: lower(state, batch).compile() gives the callable."""

  def __init__(self, gradients: Any, update: Any):
    self.gradients, self.update = gradients, update
    self._updates: dict[str, Any] = {}  # the update's shapes do not depend on the batch's: one compile
    self._lock = threading.Lock()

  def lower(self, state: Any, batch: Any) -> "TwoPrograms._Lowered":
    return TwoPrograms._Lowered(self, state, batch)

  def _compiled_update(self, state: Any, grads_and_metrics: Any) -> Any:
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        (state, *grads_and_metrics))
    key = str(jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), args))
    with self._lock:
      if key not in self._updates:
        self._updates[key] = self.update.lower(*args).compile()
      return self._updates[key]

  class _Lowered:
    def __init__(self, programs: "TwoPrograms", state: Any, batch: Any):
      self.programs, self.state = programs, state
      self.gradients = programs.gradients.lower(state, batch)

    def compile(self) -> "TwoPrograms._Compiled":
      gradients = self.gradients.compile()
      outs = jax.tree.map(lambda o, sh: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sh),
                          self.gradients.out_info, gradients.output_shardings)
      return TwoPrograms._Compiled(gradients, self.programs._compiled_update(self.state, outs))

  class _Compiled:
    def __init__(self, gradients: Any, update: Any):
      self.gradients, self.update = gradients, update

    def __call__(self, state: Any, batch: Any) -> tuple[Any, Any]:
      return self.update(state, *self.gradients(state, batch))

    def as_text(self) -> str:
      return self.gradients.as_text() + "\n" + self.update.as_text()
