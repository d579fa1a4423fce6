"""Where runs and exports are stored: remote run directories stay remote, outputs are atomic and
get the modes the user's umask gives."""

from __future__ import annotations

import os
import stat

import pytest

from jbt.atomic import atomic_dir, atomic_file
from jbt.checkpoint.run import is_remote, run_path
from jbt.configs import default
from jbt.errors import JbtError
from jbt.runtime.distributed import enable_compilation_cache


def test_remote_run_paths_pass_through_untouched(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cfg = default.get_config()
  cfg.ckpt.cache_dir = "gs://BUCKET/jbt"  # as configs/tpu_llama3_8b.py documents
  run_dir = run_path(cfg.ckpt.cache_dir) / cfg.ckpt.exp_name
  assert str(run_dir) == "gs://BUCKET/jbt/jbt" and str(run_dir / "checkpoints") == "gs://BUCKET/jbt/jbt/checkpoints"
  assert is_remote(run_dir) and not is_remote(tmp_path)
  assert enable_compilation_cache(cfg) is None  # the compiled-program cache stays local, not in a gs: folder
  assert not any(tmp_path.iterdir())  # nothing local was made
  local = run_path("runs/x")
  assert local.is_absolute() and local == tmp_path / "runs" / "x"


def test_atomic_outputs_get_the_modes_of_the_umask(tmp_path):
  old = os.umask(0o027)
  try:
    with atomic_dir(tmp_path / "FINAL") as d:
      (d / "tokenizer").mkdir(mode=0o700)
      os.close(os.open(d / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600))  # as safetensors writes it
    with atomic_file(tmp_path / "out" / "feedback.json") as f:
      f.write("[]")
  finally:
    os.umask(old)
  mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
  assert mode(tmp_path / "FINAL") == mode(tmp_path / "FINAL" / "tokenizer") == 0o750
  assert mode(tmp_path / "FINAL" / "model.safetensors") == mode(tmp_path / "out" / "feedback.json") == 0o640
  assert (tmp_path / "out" / "feedback.json").read_text() == "[]"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["FINAL", "out"]  # no temporary left behind


def test_atomic_writes_leave_nothing_on_failure_and_name_a_blocked_parent(tmp_path):
  with pytest.raises(RuntimeError):
    with atomic_dir(tmp_path / "FINAL") as d:
      (d / "half").write_text("x")
      raise RuntimeError("killed")
  with pytest.raises(RuntimeError):
    with atomic_file(tmp_path / "a.json") as f:
      f.write("half")
      raise RuntimeError("killed")
  assert not any(tmp_path.iterdir())
  (tmp_path / "file").write_text("")
  with pytest.raises(JbtError, match="is a file, not a directory"):
    with atomic_file(tmp_path / "file" / "sub" / "a.json"):
      pass


def test_a_field_newer_than_the_run_record_is_unchanged_at_its_default():
  from jbt.checkpoint.run import _differences

  defaults = {"loss.margin": 0.0, "loss.tie_nu": 1.0, "data.ties": "drop"}
  old = {"loss.margin": 0.0}  # written before loss.tie_nu and data.ties existed
  assert _differences(old, {"loss.margin": 0.0, "loss.tie_nu": 1.0, "data.ties": "drop"}, defaults) == {}
  assert _differences(old, {"loss.margin": 0.0, "loss.tie_nu": 1.0, "data.ties": "tie_loss"}, defaults) == {
      "data.ties": [None, "tie_loss"]}
  assert _differences({"loss.margin": 0.0, "data.ties": "drop"}, {"loss.margin": 0.5}, defaults) == {
      "data.ties": ["drop", None], "loss.margin": [0.0, 0.5]}
