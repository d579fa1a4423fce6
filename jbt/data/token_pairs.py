"""Tokenizing a whole list of pairs up front, optionally in grain worker processes.

Tokenizing before batching keeps the number of pairs (hence of steps, for the learning-rate
schedule) known before training, gives exact skip counts, and leaves the batching pipeline cheap
numpy work whose iterator state is one integer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jbt.data.chat import PairTokenizer, TokenizedPair
from jbt.data.records import Pair
from jbt.data.report import BadRecord, DataReport, check_on_error

# Pairs per work item sent to a worker process: large enough to amortise the transfer, small
# enough to keep all workers busy to the end.
_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
  """Tokenized pairs in flat arrays (cheap to pickle to grain workers, cheap to index).

  Attributes:
    tokens: int32 [T]: all members' ids, pair after pair, chosen before rejected.
    starts: int64 [N, 2]: where member j (0 chosen, 1 rejected) of pair i starts in tokens.
    lengths: int32 [N, 2]: its length; the reward is read at its last token.
    shared_prefix: int32 [N]: how many leading tokens chosen and rejected share (the prompt and
      the template's assistant header), for layouts that store the prompt once.
    pad_token_id: the id that fills padding.
    margins: float32 [N]: each pair's preference strength from its record (NaN: none), or None.
    ties: bool [N]: pairs marked as ties (data.ties=tie_loss keeps them), or None.
    units: int64 [N]: which unit each pair belongs to, or None when every pair is its own. A unit
      is the pairs of one ranked record (Pair.unit), consecutive here; batches are made of whole
      units, and the shared_prompt layout computes each distinct response of a unit once.
  """

  tokens: np.ndarray
  starts: np.ndarray
  lengths: np.ndarray
  shared_prefix: np.ndarray
  pad_token_id: int
  margins: np.ndarray | None = None
  ties: np.ndarray | None = None
  units: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def unit_starts(self) -> np.ndarray:
    """int64 [U + 1]: unit u is pairs unit_starts[u] .. unit_starts[u + 1] - 1."""
    n = len(self)
    if self.units is None:
      return np.arange(n + 1, dtype=np.int64)
    change = np.flatnonzero(np.diff(self.units)) + 1
    return np.concatenate([[0], change, [n]]).astype(np.int64) if n else np.zeros(1, np.int64)

  @property
  def n_units(self) -> int:
    return len(self.unit_starts) - 1

  @property
  def max_unit_pairs(self) -> int:
    """Pairs in the largest unit (1 when every pair is its own)."""
    return int(np.diff(self.unit_starts).max(initial=1))

  def unit_pair_ids(self, unit_ids: np.ndarray) -> np.ndarray:
    """The pair indices of the given units, unit after unit."""
    starts = self.unit_starts
    if self.units is None:
      return np.asarray(unit_ids, dtype=np.int64)
    return np.concatenate([np.arange(starts[u], starts[u + 1]) for u in unit_ids] or [np.zeros(0)]).astype(np.int64)

  def member(self, i: int, j: int) -> np.ndarray:
    """Ids of member j (0 chosen, 1 rejected) of pair i."""
    start = self.starts[i, j]
    return self.tokens[start:start + self.lengths[i, j]]

  @property
  def n_tokens(self) -> int:
    return int(self.lengths.sum())

  @classmethod
  def from_pairs(cls, pairs: Sequence[TokenizedPair], pad_token_id: int,
                 margins: Sequence[float | None] | None = None, ties: Sequence[bool] | None = None,
                 units: Sequence[str] | None = None) -> TokenizedPairs:
    """Packs TokenizedPair objects into flat arrays (margins: one per pair, None for none; ties:
    one flag per pair; units: one key per pair, "" for a pair of its own, consecutive pairs with
    the same key forming a unit)."""
    lengths = np.array([[len(p.chosen), len(p.rejected)] for p in pairs],
                       dtype=np.int32).reshape(-1, 2)
    ends = np.cumsum(lengths.reshape(-1), dtype=np.int64)
    starts = (ends - lengths.reshape(-1)).reshape(-1, 2)
    members = [m for p in pairs for m in (p.chosen, p.rejected)]
    tokens = np.concatenate(members).astype(np.int32) if members else np.zeros(0, np.int32)
    prefix = np.array([_common_prefix(p.chosen, p.rejected) for p in pairs], dtype=np.int32)
    m = None
    if margins is not None and any(x is not None for x in margins):
      m = np.array([np.nan if x is None else x for x in margins], dtype=np.float32)
    t = np.asarray(ties, dtype=bool) if ties is not None and any(ties) else None
    return cls(tokens, starts, lengths, prefix, pad_token_id, m, t, _unit_ids(units))


def _unit_ids(keys: Sequence[str] | None) -> np.ndarray | None:
  """Unit index of each pair: a new unit at every pair whose key is "" or differs from the last."""
  if keys is None or not any(keys):
    return None
  new = [i == 0 or not k or k != keys[i - 1] for i, k in enumerate(keys)]
  return np.cumsum(new, dtype=np.int64) - 1


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
  n = min(len(a), len(b))
  differ = np.flatnonzero(a[:n] != b[:n])
  return int(differ[0]) if differ.size else n


class _TokenizeChunk:
  """Module-level (picklable) grain transform: a chunk of pairs -> their results."""

  def __init__(self, pair_tokenizer: PairTokenizer):
    self.pair_tokenizer = pair_tokenizer

  def __call__(self, chunk: Sequence[Pair]) -> list[TokenizedPair | BadRecord]:
    return self.pair_tokenizer.many(chunk)


def ensure_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app nobody has parsed them."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _results(pairs: Sequence[Pair], pair_tokenizer: PairTokenizer, num_workers: int):
  if num_workers <= 0 or len(pairs) <= _CHUNK:
    yield from pair_tokenizer.many(pairs)
    return
  import grain  # Deferred: grain imports jax, which plain loading does not need.

  ensure_flags_parsed()

  chunks = [list(pairs[i:i + _CHUNK]) for i in range(0, len(pairs), _CHUNK)]
  ds = grain.MapDataset.source(chunks).map(_TokenizeChunk(pair_tokenizer))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                   per_worker_buffer_size=4))
  for chunk_results in ds:
    yield from chunk_results


def tokenize_pairs(pairs: Sequence[Pair], tokenizer: Any, *, max_length: int = 1250,
                   max_prompt_length: int = 625, truncation: str = "halos",
                   on_error: str = "skip", num_workers: int = 0) -> tuple[TokenizedPairs, DataReport]:
  """Tokenizes and truncates every pair (see jbt.data.chat).

  Args:
    pairs: from load_pairs.
    tokenizer: a transformers tokenizer; its chat template is used, or DEFAULT_CHAT_TEMPLATE.
    max_length, max_prompt_length, truncation: cfg.data fields.
    on_error: "skip" counts pairs that cannot be used (too long under "drop", all pad);
      "raise" stops at the first with a JbtError naming the pair's source.
    num_workers: grain worker processes to tokenize in (0: in this process). Workers start with
      spawn and import jax, so they pay off only for tens of thousands of pairs and more cores.

  Returns:
    The tokenized pairs (in input order, skipped ones left out) and a report counting skipped
    and truncated pairs.
  """
  check_on_error(on_error)
  pair_tokenizer = PairTokenizer(tokenizer, max_length=max_length,
                                 max_prompt_length=max_prompt_length, truncation=truncation)
  report = DataReport()
  kept, margins, ties, units = [], [], [], []
  for pair, result in zip(pairs, _results(pairs, pair_tokenizer, num_workers)):
    if isinstance(result, BadRecord):
      report.handle(result, pair.source, on_error)
      continue
    report.altered.update(result.altered)
    kept.append(result)
    margins.append(pair.margin)
    ties.append(pair.tie)
    units.append(pair.unit)
  return TokenizedPairs.from_pairs(kept, pair_tokenizer.pad_token_id, margins, ties, units), report
