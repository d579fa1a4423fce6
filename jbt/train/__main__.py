"""python -m jbt.train --config configs/NAME.py (or a packaged config's NAME) [--config.a.b=value ...]"""

from jbt.runtime import host_memory

host_memory.restart()  # first, before jax is imported: the restart would redo that work


def main(argv: list[str]) -> None:
  from absl import logging as absl_logging

  from jbt.configs.flags import CONFIG
  from jbt.errors import cli_main
  from jbt.train.trainer import run

  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  cli_main(run)(CONFIG.value)


if __name__ == "__main__":
  from absl import app

  from jbt.configs.flags import parse_flags_with_usage

  app.run(main, flags_parser=parse_flags_with_usage)
