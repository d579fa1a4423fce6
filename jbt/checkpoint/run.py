"""Train-run checkpoints: orbax CheckpointManager over (train state, data iterator state, progress
counters), a run lock, and fallback past a corrupted newest checkpoint.

Run directories may be remote (gs://, s3:// where etils and orbax support them): such paths are
kept as etils.epath paths, never turned into local ones. The lock is local-only (flock).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax
from etils import epath

from jbt.errors import JbtError
from jbt.runtime.distributed import is_primary


def run_path(path: str | os.PathLike) -> Any:
  """A local path made absolute, or a remote one (scheme://...) kept as it is, as etils.epath
  (what orbax uses); pathlib would turn gs://BUCKET into a local gs:/BUCKET folder."""
  text = os.fspath(path)
  if is_remote(text):
    return epath.Path(text)
  return Path(text).absolute()


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


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


ITEMS = ("state", "data", "progress")


class RunCheckpoints:
  """{run}/checkpoints/<step>/{state, data, progress}: orbax writes each step to a temporary directory and
  renames it when complete, so a kill mid-save never leaves a step that looks finished."""

  def __init__(self, run_dir: Path, *, keep: int, async_save: bool):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.dir = run_path(run_dir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=ITEMS)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], progress: dict[str, Any]) -> None:
    """progress: host-side counters (examples seen, ...) that must resume exactly."""
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data_state),
                                                     progress=ocp.args.JsonSave(progress)), force=True)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
    """(step, state, data state, progress) of the newest checkpoint that restores; a broken one is
    reported and skipped (never deleted). A checkpoint of an older jbt is refused, not skipped."""
    ocp = self._ocp
    for step in reversed(self.steps()):
      step_dir = self.dir / str(step)
      if (step_dir / "state").exists() and not (step_dir / "progress").exists():
        raise JbtError(f"{step_dir} was written by an older jbt (no progress counters) and cannot be resumed "
                       "exactly; start a new run (another ckpt.exp_name) or move that run directory away")
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  data=ocp.args.JsonRestore(),
                                                                  progress=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["data"]), dict(out["progress"])
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

