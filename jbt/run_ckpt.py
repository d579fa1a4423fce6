"""Train-run checkpoints: orbax CheckpointManager over (train state, data iterator state), a run
lock, and fallback past a corrupted newest checkpoint."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax

from jbt.errors import JbtError


class RunLock:
  """An flock on {run}/LOCK: a second run on the same directory refuses; a dead run's lock is free
  (the kernel drops it with the process, even after SIGKILL)."""

  def __init__(self, run_dir: Path):
    self.path = Path(run_dir) / "LOCK"
    self._fd: int | None = None

  def acquire(self) -> "RunLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise JbtError(f"{self.path.parent} is in use by a running job ({holder}); "
                     "wait for it, or pick another ckpt.exp_name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class RunCheckpoints:
  """{run}/checkpoints/<step>/{state, data}: orbax writes each step to a temporary directory and
  renames it when complete, so a kill mid-save never leaves a step that looks finished."""

  def __init__(self, run_dir: Path, *, keep: int, async_save: bool):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.dir = (Path(run_dir) / "checkpoints").absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=("state", "data"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state)), force=True)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Newest checkpoint that restores; a broken one is reported and skipped (never deleted)."""
    ocp = self._ocp
    for step in reversed(self.steps()):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  data=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["data"])
      except Exception as e:  # corrupted or half-written: set it aside, fall back to the one before
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        aside = self._set_aside(step)
        print(f"warning: checkpoint {self.dir / str(step)} cannot be restored ({msg}); moved to {aside.name} "
              "and trying an older one", file=sys.stderr)
    return None

  def _set_aside(self, step: int) -> Path:
    """Renames a broken step out of orbax's view (kept for inspection) so the step can be saved
    again; the good checkpoints are never touched."""
    src = self.dir / str(step)
    dst = self.dir / f"{step}.corrupt-{int(time.time())}"
    if is_primary() and src.exists():
      os.replace(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"jbt_set_aside_{step}")
    self.manager.reload()
    return dst

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def is_primary() -> bool:
  return jax.process_index() == 0
