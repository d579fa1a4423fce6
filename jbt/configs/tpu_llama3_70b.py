"""Llama-3-70B-class reward model on a TPU v5p-128 pod slice (64 chips, 16 hosts).

Hardware: TPU v5p-128; the same command runs on every host (jax.distributed auto-detects the
slice). FSDP over all 64 chips (float32 weights and AdamW moments, about 1.1 TB, split 64 ways),
bfloat16 compute, full remat (only each layer's input is kept for the backward pass), 64 pairs
a step: one pair per chip, the fewest the 64-way split allows. Check the fit first:

    python -m jbt.plan --config configs/tpu_llama3_70b.py --target tpu:v5p-128

    gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \\
      "cd jbt && python -m jbt.train --config configs/tpu_llama3_70b.py \\
         --config.model.init_from=/mnt/models/Meta-Llama-3-70B-Instruct --config.ckpt.cache_dir=gs://BUCKET/jbt"

Checkpoints must go to storage every host sees (a GCS bucket or a shared filesystem).
"""

from jbt.configs import gpu_llama3_8b


def get_config():
  c = gpu_llama3_8b.get_config()
  c.model.init_from = "/mnt/models/Meta-Llama-3-70B-Instruct"
  c.model.remat = "full"
  c.train.batch_size = 64
  c.train.eval_batch_size = 64
  c.dist.auto = True
  c.ckpt.exp_name = "llama3_70b_ultrabin_tpu"
  return c
