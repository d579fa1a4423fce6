"""Quick start: train SmolLM2-135M into a reward model on this machine, then use FINAL/.

    python scripts/demo.py [--config.x.y=value ...]

Trains with configs/demo.py (held-out accuracy is printed before and after training), which
writes .cache/demo/FINAL, a LlamaForSequenceClassification directory; then loads FINAL with
transformers, as HALOs' labeling script or TRL would, and scores new answers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def score_with_transformers(final: Path) -> None:
  import torch
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(str(final))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(final), dtype=torch.float32).eval()
  examples = [
      ("Can you recommend a novel for a long flight?",
       "Of course. A well-loved mystery novel is a good choice; tell me what you enjoyed before and I can narrow it down.",
       "Whatever. Books are boring anyway."),
      ("What should I cook tonight?",
       "Happy to help. A simple vegetable stir fry is quick, healthy and easy to adjust to what you have.",
       "Figure it out yourself. Cooking is pointless."),
  ]
  print(f"\nscoring new answers with transformers from {final} (reward = logits[:, 1]):")
  for prompt, good, bad in examples:
    texts = [tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": a}],
                                     tokenize=False) for a in (good, bad)]
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
      r = model(**enc).logits[:, 1].tolist()
    print(f"  {prompt}\n    {r[0]:+7.3f}  {good[:70]}\n    {r[1]:+7.3f}  {bad[:70]}")


def main() -> None:
  from absl import app, logging as absl_logging

  from jbt.configs.flags import CONFIG, parse_flags_with_usage
  from jbt.errors import cli_main
  from jbt.train import run

  def _main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = CONFIG.value
    cli_main(run)(cfg)
    score_with_transformers(Path(cfg.ckpt.cache_dir) / cfg.ckpt.exp_name / "FINAL")

  if not any(a.startswith("--config=") or a == "--config" for a in sys.argv[1:]):
    sys.argv[1:1] = ["--config", "demo"]
  app.run(_main, flags_parser=parse_flags_with_usage)


if __name__ == "__main__":
  main()
