"""Llama-3-8B-class reward model on a TPU v5p-32 / v4-32 pod slice (16 chips, 4 hosts).

Hardware: a pod slice; the same command runs on every host (jax.distributed auto-detects the
slice). FSDP over 16 chips; bfloat16 compute, full layer remat. Check the fit first:

    python -m jbt.plan --config configs/tpu_llama3_8b.py --target tpu:v4-32

Long context (splash attention, memory linear in the row): members of 32,768 tokens on a v5p-128
fit with 21.49 GiB to spare per chip (docs/planning.md):

    python -m jbt.plan --config configs/tpu_llama3_8b.py --target tpu:v5p-128 \
      --config.data.max_length=32768 --config.data.max_prompt_length=1024 --config.train.batch_size=128

    gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
      "cd jbt && python -m jbt.train --config configs/tpu_llama3_8b.py \
         --config.model.init_from=/mnt/models/Meta-Llama-3-8B-Instruct --config.ckpt.cache_dir=gs://BUCKET/jbt"

Checkpoints must go to storage every host sees (a GCS bucket or a shared filesystem). Expected:
about HALOs' accuracy on ultrabin for the same model and steps.
"""

from jbt.configs import gpu_llama3_8b


def get_config():
  c = gpu_llama3_8b.get_config()  # the same run; only the paths and the launch differ
  c.model.init_from = "/mnt/models/Meta-Llama-3-8B-Instruct"
  c.dist.auto = True
  c.ckpt.exp_name = "llama3_8b_ultrabin_tpu"
  return c
