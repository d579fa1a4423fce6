"""Pairwise accuracy of a reward model on preference data.

    python -m jbt.evaluate --run RUN_DIR       # a run's final model on exactly the run's eval pairs
    python -m jbt.evaluate --model PATH --rewardbench DIR   # RewardBench 1 or 2 from local files
        (jbt.tools.rewardbench: its schemas and scoring rules); the last stdout line is JSON
    python -m jbt.evaluate --model PATH --data SPEC [--data SPEC ...] [--split auto|test|train|all]
        [--max_length 1250] [--max_prompt_length 625] [--truncation halos|drop] [--batch_size 16]
        [--plot out.png] [--dtype float32|bfloat16] [--mesh 1,-1,1] [--on_error skip|raise]
        [--backend jax|torch] [--trust_remote_code]

--backend torch scores with transformers directly: any AutoModelForSequenceClassification
directory (GPT-2, OPT, ... and, with --trust_remote_code, custom heads such as ArmoRM's), on the
same tokenized inputs, so a jbt model and an external one are compared on the same files.

PATH is an HF reward-model directory (such as a run's FINAL/) or a jbt checkpoint; a SPEC is any
data spec training takes (hub name, file, directory, glob). Pairs are formatted and truncated
exactly as training formats them and scored in training's shared-prompt layout with its forward
pass (each member's reward is the one it gets scored alone). Prints one JSON line:

    {"accuracy", "mean_margin", "n_pairs", "loss", "mean_chosen", "mean_rejected",
     "reward_length_corr", "model", "per_dataset": {SPEC: {... the same, "split", "n_skipped"}}}

accuracy counts r_chosen > r_rejected strictly (a tie is wrong, as HALOs counts); loss is the mean
-log sigmoid(r_chosen - r_rejected); reward_length_corr is the Pearson correlation of reward and
response length over all scored responses.

Split rule (--split auto, the default), per spec: a hub data set uses its test split; a file
whose records name a test split ("test", or "eval"/"validation"/"valid"/"dev") uses those
records plus any without a split; a file with no test records is used whole. --split test|train
takes that split as training would (records without a split belong to both); --split all takes
every pair once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jbt.errors import ArgParser, JbtError, cli_main

SPLIT_CHOICES = ("auto", "test", "train", "all")


def load_split(spec: str, split: str, on_error: str = "skip") -> tuple[list[Any], Any, str]:
  """(pairs, data report, the split used) of one spec under the rule in the module docstring."""
  from jbt import data
  from jbt.data import hub

  if split in ("test", "train"):
    pairs, report = data.load_pairs([spec], split=split, on_error=on_error)
    return pairs, report, split
  if spec in hub.HUB_DATASETS:
    if split == "auto":
      pairs, report = data.load_pairs([spec], split="test", on_error=on_error)
      return pairs, report, "test"
    train, report = data.load_pairs([spec], split="train", on_error=on_error)
    test, _ = data.load_pairs([spec], split="test", on_error=on_error)
    return train + test, report, "all"
  # A file: the train load counts the test records it leaves out, which tells whether the data
  # has a test split without a second read. A file of test records only fails the train load.
  try:
    train, report = data.load_pairs([spec], split="train", on_error=on_error)
  except JbtError:
    pairs, report = data.load_pairs([spec], split="test", on_error=on_error)
    return pairs, report, "test" if split == "auto" else "all"
  if not report.excluded["other_split"]:
    return train, report, "all"
  test, test_report = data.load_pairs([spec], split="test", on_error=on_error)
  if split == "auto":
    return test, test_report, "test"
  # Records without a split are in both loads; keep their first copy.
  return train + [p for p in test if p.split is not None], report, "all"


def pair_metrics(chosen_P: np.ndarray, rejected_P: np.ndarray) -> dict[str, float | int]:
  """accuracy (strict), mean margin, BT loss and mean rewards of P pairs (float64)."""
  from jbt.loss import bt_sums, pair_means

  chosen_P, rejected_P = np.asarray(chosen_P, np.float64), np.asarray(rejected_P, np.float64)
  n = int(chosen_P.size)
  m = pair_means(bt_sums(chosen_P, rejected_P)) if n else dict.fromkeys(("accuracies", "margins", "loss", "chosen",
                                                                           "rejected"), float("nan"))
  return {"accuracy": float(m["accuracies"]), "mean_margin": float(m["margins"]), "n_pairs": n,
          "loss": float(m["loss"]), "mean_chosen": float(m["chosen"]), "mean_rejected": float(m["rejected"])}


def _finite(d: dict[str, Any]) -> dict[str, Any]:
  """JSON has no NaN: write null."""
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def run_config(model: str | Path) -> dict[str, Any] | None:
  """The config.json of the training run a model came from (a run's FINAL/ or final/), if any."""
  f = Path(model).parent / "config.json"
  if Path(model).name not in ("FINAL", "final") or not f.is_file():
    return None
  try:
    cfg = json.loads(f.read_text())
  except ValueError:
    return None
  return cfg if isinstance(cfg, dict) and isinstance(cfg.get("data"), dict) else None


def evaluate(model: str | Path, specs: Sequence[str], *, split: str = "auto", max_length: int | None = None,
             max_prompt_length: int | None = None, truncation: str = "halos", batch_size: int = 16,
             dtype: str | None = None, mesh_shape: Sequence[int] = (1, -1, 1), on_error: str = "skip",
             plot: str | Path | None = None, backend: str = "jax", trust_remote_code: bool = False,
             keep_rewards: bool = False, calibrate: bool = False) -> dict[str, Any]:
  """Scores every pair of every spec; returns the result dict (see the module docstring).
  keep_rewards adds "rewards": {spec: [[chosen, rejected], ...]} in each spec's pair order.
  calibrate stores the mean and std of every scored response's reward in the model's config
  (jbt.tools.normalization); a model with such statistics also gets "normalized" means."""
  from jbt import data
  from jbt.data.sources import resolve_spec
  from jbt.loss.ranking import best_of_k_host
  from jbt.tools import normalization, plots

  if split not in SPLIT_CHOICES:
    raise JbtError(f"split must be one of {', '.join(SPLIT_CHOICES)}, got {split!r}")
  if not specs:
    raise JbtError("give at least one --data SPEC")
  if len(set(specs)) != len(specs):
    raise JbtError(f"a --data spec is given twice: {specs}")
  if plot is not None and Path(plot).is_dir():
    raise JbtError(f"--plot {plot}: is a directory; give the PNG file's path")
  if not Path(model).exists():
    raise JbtError(f"--model {model}: no such directory")
  for spec in specs:  # a spec that names nothing fails before the model loads
    resolve_spec(spec)
  run = run_config(model)  # lengths default to the run's; its training files are flagged below
  run_data = (run or {}).get("data", {})
  max_length = max_length or run_data.get("max_length") or 1250
  max_prompt_length = max_prompt_length or run_data.get("max_prompt_length") or min(625, max_length // 2)
  dtype = dtype or (run or {}).get("model", {}).get("dtype") or "float32"

  scorer, tokenizer = load_backend(backend, model, batch_size=batch_size, dtype=dtype, mesh_shape=mesh_shape,
                                   pairs_max_length=max_length, trust_remote_code=trust_remote_code)
  datasets = []
  for spec in specs:
    pairs, load_report, used = load_split(spec, split, on_error)
    if used in ("all", "train") and spec in (run_data.get("train") or []):
      print(f"warning: --data {spec} is what {Path(model).parent} trained on, and these {len(pairs)} pairs include "
            f"the ones it trained on ({used}): the accuracy is inflated; `python -m jbt.evaluate --run "
            f"{Path(model).parent}` scores its held-out pairs only", file=sys.stderr)
    tok, tok_report = data.tokenize_pairs(pairs, tokenizer, max_length=max_length,
                                          max_prompt_length=max_prompt_length, truncation=truncation,
                                          on_error=on_error)
    if len(tok) == 0:
      raise JbtError(f"--data {spec}: no pair is left to score ({tok_report.summary()})")
    print(f"{spec}: {len(tok)} {used} pairs ({load_report.summary()}; {tok_report.summary()})", file=sys.stderr)
    datasets.append((spec, used, tok, load_report.n_skipped + tok_report.n_skipped))

  result: dict[str, Any] = {}
  per_dataset, all_rewards, all_lengths, kept = {}, [], [], {}
  for spec, used, tok, n_skipped in datasets:
    rewards_Px2 = scorer(tok, desc=f"evaluating {spec}" if len(datasets) > 1 else "evaluating")
    # Response tokens: what follows the prefix both members share (prompt and template header).
    lengths_Px2 = tok.lengths - tok.shared_prefix[:, None]
    all_rewards.append(rewards_Px2)
    all_lengths.append(lengths_Px2)
    kept[spec] = rewards_Px2.tolist()
    m = pair_metrics(rewards_Px2[:, 0], rewards_Px2[:, 1])
    m["reward_length_corr"] = plots.length_correlation(rewards_Px2.ravel(), lengths_Px2.ravel())
    if tok.units is not None:  # ranked records: is the top-scored response a best one?
      m["best_of_k"], m["n_records"] = best_of_k_host(tok, rewards_Px2)
    per_dataset[spec] = _finite({**m, "split": used, "n_skipped": n_skipped})
  rewards_Px2, lengths_Px2 = np.concatenate(all_rewards), np.concatenate(all_lengths)
  result.update(pair_metrics(rewards_Px2[:, 0], rewards_Px2[:, 1]))
  result["reward_length_corr"] = plots.length_correlation(rewards_Px2.ravel(), lengths_Px2.ravel())
  result = _finite(result)
  result["model"] = str(model)
  result["max_length"], result["max_prompt_length"], result["dtype"] = max_length, max_prompt_length, dtype
  result["per_dataset"] = per_dataset
  result["backend"] = backend
  if calibrate:
    st = normalization.stats(rewards_Px2, source=f"jbt.evaluate --calibrate on {', '.join(specs)}")
    written = normalization.write(model, st)
    print(f"calibrated: reward mean {st['mean']:.4f}, std {st['std']:.4f} over {st['responses']} responses, "
          f"stored in {written}", file=sys.stderr)
  st = normalization.read(model)
  if st is not None:
    norm_Px2 = normalization.apply(rewards_Px2, st)
    result["normalization"] = st
    result["normalized"] = _finite({"mean_chosen": float(norm_Px2[:, 0].mean()),
                                    "mean_rejected": float(norm_Px2[:, 1].mean()),
                                    "mean_margin": float((norm_Px2[:, 0] - norm_Px2[:, 1]).mean())})
  if keep_rewards:
    result["rewards"] = kept
  if plot is not None:
    title = f"{Path(model).name}: accuracy {result['accuracy']:.3f} on {result['n_pairs']} pairs"
    plots.plot_rewards(rewards_Px2[:, 0], rewards_Px2[:, 1], lengths_Px2[:, 0], lengths_Px2[:, 1], plot, title=title)
    print(f"wrote {plot}", file=sys.stderr)
  return result


BACKENDS = ("jax", "torch")


def add_backend_args(ap: argparse.ArgumentParser) -> None:
  """--backend and --trust_remote_code, as jbt.evaluate and jbt.label take them."""
  ap.add_argument("--backend", choices=BACKENDS, default="jax",
                  help="jax: jbt's forward pass (jbt families); torch: transformers' (any sequence-classification model)")
  ap.add_argument("--trust_remote_code", action="store_true",
                  help="--backend torch: run the model directory's own code (custom heads such as ArmoRM's)")


def load_backend(backend: str, model: str | Path, *, batch_size: int, dtype: str, mesh_shape: Sequence[int],
                 pairs_max_length: int | None, trust_remote_code: bool = False) -> tuple[Any, Any]:
  """(scorer, tokenizer): jbt's own forward pass ("jax"), or transformers' ("torch", any
  sequence-classification model). pairs_max_length None gives a scorer of single sequences."""
  from jbt.tools import score, torch_backend

  if backend == "torch":
    return torch_backend.load_torch_scorer(model, batch_size=batch_size, dtype=dtype,
                                           pairs=pairs_max_length is not None, trust_remote_code=trust_remote_code)
  if backend != "jax":
    raise JbtError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
  if trust_remote_code:
    raise JbtError("--trust_remote_code runs a model's own code: it goes with --backend torch")
  return score.load_scorer(model, batch_size=batch_size, dtype=dtype, mesh_shape=mesh_shape,
                           pairs_max_length=pairs_max_length)


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
  """A training run's final model on exactly that run's eval pairs, lengths, layout, dtype and
  mesh (when this machine has its devices): the numbers of the run's last evaluation."""
  import jax
  from ml_collections import ConfigDict

  from jbt import data
  from jbt.checkpoint.load import load_model
  from jbt.data import ensure_chat_template
  from jbt.runtime import mesh as mesh_lib
  from jbt.train import setup
  from jbt.train.evaluation import Evaluator

  run_dir = Path(run_dir)
  if not (run_dir / "config.json").is_file() or not (run_dir / "final").is_dir():
    raise JbtError(f"--run {run_dir}: not a finished training run (it needs config.json and final/)")
  cfg = ConfigDict(json.loads((run_dir / "config.json").read_text()))
  rules = tuple(tuple(r) for r in cfg.mesh.rules)
  try:
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
  except JbtError:  # the run's mesh does not fit here: every device as FSDP (numbers may differ in the last bits)
    mesh = mesh_lib.make_mesh((1, -1, 1), cfg.mesh.axes)
  m = load_model(run_dir / "final", shardings_fn=lambda c: mesh_lib.model_shardings(c, mesh, rules),
                 **setup.runtime_fields(cfg))
  ensure_chat_template(m.tokenizer)
  cfg.train.eval_every = max(cfg.train.eval_every, 0)
  ds = setup.datasets(cfg, m.tokenizer)
  if ds.eval is None:
    raise JbtError(f"--run {run_dir}: the run had no eval split ({ds.messages[-1]})")
  model_cfg = m.cfg.replace(branches=max(m.cfg.branches, data.max_responses(ds.eval)))
  metrics = Evaluator(cfg, mesh, rules, model_cfg, mesh_lib.model_shardings(m.cfg, mesh, rules))(m.params, ds.eval)
  return {"accuracy": metrics["rewards_eval/accuracies"], "mean_margin": metrics["rewards_eval/margins"],
          "n_pairs": int(metrics["eval_pairs"]), "loss": metrics["loss/eval"],
          "mean_chosen": metrics["rewards_eval/chosen"], "mean_rejected": metrics["rewards_eval/rejected"],
          "best_of_k": metrics["rewards_eval/best_of_k"], "run": str(run_dir), "split": ds.messages[-1], "devices": jax.device_count()}


@cli_main
def main(argv: list[str] | None = None) -> None:
  from jbt.tools.score import parse_mesh

  ap = ArgParser(prog="python -m jbt.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", default=None, help="a training run directory: its final model on exactly its eval pairs, "
                  "lengths and dtype (the other options are then the run's)")
  ap.add_argument("--rewardbench", default=None,
                  help="RewardBench 1 or 2 in their published schemas (a .jsonl/.json/.parquet file or a directory): "
                       "per-subset, section and overall scores as the benchmarks compute them")
  ap.add_argument("--model", help="HF reward-model directory (e.g. a run's FINAL/) or jbt checkpoint")
  ap.add_argument("--data", action="append", help="data spec (repeatable): hub name, file, dir, glob")
  ap.add_argument("--split", choices=SPLIT_CHOICES, default="auto", help="which pairs to score (see above)")
  ap.add_argument("--max_length", type=int, default=None,
                  help="as cfg.data.max_length (default: the model's run's, else 1250)")
  ap.add_argument("--max_prompt_length", type=int, default=None,
                  help="as cfg.data.max_prompt_length (default: the model's run's, else 625)")
  ap.add_argument("--truncation", choices=("halos", "drop"), default="halos", help="as cfg.data.truncation")
  ap.add_argument("--batch_size", type=int, default=16, help="sequences per scoring batch (two per pair)")
  ap.add_argument("--plot", default=None, help="write reward histograms and reward vs length to this PNG")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                  help="compute dtype (default: the model's run's, else float32; float32 for exact checks)")
  ap.add_argument("--mesh", default="1,-1,1", help="(data, fsdp, tensor) sizes over the local devices")
  ap.add_argument("--on_error", choices=("skip", "raise"), default="skip", help="bad records: count or stop")
  ap.add_argument("--calibrate", action="store_true",
                  help="store the mean and std of the scored rewards in the model's config (jbt.label --normalize "
                       "uses them; the model's raw scores are unchanged)")
  add_backend_args(ap)
  args = ap.parse_args(argv)
  if args.run is not None:
    if args.model or args.data:
      raise JbtError("--run evaluates the run's own model on its own eval pairs: give it without --model / --data")
    print(json.dumps(_finite(evaluate_run(args.run))), flush=True)
    return
  if args.rewardbench is not None:
    from jbt.tools import rewardbench

    if not args.model or args.data:
      raise JbtError("--rewardbench scores --model on the benchmark's files: give --model and no --data")
    if not Path(args.model).exists():
      raise JbtError(f"--model {args.model}: no such directory")
    res = rewardbench.evaluate(args.model, args.rewardbench, backend=args.backend, batch_size=args.batch_size,
                               dtype=args.dtype or "float32", mesh_shape=parse_mesh(args.mesh),
                               max_length=args.max_length, trust_remote_code=args.trust_remote_code, plot=args.plot)
    print(rewardbench.report(res))
    print(json.dumps(_finite(res)), flush=True)
    return
  if not args.model or not args.data:
    raise JbtError("give --model and --data, --run RUN_DIR, or --model and --rewardbench PATH")
  result = evaluate(args.model, args.data, split=args.split, max_length=args.max_length,
                    max_prompt_length=args.max_prompt_length, truncation=args.truncation,
                    batch_size=args.batch_size, dtype=args.dtype, mesh_shape=parse_mesh(args.mesh),
                    on_error=args.on_error, plot=args.plot, backend=args.backend,
                    trust_remote_code=args.trust_remote_code, calibrate=args.calibrate)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
