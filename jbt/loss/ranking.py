"""Rankings of k responses to one prompt: Plackett-Luce's loss and best-of-k accuracy.

A ranked record reaches the loss as its pairs (every ordered pair of its responses, jbt.data.records.
convert_ranked), all in one batch, with batch-wide response numbers (`chosen_response`,
`rejected_response`) and unit numbers (`pair_unit`; jbt.data.layouts.unit_responses). The
default, loss.ranking = "all_pairs", is Bradley-Terry averaged over those pairs (InstructGPT's K
choose 2 comparisons). Everything here is computed from the same per-pair arrays, so every
layout gives the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
RANKINGS = ("all_pairs", "plackett_luce")


def plackett_luce_loss(chosen_P: Array, rejected_P: Array, chosen_response_P: Array, mask_P: Array) -> Array:
  """Plackett-Luce's negative log-likelihood of each unit's ranking, averaged over its terms.

  The ranking r_1 > r_2 > ... > r_k has probability prod_t exp(r_t) / sum_{u >= t} exp(r_u), whose
  -log is the sum over responses t that beat at least one other of
  log(1 + sum_{u worse than t} exp(r_u - r_t)): here, for each response t, the sum runs over the
  pairs in which t is the chosen member. Tied responses (no pair between them) do not compete.
  A unit of one pair gives Bradley-Terry's -log sigmoid(r_c - r_r) exactly. The mean is over the
  terms (responses that beat another), so a batch of plain pairs gives Bradley-Terry's mean.
  mask_P: 1 for the pairs that count (real, and not a tie).
  """
  P = chosen_P.shape[0]
  S = 2 * P  # response numbers are below 2P
  m = mask_P > 0
  d_P = jnp.where(m, rejected_P - chosen_P, -jnp.inf)
  has_S = jax.ops.segment_sum(m.astype(jnp.float32), chosen_response_P, S) > 0
  top_S = jax.lax.stop_gradient(jnp.where(has_S, jax.ops.segment_max(d_P, chosen_response_P, S), 0.0))
  e_P = jnp.where(m, jnp.exp(d_P - top_S[chosen_response_P]), 0.0)
  lse_S = top_S + jnp.log(jnp.where(has_S, jax.ops.segment_sum(e_P, chosen_response_P, S), 1.0))
  terms_S = jnp.where(has_S, jnp.logaddexp(0.0, lse_S), 0.0)
  return terms_S.sum() / jnp.maximum(has_S.sum(), 1)


def response_sums(chosen_P: Array, rejected_P: Array, batch: dict[str, Array]) -> dict[str, Array]:
  """Sums over a batch's distinct responses and units (the host adds them over batches):

  n_responses, reward_sum, reward_sq_sum: every distinct real response once (the normalisation
  statistics); n_units, best_of_k: units with a best response (some pair not a tie), and those
  whose highest-scored response is one of the best (never the rejected member of a pair).
  For plain pairs best-of-k is the pair accuracy (strict, as HALOs counts).
  """
  P = chosen_P.shape[0]
  S = 2 * P
  mask_P = batch["pair_mask"] > 0
  decided_P = mask_P & (batch["pair_tie"] <= 0)
  ids_2P = jnp.concatenate([batch["chosen_response"], batch["rejected_response"]])
  r_2P = jnp.concatenate([chosen_P, rejected_P]).astype(jnp.float32)
  m_2P = jnp.concatenate([mask_P, mask_P])
  present_S = jax.ops.segment_sum(m_2P.astype(jnp.float32), ids_2P, S) > 0
  r_S = jnp.where(present_S, jax.ops.segment_max(jnp.where(m_2P, r_2P, -jnp.inf), ids_2P, S), 0.0)
  loser_S = jax.ops.segment_sum(decided_P.astype(jnp.float32), batch["rejected_response"], S) > 0
  units_2P = jnp.concatenate([batch["pair_unit"], batch["pair_unit"]])
  unit_S = jax.ops.segment_max(jnp.where(m_2P, units_2P, -1), ids_2P, S)
  unit_S = jnp.where(present_S, unit_S, P)  # out of range: dropped by the segment ops below
  best_good = jax.ops.segment_max(jnp.where(~loser_S, r_S, -jnp.inf), unit_S, P)
  best_bad = jax.ops.segment_max(jnp.where(loser_S, r_S, -jnp.inf), unit_S, P)
  ranked_U = jax.ops.segment_sum(loser_S.astype(jnp.float32), unit_S, P) > 0
  present = present_S.astype(jnp.float32)
  return {
      "n_responses": present.sum(),
      "reward_sum": (r_S * present).sum(),
      "reward_sq_sum": (r_S * r_S * present).sum(),
      "n_units": ranked_U.sum().astype(jnp.float32),
      "best_of_k": (ranked_U & (best_good > best_bad)).sum().astype(jnp.float32),
  }


def best_of_k_host(tok, rewards_Px2) -> tuple[float, int]:
  """(best-of-k accuracy, ranked records) of host rewards [P, 2] for tokenized pairs `tok`, as
  response_sums counts it: a record is right when its highest-scored response is never the
  rejected member of one of its pairs (ties dropped)."""
  import numpy as np

  from jbt.data.layouts import unit_responses

  chosen, rejected, unit, _ = unit_responses(tok, np.arange(len(tok)))
  decided = np.ones(len(tok), bool) if tok.ties is None else ~tok.ties
  reward = np.full(2 * len(tok), -np.inf)
  reward[chosen], reward[rejected] = rewards_Px2[:, 0], rewards_Px2[:, 1]
  loser = np.zeros(2 * len(tok), bool)
  loser[rejected[decided]] = True
  owner = np.full(2 * len(tok), -1)
  owner[chosen], owner[rejected] = unit, unit
  right = n = 0
  for u in np.unique(unit):
    mine = owner == u
    if not (loser & mine).any():
      continue
    n += 1
    right += bool(reward[mine & ~loser].max(initial=-np.inf) > reward[mine & loser].max())
  return right / max(n, 1), n
