"""One error type for user-facing failures, and the CLI wrapper that prints it."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2


class JbtError(Exception):
  """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def cli_main(fn: F) -> F:
  """Wraps a command-line entry point so a JbtError becomes one line on stderr and exit 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except JbtError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  return wrapper  # type: ignore[return-value]


class ArgParser(argparse.ArgumentParser):
  """argparse whose usage errors become a JbtError: one `error:` line and exit 2 under cli_main."""

  def error(self, message: str) -> None:  # type: ignore[override]
    raise JbtError(message)
