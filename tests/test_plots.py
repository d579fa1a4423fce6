"""jbt.plots: training curves and reward plots are written as valid, non-empty PNGs."""

import json

import numpy as np
import pytest

from jbt.tools import plots
from jbt.train.metrics import MetricsWriter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
  data = path.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 1000


@pytest.fixture
def run_dir(tmp_path):
  """A run directory whose metrics.jsonl is written as jbt.train writes it."""
  w = MetricsWriter(tmp_path, resume_step=0, tensorboard=False, wandb_project="", config=None)
  rng = np.random.default_rng(0)
  w.write(0, {"loss/eval": 0.69, "rewards_eval/accuracies": 0.5, "rewards_eval/margins": 0.0})
  for step in range(1, 41):
    w.write(step, {"loss/train": 0.69 - 0.01 * step + 0.02 * rng.normal(), "rewards_train/accuracies": 0.5 + step / 100,
                   "rewards_train/margins": 0.05 * step, "grad_norm": 1.0})
    if step % 10 == 0:
      w.write(step, {"loss/eval": 0.69 - 0.008 * step, "rewards_eval/accuracies": 0.5 + step / 120,
                     "rewards_eval/margins": 0.04 * step})
  w.write(41, {"loss/train": float("nan"), "rewards_train/accuracies": 0.9, "rewards_train/margins": 2.0})  # null
  w.close()
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 42, "loss/tr')  # a line cut by a kill
  return tmp_path


def test_training_curves_png(run_dir, tmp_path, capsys):
  plots.main([str(run_dir)])
  assert_png(run_dir / "curves.png")
  out = tmp_path / "sub" / "c.png"
  plots.main([str(run_dir / "metrics.jsonl"), "--out", str(out), "--smooth", "0"])
  assert_png(out)
  assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_metrics_rows_and_series(run_dir):
  rows = plots.read_metrics(run_dir / "metrics.jsonl")
  assert [r["step"] for r in rows] == sorted(r["step"] for r in rows) and rows[-1]["step"] == 41
  steps, values = plots.series(rows, "loss/train")
  assert steps.tolist() == list(range(1, 41))  # the null at step 41 is left out
  assert plots.series(rows, "loss/eval")[0].tolist() == [0, 10, 20, 30, 40]
  np.testing.assert_allclose(plots.ema(np.array([2.0, 2.0, 2.0]), 0.9), [2.0, 2.0, 2.0])


def test_reward_plot_png(tmp_path):
  rng = np.random.default_rng(1)
  chosen, rejected = rng.normal(0.5, 1, 50), rng.normal(-0.5, 1, 50)
  lengths = rng.integers(5, 200, size=(2, 50))
  out = plots.plot_rewards(chosen, rejected, lengths[0], lengths[1], tmp_path / "r.png", title="t")
  assert_png(out)
  # Constant lengths: no correlation, still a plot.
  assert np.isnan(plots.length_correlation(chosen, np.ones(50)))
  assert_png(plots.plot_rewards(chosen, rejected, np.ones(50), np.ones(50), tmp_path / "flat.png"))


@pytest.mark.parametrize("case", ["missing", "empty", "unknown_keys", "smooth"])
def test_bad_input_is_one_error_line(case, tmp_path, capsys):
  if case == "empty":
    (tmp_path / "metrics.jsonl").write_text("not json\n")
  if case == "unknown_keys":
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "grad_norm": 1.0}) + "\n")
  if case == "smooth":
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/train": 1.0}) + "\n")
  argv = [str(tmp_path / "nowhere" if case == "missing" else tmp_path)]
  argv += ["--smooth", "1"] if case == "smooth" else []
  with pytest.raises(SystemExit) as e:
    plots.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ")
  want = {"missing": "nowhere", "empty": "no metric rows", "unknown_keys": "loss/train", "smooth": "smooth"}
  assert want[case] in err[0]
  assert not (tmp_path / "curves.png").exists()
