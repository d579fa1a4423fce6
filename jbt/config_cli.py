"""The --config flag (ml_collections config_flags) with one-line errors instead of tracebacks."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from jbt.errors import EXIT_USER_ERROR

CONFIG = config_flags.DEFINE_config_file("config", None, "config file with get_config(), e.g. configs/tiny.py",
                                         lock_config=True)


def parse_flags_with_usage(argv: list[str]) -> list[str]:
  """absl's parser; a bad --config or --config.x.y=v (unknown key, wrong type) is one line, exit 2."""
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # config_flags reports an unknown --config.x.y as AttributeError, a bad value as a flags error.
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, (AttributeError, KeyError)):
      msg = f"unknown config field {msg.strip(chr(34)).strip(chr(39))} (see configs/default.py for every field)"
    print(f"error: {msg.splitlines()[0]}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  if CONFIG.value is None:
    print("error: --config is required, e.g. --config configs/tiny.py", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  return rest
