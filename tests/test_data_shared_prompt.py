"""The shared_prompt layout: trunk and branches, positions, pooling indices, packing, limits."""

import numpy as np
import pytest

from jbt.data import LayoutSettings, TokenizedPair, TokenizedPairs, make_batch_iterator
from jbt.data.layouts import make_batch
from jbt.errors import JbtError
from test_data_batching import check_contract, synthetic

PAD = 0


def tokenized(*members, pad=PAD):
  """TokenizedPairs from (chosen, rejected) id lists, kept as given (trailing pads included)."""
  pairs = [TokenizedPair(np.array(c, np.int32), np.array(r, np.int32)) for c, r in members]
  return TokenizedPairs.from_pairs(pairs, pad)


def one_row(data, pack_length, pairs_per_batch=None):
  n = pairs_per_batch or len(data)
  settings = LayoutSettings("shared_prompt", n, max_length=pack_length, pack_length=pack_length,
                            row_bucket=1)
  settings.check(data)
  batch = make_batch(data, np.arange(len(data)), settings)
  check_contract(batch, data, n)
  return batch


def test_hand_made_rows_hold_trunk_then_chosen_then_rejected():
  data = tokenized(([5, 6, 7, 8, 9], [5, 6, 7, 3]),  # prefix 3: branches [8, 9] and [3]
                   ([11, 12, 13], [11, 14]))  # prefix 1: branches [12, 13] and [14]
  batch = one_row(data, pack_length=12, pairs_per_batch=3)
  # First-fit decreasing: the 6-token pair first, then the 4-token one, then 2 pads.
  np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 8, 9, 3, 11, 12, 13, 14, 0, 0]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
  np.testing.assert_array_equal(batch["branch_ids"], [[0, 0, 0, 1, 1, 2, 0, 1, 1, 2, 0, 0]])
  # Both branches continue the prompt: chosen 3, 4 and rejected 3 after trunk 0, 1, 2.
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 4, 3, 0, 1, 2, 1, 0, 0]])
  np.testing.assert_array_equal(batch["chosen_index"], [4, 8, 0])
  np.testing.assert_array_equal(batch["rejected_index"], [5, 9, 0])
  np.testing.assert_array_equal(batch["pair_mask"], [1, 1, 0])
  assert batch["n_tokens"] == 10 and batch["n_pairs"] == 2


@pytest.mark.parametrize("chosen, rejected, want", [
    # Chosen is a prefix of rejected: its branch is empty, it is read at the last trunk token.
    ([5, 6, 7], [5, 6, 7, 8, 9], (2, 4)),
    # And the other way round.
    ([5, 6, 7, 8], [5, 6, 7], (3, 2)),
    # Identical members: one trunk, two empty branches, both read at its last token.
    ([5, 6, 7], [5, 6, 7], (2, 2)),
    # Nothing shared: an empty trunk, both branches start at position 0.
    ([5, 6], [7, 8, 9], (1, 4)),
    # Untrimmed members: transformers skips trailing pads, in the trunk as in a branch.
    ([5, 6, PAD], [5, 6, PAD, 8, PAD], (1, 3)),
])
def test_empty_branches_are_read_where_transformers_reads(chosen, rejected, want):
  data = tokenized((chosen, rejected))
  batch = one_row(data, pack_length=8)
  assert (batch["chosen_index"][0], batch["rejected_index"][0]) == want
  shared = data.shared_prefix[0]
  assert (batch["branch_ids"][0, :shared] == 0).all()
  assert batch["n_tokens"] == len(chosen) + len(rejected) - shared


def test_real_template_shares_prompt_and_header():
  """With the ChatML tokenizer the trunk is the templated prompt plus the assistant header."""
  pytest.importorskip("transformers")
  import tinymodels
  from jbt.data import Pair, tokenize_pairs

  tok = tinymodels.make_tokenizer()
  prompt = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how are you today?"}]
  yes = [{"role": "assistant", "content": "the quick fox"}]
  pairs = [Pair(prompt, yes, [{"role": "assistant", "content": "a lazy dog"}]),
           # Chosen ends where rejected goes on: chosen is a prefix of rejected.
           Pair(prompt, yes, yes + [{"role": "user", "content": "and?"},
                                    {"role": "assistant", "content": "over"}])]
  data, _ = tokenize_pairs(pairs, tok, max_length=128, max_prompt_length=64)
  header = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                   return_dict=False)
  assert data.shared_prefix[0] >= len(header)
  assert data.shared_prefix[1] == data.lengths[1, 0]  # the whole chosen member
  batch = one_row(data, pack_length=256)
  row, t = divmod(int(batch["chosen_index"][1]), 256)
  assert batch["branch_ids"][row, t] == 0 and batch["tokens"][row, t] == data.member(1, 0)[-1]
  assert (batch["branch_ids"][row] == 1).sum() == data.lengths[0, 0] - data.shared_prefix[0]


def test_default_row_length_holds_any_pair_and_short_rows_are_refused():
  data = tokenized(([1] * 10, [2] * 10))  # nothing shared: 20 tokens, 2 * max_length
  settings = LayoutSettings("shared_prompt", 1, max_length=10)
  assert settings.row_length == 20
  settings.check(data)
  with pytest.raises(JbtError, match="pack_length 19 cannot hold pair 0 of 20 tokens"):
    make_batch_iterator(data, layout="shared_prompt", batch_size=1, max_length=10, pack_length=19)
  # Sharing makes pairs smaller: 14 tokens hold a pair sharing 6, which packed cannot.
  shared = tokenized(([1] * 6 + [3] * 4, [1] * 6 + [4] * 4))
  make_batch_iterator(shared, layout="shared_prompt", batch_size=1, max_length=10, pack_length=14)
  with pytest.raises(JbtError, match="pack_length"):
    make_batch_iterator(shared, layout="packed", batch_size=1, max_length=10, pack_length=14)


@pytest.mark.parametrize("rule", [4, "pow2"])
def test_random_batches_keep_the_contract_and_store_fewer_tokens(rule):
  data = synthetic(40, max_len=30, min_len=12)  # shared prefixes of 1..12 tokens
  kwargs = dict(batch_size=8, max_length=30, seed=2, row_bucket=rule)
  tokens = {}
  for layout in ("packed", "shared_prompt"):
    tokens[layout] = 0
    for batch in make_batch_iterator(data, layout=layout, **kwargs):
      check_contract(batch, data, 8)
      assert batch["tokens"].shape[1] == 60
      rows = batch["tokens"].shape[0]
      assert rows % 4 == 0 if rule == 4 else rows & (rows - 1) == 0
      tokens[layout] += int(batch["n_tokens"])
  assert tokens["packed"] == data.n_tokens
  assert tokens["shared_prompt"] == data.n_tokens - int(data.shared_prefix.sum())
