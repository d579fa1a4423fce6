"""python -m jbt.plan --config CONFIG --target tpu:v5e-16 [--config.a.b=value ...] [--shape llama3-8b] [--mfu 0.4]

Compiles the training step CONFIG would run for the target's chips, on this machine (no TPU, no
weights, no data), and prints per chip: parameter, optimizer-state, batch, temporary (activations,
gradients, workspace) and total memory against the chip's, whether it fits, FLOPs per step and
the step time and pairs/s they imply at the given model FLOPs utilisation. The batch is the
largest the config can make: every member at data.max_length tokens, nothing shared.

The model's sizes come from model.init_from's config files when they are on this machine, else
from a published shape its name points at (or --shape). A config that does not fit exits 2 with
one line: what it needs per chip, what the chip has, and the settings that would help.
"""

from jbt.runtime import hugepages

hugepages.restart_with_hugepages()

from absl import flags  # noqa: E402

_TARGET = flags.DEFINE_string("target", None, "tpu:v5e-16, tpu:v5p-128, tpu:v4-32, tpu:2xv5e-16, ...")
_SHAPE = flags.DEFINE_string("shape", None, "a published model shape (llama3-1b, llama3-8b, llama3-70b) instead "
                             "of model.init_from's files")
_MFU = flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation the step time and pairs/s assume")


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def knobs(cfg, plan) -> str:
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


def report(cfg, plan, mfu: float) -> None:
  from jbt.errors import JbtError

  t = plan.target
  m = cfg.model
  print(f"model: {plan.model_source}, {plan.params / 1e6:,.1f}M parameters, {m.dtype} compute, remat {m.remat}")
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


def main(argv: list[str]) -> None:
  from absl import logging as absl_logging

  from jbt.configs.flags import CONFIG
  from jbt.errors import JbtError, cli_main
  from jbt.plan import compile as plan_compile
  from jbt.plan import targets

  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)

  def run() -> None:
    if not _TARGET.value:
      raise JbtError("--target is required, e.g. --target tpu:v5e-16")
    target = targets.parse(_TARGET.value)
    plan = plan_compile.compile_plan(CONFIG.value, target, shape=_SHAPE.value)
    report(CONFIG.value, plan, _MFU.value)

  cli_main(run)()


if __name__ == "__main__":
  from absl import app

  from jbt.configs.flags import parse_flags_with_usage

  app.run(main, flags_parser=parse_flags_with_usage)
