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

from jbt.runtime import host_memory

host_memory.restart(keep=False)  # JBT_HUGEPAGES=1 or JBT_KEEP_MEMORY=1 only: planning compiles, it does not train

from absl import flags  # noqa: E402

_TARGET = flags.DEFINE_string("target", None, "tpu:v5e-16, tpu:v5p-128, tpu:v4-32, tpu:2xv5e-16, ...")
_SHAPE = flags.DEFINE_string("shape", None, "a published model shape (llama3-1b, llama3-8b, llama3-70b) instead "
                             "of model.init_from's files")
_MFU = flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation the step time and pairs/s assume")


def main(argv: list[str]) -> None:
  from absl import logging as absl_logging

  from jbt.configs.flags import CONFIG
  from jbt.errors import JbtError, cli_main
  from jbt.plan import compile as plan_compile
  from jbt.plan import targets
  from jbt.plan.report import report

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
