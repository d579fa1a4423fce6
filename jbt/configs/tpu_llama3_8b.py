"""Llama-3-8B-class reward model on a TPU v5p-32 / v4-32 pod slice (16 chips, 4 hosts).

Hardware: a pod slice; the same command runs on every host (jax.distributed auto-detects the
slice). FSDP over 16 chips; bfloat16 compute, full layer remat. Check the fit first:

    python -m jbt.plan --config configs/tpu_llama3_8b.py --target tpu:v4-32

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
