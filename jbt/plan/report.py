"""What jbt.plan prints: a plan's memory per chip, its step time, and the one-line refusal."""

from __future__ import annotations

from typing import Any


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def knobs(cfg: Any, plan: Any) -> str:
  """The settings that would lower the memory per chip, the biggest first."""
  state = plan.params_bytes + plan.opt_bytes
  out = []
  if state > 0.5 * plan.target.memory_bytes:
    out.append("more chips (a larger slice) or tensor parallelism (mesh.shape=(1,-1,T))")
  if cfg.model.remat != "full":
    out.append("model.remat=full")
  micro = cfg.train.batch_size // cfg.opt.grad_accum
  dp = plan.mesh.get("data", 1) * plan.mesh.get("fsdp", 1)
  if micro // 2 >= dp and micro % 2 == 0:
    out.append(f"opt.grad_accum={cfg.opt.grad_accum * 2}")
  out.append(f"data.max_length below {cfg.data.max_length}")
  return ", ".join(out)


def report(cfg: Any, plan: Any, mfu: float) -> None:
  """Prints the plan; raises JbtError (exit 2 under cli_main) when it does not fit."""
  from jbt.errors import JbtError

  t = plan.target
  m = cfg.model
  print(f"model: {plan.model_source}, {plan.params / 1e6:,.1f}M parameters, {m.dtype} compute, remat {m.remat}, "
        f"{plan.attention} attention")
  print(f"target: {t.name}: {t.chips} x {t.chip.kind} ({t.chip.memory_gib:g} GiB, {t.chip.peak_tflops:g} TFLOP/s "
        f"bf16 each{f', {t.num_slices} slices' if t.num_slices > 1 else ''}), mesh {plan.mesh}")
  print(f"batch: {plan.batch_pairs} pairs a step (grad_accum {cfg.opt.grad_accum}), {cfg.data.layout} layout: "
        f"{plan.rows} rows x {plan.row_length} tokens a micro-step (every member at max_length {cfg.data.max_length})")
  state = plan.params_bytes + plan.opt_bytes + plan.batch_bytes
  if plan.total_bytes is not None:
    print(f"per chip: parameters {gib(plan.params_bytes)}, optimizer state {gib(plan.opt_bytes)}, batch "
          f"{gib(plan.batch_bytes)}, temporaries {gib(plan.temp_bytes)}; total {gib(plan.total_bytes)} "
          f"of {gib(t.memory_bytes)} (compiled in {plan.compile_s:.0f} s)")
  step_s = plan.step_seconds(mfu)
  print(f"step: {plan.flops_per_step:.3g} FLOPs (model FLOPs, largest batch): {step_s:.2f} s at {mfu:.0%} MFU, "
        f"{plan.batch_pairs / step_s:.1f} pairs/s")
  dp = plan.mesh.get("data", 1) * plan.mesh.get("fsdp", 1)
  if cfg.train.eval_batch_size % dp:
    print(f"note: train.eval_batch_size ({cfg.train.eval_batch_size}) does not divide over the {dp} data-parallel "
          f"chips; the run needs a multiple of {dp} (--config.train.eval_batch_size={-(-cfg.train.eval_batch_size // dp) * dp})")
  if plan.fits:
    spare = t.memory_bytes - plan.total_bytes
    print(f"fits: {gib(spare)} ({spare / t.memory_bytes:.0%}) to spare per chip")
    return
  if plan.total_bytes is not None:
    need = f"{gib(plan.total_bytes)} per chip"
  else:
    print(f"per chip: parameters {gib(plan.params_bytes)}, optimizer state {gib(plan.opt_bytes)}, batch "
          f"{gib(plan.batch_bytes)}; the compiler: {plan.error}")
    need = f"{gib(state)} of state per chip plus temporaries the compiler could not place ({plan.error})"
  raise JbtError(f"does not fit {t.name}: needs {need}, a chip has {gib(t.memory_bytes)}; try {knobs(cfg, plan)}")
