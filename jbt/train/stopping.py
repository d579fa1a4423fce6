"""Stopping a run on request: SIGINT (Ctrl-C) or SIGTERM (preemption on TPU VMs, SLURM, Kubernetes).

During the training loop the first signal asks the loop to stop at the next optimizer-step
boundary, save a checkpoint and wait for it to commit; every process agrees on the stop step. A
second signal, or one outside the loop (loading, compiling, exporting), exits at once with one
line: checkpoints and exports are written to temporary names and renamed when complete, so an
exit at any moment leaves no corrupt one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np

from jbt.errors import EXIT_INTERRUPTED

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
  """Installs the handlers for the duration of a `with` block (main thread only)."""

  def __init__(self) -> None:
    self.signal: int | None = None  # the first signal received during the loop
    self.in_loop = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc: Any) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.in_loop and self.signal is None:
      self.signal = signum
      print(f"\n{name}: stopping at the end of this step and saving a checkpoint (again to exit at once)",
            file=sys.stderr, flush=True)
      return
    print(f"\n{name}: exiting now; re-run the same command to resume from the last checkpoint", file=sys.stderr,
          flush=True)
    os._exit(EXIT_INTERRUPTED)

  def requested(self) -> bool:
    """Whether any process was asked to stop (the same answer on every process)."""
    flag = self.signal is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag
