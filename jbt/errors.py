"""One error type for user-facing failures, and the CLI wrapper that prints it."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process stopped by Ctrl-C


class JbtError(Exception):
  """A problem with the user's input: printed as one line, exit code 2, no traceback."""


class Interrupted(Exception):
  """A run stopped on request (SIGINT / SIGTERM) after saving: printed as one line, exit 130."""


def cli_main(fn: F) -> F:
  """Wraps a command-line entry point so a JbtError becomes one line on stderr and exit 2, and an
  Interrupted run one line and exit 130."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except JbtError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    except Interrupted as e:
      print(str(e), file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)

  return wrapper  # type: ignore[return-value]


class ArgParser(argparse.ArgumentParser):
  """argparse whose usage errors become a JbtError: one `error:` line and exit 2 under cli_main."""

  def error(self, message: str) -> None:  # type: ignore[override]
    raise JbtError(message)
