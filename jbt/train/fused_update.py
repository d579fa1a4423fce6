"""The optimizer's update as one compiled CPU kernel pass (adamw.cc, through XLA's FFI).

optax.chain(clip_by_global_norm, optax.adamw) under XLA's CPU backend reads and writes the
parameters and both moments in several passes, and the logged norms of the update and of the new
parameters cost more passes again (the update's norm recomputes the update: about half of the
update program's time, docs/benchmarks.md). The kernel computes the same float32 operations in
the same order per element, with XLA's fused multiply-adds where XLA's CPU code has them: the
moments are optax's bit for bit and the parameters all but a few in a thousand, which differ in
their last place (tests/test_optim.py). It updates the parameters and moments in place and returns
the sums of squares the norms need. The optimizer state keeps optax's structure, so checkpoints
and the optax path read it unchanged.

`plan()` says whether a run uses it: CPU, one device, plain AdamW (no gradient accumulation, no
frozen rows of a layer stack), and a kernel that builds here (`opt.fused_update`: "auto" uses it
where it can, "off" never)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jbt.runtime import kernels

SOURCE = Path(__file__).with_name("adamw.cc")
TARGET = "jbt_adamw"
MODES = ("auto", "off")


@functools.cache
def _register() -> None:
  # -fno-math-errno: sqrt as a vector instruction (the same IEEE square root)
  kernels.register(kernels.build(SOURCE, "jbt_adamw", kernels.compiler(), "optimizer", ("-fno-math-errno",)),
                   {TARGET: "JbtAdamW"})


@functools.cache
def available() -> bool:
  """Whether the kernel builds and loads here (logs why not)."""
  return kernels.loads(_register, "optimizer: the fused CPU update is not available (optax's update runs instead)")


@dataclasses.dataclass(frozen=True)
class AdamW:
  """optax.chain(jbt.train.optim.clip_by_global_norm(clip) or identity, optax.adamw(lr, b1, b2,
  eps, weight_decay=weight_decay)) as one kernel pass."""
  lr: Callable[[Any], Any]
  b1: float
  b2: float
  eps: float
  weight_decay: float
  clip: float  # 0: no clipping
  eps_root: float = 0.0

  def update(self, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any, jax.Array, jax.Array]:
    """(new params, new optimizer state, sum of the updates' squares, sum of the new params'
    squares) for trees of float32 leaves (None where a parameter does not train) and optax's
    state of the chain above."""
    clip_state, (adam, decay_state, sched) = opt_state
    if not isinstance(adam, optax.ScaleByAdamState) or not isinstance(sched, optax.ScaleByScheduleState):
      raise TypeError(f"fused AdamW: unexpected optimizer state {type(adam).__name__}, {type(sched).__name__}")
    # The scalars, computed as optax computes them (jbt.train.optim.clip_by_global_norm, optax's
    # scale_by_adam, bias_correction, scale_by_learning_rate); XLA divides by a broadcast scalar
    # as a multiply by its reciprocal, so the bias corrections go in as reciprocals.
    if self.clip > 0:
      norm = optax.tree.norm(grads)
      scale = jnp.where(norm < self.clip, 1.0, self.clip / norm).astype(jnp.float32)
    else:
      scale = jnp.float32(1.0)
    count = optax.safe_increment(adam.count)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731  (a Python float as a weakly typed float32 operand)
    hyper = jnp.stack([scale, f32(1 - self.b1), f32(self.b1), f32(1 - self.b2), f32(self.b2),
                       1 / f32(1 - self.b1 ** count), 1 / f32(1 - self.b2 ** count), f32(self.eps_root), f32(self.eps),
                       f32(self.weight_decay), f32(-self.lr(sched.count))])
    leaves, treedef = jax.tree.flatten(params)
    g_leaves, mu, nu = treedef.flatten_up_to(grads), treedef.flatten_up_to(adam.mu), treedef.flatten_up_to(adam.nu)
    for x in (*leaves, *g_leaves, *mu, *nu):
      if x.dtype != jnp.float32:
        raise TypeError(f"fused AdamW needs float32 parameters, gradients and moments, got {x.dtype}")
    n = len(leaves)
    args = [x for leaf in zip(leaves, g_leaves, mu, nu) for x in leaf]
    outs = [jax.ShapeDtypeStruct((2,), jnp.float32)] + [jax.ShapeDtypeStruct(x.shape, x.dtype)
                                                         for i in range(n) for x in (leaves[i], mu[i], nu[i])]
    # p, m, v of leaf i are inputs 1 + 4i, 3 + 4i, 4 + 4i and outputs 1 + 3i, 2 + 3i, 3 + 3i
    aliases = {a: r for i in range(n) for a, r in ((1 + 4 * i, 1 + 3 * i), (3 + 4 * i, 2 + 3 * i), (4 + 4 * i, 3 + 3 * i))}
    sums, *new = jax.ffi.ffi_call(TARGET, outs, input_output_aliases=aliases)(hyper, *args)
    p_new, m_new, v_new = (treedef.unflatten(new[j::3]) for j in range(3))
    state = (clip_state, (adam._replace(count=count, mu=m_new, nu=v_new), decay_state,
                          sched._replace(count=optax.safe_increment(sched.count))))
    return p_new, state, sums[0], sums[1]


def plan(opt: Any, lr: Callable[[Any], Any], n_devices: int, frozen_rows: int, backend: str | None = None) -> AdamW | None:
  """The fused update a run uses, or None for optax's (see the module's docstring)."""
  mode = opt.get("fused_update", "auto")
  if mode not in MODES:
    raise ValueError(f"opt.fused_update must be one of {', '.join(MODES)}, got {mode!r}")
  if (mode == "off" or (backend or jax.default_backend()) != "cpu" or n_devices != 1 or opt.grad_accum > 1
      or frozen_rows or not available()):
    return None
  return AdamW(lr=lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, clip=opt.clip or 0.0)
