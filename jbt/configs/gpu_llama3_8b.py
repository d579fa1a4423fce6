"""Llama-3-8B-class reward model on one 8-GPU host (H100/A100 80GB), HALOs' defaults.

Hardware: 8 GPUs with 80 GB each. FSDP (ZeRO-3) over all 8 devices: float32 master weights and
AdamW moments (~128 GB for 8B parameters) are split 8 ways, bfloat16 compute, full layer remat
(only each layer's input is kept for the backward pass): with it the run fits at max_length 1250
up to 8192, which `python -m jbt.plan --config configs/gpu_llama3_8b.py --target gpu:h100x8
--config.data.max_length=4096` shows (docs/planning.md).
Data: UltraFeedback binarized from the hub (or set data.train to local files).

    python -m jbt.train --config configs/gpu_llama3_8b.py --config.model.init_from=/models/Meta-Llama-3-8B-Instruct

On a GPU cluster (several hosts, one process per host; e.g. SLURM), add --config.dist.auto=True
(jax.distributed detects the cluster) or give --config.dist.coordinator=HOST:PORT
--config.dist.num_processes=N --config.dist.process_id=I on each host. Expected: about HALOs'
accuracy on ultrabin for the same model and steps.
"""

from jbt.configs import default


def get_config():
  c = default.get_config()
  c.model.init_from = "/models/Meta-Llama-3-8B-Instruct"
  c.model.dtype = "bfloat16"
  c.model.remat = "full"  # "dots" needs 110.6 GiB per GPU at max_length 4096 (docs/planning.md)
  # The MLP over 8192-token chunks of a row (recomputed in the backward pass): rows up to 8192
  # tokens are unchanged; long-context rows (max_length 32768 on a v5p-128) then fit.
  c.model.mlp_chunk = 8192
  c.data.train = ("ultrabin",)
  c.train.batch_size = 32
  c.train.eval_batch_size = 32
  c.mesh.shape = (1, -1, 1)  # FSDP over every device
  c.ckpt.exp_name = "llama3_8b_ultrabin"
  c.ckpt.save_every = 200
  return c
