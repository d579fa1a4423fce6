"""HALOs' Bradley-Terry loss with TRL's optional margin and reward centering, and its metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def bt_loss(
    chosen_P: Array,
    rejected_P: Array,
    mask_P: Array,
    *,
    margin: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
  """Mean over real pairs of -log_sigmoid(r_c - r_r - margin), plus center_coef * mean((r_c + r_r)^2).

  margin=0, center_coef=0 is HALOs' BCE-with-logits(r_c - r_r, 1). The centering term is TRL's
  center_rewards_coefficient. Filler pairs (mask 0) contribute nothing to loss or metrics.
  """
  mask_P = mask_P.astype(jnp.float32)
  n = jnp.maximum(mask_P.sum(), 1.0)

  def mean(x_P: Array) -> Array:
    return (x_P * mask_P).sum() / n

  margins_P = chosen_P - rejected_P
  loss = mean(-jax.nn.log_sigmoid(margins_P - margin))
  if center_coef:
    loss += center_coef * mean((chosen_P + rejected_P) ** 2)
  metrics = {
      "loss": loss,
      "chosen": mean(chosen_P),
      "rejected": mean(rejected_P),
      "margins": mean(margins_P),
      "accuracies": mean((margins_P > 0).astype(jnp.float32)),  # strict, as HALOs
  }
  return loss, metrics
