"""Preference data: specs -> pairs -> token ids -> fixed-shape batches, on grain.

Typical use (the trainer passes cfg.data and cfg.train fields):

    pairs, load_report = load_pairs(cfg.data.train, split="train", on_error=cfg.data.on_error)
    data, tok_report = tokenize_pairs(pairs, tokenizer, max_length=..., max_prompt_length=...,
                                      truncation=cfg.data.truncation)
    steps = batches_per_epoch(len(data), cfg.train.batch_size) * cfg.train.epochs
    it = make_batch_iterator(data, layout=cfg.data.layout, batch_size=cfg.train.batch_size,
                             max_length=..., seed=cfg.train.seed, epochs=cfg.train.epochs,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it); state = it.get_state()  # saved with the train state; it.set_state(state)

Batch contract. A batch is a dict of numpy arrays; P = batch_size / process_count pair slots.

  tokens          int32 [R, L]  token ids; pad_token_id in padding.
  segment_ids     int32 [R, L]  0 = padding; 1, 2, 3, ... one id per sequence (prompt + response
                                of one member of a pair) within its row. Attention is causal
                                within a segment only. Padding tokens share segment 0, so a mask
                                built as (segment_q == segment_k) & causal never leaves a query
                                with nothing to attend to.
  positions       int32 [R, L]  0-based position of the token within its own sequence (prompt +
                                response); 0 in padding.
  chosen_index    int32 [P]     flat index row * L + t of the token whose output is the reward of
  rejected_index  int32 [P]     the pair's chosen / rejected member: exactly where transformers'
                                *ForSequenceClassification pools that sequence scored alone (the
                                rightmost token whose id != pad_token_id, see pool_position).
                                Indices are local to this process's [R, L] batch.
  pair_mask       float32 [P]   1.0 for real pairs, 0.0 for filler slots (the short last batch of
                                an epoch); fillers point at index 0 and the loss must ignore them.
  pair_margin     float32 [P]   each pair's preference strength from its record (0 where none:
                                fillers, records without one); read when loss.margin_from_data.
  pair_tie        float32 [P]   1.0 for a pair marked as a tie (data.ties=tie_loss keeps them).
  chosen_response int32 [P]     which response of the batch each member is: the same number for
  rejected_response             the same sequence within a unit (a ranked record's pairs share
                                their responses), distinct otherwise; below 2P.
  pair_unit       int32 [P]     which unit of the batch each pair belongs to; below P. Fillers
                                get responses and units of their own. Plackett-Luce, best-of-k
                                and the reward statistics read these three.

  Host-side statistics ride in the same dict (STAT_KEYS; keep them off the device, e.g. with
  split_batch): n_pairs (int64 scalar, real pairs), n_tokens (int64 scalar, real tokens; the
  real-token fraction is n_tokens / tokens.size), pair_ids (int64 [P], index into the tokenized
  data, -1 for fillers).

  Layout "padded" (HALOs'): R = 2P, rows 0..P-1 chosen, rows P..2P-1 rejected, each sequence
  at the start of its row, segment 1. L = max_length, or with length_multiple=m the batch's
  longest sequence rounded up to a multiple of m (capped at max_length).
  Layout "packed": the same P pairs packed first-fit decreasing into rows of L = pack_length
  (default 2 * max_length, so that any pair fits: both members of a pair share a row, chosen then
  rejected, never split); R = rows needed rounded up by row_bucket (a multiple, default 4, or
  "pow2"), so few shapes.
  Layout "shared_prompt": like "packed", but each pair is ONE segment holding the tokens its
  members share once (TokenizedPairs.shared_prefix: the prompt and the assistant header), then
  the rest of chosen, then the rest of rejected; pair sizes are p + (c - p) + (r - p), so
  L = pack_length defaults to 2 * max_length here too. One more device array:

  branch_ids      int32 [R, L]  0 for the shared prefix (trunk) and padding, 1 for the chosen
                                member's own tokens, 2 for the rejected member's. The model's
                                mask is same segment & causal by array index & (key in the trunk
                                or in the query's own branch), so each branch computes exactly
                                prompt + response alone while the prompt is computed once.

  There, positions run 0..p-1 over the trunk and p.. in each branch (both continue the prompt),
  and chosen_index / rejected_index point at the branch's last token, or at the trunk's last
  token when a member is a prefix of the other (its branch is empty): where transformers pools
  it scored alone, as in every layout. n_tokens counts the tokens stored, shared ones once.
  A ranked record (a unit of pairs, TokenizedPairs.units) is one segment the same way: the
  tokens all its responses share, then each distinct response's rest once, branches 1..k; its
  pairs' indices point into those branches, so k responses cost one prompt and k remainders.
  Batches hold whole units (batch_size counts units), so every pair of a record is in one batch.
  Only this layout emits branch_ids (device_keys(layout)): the trainer compiles on the keys of
  the dict, and padded and packed batches stay free of an all-zero array.

Sequences: the chat template over prompt turns + response turns (the tokenizer's template, else
DEFAULT_CHAT_TEMPLATE), truncated by HALOs' rule (jbt.data.chat). Pad id: the tokenizer's
pad token, else its EOS (resolve_pad_token_id); the exported model's config.pad_token_id must be
the same id for pooling to agree.
"""

from jbt.data.batching import batches_per_epoch, make_batch_iterator
from jbt.data.chat import (DEFAULT_CHAT_TEMPLATE, TRUNCATIONS, PairTokenizer, TokenizedPair,
                                 ensure_chat_template, pool_position, resolve_pad_token_id,
                                 tokenize_pair)
from jbt.data.layouts import (BRANCH_KEY, DEVICE_KEYS, LAYOUTS, STAT_KEYS, LayoutSettings,
                              bucket_rows, device_keys, max_responses)
from jbt.data.records import Pair
from jbt.data.report import BadRecord, DataReport
from jbt.data.sources import TIES, load_pairs, resolve_spec
from jbt.data.token_pairs import TokenizedPairs, tokenize_pairs


def split_batch(batch: dict) -> tuple[dict, dict]:
  """Splits a batch dict into (arrays for the device, host-side statistics).

  branch_ids goes to the device when the batch has it (shared_prompt), and is never invented.
  """
  keys = device_keys("shared_prompt" if BRANCH_KEY in batch else "padded")
  return ({k: batch[k] for k in keys}, {k: v for k, v in batch.items() if k not in keys})


__all__ = [
    "BRANCH_KEY", "BadRecord", "DataReport", "DEFAULT_CHAT_TEMPLATE", "DEVICE_KEYS", "LAYOUTS",
    "LayoutSettings", "Pair", "PairTokenizer", "STAT_KEYS", "TIES", "TRUNCATIONS", "TokenizedPair",
    "TokenizedPairs", "batches_per_epoch", "bucket_rows", "device_keys", "ensure_chat_template",
    "load_pairs", "make_batch_iterator", "max_responses", "resolve_spec", "pool_position", "resolve_pad_token_id", "split_batch",
    "tokenize_pair", "tokenize_pairs",
]
