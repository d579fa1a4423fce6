"""The planning table of docs/planning.md: jbt.plan for Llama-3 shapes at several lengths and targets.

    python scripts/plan_table.py [--only 8b]

Each row compiles the train step of a shipped config for the target (python -m jbt.plan, in this
process) with the overrides shown, and prints one markdown row: model, max_length, target,
settings, GiB per chip (parameters + optimizer state + temporaries), fits, the predicted pairs/s
at 40% MFU, and compile seconds. Needs libtpu and the CUDA plugin (pip install -e '.[plan,plan-gpu]');
minutes per row.
"""

from __future__ import annotations

import argparse
import sys

ROWS = [  # (config, shape, max_length, target, overrides)
    ("tpu_llama3_8b", "llama3-1b", 2048, "tpu:v5e-4", {"model.remat": "full", "train.batch_size": 32}),
    ("tpu_llama3_8b", "llama3-1b", 8192, "tpu:v5e-4", {"model.remat": "full", "opt.grad_accum": 8}),
    ("tpu_llama3_8b", "llama3-8b", 2048, "tpu:v5e-16", {"model.remat": "full"}),
    ("tpu_llama3_8b", "llama3-8b", 4096, "tpu:v5e-16", {"model.remat": "full", "opt.grad_accum": 2}),
    ("tpu_llama3_8b", "llama3-8b", 4096, "tpu:v5e-32", {"model.remat": "full"}),
    ("tpu_llama3_8b", "llama3-8b", 4096, "tpu:v5p-32", {"model.remat": "dots"}),
    ("tpu_llama3_8b", "llama3-8b", 8192, "tpu:v5p-32", {"model.remat": "full"}),
    ("tpu_llama3_70b", "llama3-70b", 2048, "tpu:v5p-128", {}),
    ("tpu_llama3_70b", "llama3-70b", 8192, "tpu:v5p-128", {}),
    ("gpu_llama3_8b", "llama3-8b", 4096, "gpu:h100x8", {"model.remat": "dots"}),
    ("gpu_llama3_8b", "llama3-8b", 4096, "gpu:h100x8", {}),
    ("gpu_llama3_8b", "llama3-8b", 8192, "gpu:h100x8", {"model.remat": "full"}),
    # the big configs as shipped (max_length 1250), on the hardware their docstrings name
    ("gpu_llama3_8b", "llama3-8b", 1250, "gpu:h100x8", {}),
    ("tpu_llama3_8b", "llama3-8b", 1250, "tpu:v4-32", {}),
    ("tpu_llama3_70b", "llama3-70b", 1250, "tpu:v5p-128", {}),
    # 8B at 4096 on the smallest v5e slice that holds its state, with every memory setting
    ("tpu_llama3_8b", "llama3-8b", 4096, "tpu:v5e-16",
     {"model.remat": "full", "opt.grad_accum": 2, "model.mlp_chunk": 1024}),
]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default="", help="rows whose command contains this (e.g. llama3-70b, gpu:)")
  ap.add_argument("--mfu", type=float, default=0.4)
  args = ap.parse_args()

  import importlib

  from jbt.plan import compile as plan_compile
  from jbt.plan import targets

  print("| model | max_length | target | settings | GiB per chip (params + opt + temp = total) | fits | "
        f"pairs/s at {args.mfu:.0%} MFU | compile s | command |")
  print("|---|---|---|---|---|---|---|---|---|")
  for config, shape, length, target, over in ROWS:
    flags = " ".join(f"--config.{k}={v}" for k, v in over.items())
    cmd = (f"`python -m jbt.plan --config configs/{config}.py --shape {shape} --target {target} "
           f"--config.data.max_length={length} --config.data.max_prompt_length={length // 2 if length != 1250 else 625}"
           f"{' ' + flags if flags else ''}`")
    if args.only not in cmd:
      continue
    cfg = importlib.import_module(f"jbt.configs.{config}").get_config()
    cfg.data.max_length, cfg.data.max_prompt_length = length, length // 2 if length != 1250 else 625
    for k, v in over.items():
      section, field = k.split(".")
      cfg[section][field] = v
    plan = plan_compile.compile_plan(cfg, targets.parse(target), shape=shape)
    g = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
    mem = (f"{g(plan.params_bytes)} + {g(plan.opt_bytes)} + {g(plan.temp_bytes)} = {g(plan.total_bytes)}"
           if plan.total_bytes is not None else f"{g(plan.params_bytes)} + {g(plan.opt_bytes)} + out of memory")
    settings = ", ".join(f"{k}={v}" for k, v in over.items()) or "as shipped"
    print(f"| {shape} | {length} | {target} | {settings} | {mem} | {'yes' if plan.fits else 'no'} | "
          f"{cfg.train.batch_size / plan.step_seconds(args.mfu):.1f} | {plan.compile_s:.0f} | {cmd} |", flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
