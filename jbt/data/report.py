"""Bad-input policy: skipped and altered pairs are counted by reason, never dropped silently."""

from __future__ import annotations

import collections
import dataclasses

from jbt.errors import JbtError

ON_ERROR_CHOICES = ("skip", "raise")

# How many file:line locations a report keeps per reason; enough to find the problem, few enough
# to print on one line.
MAX_LOCATIONS = 3


class BadRecord(Exception):
  """One record cannot become a pair. Caught by the loader and turned into a skip or a JbtError.

  Attributes:
    reason: a short stable key used for counting (e.g. "missing_field", "empty_response").
    message: what is wrong, naming the field.
  """

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason
    self.message = message

  def __reduce__(self):
    # Exceptions pickle their args by default; this one has two, so say how to rebuild it (it
    # travels back from grain worker processes).
    return (BadRecord, (self.reason, self.message))


def check_on_error(on_error: str) -> None:
  """Raises JbtError unless on_error is a known policy."""
  if on_error not in ON_ERROR_CHOICES:
    raise JbtError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


@dataclasses.dataclass
class DataReport:
  """What loading or tokenizing did besides producing pairs.

  Attributes:
    skipped: pairs dropped, by reason.
    locations: the first few "file:line" locations of each skip reason.
    altered: pairs kept but changed (e.g. "prompt_truncated"), by kind.
    excluded: records left out on purpose (e.g. "other_split"), by kind; not errors.
  """

  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  locations: dict = dataclasses.field(default_factory=dict)
  altered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  excluded: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def n_skipped(self) -> int:
    return sum(self.skipped.values())

  def skip(self, reason: str, location: str) -> None:
    """Counts one skipped pair and remembers where it was if it is among the first few."""
    self.skipped[reason] += 1
    where = self.locations.setdefault(reason, [])
    if len(where) < MAX_LOCATIONS:
      where.append(location)

  def handle(self, error: BadRecord, location: str, on_error: str) -> None:
    """Applies the on_error policy to one bad record: count it, or stop with a JbtError."""
    if on_error == "raise":
      raise JbtError(f"{location}: {error.message}")
    self.skip(error.reason, location)

  def merge(self, other: DataReport) -> None:
    """Adds another report's counts into this one (keeping the first locations)."""
    for reason, n in other.skipped.items():
      self.skipped[reason] += n
      where = self.locations.setdefault(reason, [])
      where.extend(other.locations.get(reason, [])[: MAX_LOCATIONS - len(where)])
    self.altered.update(other.altered)
    self.excluded.update(other.excluded)

  def summary(self) -> str:
    """One line for logs, e.g. "skipped 2 (empty_response 2 at a.jsonl:3, a.jsonl:9); altered: ..."."""
    parts = []
    if self.skipped:
      reasons = ", ".join(
          f"{r} {n} at {', '.join(self.locations.get(r, []))}"
          for r, n in sorted(self.skipped.items()))
      parts.append(f"skipped {self.n_skipped} ({reasons})")
    else:
      parts.append("skipped 0")
    if self.altered:
      parts.append("altered: " + ", ".join(f"{k} {n}" for k, n in sorted(self.altered.items())))
    if self.excluded:
      parts.append("excluded: " + ", ".join(f"{k} {n}" for k, n in sorted(self.excluded.items())))
    return "; ".join(parts)
