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



# The config fields that define what a run computes: resuming with other values would silently
# mix two runs. Logging, evaluation cadence, checkpoint cadence, mesh and kernels are left out.
IDENTITY_FIELDS = (
    "model.init_from", "model.tokenizer", "model.num_labels", "model.dtype", "model.random",
    "data.train", "data.eval", "data.eval_fraction", "data.max_length", "data.max_prompt_length", "data.truncation",
    "data.layout", "data.ties", "data.pack_length", "data.row_bucket", "data.length_bucket", "data.length_multiple",
    "train.batch_size", "train.epochs", "train.max_steps", "train.seed", "train.freeze", "train.frozen_dtype", "loss", "opt", "lora",
)
RESUME_MODES = ("auto", "never", "force")
RECORD = "run.json"


def run_identity(cfg: Any) -> dict[str, Any]:
  """The values of IDENTITY_FIELDS, one entry per leaf ("opt.lr"), as plain JSON data."""
  import json

  out: dict[str, Any] = {}

  def add(name: str, node: Any) -> None:
    if hasattr(node, "to_dict"):
      node = node.to_dict()
    if isinstance(node, dict):
      for k, v in node.items():
        add(f"{name}.{k}", v)
    else:
      out[name] = node

  for field in IDENTITY_FIELDS:
    node = cfg
    for part in field.split("."):
      node = node.get(part) if hasattr(node, "get") else None
    add(field, node)
  return json.loads(json.dumps(out, default=str))


def _differences(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> dict[str, list[Any]]:
  """Fields whose values differ. A field the old record lacks (it predates the field) counts as
  unchanged while the new value is the field's default: what the older jbt did."""
  return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and not (k not in old and new.get(k) == defaults.get(k))}


def reconcile(cfg: Any, run_dir: Any, mode: str) -> str:
  """Compares the config with the run directory's record before any work. Returns "new" (nothing
  to resume), "resume", "forced" (continuing with changed fields, recorded), or "moved" (the old
  run was renamed aside by mode "never"); raises a JbtError when the fields differ in mode "auto".
  Only the primary process writes; every process reaches the same answer."""
  import datetime
  import json

  if mode not in RESUME_MODES:
    raise JbtError(f"ckpt.resume must be one of {', '.join(RESUME_MODES)}, got {mode!r}")
  record_path = run_dir / RECORD
  has_steps = (run_dir / "checkpoints").exists() and any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())
  record = json.loads(record_path.read_text()) if record_path.exists() else None
  new = run_identity(cfg)
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  if not has_steps or record is None or mode == "never":
    state = "new"
    if has_steps and mode == "never":
      aside = run_dir.parent / f"{run_dir.name}.old-{now.replace(':', '')}"
      if is_primary():
        os.replace(run_dir, aside)
      print(f"ckpt.resume=never: moved the old run {run_dir} aside to {aside}", file=sys.stderr)
      state = "moved"
    if is_primary():
      run_dir.mkdir(parents=True, exist_ok=True)
      record_path.write_text(json.dumps({"identity": new, "history": [{"started": now, "resume": mode}]}, indent=2))
    return state
  from jbt.configs import default

  changed = _differences(record["identity"], new, run_identity(default.get_config()))
  if changed and mode == "auto":
    fields = "; ".join(f"{k}: {a!r} -> {b!r}" for k, v in changed.items() for a, b in [v])
    raise JbtError(f"{run_dir} holds a run with other settings ({fields}). Use another ckpt.exp_name, or "
                   "--config.ckpt.resume=never to start over (the old run is moved aside, not deleted), or "
                   "--config.ckpt.resume=force to continue it with the new settings")
  if is_primary():
    record["history"].append({"started": now, "resume": mode, **({"changed": changed} if changed else {})})
    record["identity"] = new
    record_path.write_text(json.dumps(record, indent=2))
  return "forced" if changed else "resume"
