"""HF directory or GGUF file -> jbt model checkpoint.

    python convert/hf_to_jbt.py --hf DIR_OR_GGUF --out CKPT_DIR [--num_labels 2|1] [--overwrite]

A ...ForCausalLM checkpoint gets a fresh reward head (normal(0, initializer_range)); a
...ForSequenceClassification checkpoint keeps its head. Tensors are read one at a time.
"""

from __future__ import annotations

import argparse

from jbt.errors import ArgParser, cli_main
from jbt.tools.convert import hf_to_jbt


@cli_main
def main(argv: list[str] | None = None) -> None:
  ap = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hf", required=True, help="Hugging Face model directory or .gguf file")
  ap.add_argument("--out", required=True, help="output jbt checkpoint directory")
  ap.add_argument("--num_labels", type=int, choices=(1, 2), default=None,
                  help="reward head size for a fresh head (default 2, HALOs)")
  ap.add_argument("--seed", type=int, default=0, help="seed of a fresh reward head")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  a = ap.parse_args(argv)
  cfg = hf_to_jbt(a.hf, a.out, num_labels=a.num_labels, seed=a.seed, overwrite=a.overwrite)
  print(f"wrote {a.out}: {cfg.family}, {cfg.num_layers} layers, {cfg.num_params() / 1e6:.1f}M parameters, "
        f"{cfg.num_labels}-label head")


if __name__ == "__main__":
  main()
