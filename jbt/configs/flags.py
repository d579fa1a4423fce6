"""The --config flag (ml_collections config_flags) with one-line errors instead of tracebacks."""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from jbt import configs
from jbt.errors import EXIT_USER_ERROR

CONFIG = config_flags.DEFINE_config_file("config", None, "config file with get_config(), e.g. configs/tiny.py, or "
                                         "a packaged config's name, e.g. tiny", lock_config=True)


def _fail(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def resolve_config_value(value: str) -> str:
  """A --config value as config_flags loads it: an existing file stays; a packaged config's name
  (tiny, tiny.py, configs/tiny.py from any directory) becomes its file; anything else is an error.
  config_flags' "FILE:ARG" form keeps its argument."""
  path, sep, arg = value.partition(":")
  if Path(path).is_file():
    return value
  packaged = configs.packaged_path(path) if (path.count("/") == 0 or Path(path).parent.name == "configs") else None
  if packaged is None:
    _fail(f"--config {value}: no such file, and no packaged config of that name (packaged: "
          f"{', '.join(configs.names())})")
  return f"{packaged}{sep}{arg}"


def _resolve_argv(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, a in enumerate(out):
    if a in ("--config", "-config") and i + 1 < len(out):
      out[i + 1] = resolve_config_value(out[i + 1])
    elif a.startswith(("--config=", "-config=")):
      flag, _, value = a.partition("=")
      out[i] = f"{flag}={resolve_config_value(value)}"
  return out


def parse_flags_with_usage(argv: list[str]) -> list[str]:
  """absl's parser; a bad --config or --config.x.y=v (unknown key, wrong type) is one line, exit 2."""
  try:
    rest = flags.FLAGS(_resolve_argv(argv))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    # config_flags reports an unknown --config.x.y as AttributeError, a bad value as a flags error.
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, (AttributeError, KeyError)):
      # The message may carry a KeyError's repr: escaped quotes and newlines.
      text = msg.replace("\\'", "'").replace("\\n", "\n")
      lines = [line.strip().strip("'\"") for line in text.splitlines() if line.strip()]
      hint = f"; {lines[1]}" if len(lines) > 1 else ""
      msg = f"unknown config field {lines[0]!r}{hint} (see configs/default.py for every field)"
    _fail(msg.splitlines()[0])
  if CONFIG.value is None:
    _fail("--config is required, e.g. --config configs/tiny.py or --config tiny")
  return rest
