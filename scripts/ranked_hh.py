"""Pairwise vs ranked training on the HH-harmless sample: what do extra responses per prompt buy?

Builds, from ../shared/data/hh-harmless/pairs.jsonl.gz, held-out pairs (whole prompts never
trained on) and two train files over the same prompts:
  pairs.jsonl   each HH pair as it is (chosen > rejected);
  ranked.jsonl  each HH pair as a ranked record of 4 responses: chosen (3), rejected (2), and the
                chosen responses of two other train prompts (1, 1: off-topic answers rank last,
                tied with each other), 5 ordered pairs a record with the tie dropped.
Then trains SmolLM2-135M (configs/smollm2_hh.py) the same number of steps with the same number of
prompts a step on: pairs (Bradley-Terry), ranked with loss.ranking=all_pairs, ranked with
loss.ranking=plackett_luce, all in the shared-prompt layout (a ranked record's prompt computed
once, each response once), and prints held-out accuracy on the real HH comparisons, train time
and tokens of each.

    python scripts/ranked_hh.py --steps 32 --out /tmp/ranked_hh
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-harmless" / "pairs.jsonl.gz"
VARIANTS = {  # name -> (train file, extra config)
    "pairs": ("pairs.jsonl", []),
    "ranked all_pairs": ("ranked.jsonl", ["--config.loss.ranking=all_pairs"]),
    "ranked plackett_luce": ("ranked.jsonl", ["--config.loss.ranking=plackett_luce"]),
}


def write_jsonl(path: Path, records: list[dict]) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def build(out: Path, n_eval: int, seed: int) -> tuple[int, int]:
  from jbt.data import load_pairs

  pairs, _ = load_pairs([str(HH)], split="train")
  groups = sorted({p.group for p in pairs})
  rng = np.random.default_rng(seed)
  held = set(rng.permutation(groups)[:n_eval].tolist())
  test = [p for p in pairs if p.group in held][:n_eval]
  train = [p for p in pairs if p.group not in held]
  write_jsonl(out / "eval.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in test])
  write_jsonl(out / "pairs.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train])
  other = rng.permutation(len(train))
  ranked = []
  for i, p in enumerate(train):
    d1, d2 = train[other[i]].chosen, train[other[(i + 1) % len(train)]].chosen
    if d1 in (p.chosen, p.rejected) or d2 in (p.chosen, p.rejected) or d1 == d2:
      d1, d2 = train[(i + 7) % len(train)].chosen, train[(i + 13) % len(train)].chosen
    ranked.append({"prompt": p.prompt, "responses": [p.chosen, p.rejected, d1, d2], "scores": [3, 2, 1, 1]})
  write_jsonl(out / "ranked.jsonl", ranked)
  return len(train), len(test)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="/tmp/ranked_hh")
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--batch_size", type=int, default=8, help="prompts (pairs or ranked records) a step")
  ap.add_argument("--eval_pairs", type=int, default=256)
  ap.add_argument("--max_length", type=int, default=256)
  ap.add_argument("--lr", type=float, default=1e-5)
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  a = ap.parse_args()
  from jbt.runtime.cpu import describe
  from jbt.tools import evaluate

  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  n_train, n_eval = build(out, a.eval_pairs, a.seed)
  print(f"{n_train} train prompts, {n_eval} held-out pairs; CPU: {describe()}", flush=True)
  rows = []
  for name in a.variants.split(","):
    train_file, extra = VARIANTS[name]
    run_dir = out / "runs"
    exp = name.replace(" ", "_")
    cmd = [sys.executable, "-m", "jbt.train", "--config", str(ROOT / "configs" / "smollm2_hh.py"),
           f"--config.data.train={out / train_file}", "--config.data.eval_fraction=0.0", "--config.train.eval_every=-1",
           f"--config.train.max_steps={a.steps}", f"--config.train.batch_size={a.batch_size}",
           f"--config.data.max_length={a.max_length}", f"--config.data.max_prompt_length={a.max_length // 2}",
           "--config.data.layout=shared_prompt", f"--config.opt.lr={a.lr}", f"--config.train.seed={a.seed}",
           f"--config.ckpt.cache_dir={run_dir}", f"--config.ckpt.exp_name={exp}", "--config.ckpt.save_every=0",
           "--config.log.progress=False", *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.time() - t0
    metrics = [json.loads(line) for line in (run_dir / exp / "metrics.jsonl").read_text().splitlines()]
    pairs_seen = max(m.get("counters/examples", 0) for m in metrics)
    res = evaluate.evaluate(run_dir / exp / "FINAL", [str(out / "eval.jsonl")], max_length=a.max_length,
                            max_prompt_length=a.max_length // 2)
    rows.append((name, res["accuracy"], res["mean_margin"], pairs_seen, seconds))
    print(f"{name}: held-out accuracy {res['accuracy']:.3f}, {seconds:.0f} s", flush=True)
  print(f"\n{a.steps} steps of {a.batch_size} prompts, SmolLM2-135M, max_length {a.max_length}, lr {a.lr}")
  print("| train set, loss | held-out accuracy | mean margin | pairs trained | wall s |")
  print("|---|---|---|---|---|")
  for name, acc, margin, seen, s in rows:
    print(f"| {name} | {acc:.3f} | {margin:.3f} | {seen:.0f} | {s:.0f} |")


if __name__ == "__main__":
  main()
