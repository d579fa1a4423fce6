"""Llama-3-8B-class reward model at max_length 4096 on a TPU v5e-16 slice (16 chips of 16 GB, 4 hosts).

Hardware: TPU v5e-16; the same command runs on every host (jax.distributed auto-detects the
slice). The float32 weights and AdamW state take 7.0 GiB of each chip's 15.75, so everything else
is set for memory: full remat, two micro-steps of 16 pairs (one 8,192-token row per chip at
worst), and the MLP over 1,024-token chunks of a row. The plan places the step in 15.4 GiB per chip
(docs/planning.md), 2% to spare; a v5e-32 with configs/tpu_llama3_8b.py has far more room.

    python -m jbt.plan --config configs/tpu_v5e_llama3_8b.py --target tpu:v5e-16
    gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \\
      "cd jbt && python -m jbt.train --config configs/tpu_v5e_llama3_8b.py \\
         --config.model.init_from=/mnt/models/Meta-Llama-3-8B-Instruct --config.ckpt.cache_dir=gs://BUCKET/jbt"
"""

from jbt.configs import tpu_llama3_8b


def get_config():
  c = tpu_llama3_8b.get_config()
  c.data.max_length = 4096
  c.data.max_prompt_length = 2048
  c.model.remat = "full"
  c.model.mlp_chunk = 1024
  c.opt.grad_accum = 2
  c.ckpt.exp_name = "llama3_8b_ultrabin_v5e"
  return c
