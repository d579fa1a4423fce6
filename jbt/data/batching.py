"""The grain pipeline: seeded shuffle, epochs, per-process shards, layouts, checkpointable state.

Element k of the pipeline is global batch k: epoch k // B_e, batch k % B_e of that epoch, where
B_e is the number of batches an epoch has. An epoch visits the pairs in grain's index_shuffle
order for seed + epoch (grain's own shuffle), cut into global batches of batch_size pairs.
Process p takes slots [p * P, (p + 1) * P) of each global batch, so processes read disjoint
pairs that together cover the epoch. The last global batch of an epoch may be short: its
missing slots are filler pairs (pair_mask 0), so every process yields the same number of batches
of the same shapes; drop_remainder=True drops it instead, as HALOs does with several processes.

Every process loads and tokenizes all pairs, so that each epoch can shuffle globally; it then
builds batches from its own slots only.

The iterator is grain's: get_state() is a small dict (the next batch index) that the trainer
saves next to its train state; set_state() on an iterator built with the same arguments resumes
with exactly the batches the uninterrupted run would have produced.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import grain
import numpy as np

from jbt.data.layouts import LayoutSettings, make_batch, max_responses
from jbt.data.records import Pair
from jbt.data.token_pairs import TokenizedPairs, tokenize_pairs
from jbt.errors import JbtError


def batches_per_epoch(n_pairs: int, batch_size: int, drop_remainder: bool = False) -> int:
  """Global batches in one epoch (the same on every process)."""
  return n_pairs // batch_size if drop_remainder else -(-n_pairs // batch_size)


class _EpochSlots:
  """Global batch index -> the pair indices this process reads (picklable grain transform).

  The shuffle is over units (jbt.data.TokenizedPairs.units: a ranked record's pairs; one pair
  each otherwise), and a batch holds batch_size units with all their pairs.
  """

  def __init__(self, unit_starts: np.ndarray, batch_size: int, per_process: int, process_index: int,
               per_epoch: int, seed: int):
    self.unit_starts = unit_starts
    self.n_pairs = len(unit_starts) - 1  # units
    self.batch_size = batch_size
    self.per_process = per_process
    self.process_index = process_index
    self.per_epoch = per_epoch
    self.seed = seed

  def __call__(self, index: int, _: Any) -> np.ndarray:
    epoch, batch = divmod(index, self.per_epoch)
    first = batch * self.batch_size + self.process_index * self.per_process
    slots = range(first, min(first + self.per_process, self.n_pairs))
    # Same per-epoch seeds as grain's MapDataset.shuffle; 4 rounds is its default too.
    seed = (self.seed + epoch) % 2**32
    units = [grain.experimental.index_shuffle(s, max_index=self.n_pairs - 1, seed=seed, rounds=4) for s in slots]
    if len(self.unit_starts) - 1 == self.unit_starts[-1]:  # one pair a unit
      return np.array(units, dtype=np.int64)
    starts = self.unit_starts
    return np.array([i for u in units for i in range(starts[u], starts[u + 1])], dtype=np.int64)


class _Layout:
  """Pair indices -> batch dict (picklable grain transform holding the tokenized data)."""

  def __init__(self, data: TokenizedPairs, settings: LayoutSettings):
    self.data = data
    self.settings = settings

  def __call__(self, pair_ids: np.ndarray) -> dict[str, np.ndarray]:
    return make_batch(self.data, pair_ids, self.settings)


def make_batch_iterator(
    data: TokenizedPairs | Sequence[Pair],
    tokenizer: Any = None,
    *,
    layout: str = "padded",
    batch_size: int = 32,
    max_length: int = 1250,
    max_prompt_length: int = 625,
    truncation: str = "halos",
    seed: int = 1,
    epochs: int | None = 1,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = False,
    length_multiple: int | None = None,
    pack_length: int | None = None,
    row_bucket: int | str = 4,
    length_bucket: int | str | None = None,
    min_rows: int = 1,
    on_error: str = "skip",
    num_threads: int = 2,
    num_workers: int = 0,
) -> grain.DatasetIterator:
  """A checkpointable iterator of batch dicts (the contract in jbt.data's docstring).

  Args:
    data: tokenized pairs (tokenize_pairs), or pairs (load_pairs) to tokenize here with
      tokenizer; tokenize first yourself to see the report and the pair count.
    tokenizer: a transformers tokenizer; only needed when data is pairs.
    layout: "padded", "packed" or "shared_prompt" (cfg.data.layout); see jbt.data's docstring.
    batch_size: pairs per step across all processes (cfg.train.batch_size); each batch holds
      P = batch_size / process_count pair slots. With ranked records (units of several pairs,
      TokenizedPairs.units) it counts units (prompts), each bringing all its pairs, and P is
      batch_size / process_count times the pairs of the largest unit.
    max_length, max_prompt_length, truncation, on_error: cfg.data fields (tokenizing only).
    seed: shuffle seed; epoch e uses seed + e.
    epochs: passes over the data; None repeats forever (the trainer stops at max_steps).
    process_index, process_count: jax.process_index() and jax.process_count().
    drop_remainder: drop each epoch's last, short global batch instead of filling it.
    length_multiple, pack_length, row_bucket, length_bucket, min_rows: shape rules, see
      layouts.LayoutSettings.
    num_threads: grain prefetch threads building batches ahead of the trainer.
    num_workers: grain worker processes (spawned) for tokenizing when data is pairs; 0 keeps it
      in this process. Building batches is cheap numpy work (tens of thousands of pairs/s on one
      thread), so it stays in this process, and the state stays one integer.

  Returns:
    grain's DatasetIterator: next() gives a batch dict; get_state()/set_state() checkpoint it.
  """
  if not isinstance(data, TokenizedPairs):
    if tokenizer is None:
      raise JbtError("make_batch_iterator needs a tokenizer to tokenize pairs")
    data, report = tokenize_pairs(list(data), tokenizer, max_length=max_length,
                                  max_prompt_length=max_prompt_length, truncation=truncation,
                                  on_error=on_error, num_workers=num_workers)
    if report.n_skipped:  # The caller never sees this report, so say it here.
      logging.getLogger(__name__).warning("tokenizing: %s", report.summary())
  if not 0 <= process_index < process_count:
    raise JbtError(f"process_index {process_index} is not in [0, {process_count})")
  if batch_size <= 0 or batch_size % process_count:
    raise JbtError(f"batch_size {batch_size} must be a positive multiple of the process count "
                   f"{process_count}")
  if epochs is not None and epochs <= 0:
    raise JbtError(f"epochs must be positive or None, got {epochs}")
  per_epoch = batches_per_epoch(data.n_units, batch_size, drop_remainder)
  if per_epoch == 0:
    raise JbtError(f"{data.n_units} pairs make no batch of {batch_size} with drop_remainder")
  per_process = batch_size // process_count
  settings = LayoutSettings(layout, per_process * data.max_unit_pairs, max_length, length_multiple, pack_length,
                            row_bucket, length_bucket, min_rows, max_responses(data) if layout == "shared_prompt" else 2)
  settings.check(data)

  ds = grain.MapDataset.range(per_epoch).repeat(epochs)
  ds = ds.map_with_index(_EpochSlots(data.unit_starts, batch_size, per_process, process_index,
                                     per_epoch, seed))
  ds = ds.map(_Layout(data, settings))
  # Threads overlap batch building with the device step; a few suffice for numpy copies.
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=max(2 * num_threads, 1)))
  return iter(iter_ds)
