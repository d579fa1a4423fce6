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


def bt_loss(
    chosen_P: jax.Array,
    rejected_P: jax.Array,
    mask_P: jax.Array,
    *,
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over real pairs of -log_sigmoid(r_c - r_r - margin), plus center_coef * mean((r_c + r_r)^2).

  margin=0, center_coef=0 is HALOs' BCE-with-logits(r_c - r_r, 1). The centering term is TRL's
  center_rewards_coefficient. Filler pairs (mask 0) contribute nothing to loss or metrics.
  Returns (loss, means of bt_sums).
  """
  chosen_P, rejected_P = chosen_P.astype(jnp.float32), rejected_P.astype(jnp.float32)
  metrics = pair_means(bt_sums(chosen_P, rejected_P, mask_P, margin=margin))
  loss = metrics["loss"]
  if center_coef:
    mask_P = mask_P.astype(jnp.float32)
    loss += center_coef * ((chosen_P + rejected_P) ** 2 * mask_P).sum() / jnp.maximum(mask_P.sum(), 1.0)
  return loss, metrics
