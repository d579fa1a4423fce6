"""Compiling the train step per batch shape, in the background, one batch ahead.

Packed batches come in a few shapes (rows x length buckets). Each new shape is compiled ahead of
time in a background thread while the steps before it run (XLA compiles on one core and a step
rarely keeps every core busy); the persistent compilation cache makes reruns skip compiling.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax


def _key(batch: dict[str, jax.Array]) -> tuple:
  return tuple(sorted((k, v.shape) for k, v in batch.items()))


class StepCompiler:
  """Holds a jitted step and its compiled executables, one per batch shape."""

  def __init__(self, jitted: Any, mesh: Any):
    self.jitted = jitted
    self.mesh = mesh
    self._compiled: dict[tuple, Any] = {}
    self._compiling: dict[tuple, Future] = {}
    self._pool: ThreadPoolExecutor | None = None
    self.seconds_waited = 0.0  # total time step() waited for compilation
    # Calls that ran a shape's program for the first time. A first run costs more than the
    # later ones (on a CPU, a program loaded from the persistent cache finishes linking on its
    # first run, and a new shape's buffers are fresh memory): perf/new_shapes marks those steps.
    self.first_runs = 0

  def _compile(self, state: Any, batch: dict[str, jax.Array]) -> Any:
    with jax.set_mesh(self.mesh):  # the mesh context is per thread
      return self.jitted.lower(state, batch).compile()

  def prepare(self, state: Any, batch: dict[str, jax.Array]) -> None:
    """Starts compiling for a batch shape not seen yet, in a background thread. Only shapes and
    shardings are read: `state` may be donated meanwhile."""
    key = _key(batch)
    if key in self._compiled or key in self._compiling:
      return
    if self._pool is None:
      self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jbt-compile")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (state, batch))
    self._compiling[key] = self._pool.submit(self._compile, *abstract)

  def __call__(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, float]:
    """(new state, metrics, seconds this call waited for compilation: 0.0 for a shape compiled
    before, or one prepare() finished compiling in the background)."""
    key = _key(batch)
    waited = 0.0
    if key not in self._compiled:
      self.first_runs += 1
      t0 = time.time()
      future = self._compiling.pop(key, None)
      self._compiled[key] = future.result() if future is not None else self._compile(state, batch)
      waited = time.time() - t0
      self.seconds_waited += waited
    state, metrics = self._compiled[key](state, batch)
    return state, metrics, waited

  def compiled_text(self, batch: dict[str, jax.Array]) -> str:
    """The optimized HLO of the program compiled for `batch`'s shapes."""
    return self._compiled[_key(batch)].as_text()

  @property
  def compiled_shapes(self) -> int:
    return len(self._compiled)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None
