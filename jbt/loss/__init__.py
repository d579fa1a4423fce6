"""Training objectives over the rewards of a batch's pooled sequences.

    bradley_terry.py   HALOs' pairwise Bradley-Terry loss (with TRL's margin and centering) and
                       the pair metrics that train, eval and jbt.evaluate all report
"""

from jbt.loss.bradley_terry import bt_loss, bt_sums, pair_means

__all__ = ["bt_loss", "bt_sums", "pair_means"]
