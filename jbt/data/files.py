"""Reading local data files record by record, with a location for every record.

Each reader yields (location, record) where record is a decoded JSON value, or a BadRecord when
the bytes at that location cannot be decoded. Locations are "path:line" (1-based); for parquet
the number is the row.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

from jbt.data.report import BadRecord
from jbt.errors import JbtError

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")

Located = tuple[str, Any]


def file_kind(path: Path) -> str | None:
  """The supported suffix the file name ends with, or None."""
  name = path.name.lower()
  for suffix in SUFFIXES:
    if name.endswith(suffix):
      return suffix
  return None


def read_records(path: Path) -> Iterator[Located]:
  """Yields (location, record or BadRecord) for every record of one supported file."""
  kind = file_kind(path)
  if kind == ".parquet":
    yield from _read_parquet(path)
  elif kind in (".jsonl", ".jsonl.gz"):
    yield from _read_json_lines(path)
  elif kind in (".json", ".json.gz"):
    yield from _read_json(path)
  else:
    raise JbtError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")


def _open(path: Path):
  return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


# Decompression failures surface while reading, not at open.
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _decode_line(raw: bytes) -> Any:
  """The JSON value of one line, or the BadRecord saying why it has none."""
  try:
    # utf-8-sig: tolerate the byte-order mark some editors put at the start of a file.
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    return BadRecord("not_utf8", f"not UTF-8 text (byte {e.start + 1} of the line)")
  text = text.rstrip("\r\n")  # else an error at the end of the line is reported at column 1 of the next
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # "Invalid control character at"
    where = "the end of the line" if e.pos >= len(text) else f"column {e.colno}"
    return BadRecord("malformed_json", f"malformed JSON: {msg} at {where}")


def _read_json_lines(path: Path) -> Iterator[Located]:
  line_no = 0
  try:
    with _open(path) as f:
      for line_no, raw in enumerate(f, 1):
        if raw.strip():
          yield f"{path}:{line_no}", _decode_line(raw)
  except _READ_ERRORS as e:
    yield f"{path}:{line_no + 1}", BadRecord(
        "unreadable_file", f"cannot read the rest of the file: {type(e).__name__}: {e}")


def _read_json(path: Path) -> Iterator[Located]:
  """A .json file holds either one JSON array of records (HALOs' writers) or JSON lines."""
  try:
    with _open(path) as f:
      data = f.read()
  except _READ_ERRORS as e:
    raise JbtError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    if data.lstrip().startswith(b"["):
      line = data.count(b"\n", 0, e.start) + 1
      yield f"{path}:{line}", BadRecord("not_utf8", "not UTF-8 text; the file was not read")
      return
    text = None
  if text is None or not text.lstrip().startswith("["):
    for line_no, raw in enumerate(data.split(b"\n"), 1):
      if raw.strip():
        yield f"{path}:{line_no}", _decode_line(raw)
    return
  yield from _iter_json_array(path, text)


def _iter_json_array(path: Path, text: str) -> Iterator[Located]:
  """Decodes the array element by element so each record keeps the line it starts on."""
  decoder = json.JSONDecoder()
  pos = text.index("[") + 1
  line, counted_to = 1, 0

  def line_at(p: int) -> int:
    nonlocal line, counted_to
    line += text.count("\n", counted_to, p)
    counted_to = p
    return line

  def skip_space(p: int) -> int:
    while p < len(text) and text[p] in " \t\r\n":
      p += 1
    return p

  pos = skip_space(pos)
  if pos < len(text) and text[pos] == "]":
    return
  while True:
    try:
      record, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      yield f"{path}:{line_at(e.pos)}", BadRecord(
          "malformed_json", f"malformed JSON: {e.msg}; the rest of the file was not read")
      return
    yield f"{path}:{line_at(pos)}", record
    pos = skip_space(end)
    if pos < len(text) and text[pos] == ",":
      pos = skip_space(pos + 1)
      continue
    if pos < len(text) and text[pos] == "]":
      return
    yield f"{path}:{line_at(pos)}", BadRecord(
        "malformed_json", "malformed JSON: expected ',' or ']'; the rest of the file was not read")
    return


def _read_parquet(path: Path) -> Iterator[Located]:
  import pyarrow.parquet as pq  # Deferred: only parquet users pay for the import.

  try:
    parquet = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files.
    raise JbtError(f"{path}: cannot read parquet: {type(e).__name__}: {e}") from None
  row = 0
  for batch in parquet.iter_batches(batch_size=4096):
    for record in batch.to_pylist():
      row += 1
      yield f"{path}:{row}", record
