"""Batch layouts: how the P pairs of one batch are laid out in rows of token ids.

Every layout produces the batch contract of jbt.data (tokens, segment_ids, positions,
chosen_index, rejected_index, pair_mask, plus host-side stats); "shared_prompt" adds branch_ids.
A layout is a function (data, pair_ids, settings) -> batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jbt.data.chat import pool_position
from jbt.data.token_pairs import TokenizedPairs
from jbt.errors import JbtError

LAYOUTS = ("padded", "packed", "shared_prompt")

# Arrays the model and loss consume in every layout; the rest of a batch dict is host-side
# statistics, except branch_ids, which only shared_prompt batches carry (see device_keys).
DEVICE_KEYS = ("tokens", "segment_ids", "positions", "chosen_index", "rejected_index", "pair_mask", "pair_margin",
               "pair_tie", "chosen_response", "rejected_response", "pair_unit")
BRANCH_KEY = "branch_ids"
# n_pairs: real pairs in the batch; n_tokens: real (non-padding) tokens; pair_ids: index of each
# pair slot into the tokenized data, -1 for filler slots.
STAT_KEYS = ("n_pairs", "n_tokens", "pair_ids")

# branch_ids values: the shared prefix, then the chosen and the rejected member's own tokens.
TRUNK, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2


def device_keys(layout: str) -> tuple[str, ...]:
  """The device arrays of a layout's batches. The trainer compiles on these keys, so padded and
  packed batches never carry a branch_ids array, not even an all-zero one."""
  return DEVICE_KEYS + (BRANCH_KEY,) if layout == "shared_prompt" else DEVICE_KEYS


@dataclasses.dataclass(frozen=True)
class LayoutSettings:
  """Shape rules of a layout, fixed for a run so that jit compiles few shapes.

  Attributes:
    layout: "padded", "packed" or "shared_prompt".
    pairs_per_batch: P, pairs per batch on this process.
    max_length: longest member sequence (padded rows are this long, or less, see below).
    length_multiple: padded layout only: None keeps L = max_length; an int m makes L the batch's
      longest member rounded up to a multiple of m (capped at max_length), so at most
      ceil(max_length / m) shapes.
    pack_length: packed and shared_prompt layouts: the row length L. A pair never spans two rows,
      so L must hold the longest pair: chosen + rejected tokens when packed, shared prefix +
      both remainders (chosen + rejected - prefix) with a shared prompt. None means
      2 * max_length, which holds every pair in both layouts (each member has at most
      max_length tokens); a shared_prompt pair needs 2 * max_length - prefix, so with prompts
      of at least m tokens 2 * max_length - m rows suffice (check() says when one does not).
    row_bucket: packed and shared_prompt layouts: the row count R is the rows the pairs need
      rounded up to a multiple of this int, or to a power of two with "pow2". With row_bucket =
      P there is a single shape. On HH pairs with P = 32 the rows needed vary over about a 2x
      range, so 4 gives 2-3 shapes at 60-80% real tokens, 2 gives 3-4 shapes at 80-90%
      (scripts/bench_data.py).
    length_bucket: packed and shared_prompt layouts. None: rows are pack_length long, filled
      first-fit decreasing (the shape rule above). "geometric" or an int m: the pairs are spread
      over as few rows as hold them, but at least min_rows, longest first onto the emptiest row
      (balanced), and L is the fullest row rounded up to a multiple of m, or with "geometric" to
      one of 8 sizes per doubling above 512 (multiples of 64: ..., 1024, 1152, 1280, ..., 2048,
      2304, ...), at most 12.5% over there and few shapes; never more than pack_length. Meant for attention whose
      cost follows the segments, not the row (jbt.attention), where one long row is as cheap as
      several short ones and padding is the only waste.
    min_rows: with length_bucket, the fewest rows a batch has (the trainer passes this process's
      data-parallel devices, so no device gets an empty row).
    members: shared_prompt layout: the most distinct responses a unit has (max_responses; 2
      without ranked records); pack_length's default is members * max_length.
  """

  layout: str
  pairs_per_batch: int
  max_length: int
  length_multiple: int | None = None
  pack_length: int | None = None
  row_bucket: int | str = 4
  length_bucket: int | str | None = None
  min_rows: int = 1
  members: int = 2

  @property
  def row_length(self) -> int:
    if self.layout in ("packed", "shared_prompt"):
      return self.pack_length or (self.members if self.layout == "shared_prompt" else 2) * self.max_length
    return self.max_length

  def check(self, data: TokenizedPairs) -> None:
    """JbtError when the settings cannot hold the data."""
    if self.layout not in LAYOUTS:
      raise JbtError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.row_bucket != "pow2" and not (isinstance(self.row_bucket, int) and self.row_bucket > 0):
      raise JbtError(f"row_bucket must be a positive int or 'pow2', got {self.row_bucket!r}")
    if self.length_bucket not in (None, "geometric") and not (
        isinstance(self.length_bucket, int) and self.length_bucket > 0):
      raise JbtError(f"length_bucket must be None, 'geometric' or a positive int, got {self.length_bucket!r}")
    if self.min_rows <= 0:
      raise JbtError(f"min_rows must be positive, got {self.min_rows}")
    if self.length_multiple is not None and self.length_multiple <= 0:
      raise JbtError(f"length_multiple must be positive, got {self.length_multiple}")
    if self.pack_length is not None and self.pack_length <= 0:
      raise JbtError(f"pack_length must be positive, got {self.pack_length}")
    if len(data) and int(data.lengths.max()) > self.max_length:
      raise JbtError(f"a tokenized sequence has {int(data.lengths.max())} tokens, more than "
                     f"max_length {self.max_length}; tokenize with the same max_length")
    if self.layout == "padded" or not len(data):
      return
    if self.layout == "shared_prompt" and data.units is not None:
      sizes = np.array([unit_size(r) for r in unit_responses(data, np.arange(len(data)))[3]], dtype=np.int64)
      longest = int(sizes.argmax())
      if sizes[longest] > self.row_length:
        raise JbtError(f"pack_length {self.row_length} cannot hold ranked record {longest} of {int(sizes[longest])} "
                       "tokens (shared prefix + every response's remainder); raise pack_length or leave it unset")
      return
    sizes = pair_sizes(data, np.arange(len(data)), self.layout)
    longest = int(sizes.argmax())
    if sizes[longest] > self.row_length:
      what = ("both members share a row" if self.layout == "packed" else
              f"shared prefix {int(data.shared_prefix[longest])} + both remainders")
      raise JbtError(f"pack_length {self.row_length} cannot hold pair {longest} of "
                     f"{int(sizes[longest])} tokens ({what}); raise pack_length or leave it unset")


def pair_sizes(data: TokenizedPairs, pair_ids: np.ndarray, layout: str) -> np.ndarray:
  """Tokens each pair occupies in a row of a packed or shared_prompt batch."""
  sizes = data.lengths[pair_ids].sum(axis=1).astype(np.int64)
  if layout == "shared_prompt":
    sizes -= data.shared_prefix[pair_ids]
  return sizes


def _common_prefix_all(members: list[np.ndarray]) -> int:
  """Leading tokens all members share."""
  first, n = members[0], min(len(m) for m in members)
  for m in members[1:]:
    differ = np.flatnonzero(m[:n] != first[:n])
    n = int(differ[0]) if differ.size else n
  return n


def unit_responses(data: TokenizedPairs, pair_ids: np.ndarray):
  """The responses of the units the given pairs belong to, each distinct sequence once.

  Pairs of one unit are consecutive in pair_ids (batches hold whole units); a pair without a
  unit is a unit of its own. Returns (chosen_response [n], rejected_response [n]: the batch-wide
  number of each pair's members; pair_unit [n]: the unit slot of each pair; units: per unit slot
  (trunk, members), trunk being the tokens all its members share).
  """
  n = len(pair_ids)
  chosen, rejected, unit_slot = (np.zeros(n, np.int32) for _ in range(3))
  units: list[tuple[int, list[np.ndarray]]] = []
  seen: dict[bytes, int] = {}
  keys = data.units[pair_ids] if data.units is not None else np.arange(n)
  response = 0
  for k, i in enumerate(pair_ids):
    if k == 0 or keys[k] != keys[k - 1]:
      units.append((0, []))
      seen = {}
    for j, out in ((0, chosen), (1, rejected)):
      member = data.member(i, j)
      key = member.tobytes()
      if key not in seen:
        seen[key] = response
        response += 1
        units[-1][1].append(member)
      out[k] = seen[key]
    unit_slot[k] = len(units) - 1
  units = [(_common_prefix_all(members), members) for _, members in units]
  return chosen, rejected, unit_slot, units


def unit_size(unit: tuple[int, list[np.ndarray]]) -> int:
  """Tokens a unit occupies in a shared_prompt row: its trunk once, then each member's rest."""
  trunk, members = unit
  return trunk + sum(len(m) - trunk for m in members)


def max_responses(data: TokenizedPairs) -> int:
  """The most distinct responses one unit has: the branches a shared_prompt row may hold per
  segment (2 without ranked records)."""
  if data.units is None or not len(data):
    return 2
  return max(len(members) for _, members in unit_responses(data, np.arange(len(data)))[3])


def bucket_rows(n_rows: int, rule: int | str) -> int:
  """Rows of a packed batch: n_rows rounded up by the rule (a multiple, or "pow2"); at least 1."""
  n_rows = max(n_rows, 1)
  if rule == "pow2":
    return 1 << (n_rows - 1).bit_length()
  return -(-n_rows // rule) * rule


def bucket_length(n: int, rule: int | str) -> int:
  """Row length for a fullest row of n tokens: a multiple of the int rule, or with "geometric"
  a multiple of 64 up to 512, then the next of 8 sizes per doubling (..., 1024, 1152, 1280, ...,
  1920, 2048, 2304, ...): at most 12.5% over n above 512 tokens, where the rows of a long batch
  lie, and 25% below."""
  n = max(n, 1)
  if rule != "geometric":
    return -(-n // rule) * rule
  if n <= 512:
    return -(-n // 64) * 64
  step = (1 << ((n - 1).bit_length() - 1)) // 8  # an eighth of the power of two below n
  return -(-n // step) * step


def _balanced(sizes: np.ndarray, capacity: int, min_rows: int) -> tuple[np.ndarray, int]:
  """(row, start) of each item spread over the fewest rows (>= min_rows) that hold them, longest
  first onto the emptiest row (ties: the lower row), and the number of rows."""
  order = np.argsort(-sizes, kind="stable")
  n_rows = max(min_rows, -(-int(sizes.sum()) // capacity), 1)
  while True:
    fill = np.zeros(n_rows, dtype=np.int64)
    placement = np.zeros((len(sizes), 2), dtype=np.int64)
    for k in order:
      row = int(fill.argmin())
      placement[k] = row, fill[row]
      fill[row] += sizes[k]
    if fill.max(initial=0) <= capacity:
      return placement, n_rows
    n_rows += 1


def _pack(sizes: np.ndarray, settings: LayoutSettings) -> tuple[np.ndarray, int, int]:
  """(placement [n, 2] of (row, start), rows R, row length L) of a packed batch."""
  capacity = settings.row_length
  if settings.length_bucket is None:
    placement, n_open = _first_fit_decreasing(sizes, capacity)
    return placement, bucket_rows(n_open, settings.row_bucket), capacity
  placement, n_rows = _balanced(sizes, capacity, settings.min_rows)
  fullest = int((placement[:, 1] + sizes).max(initial=1))
  if n_rows > settings.min_rows:
    n_rows = bucket_rows(n_rows, settings.row_bucket)
  return placement, n_rows, min(bucket_length(fullest, settings.length_bucket), capacity)


def _empty(n_rows: int, length: int, pad: int, n_pairs: int) -> dict[str, np.ndarray]:
  return {
      "tokens": np.full((n_rows, length), pad, dtype=np.int32),
      "segment_ids": np.zeros((n_rows, length), dtype=np.int32),
      "positions": np.zeros((n_rows, length), dtype=np.int32),
      "chosen_index": np.zeros(n_pairs, dtype=np.int32),
      "rejected_index": np.zeros(n_pairs, dtype=np.int32),
      "pair_mask": np.zeros(n_pairs, dtype=np.float32),
      "pair_margin": np.zeros(n_pairs, dtype=np.float32),
      "pair_tie": np.zeros(n_pairs, dtype=np.float32),
      "chosen_response": np.zeros(n_pairs, dtype=np.int32),
      "rejected_response": np.zeros(n_pairs, dtype=np.int32),
      "pair_unit": np.zeros(n_pairs, dtype=np.int32),
  }


def _put(batch: dict[str, np.ndarray], row: int, start: int, seq: np.ndarray, segment: int,
         first_position: int = 0) -> None:
  """Writes one run of tokens at (row, start), positions counting up from first_position."""
  n = len(seq)
  batch["tokens"][row, start:start + n] = seq
  batch["segment_ids"][row, start:start + n] = segment
  batch["positions"][row, start:start + n] = np.arange(first_position, first_position + n,
                                                       dtype=np.int32)


def _stats(batch: dict[str, np.ndarray], data: TokenizedPairs, pair_ids: np.ndarray,
           n_slots: int, n_tokens: int, responses: tuple | None = None) -> dict[str, np.ndarray]:
  n = len(pair_ids)
  batch["pair_mask"][:n] = 1.0
  # Which response each member is, and which unit each pair belongs to (Plackett-Luce, best-of-k,
  # reward statistics). Fillers get units and responses of their own past the real ones.
  chosen, rejected, unit, _ = responses or unit_responses(data, pair_ids)
  first_free = int(max(chosen.max(initial=-1), rejected.max(initial=-1))) + 1
  fill = np.arange(n_slots - n, dtype=np.int32)
  batch["chosen_response"][:] = np.concatenate([chosen, first_free + 2 * fill])
  batch["rejected_response"][:] = np.concatenate([rejected, first_free + 2 * fill + 1])
  batch["pair_unit"][:] = np.concatenate([unit, int(unit.max(initial=-1)) + 1 + fill])
  if data.margins is not None:  # a pair without one: 0, plain Bradley-Terry
    batch["pair_margin"][: len(pair_ids)] = np.nan_to_num(data.margins[pair_ids], nan=0.0)
  if data.ties is not None:
    batch["pair_tie"][: len(pair_ids)] = data.ties[pair_ids]
  batch["n_pairs"] = np.int64(len(pair_ids))
  batch["n_tokens"] = np.int64(n_tokens)
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
    for j, (row, key) in enumerate(((k, "chosen_index"), (n_pairs + k, "rejected_index"))):
      member = data.member(i, j)
      _put(batch, row, 0, member, 1)
      batch[key][k] = row * length + pool_position(member, data.pad_token_id)
  return _stats(batch, data, pair_ids, n_pairs, int(data.lengths[pair_ids].sum()))


def _first_fit_decreasing(sizes: np.ndarray, length: int) -> tuple[np.ndarray, int]:
  """(row, start) of each item packed into rows of `length`, and the number of rows used.

  Longest first, ties by position, so the packing is a deterministic function of the batch.
  """
  order = np.argsort(-sizes, kind="stable")
  fill = np.zeros(len(sizes), dtype=np.int64)  # used length of each opened row
  n_open = 0
  placement = np.zeros((len(sizes), 2), dtype=np.int64)
  for k in order:
    fits = np.flatnonzero(fill[:n_open] + sizes[k] <= length)
    row = int(fits[0]) if fits.size else n_open
    n_open += not fits.size
    placement[k] = row, fill[row]
    fill[row] += sizes[k]
  return placement, n_open


def _in_row_order(placement: np.ndarray, length: int):
  """Yields (k, row, start, q) left to right in each row, q counting the items before it."""
  items_in_row: dict[int, int] = {}
  for k in np.argsort(placement[:, 0] * length + placement[:, 1], kind="stable"):
    row, start = (int(x) for x in placement[k])
    q = items_in_row.get(row, 0)
    items_in_row[row] = q + 1
    yield int(k), row, start, q


def packed_batch(data: TokenizedPairs, pair_ids: np.ndarray,
                 settings: LayoutSettings) -> dict[str, np.ndarray]:
  """Packs whole pairs into rows (first-fit decreasing into pack_length, or balanced with
  length_bucket; see LayoutSettings).

  Each pair occupies one span of a row: its chosen member (segment 2q+1) then its rejected
  member (segment 2q+2), where q counts the pairs already in that row. The row count is
  rounded up by row_bucket.
  """
  placement, n_rows, length = _pack(pair_sizes(data, pair_ids, "packed"), settings)
  batch = _empty(n_rows, length, data.pad_token_id, settings.pairs_per_batch)
  for k, row, start, q in _in_row_order(placement, length):
    chosen, rejected = data.member(pair_ids[k], 0), data.member(pair_ids[k], 1)
    _put(batch, row, start, chosen, 2 * q + 1)
    _put(batch, row, start + len(chosen), rejected, 2 * q + 2)
    flat = row * length + start
    batch["chosen_index"][k] = flat + pool_position(chosen, data.pad_token_id)
    batch["rejected_index"][k] = flat + len(chosen) + pool_position(rejected, data.pad_token_id)
  return _stats(batch, data, pair_ids, settings.pairs_per_batch,
                int(data.lengths[pair_ids].sum()))


def _branch_index(member: np.ndarray, prefix: int, trunk_flat: int, branch_flat: int,
                  pad: int) -> int:
  """Flat index of the token transformers pools for `member` scored alone.

  Its first `prefix` tokens are the trunk (at trunk_flat...), the rest its branch (at
  branch_flat...). Members end at their pooling position, so this is the branch's last token,
  or the trunk's last when the branch is empty (the member is a prefix of the other); finding
  it with pool_position also covers members that keep trailing pad tokens.
  """
  t = pool_position(member, pad)
  return trunk_flat + t if t < prefix else branch_flat + t - prefix


def shared_prompt_batch(data: TokenizedPairs, pair_ids: np.ndarray,
                        settings: LayoutSettings) -> dict[str, np.ndarray]:
  """Packs units (a pair, or a ranked record's pairs) with their shared prefix stored once, into
  rows as packed_batch does.

  Unit q of a row is one segment (q + 1): the tokens all its members share (the prompt, the
  template's assistant header, and any common start of the responses: the trunk), then the rest
  of each distinct member, once however many pairs it is in. branch_ids mark the trunk 0 and the
  members 1, 2, ... (for a pair: chosen 1, rejected 2); positions run 0..p-1 over the trunk and
  restart at p in each branch, so that each branch sees exactly its member's tokens at its
  member's positions under the model's branch mask.
  """
  responses = unit_responses(data, pair_ids)
  chosen_r, rejected_r, unit_slot, units = responses
  sizes = np.array([unit_size(u) for u in units], dtype=np.int64)
  placement, n_rows, length = _pack(sizes, settings)
  batch = _empty(n_rows, length, data.pad_token_id, settings.pairs_per_batch)
  batch[BRANCH_KEY] = np.full((n_rows, length), TRUNK, dtype=np.int32)
  first = np.cumsum([0] + [len(members) for _, members in units])  # unit u's first response number
  pool = np.zeros(first[-1], dtype=np.int64)  # response number -> flat index of its reward
  for u, row, start, q in _in_row_order(placement, length):
    trunk, members = units[u]
    _put(batch, row, start, members[0][:trunk], q + 1)
    at, flat = start + trunk, row * length
    for b, member in enumerate(members):
      _put(batch, row, at, member[trunk:], q + 1, first_position=trunk)
      batch[BRANCH_KEY][row, at:at + len(member) - trunk] = b + 1
      pool[first[u] + b] = _branch_index(member, trunk, flat + start, flat + at, data.pad_token_id)
      at += len(member) - trunk
  batch["chosen_index"][: len(pair_ids)] = pool[chosen_r]
  batch["rejected_index"][: len(pair_ids)] = pool[rejected_r]
  return _stats(batch, data, pair_ids, settings.pairs_per_batch, int(sizes.sum()), responses)


_BUILDERS = {"padded": padded_batch, "packed": packed_batch, "shared_prompt": shared_prompt_batch}


def make_batch(data: TokenizedPairs, pair_ids: np.ndarray,
               settings: LayoutSettings) -> dict[str, np.ndarray]:
  """The batch of the given pairs (at most P of them; the rest of the P slots are fillers)."""
  return _BUILDERS[settings.layout](data, pair_ids, settings)
