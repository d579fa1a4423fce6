"""Data specs -> pairs: resolving specs, detecting each file's format, and choosing the split.

A data spec is a hub name (hh, hh_helpful, hh_harmless, shp, ultrabin), a file, a directory
(its supported files, sorted), or a glob. Every spec is resolved before anything is read, so a
spec that matches nothing fails at once.

Splits: a pair belongs to its own split when it has one: the hub split it was downloaded from,
or the "split" field of its record. Pairs without one go to both splits, unless eval_fraction is
set: then a seeded random eval_fraction of their prompts (all pairs of a prompt together) is held
out as "test" and the rest is "train".
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Sequence

import numpy as np

from jbt.data import files, hub
from jbt.data.records import CONVERTERS, BadRecord, Pair, detect_format
from jbt.data.report import DataReport, check_on_error
from jbt.errors import JbtError

SPLITS = ("train", "test")
# Record split values other tools write for held-out data.
_SPLIT_ALIASES = {"eval": "test", "validation": "test", "valid": "test", "dev": "test"}

# HALOs record types that are not pairwise preferences.
_NOT_PAIRWISE = ("binary_feedback", "sample", "score_feedback")


@dataclasses.dataclass(frozen=True)
class Source:
  """One resolved input: a hub data set (kind "hub") or a local file (kind "file")."""

  kind: str
  name: str


def resolve_spec(spec: str) -> list[Source]:
  """The sources one spec names; JbtError when it names nothing."""
  if spec in hub.HUB_DATASETS:
    return [Source("hub", spec)]
  path = Path(spec).expanduser()
  if path.is_file():
    if files.file_kind(path) is None:
      raise JbtError(f"data file {spec}: unsupported type; use one of {', '.join(files.SUFFIXES)}")
    return [Source("file", str(path))]
  if path.is_dir():
    found = sorted(p for p in path.iterdir() if p.is_file() and files.file_kind(p))
    if not found:
      raise JbtError(f"data directory {spec} holds no {', '.join(files.SUFFIXES)} file")
    return [Source("file", str(p)) for p in found]
  if glob.has_magic(spec):
    found = sorted(p for p in glob.glob(str(path), recursive=True)
                   if Path(p).is_file() and files.file_kind(Path(p)))
    if not found:
      raise JbtError(f"data spec {spec} matches no {', '.join(files.SUFFIXES)} file")
    return [Source("file", p) for p in found]
  raise JbtError(f"data spec {spec!r} is not a file, a directory, a glob or a hub name "
                 f"({', '.join(hub.HUB_DATASETS)})")


def load_file(path: str, report: DataReport, on_error: str) -> list[Pair]:
  """All pairs of one local file, its format detected from its first usable record."""
  pairs: list[Pair] = []
  fmt = None
  n_records = 0
  for location, record in files.read_records(Path(path)):
    n_records += 1
    try:
      if isinstance(record, BadRecord):
        raise record
      if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
      if fmt is None:
        if record.get("type") in _NOT_PAIRWISE:
          raise JbtError(f"{location}: HALOs {record['type']!r} records are not pairwise "
                         "preferences; label them into pairwise_feedback first")
        fmt = detect_format(record)
        if fmt is None:
          raise BadRecord("unknown_format",
                          f"cannot tell the format from a record with keys {sorted(record)[:8]}; "
                          "expected HALOs pairwise feedback (prompt, output_A, output_B, label), "
                          "HH transcripts (chosen, rejected), TRL (prompt, chosen, rejected) or ranked "
                          "(prompt, responses, scores)")
      got = CONVERTERS[fmt](record, location)
      pairs.extend(got if isinstance(got, list) else [got])
    except BadRecord as e:
      report.handle(e, location, on_error)
  if n_records == 0:
    raise JbtError(f"data file {path} holds no records")
  if fmt is None:
    raise JbtError(f"data file {path}: no record in a known format; {report.summary()}")
  return pairs


def _normalize_split(split: str | None) -> str | None:
  return None if split is None else _SPLIT_ALIASES.get(split, split)


def _held_out_groups(pairs: Sequence[Pair], eval_fraction: float, seed: int) -> set[str]:
  groups = list(dict.fromkeys(p.group for p in pairs))
  n_test = int(round(eval_fraction * len(groups)))
  if eval_fraction > 0 and len(groups) > 1:
    n_test = min(max(n_test, 1), len(groups) - 1)
  order = np.random.default_rng(seed).permutation(len(groups))
  return {groups[i] for i in order[:n_test]}


TIES = ("drop", "tie_loss")


def load_pairs(specs: Sequence[str], *, split: str = "train", on_error: str = "skip",
               eval_fraction: float = 0.0, seed: int = 1, ties: str = "drop") -> tuple[list[Pair], DataReport]:
  """Loads the pairs of one split from several data specs.

  Args:
    specs: hub names, files, directories or globs (cfg.data.train or cfg.data.eval).
    split: "train" or "test".
    on_error: "skip" counts bad records in the report; "raise" stops at the first with a JbtError
      naming file, line and field.
    eval_fraction: when > 0, the fraction of prompts without their own split held out as "test".
    seed: seed of the held-out draw (use the same for the train and the test call).
    ties: what to do with pairs marked as ties (HALOs' label 0.5, equal scores): "drop" leaves
      them out ("excluded: tie N" in the report), "tie_loss" keeps them ("altered: tie N") for a
      tie-aware loss.

  Returns:
    The pairs in spec, file and record order, and the report of what was skipped or left out.
  """
  check_on_error(on_error)
  if ties not in TIES:
    raise JbtError(f"data.ties must be one of {', '.join(TIES)}, got {ties!r}")
  if split not in SPLITS:
    raise JbtError(f"split must be one of {SPLITS}, got {split!r}")
  if not 0.0 <= eval_fraction < 1.0:
    raise JbtError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
  if not specs:
    raise JbtError("no data specs given")
  if isinstance(specs, str):
    specs = [specs]
  sources = [source for spec in specs for source in resolve_spec(spec)]

  report = DataReport()
  # (pair, its own split or None), in the order read.
  loaded: list[tuple[Pair, str | None]] = []
  for source in sources:
    if source.kind == "hub":
      own = None if source.name in hub.TRAIN_ONLY else split
      loaded.extend((p, own) for p in hub.load_hub(source.name, split, report, on_error))
    else:
      loaded.extend((p, _normalize_split(p.split)) for p in load_file(source.name, report, on_error))

  test_groups: set[str] = set()
  if eval_fraction > 0:
    test_groups = _held_out_groups([p for p, s in loaded if s is None], eval_fraction, seed)
  pairs = []
  for pair, own in loaded:
    if own is None and eval_fraction > 0:
      own = "test" if pair.group in test_groups else "train"
    if own is not None and own != split:
      report.excluded["other_split"] += 1
    elif pair.tie and ties == "drop":
      report.excluded["tie"] += 1
    else:
      if pair.tie:
        report.altered["tie"] += 1
      pairs.append(pair)
  if not pairs:
    raise JbtError(f"no {split} pairs in {', '.join(specs)}; {report.summary()}")
  return pairs, report
