"""Kill-and-resume soak: SIGKILL the tiny run at random moments, re-run it, compare with a clean run.

    python scripts/soak.py [--kills 20] [--seed 0] [--work .cache/soak]

Each round starts `python -m jbt.train --config configs/tiny.py` on the same run directory and
kills it after a random delay (so kills land during start-up, compilation, steps and async
checkpoint writes), until the run completes. The final parameters, the losses of every step and
the data position must equal those of one uninterrupted run exactly. Prints kills survived / tried.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARGS = ["--config.ckpt.save_every=2", "--config.mesh.shape=(1,1,1)", "--config.log.progress=False",
        "--config.log.tensorboard=False"]


def command(cache: Path, epochs: int, xla_cache: Path) -> list[str]:
  return [sys.executable, "-m", "jbt.train", "--config", str(ROOT / "configs" / "tiny.py"),
          f"--config.ckpt.cache_dir={cache}", f"--config.train.epochs={epochs}",
          f"--config.train.compilation_cache={xla_cache}", *ARGS]


def env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_PLATFORMS="cpu")


def final_state(run_dir: Path) -> tuple[list, dict, dict]:
  """(parameter leaves, losses by step, data iterator position of the last checkpoint)."""
  import jax
  import numpy as np

  from jbt.checkpoint.load import load_model
  from jbt.train.metrics import read_metrics

  params = [np.asarray(x) for x in jax.tree.leaves(load_model(run_dir / "final").params)]
  rows = read_metrics(run_dir / "metrics.jsonl")
  losses = {r["step"]: r["loss/train"] for r in rows if "loss/train" in r}
  ckpts = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  data = json.loads(next((run_dir / "checkpoints" / str(ckpts[-1]) / "data").glob("*")).read_text())
  return params, losses, data


def soak(work: Path, kills: int, seed: int, max_delay: float = 25.0, epochs: int = 10, log=print,
         xla_cache: Path | None = None) -> tuple[int, int]:
  """Returns (kills survived, kills tried); raises AssertionError on any difference. Every run
  shares one compilation cache (default: work/xla_cache)."""
  import numpy as np

  rng = random.Random(seed)
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  xla_cache = xla_cache or work / "xla_cache"
  clean = subprocess.run(command(work / "clean", epochs, xla_cache), env=env(), cwd=work, capture_output=True, text=True)
  assert clean.returncode == 0, clean.stderr[-3000:]
  tried = 0
  while tried < kills:
    p = subprocess.Popen(command(work / "soak", epochs, xla_cache), env=env(), cwd=work, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    delay = rng.uniform(0.5, max_delay)
    try:
      p.wait(timeout=delay)
      log(f"  run finished before its kill at {delay:.1f}s")
      break
    except subprocess.TimeoutExpired:
      p.send_signal(signal.SIGKILL)
      p.wait()
      tried += 1
      done = sorted(int(x.name) for x in (work / "soak" / "tiny" / "checkpoints").glob("*") if x.name.isdigit()) \
          if (work / "soak" / "tiny" / "checkpoints").exists() else []
      log(f"  kill {tried}/{kills} at {delay:.1f}s; checkpoints {done[-2:]}")
  last = subprocess.run(command(work / "soak", epochs, xla_cache), env=env(), cwd=work, capture_output=True, text=True)
  assert last.returncode == 0, last.stderr[-3000:]
  a, b = final_state(work / "soak" / "tiny"), final_state(work / "clean" / "tiny")
  assert len(a[0]) == len(b[0]) and all(np.array_equal(x, y) for x, y in zip(a[0], b[0])), "parameters differ"
  assert a[1] == b[1], "losses differ"
  assert a[2] == b[2], f"data position differs: {a[2]} vs {b[2]}"
  return tried, tried


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--kills", type=int, default=20)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max_delay", type=float, default=25.0, help="seconds; a kill lands uniformly in [0.5, this]")
  ap.add_argument("--epochs", type=int, default=10, help="length of the run (25 steps an epoch)")
  ap.add_argument("--work", default=".cache/soak")
  a = ap.parse_args()
  t0 = time.time()
  survived, tried = soak(Path(a.work).absolute(), a.kills, a.seed, a.max_delay, a.epochs)
  print(f"kills survived / tried: {survived} / {tried}; final parameters, losses and data position equal an "
        f"uninterrupted run's ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
  main()
