"""Optimizer and schedule: HALOs' defaults (AdamW, linear warmup from 0.1*lr, then constant)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's result (scale by max_norm / norm when the norm exceeds it), as
  one scalar multiply per element: XLA's CPU backend runs optax's per-element where/divide form
  several times slower than the whole AdamW update (docs/benchmarks.md, "What moved the numbers")."""

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def schedule(opt: ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from warmup_start * lr to lr over warmup_ratio of the steps, then constant."""
  warmup = int(round(opt.warmup_ratio * total_steps))
  start = opt.get("warmup_start", 0.1) * opt.lr
  if warmup <= 0:
    return optax.constant_schedule(opt.lr)
  return optax.join_schedules(
      [optax.linear_schedule(start, opt.lr, warmup), optax.constant_schedule(opt.lr)], [warmup]
  )


def make_optimizer(opt: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then AdamW; with grad_accum > 1 gradients are averaged over micro-steps."""
  lr = schedule(opt, total_steps)
  tx = optax.chain(
      clip_by_global_norm(opt.clip) if opt.clip and opt.clip > 0 else optax.identity(),
      optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
  )
  if opt.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=opt.grad_accum)
  return tx, lr
