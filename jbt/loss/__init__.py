"""Training objectives over the rewards of a batch's pooled sequences.

    bradley_terry.py   HALOs' pairwise Bradley-Terry loss (with TRL's margin and centering) and
                       the pair metrics that train, eval and jbt.evaluate all report
    ranking.py         rankings of k responses: Plackett-Luce's loss, best-of-k accuracy and the
                       reward statistics over distinct responses
"""

from jbt.loss.bradley_terry import bt_loss, bt_sums, pair_means
from jbt.loss.ranking import RANKINGS, plackett_luce_loss, response_sums

__all__ = ["RANKINGS", "bt_loss", "bt_sums", "pair_means", "plackett_luce_loss", "response_sums"]
