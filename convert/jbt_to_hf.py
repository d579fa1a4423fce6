"""jbt checkpoint -> Hugging Face ...ForSequenceClassification directory.

    python convert/jbt_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--num_labels 2|1] [--overwrite]

--num_labels 2 is HALOs' layout (reward = logit 1); 1 is TRL / OpenRLHF / RewardBench's (reward =
logit 0). Either way the reward is unchanged. The directory appears only once complete.
"""

from __future__ import annotations

import argparse

from jbt.errors import ArgParser, cli_main
from jbt.tools.convert import jbt_to_hf


@cli_main
def main(argv: list[str] | None = None) -> None:
  ap = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", required=True, help="jbt checkpoint directory")
  ap.add_argument("--out", required=True, help="output Hugging Face directory")
  ap.add_argument("--num_labels", type=int, choices=(1, 2), default=None, help="head size (default: as trained)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  a = ap.parse_args(argv)
  jbt_to_hf(a.ckpt, a.out, num_labels=a.num_labels, overwrite=a.overwrite)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
