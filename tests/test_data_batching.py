"""Batch layouts and the grain iterator: contract, shuffling, shards, checkpoint and restore."""

import json

import numpy as np
import pytest

from jbt.data import (LayoutSettings, TokenizedPair, TokenizedPairs, batches_per_epoch, bucket_rows,
                      device_keys, make_batch_iterator, pool_position, split_batch)
from jbt.data.layouts import bucket_length, make_batch, pair_sizes
from jbt.errors import JbtError

PAD = 0


def synthetic(n_pairs, max_len=40, seed=0, min_len=3):
  """Tokenized pairs with random lengths and ids 1..999 (never the pad id 0)."""
  rng = np.random.default_rng(seed)
  pairs = []
  for _ in range(n_pairs):
    prefix = rng.integers(1, 1000, size=rng.integers(1, min_len + 1))
    members = [np.concatenate([prefix, rng.integers(1, 1000, size=rng.integers(1, max_len - len(prefix) + 1))])
               for _ in range(2)]
    pairs.append(TokenizedPair(members[0].astype(np.int32), members[1].astype(np.int32)))
  return TokenizedPairs.from_pairs(pairs, PAD)


def sequences(batch):
  """Every (row, segment) of a batch: its tokens and positions, in reading order."""
  out = {}
  for row in range(batch["tokens"].shape[0]):
    for seg in np.unique(batch["segment_ids"][row]):
      if seg == 0:
        continue
      cols = np.flatnonzero(batch["segment_ids"][row] == seg)
      assert np.array_equal(cols, np.arange(cols[0], cols[-1] + 1)), "a segment must be contiguous"
      out[row, seg] = (cols, batch["tokens"][row, cols], batch["positions"][row, cols])
  return out


def check_contract(batch, data, n_slots):
  """The batch contract of jbt.data, checked against the tokenized data it came from."""
  if "branch_ids" in batch:
    return check_shared_contract(batch, data, n_slots)
  tokens, L = batch["tokens"], batch["tokens"].shape[1]
  pad = data.pad_token_id
  assert tokens.dtype == np.int32 and batch["segment_ids"].dtype == np.int32
  assert batch["positions"].dtype == np.int32 and batch["pair_mask"].dtype == np.float32
  for key in ("chosen_index", "rejected_index", "pair_mask"):
    assert batch[key].shape == (n_slots,)
  pad_cells = batch["segment_ids"] == 0
  assert (tokens[pad_cells] == pad).all() and (batch["positions"][pad_cells] == 0).all()
  seqs = sequences(batch)
  for _, (cols, _, positions) in seqs.items():
    assert np.array_equal(positions, np.arange(len(cols)))
  real = batch["pair_ids"] >= 0
  assert np.array_equal(batch["pair_mask"], real.astype(np.float32))
  assert batch["n_pairs"] == real.sum() and batch["n_tokens"] == (~pad_cells).sum()
  assert len(seqs) == 2 * real.sum()
  for k in np.flatnonzero(real):
    i = batch["pair_ids"][k]
    for key, j in (("chosen_index", 0), ("rejected_index", 1)):
      row, t = divmod(int(batch[key][k]), L)
      seg = batch["segment_ids"][row, t]
      cols, seq, _ = seqs[row, seg]
      # The sequence at the index is exactly the member, and the index is where transformers
      # pools that member scored alone.
      assert np.array_equal(seq, data.member(i, j))
      assert t == cols[0] + pool_position(seq, pad)
  for k in np.flatnonzero(~real):
    assert batch["chosen_index"][k] == 0 and batch["rejected_index"][k] == 0


def check_shared_contract(batch, data, n_slots):
  """The shared_prompt contract: one segment per pair, trunk then chosen then rejected branch,
  and each member rebuilt from trunk + its branch is exactly the tokenized member."""
  tokens, branch, L = batch["tokens"], batch["branch_ids"], batch["tokens"].shape[1]
  pad = data.pad_token_id
  assert branch.dtype == np.int32 and branch.shape == tokens.shape
  for key in ("chosen_index", "rejected_index", "pair_mask"):
    assert batch[key].shape == (n_slots,)
  pad_cells = batch["segment_ids"] == 0
  assert (tokens[pad_cells] == pad).all() and (batch["positions"][pad_cells] == 0).all()
  assert (branch[pad_cells] == 0).all()
  seqs = sequences(batch)
  real = batch["pair_ids"] >= 0
  assert np.array_equal(batch["pair_mask"], real.astype(np.float32))
  assert batch["n_pairs"] == real.sum() and batch["n_tokens"] == (~pad_cells).sum()
  assert len(seqs) == real.sum()
  for k in np.flatnonzero(real):
    i = batch["pair_ids"][k]
    row, t_c = divmod(int(batch["chosen_index"][k]), L)
    row_r, t_r = divmod(int(batch["rejected_index"][k]), L)
    seg = batch["segment_ids"][row, t_c]
    assert row_r == row and batch["segment_ids"][row, t_r] == seg
    cols, _, _ = seqs[row, seg]
    assert np.all(np.diff(branch[row, cols]) >= 0)  # trunk, then chosen, then rejected
    assert (branch[row, cols] == 0).sum() == data.shared_prefix[i]
    for j, t in ((0, t_c), (1, t_r)):
      own = cols[np.isin(branch[row, cols], (0, j + 1))]
      member = tokens[row, own]
      assert np.array_equal(member, data.member(i, j))
      assert np.array_equal(batch["positions"][row, own], np.arange(len(own)))
      assert t == own[pool_position(member, pad)]
  for k in np.flatnonzero(~real):
    assert batch["chosen_index"][k] == 0 and batch["rejected_index"][k] == 0


# --- layouts -----------------------------------------------------------------------------------

def test_padded_layout_rows_chosen_then_rejected():
  data = synthetic(5)
  settings = LayoutSettings("padded", pairs_per_batch=8, max_length=40)
  batch = make_batch(data, np.array([3, 0, 4, 1, 2]), settings)
  check_contract(batch, data, 8)
  assert batch["tokens"].shape == (16, 40)
  for k, i in enumerate([3, 0, 4, 1, 2]):
    assert np.array_equal(batch["tokens"][k, :data.lengths[i, 0]], data.member(i, 0))
    assert np.array_equal(batch["tokens"][8 + k, :data.lengths[i, 1]], data.member(i, 1))
  assert (batch["segment_ids"][5:8] == 0).all() and (batch["segment_ids"][13:] == 0).all()


def test_padded_length_multiple_gives_few_shapes():
  data = synthetic(64, max_len=100, min_len=1)
  settings = LayoutSettings("padded", pairs_per_batch=4, max_length=100, length_multiple=32)
  shapes = set()
  for start in range(0, 64, 4):
    ids = np.arange(start, start + 4)
    batch = make_batch(data, ids, settings)
    check_contract(batch, data, 4)
    L = batch["tokens"].shape[1]
    assert L in (32, 64, 96, 100) and L >= data.lengths[ids].max()
    shapes.add(L)
  assert len(shapes) > 1


@pytest.mark.parametrize("rule, allowed", [(8, {8, 16}), ("pow2", {1, 2, 4, 8, 16})])
def test_packed_layout_keeps_pairs_whole_in_one_row(rule, allowed):
  data = synthetic(16, max_len=60)
  settings = LayoutSettings("packed", pairs_per_batch=16, max_length=60, row_bucket=rule)
  batch = make_batch(data, np.arange(16), settings)
  check_contract(batch, data, 16)
  L = batch["tokens"].shape[1]
  assert L == 120 and batch["tokens"].shape[0] in allowed
  for k in range(16):
    row_c, t_c = divmod(int(batch["chosen_index"][k]), L)
    row_r, t_r = divmod(int(batch["rejected_index"][k]), L)
    assert row_c == row_r and t_r > t_c  # same row, rejected right after chosen
    assert batch["segment_ids"][row_r, t_r] == batch["segment_ids"][row_c, t_c] + 1
  # First-fit decreasing needs no more rows than pairs sorted into bins by a simple bound.
  used_rows = (batch["segment_ids"] > 0).any(axis=1).sum()
  assert used_rows <= -(-int(data.lengths.sum()) // (L // 2))
  assert batch["n_tokens"] / batch["tokens"].size > 0.5


def test_packed_layout_with_partial_batch_and_no_pairs():
  data = synthetic(3)
  settings = LayoutSettings("packed", pairs_per_batch=8, max_length=40, row_bucket=4)
  check_contract(make_batch(data, np.array([2]), settings), data, 8)
  empty = make_batch(data, np.array([], dtype=np.int64), settings)
  assert empty["tokens"].shape == (4, 80) and empty["pair_mask"].sum() == 0


@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
@pytest.mark.parametrize("min_rows", [1, 3])
def test_length_bucketed_layout_balances_rows_and_rounds_the_length(layout, min_rows):
  data = synthetic(64, max_len=60, min_len=20)
  settings = LayoutSettings(layout, pairs_per_batch=8, max_length=60, pack_length=8 * 120,
                            length_bucket="geometric", min_rows=min_rows)
  shapes = set()
  for start in range(0, 64, 8):
    ids = np.arange(start, start + 8)
    batch = make_batch(data, ids, settings)
    check_contract(batch, data, 8)
    R, L = batch["tokens"].shape
    fill = (batch["segment_ids"] > 0).sum(axis=1)  # pairs are packed from each row's start
    assert R == min_rows and L == bucket_length(int(fill.max()), "geometric") and L >= fill.max()
    # Longest first onto the emptiest row: rows differ by at most the longest pair.
    sizes = pair_sizes(data, ids, layout)
    assert fill.max() - fill.min() <= sizes.max()
    shapes.add(L)
  assert 1 < len(shapes) <= 4


def test_length_bucketed_layout_adds_rows_when_the_capacity_is_short():
  data = synthetic(16, max_len=40, min_len=3)
  settings = LayoutSettings("packed", pairs_per_batch=16, max_length=40, pack_length=100,
                            row_bucket=1, length_bucket=16)
  batch = make_batch(data, np.arange(16), settings)
  check_contract(batch, data, 16)
  R, L = batch["tokens"].shape
  assert L <= 100 and L % 16 == 0 and R >= -(-int(data.lengths.sum()) // 100)


def test_bucket_length_rules():
  assert [bucket_length(n, "geometric") for n in (1, 64, 65, 257, 512, 513, 1000, 1025, 1775, 2049)] == [
      64, 64, 128, 320, 512, 576, 1024, 1152, 1792, 2304]
  assert [bucket_length(n, 100) for n in (1, 100, 101)] == [100, 100, 200]
  for n in range(1, 9000, 7):  # multiples of 64 up to 512, then at most 12.5% over
    b = bucket_length(n, "geometric")
    assert n <= b <= (max(1.125 * n, n + 63) if n > 512 else n + 63) and b % 64 == 0
  assert len({bucket_length(n, "geometric") for n in range(1025, 2049)}) == 8


def test_bucket_rows_rules():
  assert [bucket_rows(n, 8) for n in (0, 1, 8, 9)] == [8, 8, 8, 16]
  assert [bucket_rows(n, "pow2") for n in (0, 1, 3, 4, 5)] == [1, 1, 4, 4, 8]


def test_settings_that_cannot_hold_the_data_are_errors():
  data = synthetic(4, max_len=40)
  with pytest.raises(JbtError, match="max_length"):
    make_batch_iterator(data, batch_size=2, max_length=10)
  with pytest.raises(JbtError, match="pack_length"):
    make_batch_iterator(data, layout="packed", batch_size=2, max_length=40, pack_length=41)
  with pytest.raises(JbtError, match="pack_length"):
    make_batch_iterator(data, layout="shared_prompt", batch_size=2, max_length=40, pack_length=41)
  with pytest.raises(JbtError, match="layout"):
    make_batch_iterator(data, layout="shared", batch_size=2, max_length=40)
  with pytest.raises(JbtError, match="multiple"):
    make_batch_iterator(data, batch_size=3, max_length=40, process_count=2)


# --- iterator ----------------------------------------------------------------------------------

def pair_ids(batches):
  return [b["pair_ids"].tolist() for b in batches]


def test_epochs_visit_every_pair_once_in_a_seeded_order():
  data = synthetic(21)
  batches = list(make_batch_iterator(data, batch_size=4, max_length=40, seed=7, epochs=2))
  assert len(batches) == 2 * batches_per_epoch(21, 4) == 12
  for epoch in (batches[:6], batches[6:]):
    ids = [i for b in epoch for i in b["pair_ids"] if i >= 0]
    assert sorted(ids) == list(range(21))
    assert epoch[-1]["pair_mask"].tolist() == [1.0, 0.0, 0.0, 0.0]
  assert pair_ids(batches[:6]) != pair_ids(batches[6:])  # reshuffled each epoch
  again = list(make_batch_iterator(data, batch_size=4, max_length=40, seed=7, epochs=2))
  other = list(make_batch_iterator(data, batch_size=4, max_length=40, seed=8, epochs=2))
  assert pair_ids(again) == pair_ids(batches) and pair_ids(other) != pair_ids(batches)
  for b in batches:
    check_contract(b, data, 4)


def test_drop_remainder_and_endless_epochs():
  data = synthetic(21)
  dropped = list(make_batch_iterator(data, batch_size=4, max_length=40, epochs=1, drop_remainder=True))
  assert len(dropped) == 5 and all(b["pair_mask"].all() for b in dropped)
  endless = make_batch_iterator(data, batch_size=4, max_length=40, epochs=None)
  assert len([next(endless) for _ in range(50)]) == 50


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_restoring_state_mid_epoch_gives_the_same_batches(layout):
  data = synthetic(30)
  kwargs = dict(layout=layout, batch_size=4, max_length=40, seed=3, epochs=2)
  reference = list(make_batch_iterator(data, **kwargs))
  it = make_batch_iterator(data, **kwargs)
  for _ in range(5):
    next(it)
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state  # plain data, as a checkpoint stores it
  resumed = make_batch_iterator(data, **kwargs)
  resumed.set_state(state)
  rest = list(resumed)
  assert len(rest) == len(reference) - 5
  for got, want in zip(rest, reference[5:]):
    assert got.keys() == want.keys()
    for key in got:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_processes_read_disjoint_shards_that_cover_the_data(layout):
  data = synthetic(23)
  kwargs = dict(layout=layout, batch_size=8, max_length=40, seed=5, epochs=1)
  single = list(make_batch_iterator(data, **kwargs))
  shards = [list(make_batch_iterator(data, process_index=p, process_count=2, **kwargs))
            for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(single) == 3
  for step, (a, b) in enumerate(zip(*shards)):
    assert a["pair_mask"].shape == b["pair_mask"].shape == (4,)
    ids_a = set(a["pair_ids"][a["pair_ids"] >= 0])
    ids_b = set(b["pair_ids"][b["pair_ids"] >= 0])
    assert not ids_a & ids_b
    # Together the processes read exactly the global batch one process would read.
    assert ids_a | ids_b == set(single[step]["pair_ids"][single[step]["pair_ids"] >= 0])
    check_contract(a, data, 4)
    check_contract(b, data, 4)
  covered = [i for shard in shards for b in shard for i in b["pair_ids"] if i >= 0]
  assert sorted(covered) == list(range(23))


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt"])
def test_split_batch_keeps_stats_off_the_device(layout):
  batch = next(make_batch_iterator(synthetic(4), layout=layout, batch_size=4, max_length=40))
  device, stats = split_batch(batch)
  # The trainer compiles on these keys: branch_ids only where the layout has branches.
  assert tuple(device) == device_keys(layout)
  assert ("branch_ids" in device) == (layout == "shared_prompt")
  assert set(stats) == {"n_pairs", "n_tokens", "pair_ids"}


def test_packed_layout_uses_fewer_slots_than_padded():
  data = synthetic(64, max_len=12)  # short sequences, as most are next to max_length
  fractions = {}
  for layout in ("padded", "packed"):
    real = total = 0
    for b in make_batch_iterator(data, layout=layout, batch_size=16, max_length=40):
      real += b["n_tokens"]
      total += b["tokens"].size
    fractions[layout] = real / total
  assert fractions["packed"] > 1.5 * fractions["padded"]
