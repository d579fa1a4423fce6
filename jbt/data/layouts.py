"""Batch layouts: how the P pairs of one batch are laid out in rows of token ids.

Both layouts produce the batch contract of jbt.data (tokens, segment_ids, positions,
chosen_index, rejected_index, pair_mask, plus host-side stats). A layout is a function
(data, pair_ids, settings) -> batch; a future "shared_prompt" layout (prompt once, chosen and
rejected as two branches, using TokenizedPairs.shared_prefix) plugs in beside them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jbt.data.tokenized import TokenizedPairs
from jbt.errors import JbtError

LAYOUTS = ("padded", "packed")

# Arrays the model and loss consume; the rest of a batch dict is host-side statistics.
DEVICE_KEYS = ("tokens", "segment_ids", "positions", "chosen_index", "rejected_index", "pair_mask")
# n_pairs: real pairs in the batch; n_tokens: real (non-padding) tokens; pair_ids: index of each
# pair slot into the tokenized data, -1 for filler slots.
STAT_KEYS = ("n_pairs", "n_tokens", "pair_ids")


@dataclasses.dataclass(frozen=True)
class LayoutSettings:
  """Shape rules of a layout, fixed for a run so that jit compiles few shapes.

  Attributes:
    layout: "padded" or "packed".
    pairs_per_batch: P, pairs per batch on this process.
    max_length: longest member sequence (padded rows are this long, or less, see below).
    length_multiple: padded layout only: None keeps L = max_length; an int m makes L the batch's
      longest member rounded up to a multiple of m (capped at max_length), so at most
      ceil(max_length / m) shapes.
    pack_length: packed layout only: the row length L. Both members of a pair share a row, so it
      must hold the longest pair; None means 2 * max_length, which holds every pair.
    row_bucket: packed layout only: the row count R is the rows the pairs need rounded up to a
      multiple of this int, or to a power of two with "pow2". With row_bucket = P there is a
      single shape. On HH pairs with P = 32 the rows needed vary over about a 2x range, so 4
      gives 2-3 shapes at 60-80% real tokens, 2 gives 3-4 shapes at 80-90%
      (scripts/bench_data.py).
  """

  layout: str
  pairs_per_batch: int
  max_length: int
  length_multiple: int | None = None
  pack_length: int | None = None
  row_bucket: int | str = 4

  @property
  def row_length(self) -> int:
    if self.layout == "packed":
      return self.pack_length or 2 * self.max_length
    return self.max_length

  def check(self, data: TokenizedPairs) -> None:
    """JbtError when the settings cannot hold the data."""
    if self.layout not in LAYOUTS:
      hint = " (not implemented yet)" if self.layout == "shared_prompt" else ""
      raise JbtError(f"layout must be one of {LAYOUTS}, got {self.layout!r}{hint}")
    if self.row_bucket != "pow2" and not (isinstance(self.row_bucket, int) and self.row_bucket > 0):
      raise JbtError(f"row_bucket must be a positive int or 'pow2', got {self.row_bucket!r}")
    if self.length_multiple is not None and self.length_multiple <= 0:
      raise JbtError(f"length_multiple must be positive, got {self.length_multiple}")
    if len(data) and int(data.lengths.max()) > self.max_length:
      raise JbtError(f"a tokenized sequence has {int(data.lengths.max())} tokens, more than "
                     f"max_length {self.max_length}; tokenize with the same max_length")
    if self.layout == "packed" and len(data):
      longest_pair = int(data.lengths.sum(axis=1).max())
      if longest_pair > self.row_length:
        raise JbtError(f"pack_length {self.row_length} cannot hold a pair of {longest_pair} tokens "
                       "(both members share a row); raise pack_length or leave it unset")


def bucket_rows(n_rows: int, rule: int | str) -> int:
  """Rows of a packed batch: n_rows rounded up by the rule (a multiple, or "pow2"); at least 1."""
  n_rows = max(n_rows, 1)
  if rule == "pow2":
    return 1 << (n_rows - 1).bit_length()
  return -(-n_rows // rule) * rule


def _empty(n_rows: int, length: int, pad: int, n_pairs: int) -> dict[str, np.ndarray]:
  return {
      "tokens": np.full((n_rows, length), pad, dtype=np.int32),
      "segment_ids": np.zeros((n_rows, length), dtype=np.int32),
      "positions": np.zeros((n_rows, length), dtype=np.int32),
      "chosen_index": np.zeros(n_pairs, dtype=np.int32),
      "rejected_index": np.zeros(n_pairs, dtype=np.int32),
      "pair_mask": np.zeros(n_pairs, dtype=np.float32),
  }


def _put(batch: dict[str, np.ndarray], row: int, start: int, seq: np.ndarray, segment: int) -> int:
  """Writes one sequence at (row, start); returns the flat index of its last token."""
  n = len(seq)
  batch["tokens"][row, start:start + n] = seq
  batch["segment_ids"][row, start:start + n] = segment
  batch["positions"][row, start:start + n] = np.arange(n, dtype=np.int32)
  return row * batch["tokens"].shape[1] + start + n - 1


def _stats(batch: dict[str, np.ndarray], data: TokenizedPairs, pair_ids: np.ndarray,
           n_slots: int) -> dict[str, np.ndarray]:
  batch["pair_mask"][: len(pair_ids)] = 1.0
  batch["n_pairs"] = np.int64(len(pair_ids))
  batch["n_tokens"] = np.int64(data.lengths[pair_ids].sum())
  ids = np.full(n_slots, -1, dtype=np.int64)
  ids[: len(pair_ids)] = pair_ids
  batch["pair_ids"] = ids
  return batch


def padded_batch(data: TokenizedPairs, pair_ids: np.ndarray,
                 settings: LayoutSettings) -> dict[str, np.ndarray]:
  """HALOs' layout: rows 0..P-1 hold the chosen members, rows P..2P-1 the rejected, right-padded.

  Pairs beyond len(pair_ids) are fillers: empty rows, indices 0, pair_mask 0.
  """
  n_pairs = settings.pairs_per_batch
  length = settings.max_length
  if settings.length_multiple and len(pair_ids):
    longest = int(data.lengths[pair_ids].max())
    length = min(-(-longest // settings.length_multiple) * settings.length_multiple, length)
  batch = _empty(2 * n_pairs, length, data.pad_token_id, n_pairs)
  for k, i in enumerate(pair_ids):
    batch["chosen_index"][k] = _put(batch, k, 0, data.member(i, 0), 1)
    batch["rejected_index"][k] = _put(batch, n_pairs + k, 0, data.member(i, 1), 1)
  return _stats(batch, data, pair_ids, n_pairs)


def packed_batch(data: TokenizedPairs, pair_ids: np.ndarray,
                 settings: LayoutSettings) -> dict[str, np.ndarray]:
  """Packs whole pairs into rows of pack_length tokens, first-fit decreasing.

  Each pair occupies one span of a row: its chosen member (segment 2q+1) then its rejected
  member (segment 2q+2), where q counts the pairs already in that row. The row count is
  rounded up by row_bucket.
  """
  length = settings.row_length
  sizes = data.lengths[pair_ids].sum(axis=1)
  # Longest first, ties by position, so the packing is a deterministic function of the batch.
  order = np.argsort(-sizes, kind="stable")
  fill = np.zeros(len(pair_ids), dtype=np.int64)  # used length of each opened row
  n_open = 0
  placement = np.zeros((len(pair_ids), 2), dtype=np.int64)  # (row, start) of each pair
  for k in order:
    fits = np.flatnonzero(fill[:n_open] + sizes[k] <= length)
    row = int(fits[0]) if fits.size else n_open
    n_open += not fits.size
    placement[k] = row, fill[row]
    fill[row] += sizes[k]
  n_rows = bucket_rows(n_open, settings.row_bucket)
  batch = _empty(n_rows, length, data.pad_token_id, settings.pairs_per_batch)
  pairs_in_row = np.zeros(n_rows, dtype=np.int32)
  for k in np.argsort(placement[:, 0] * length + placement[:, 1], kind="stable"):
    row, start = (int(x) for x in placement[k])
    i = pair_ids[k]
    segment = 2 * int(pairs_in_row[row]) + 1
    pairs_in_row[row] += 1
    chosen = data.member(i, 0)
    batch["chosen_index"][k] = _put(batch, row, start, chosen, segment)
    batch["rejected_index"][k] = _put(batch, row, start + len(chosen), data.member(i, 1),
                                      segment + 1)
  return _stats(batch, data, pair_ids, settings.pairs_per_batch)


def make_batch(data: TokenizedPairs, pair_ids: np.ndarray,
               settings: LayoutSettings) -> dict[str, np.ndarray]:
  """The batch of the given pairs (at most P of them; the rest of the P slots are fillers)."""
  if settings.layout == "packed":
    return packed_batch(data, pair_ids, settings)
  return padded_batch(data, pair_ids, settings)
