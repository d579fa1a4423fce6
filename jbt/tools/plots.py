"""PNG plots: a training run's curves, and reward distributions for evaluate.

    python -m jbt.plots RUN_DIR [--out PNG] [--smooth 0.8]

reads RUN_DIR/metrics.jsonl (or a metrics.jsonl given directly) and writes loss, accuracy and
margin against the optimizer step, train and eval, to RUN_DIR/curves.png by default.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend state), and
files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jbt.atomic import atomic_file
from jbt.errors import ArgParser, JbtError, cli_main

# (panel title, train key, eval key): HALOs' metric names, as jbt.train writes them.
CURVES = (
    ("loss", "loss/train", "loss/eval"),
    ("accuracy", "rewards_train/accuracies", "rewards_eval/accuracies"),
    ("margin (r_chosen - r_rejected)", "rewards_train/margins", "rewards_eval/margins"),
)


def new_figure(ncols: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
  """A Figure on an Agg canvas with `ncols` side-by-side axes."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width * ncols, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def save_figure(fig: Any, out: str | Path, dpi: int = 110) -> Path:
  """Writes a PNG atomically (jbt.atomic)."""
  with atomic_file(out, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
  """Rows of a metrics.jsonl, sorted by step; a line cut by a kill is skipped."""
  if not path.is_file():
    raise JbtError(f"{path}: no such metrics file (a training run writes RUN_DIR/metrics.jsonl)")
  from jbt.train.metrics import read_metrics as read_rows

  rows = read_rows(path)
  if not rows:
    raise JbtError(f"{path}: holds no metric rows with a 'step'")
  return sorted(rows, key=lambda r: r["step"])


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows holding a finite value for `key` (NaN is written as null)."""
  pts = [(r["step"], r[key]) for r in rows
         if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  steps, values = zip(*pts) if pts else ((), ())
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def ema(values: np.ndarray, smooth: float) -> np.ndarray:
  """Exponential moving average, debiased at the start (TensorBoard's smoothing)."""
  out = np.empty_like(values)
  acc, weight = 0.0, 0.0
  for i, v in enumerate(values):
    acc = smooth * acc + (1 - smooth) * v
    weight = smooth * weight + (1 - smooth)
    out[i] = acc / weight
  return out


def plot_training_curves(run: str | Path, out: str | Path | None = None, *, smooth: float = 0.8) -> Path:
  """Loss, accuracy and margin of a run, train and eval, as one PNG; returns its path.

  `run` is a run directory or its metrics.jsonl; `out` defaults to curves.png beside the metrics.
  Train values are drawn faintly as logged and boldly smoothed; eval values as points on a line.
  """
  if not 0.0 <= smooth < 1.0:
    raise JbtError(f"smooth must be in [0, 1), got {smooth}")
  run = Path(run)
  if not run.exists():
    raise JbtError(f"{run}: no such run directory or metrics file")
  path = run / "metrics.jsonl" if run.is_dir() else run
  rows = read_metrics(path)
  if not any(series(rows, key)[0].size for _, *keys in CURVES for key in keys):
    wanted = ", ".join(k for _, *keys in CURVES for k in keys)
    raise JbtError(f"{path}: no row holds any of {wanted}")
  fig, axes = new_figure(len(CURVES))
  for ax, (title, train_key, eval_key) in zip(axes, CURVES):
    steps, values = series(rows, train_key)
    if steps.size:
      ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8)
      ax.plot(steps, ema(values, smooth), color="tab:blue", linewidth=1.6, label="train")
    steps, values = series(rows, eval_key)
    if steps.size:
      ax.plot(steps, values, color="tab:orange", marker="o", markersize=3.5, linewidth=1.2, label="eval")
    if title == "accuracy":
      ax.axhline(0.5, color="gray", linewidth=0.6, linestyle=":")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(loc="best", fontsize="small")
  fig.suptitle(str(path.parent.name or path))
  return save_figure(fig, out if out is not None else path.parent / "curves.png")


def plot_rewards(chosen_P: np.ndarray, rejected_P: np.ndarray, chosen_len_P: np.ndarray,
                 rejected_len_P: np.ndarray, out: str | Path, *, title: str = "") -> Path:
  """Chosen vs rejected reward histograms, and reward vs response length (length bias); a PNG."""
  chosen_P, rejected_P = np.asarray(chosen_P, np.float64), np.asarray(rejected_P, np.float64)
  fig, (hist_ax, len_ax) = new_figure(2)
  both = np.concatenate([chosen_P, rejected_P])
  bins = np.histogram_bin_edges(both, bins=min(40, max(10, int(np.sqrt(both.size)))))
  hist_ax.hist(chosen_P, bins=bins, alpha=0.55, color="tab:green", label=f"chosen (mean {chosen_P.mean():.3f})")
  hist_ax.hist(rejected_P, bins=bins, alpha=0.55, color="tab:red", label=f"rejected (mean {rejected_P.mean():.3f})")
  hist_ax.set_xlabel("reward")
  hist_ax.set_ylabel("sequences")
  hist_ax.set_title("reward distribution")
  hist_ax.legend(loc="best", fontsize="small")

  lengths = np.concatenate([chosen_len_P, rejected_len_P]).astype(np.float64)
  len_ax.scatter(chosen_len_P, chosen_P, s=9, alpha=0.5, color="tab:green", label="chosen")
  len_ax.scatter(rejected_len_P, rejected_P, s=9, alpha=0.5, color="tab:red", label="rejected")
  corr = length_correlation(both, lengths)
  if np.isfinite(corr):
    slope, intercept = np.polyfit(lengths, both, 1)
    xs = np.array([lengths.min(), lengths.max()])
    len_ax.plot(xs, slope * xs + intercept, color="black", linewidth=1.0, label="least squares")
  len_ax.set_xlabel("response tokens")
  len_ax.set_ylabel("reward")
  len_ax.set_title(f"reward vs response length (Pearson r = {corr:.3f})")
  len_ax.grid(alpha=0.3)
  len_ax.legend(loc="best", fontsize="small")
  if title:
    fig.suptitle(title)
  return save_figure(fig, out)


def length_correlation(rewards: np.ndarray, lengths: np.ndarray) -> float:
  """Pearson correlation of reward and response length; NaN when either is constant."""
  rewards, lengths = np.asarray(rewards, np.float64), np.asarray(lengths, np.float64)
  if rewards.size < 2 or np.std(rewards) == 0 or np.std(lengths) == 0:
    return float("nan")
  return float(np.corrcoef(rewards, lengths)[0, 1])


@cli_main
def main(argv: list[str] | None = None) -> None:
  ap = ArgParser(prog="python -m jbt.plots", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("run", help="training run directory ({cache_dir}/{exp_name}) or its metrics.jsonl")
  ap.add_argument("--out", default=None, help="PNG to write (default: curves.png beside metrics.jsonl)")
  ap.add_argument("--smooth", type=float, default=0.8, help="EMA smoothing of train curves, in [0, 1)")
  args = ap.parse_args(argv)
  out = plot_training_curves(args.run, args.out, smooth=args.smooth)
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
