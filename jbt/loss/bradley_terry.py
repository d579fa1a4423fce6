"""HALOs' Bradley-Terry loss with TRL's optional margin and reward centering, and its metrics.

One function, bt_sums, computes the pair metrics everywhere they are reported: the train step
(means over a batch), the eval step (sums the host adds over batches) and jbt.evaluate (numpy,
float64). It takes jax or numpy arrays and computes in their module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array or np.ndarray
SUM_KEYS = ("loss", "chosen", "rejected", "margins", "accuracies")


def bt_sums(chosen_P: Array, rejected_P: Array, mask_P: Array | None = None, *,
            margin: float | Array = 0.0) -> dict[str, Array]:
  """Sums over real pairs (mask 1) of: loss -log sigmoid(r_c - r_r - margin) (margin: one number,
  or one per pair: loss.margin_from_data), chosen and rejected
  rewards, margins r_c - r_r, accuracies (r_c > r_r strictly, a tie is wrong, as HALOs counts);
  and n, the number of real pairs."""
  xp = np if isinstance(chosen_P, np.ndarray) and isinstance(rejected_P, np.ndarray) else jnp
  mask_P = xp.ones_like(chosen_P) if mask_P is None else mask_P.astype(chosen_P.dtype)
  margins_P = chosen_P - rejected_P
  # -log sigmoid(x) = softplus(-x) = logaddexp(0, -x): no overflow for large |x|.
  per_pair = {
      "loss": xp.logaddexp(0.0, -(margins_P - margin)),
      "chosen": chosen_P,
      "rejected": rejected_P,
      "margins": margins_P,
      "accuracies": (margins_P > 0).astype(chosen_P.dtype),
  }
  sums = {k: (v * mask_P).sum() for k, v in per_pair.items()}
  sums["n"] = mask_P.sum()
  return sums


def pair_means(sums: dict[str, Any]) -> dict[str, Any]:
  """bt_sums (or their totals over batches) -> means over the real pairs (0 pairs: 0)."""
  n = sums["n"]
  denom = jnp.maximum(n, 1.0) if isinstance(n, jax.Array) else max(float(n), 1.0)
  return {k: sums[k] / denom for k in SUM_KEYS}


def davidson_nll(delta_P: Array, tie_P: Array, nu: float) -> Array:
  """-log of Davidson's (1970) Bradley-Terry-with-ties probabilities, per pair.

  With d = r_chosen - r_rejected: a win has probability e^(d/2) / (e^(d/2) + e^(-d/2) + nu), a
  tie nu / (e^(d/2) + e^(-d/2) + nu). A tie is most likely at d = 0; nu = 0 is plain
  Bradley-Terry (the win term is then log(1 + e^-d)).
  """
  xp = np if isinstance(delta_P, np.ndarray) else jnp
  log_nu = xp.log(nu) if nu > 0 else -xp.inf
  z = xp.logaddexp(xp.logaddexp(delta_P / 2, -delta_P / 2), log_nu)
  return xp.where(tie_P > 0, z - log_nu, z - delta_P / 2)


def bt_loss(
    chosen_P: jax.Array,
    rejected_P: jax.Array,
    mask_P: jax.Array,
    *,
    margin: float | jax.Array = 0.0,
    center_coef: float = 0.0,
    tie_P: jax.Array | None = None,
    tie_nu: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over real pairs of -log_sigmoid(r_c - r_r - margin), plus center_coef * mean((r_c + r_r)^2).

  margin=0, center_coef=0 is HALOs' BCE-with-logits(r_c - r_r, 1). tie_P (1.0 for pairs marked as
  ties) switches to Davidson's likelihood with tie parameter tie_nu (davidson_nll). The centering term is TRL's
  center_rewards_coefficient. Filler pairs (mask 0) contribute nothing to loss or metrics.
  Returns (loss, means of bt_sums).
  """
  chosen_P, rejected_P = chosen_P.astype(jnp.float32), rejected_P.astype(jnp.float32)
  metrics = pair_means(bt_sums(chosen_P, rejected_P, mask_P, margin=margin))
  if tie_P is not None:  # data.ties=tie_loss: Davidson's likelihood of wins and ties
    m = mask_P.astype(jnp.float32)
    nll = davidson_nll(chosen_P - rejected_P - margin, tie_P, tie_nu)
    metrics["loss"] = (nll * m).sum() / jnp.maximum(m.sum(), 1.0)
  loss = metrics["loss"]
  if center_coef:
    mask_P = mask_P.astype(jnp.float32)
    loss += center_coef * ((chosen_P + rejected_P) ** 2 * mask_P).sum() / jnp.maximum(mask_P.sum(), 1.0)
  return loss, metrics
