"""jbt on one GPU: TRL's RewardTrainer side by side on SmolLM2-135M, and jbt's MFU on a ~1B Llama.

Three measurements, in one run (about 6 minutes on an H100/H200 at the defaults):
1. The card's bf16 matmul rate: an N x N x N bf16 product (float32 accumulation) timed in JAX and
   in PyTorch; the better one is "measured peak".
2. jbt (shared-prompt layout) against TRL's RewardTrainer as users get it (gradient checkpointing
   on, bf16 autocast, sdpa attention) and at its fastest (checkpointing off), through
   scripts/bench.py's workers: same random-weight SmolLM2-135M-shaped model (speed does not
   depend on the weights; the real ones are too big to carry to a lent machine), SmolLM2's
   tokenizer, the HH-harmless sample, pairs that fit max_length whole.
3. jbt's MFU: a random Llama-3.2-1B-shaped model (SmolLM2's 49,152-token vocabulary: the
   embedding is a gather, outside the FLOP count either way), members at --mfu_length tokens (prompt
   --mfu_length / 2), bf16 compute; model FLOPs / step time against the measured peak and the
   card's nominal peak (jbt.plan.targets.peak_flops).

A lent GPU machine has jax, flax, optax, orbax, transformers and torch, not the rest: prepare a
bundle here (tokenizer and config, the sample, the missing packages as Python 3.12 wheels), carry
it, run there:

    python scripts/bench_gpu.py --prepare .gpu            # here; .gpu is git-ignored
    # there (device tool, carry [".gpu"]):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl \\
      && PYTHONPATH=/tmp/site:. python3 scripts/bench_gpu.py --bundle .gpu --out $OUT/bench_gpu.json

    python scripts/bench_gpu.py --dry_run                 # any machine: the same steps at toy sizes

Prints a markdown table (docs/benchmarks.md keeps the measured ones) and writes --out as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (scripts/bench.py: the jbt and TRL workers)

DEFAULT_DATA = bench.DEFAULT_DATA
# Missing from the lent machine's image (Python 3.12, jax/flax/optax/orbax/transformers/torch,
# pyarrow, accelerate, xxhash there); jbt needs grain, ml_collections, datasets; TRL needs trl.
WHEELS = ("grain", "ml_collections", "datasets", "dill", "multiprocess", "trl", "array_record", "portpicker")
LLAMA_1B = dict(family="llama", hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                num_kv_heads=8, head_dim=64, rope_theta=500000.0, initializer_range=0.02)
TOY = dict(family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
           head_dim=16, initializer_range=0.02)


def write_bundle(bundle: Path, data: Path, wheels: bool = True) -> None:
  """SmolLM2's tokenizer and config (no weights), the pairs sample and (wheels) the packages the
  lent machine lacks, as Python 3.12 wheels."""
  import transformers

  from jbt.checkpoint.load import resolve_model_path
  from jbt.hf.files import load_tokenizer
  from jbt.hf.sources import find_gguf

  gguf = find_gguf(Path(resolve_model_path("smollm2")))
  (bundle / "smollm2").mkdir(parents=True, exist_ok=True)
  load_tokenizer(gguf.parent, gguf.name).save_pretrained(str(bundle / "smollm2"))
  transformers.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(bundle / "smollm2"))
  with open(data, "rb") as src, gzip.open(bundle / "pairs.jsonl.gz", "wb") as dst:
    shutil.copyfileobj(gzip.GzipFile(fileobj=src) if data.suffix == ".gz" else src, dst)
  if not wheels:
    return
  from importlib import metadata

  pins = [f"{n}=={metadata.version(n)}" for n in WHEELS if _installed(n)]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", "-d", str(bundle / "whl")]
  for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
    cmd += ["--platform", tag]
  subprocess.run(cmd + pins, check=True)
  size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
  print(f"bundle {bundle}: {size / 2**20:.1f} MiB ({', '.join(pins)})")


def _installed(name: str) -> bool:
  from importlib import metadata

  try:
    metadata.version(name)
    return True
  except metadata.PackageNotFoundError:
    return False


def matmul_peak(n: int, reps: int) -> dict:
  """bf16 TFLOP/s of an n x n x n product in JAX and in PyTorch, on the default device."""
  import jax
  import jax.numpy as jnp

  out = {}
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    r = f(a, b)
  r.block_until_ready()
  out["jax"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
  try:
    import torch
  except ImportError:
    return out
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  ta, tb = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
  ta @ tb
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  sync()
  t = time.perf_counter()
  for _ in range(reps):
    ta @ tb
  sync()
  out["torch"] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
  return out


def random_hf_model(bundle: Path, work: Path, toy: bool) -> Path:
  """A random SmolLM2-135M-shaped (or toy) LlamaForSequenceClassification with SmolLM2's tokenizer."""
  import torch
  import transformers

  out = work / "model"
  if out.exists():
    return out
  cfg = transformers.AutoConfig.from_pretrained(str(bundle / "smollm2"))
  cfg.num_labels = 1
  if toy:
    cfg.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16))
  torch.manual_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
  model.save_pretrained(str(out))
  transformers.AutoTokenizer.from_pretrained(str(bundle / "smollm2")).save_pretrained(str(out))
  return out


def long_pairs(data: Path, out: Path, n: int, words: int) -> Path:
  """n pairs whose prompt and responses each run to about `words` words (HH text strung together),
  so halos truncation cuts every member to exactly max_length tokens."""
  from jbt import data as jdata

  pairs, _ = jdata.load_pairs([str(data)])
  text = " ".join(t["content"] for p in pairs for t in (*p.prompt, *p.chosen, *p.rejected)).split()

  def chunk(i: int) -> str:
    start = (i * 7919) % max(len(text) - words, 1)
    return " ".join(text[start:start + words])

  out.write_text("".join(json.dumps({"prompt": chunk(3 * i), "chosen": chunk(3 * i + 1),
                                     "rejected": chunk(3 * i + 2)}) + "\n" for i in range(n)))
  return out


def worker_mfu(a: argparse.Namespace) -> dict:
  from absl import logging as absl_logging

  from jbt.configs import default
  from jbt.train import run
  from jbt.train.metrics import read_metrics

  absl_logging.set_verbosity(absl_logging.WARNING)
  c = default.get_config()
  c.model.init_from = "random"
  c.model.tokenizer = a.tokenizer
  c.model.random.update(**(TOY if a.dry_run else LLAMA_1B))
  c.model.num_labels = 1
  c.model.remat = a.remat
  c.data.train = (a.pairs,)
  c.data.max_length, c.data.max_prompt_length = a.mfu_length, a.mfu_length // 2
  c.data.truncation = "halos"
  c.train.batch_size = a.mfu_batch
  c.train.max_steps = a.warmup + a.steps
  c.train.eval_every = 0
  c.opt.warmup_ratio = 0.0
  c.ckpt.cache_dir, c.ckpt.exp_name, c.ckpt.export_final = a.out, "mfu", False
  c.log.progress = c.log.tensorboard = False
  run(c)
  rows = [r for r in read_metrics(Path(a.out) / "mfu" / "metrics.jsonl") if "loss/train" in r]
  timed = [r for r in rows if r["step"] > a.warmup]
  import jax

  return {"tflops": statistics.median(r["perf/tflops"] for r in timed),
          "tokens_per_s": statistics.median(r["tokens_per_second"] for r in timed),
          "pairs_per_s": statistics.median(r["examples_per_second"] for r in timed),
          "device": jax.devices()[0].device_kind, "device_count": jax.device_count()}


def run_mfu(a: argparse.Namespace, bundle: Path, work: Path) -> dict:
  pairs = long_pairs(bundle / "pairs.jsonl.gz", work / "long_pairs.jsonl", (a.warmup + a.steps) * a.mfu_batch,
                     words=a.mfu_length)
  out = Path(tempfile.mkdtemp(prefix="mfu-", dir=work))
  cmd = [sys.executable, __file__, "--worker_mfu", "--pairs", str(pairs), "--tokenizer", str(bundle / "smollm2"),
         "--out", str(out), "--steps", str(a.steps), "--warmup", str(a.warmup), "--mfu_length", str(a.mfu_length),
         "--mfu_batch", str(a.mfu_batch), "--remat", a.remat] + (["--dry_run"] if a.dry_run else [])
  p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=_pythonpath()))
  lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
  if p.returncode or not lines:
    raise SystemExit(f"mfu run failed:\n{p.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _pythonpath() -> str:
  return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prepare", default=None, help="write a bundle for a lent machine into this directory")
  ap.add_argument("--bundle", default=".gpu", help="the prepared bundle (tokenizer, pairs, wheels)")
  ap.add_argument("--dry_run", action="store_true", help="toy sizes, a few steps: checks the script on a CPU")
  ap.add_argument("--data", default=str(DEFAULT_DATA))
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--max_length", type=int, default=512, help="SmolLM2 comparison: member length limit")
  ap.add_argument("--batch", type=int, default=32, help="SmolLM2 comparison: pairs a step")
  ap.add_argument("--mfu_length", type=int, default=2048)
  ap.add_argument("--mfu_batch", type=int, default=8)
  ap.add_argument("--remat", default="none", help="the MFU run's model.remat")
  ap.add_argument("--matmul_n", type=int, default=8192)
  ap.add_argument("--variants", default="jbt-shared,trl,trl-no-gc")
  ap.add_argument("--work", default=".cache/bench_gpu")
  ap.add_argument("--out", default=None, help="also write the results here as JSON")
  ap.add_argument("--worker_mfu", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--pairs", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker_mfu:
    print("RESULT " + json.dumps(worker_mfu(a)), flush=True)
    return
  if a.prepare:
    write_bundle(Path(a.prepare).absolute(), Path(a.data))
    return
  if a.dry_run:
    a.steps, a.warmup, a.max_length, a.batch = 2, 1, 128, 2
    a.mfu_length, a.mfu_batch, a.matmul_n = 128, 2, 256
  work = Path(a.work).absolute()
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  bundle = Path(a.bundle).absolute()
  if a.dry_run and not (bundle / "pairs.jsonl.gz").exists():
    bundle = work / "bundle"  # the dry run writes a bundle (no wheels): that step is checked too
    write_bundle(bundle, Path(a.data), wheels=False)
  results: dict = {"host": platform.node(), "python": platform.python_version()}
  results["matmul_tflops"] = matmul_peak(a.matmul_n, 3 if a.dry_run else 20)
  peak = max(results["matmul_tflops"].values())
  print(f"bf16 matmul {a.matmul_n}^3: " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in results["matmul_tflops"].items()),
        flush=True)
  model = random_hf_model(bundle, work, toy=a.dry_run)
  spec = bench.prepare_pairs(work, model, bundle / "pairs.jsonl.gz", a.max_length, (a.steps + a.warmup) * a.batch)
  b = argparse.Namespace(steps=a.steps, warmup=a.warmup, max_length=a.max_length, batch=a.batch, lr=1e-5)
  results["variants"] = {}
  for name in a.variants.split(","):
    results["variants"][name] = res = bench.run_variant(name, b, spec, work)
    print(f"  {name}: {res['pairs_per_s']:.3f} pairs/s, loss {res['loss']:.4f}", flush=True)
  results["mfu"] = m = run_mfu(a, bundle, work)
  from jbt.plan.targets import peak_flops

  nominal = peak_flops(m["device"])
  m["of_measured_peak"] = m["tflops"] / (peak * m["device_count"])
  m["of_nominal_peak"] = m["tflops"] * 1e12 / (nominal * m["device_count"]) if nominal else None
  v = results["variants"]
  print(f"\n{m['device']}; SmolLM2-135M shape (random weights), max_length {a.max_length}, {a.batch} pairs/step, "
        f"{spec['tokens_per_pair']:.0f} real tokens/pair")
  print("| variant | pairs/s | peak host RSS GiB |" + "".join(f" x {x} |" for x in ("trl", "trl-no-gc") if x in v))
  print("|---|---|---|" + "---|" * sum(x in v for x in ("trl", "trl-no-gc")))
  for name, res in v.items():
    row = f"| {name} | {res['pairs_per_s']:.3f} | {res['peak_rss_gib']:.2f} |"
    for base in ("trl", "trl-no-gc"):
      if base in v:
        row += f" {res['pairs_per_s'] / v[base]['pairs_per_s']:.2f} |"
    print(row)
  nominal_txt = f", {m['of_nominal_peak']:.1%} of the nominal {nominal / 1e12:.0f}" if nominal else ""
  print(f"\nMFU, Llama-1B shape at {a.mfu_length} tokens, {a.mfu_batch} pairs/step, remat {a.remat}: "
        f"{m['tflops']:.1f} TFLOP/s = {m['of_measured_peak']:.1%} of the measured {peak:.1f} TFLOP/s{nominal_txt}; "
        f"{m['tokens_per_s']:.0f} tokens/s")
  if a.out:
    Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
