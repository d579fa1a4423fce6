"""A run's evaluation: HALOs' eval metrics over every eval pair, batched as training batches them.

The trainer evaluates with it, and `jbt.evaluate --run` builds the same one from a run directory,
so both give the same numbers for the same parameters.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from ml_collections import ConfigDict

from jbt.loss.bradley_terry import SUM_KEYS, pair_means
from jbt.model import ModelConfig
from jbt.model.attention import BLOCK_SPARSE
from jbt.runtime import mesh as mesh_lib
from jbt.runtime import xla_options
from jbt.train.batches import Batches
from jbt.train.step import make_eval_step, max_segment, ruled


class Evaluator:
  """The jitted eval step of a run and the batches it reads."""

  def __init__(self, cfg: ConfigDict, mesh: Any, rules: tuple, model_cfg: ModelConfig, param_shardings: Any):
    self.cfg, self.mesh = cfg, mesh
    self.batches = Batches(cfg, mesh, model_cfg.pad_token_id, flash=model_cfg.attention in BLOCK_SPARSE)
    batch_sh = jax.sharding.NamedSharding(mesh, mesh_lib.batch_spec(mesh))
    step = make_eval_step(model_cfg, margin=cfg.loss.margin, max_segment=max_segment(cfg))
    self.step = jax.jit(ruled(step, rules), in_shardings=(param_shardings, batch_sh),
                        compiler_options=xla_options.compiler_options(model_cfg.dtype))

  def __call__(self, params: Any, tok: Any) -> dict[str, float]:
    """rewards_eval/{chosen,rejected,margins,accuracies}, loss/eval and eval_pairs over `tok`,
    rewards_eval/best_of_k (units whose top-scored response is a best one), and
    rewards_eval/{mean,std} over every distinct response of those pairs."""
    totals = dict.fromkeys((*SUM_KEYS, "n", "n_responses", "reward_sum", "reward_sq_sum", "n_units", "best_of_k"), 0.0)
    it = self.batches.iterator(tok, batch_size=self.cfg.train.eval_batch_size, epochs=1, seed=self.cfg.train.seed)
    with jax.set_mesh(self.mesh):
      for local in it:
        batch, _ = self.batches.place(local)
        for k, v in jax.device_get(self.step(params, batch)).items():
          totals[k] += float(v)
    means = pair_means(totals)
    out = {f"rewards_eval/{k}": v for k, v in means.items() if k != "loss"}
    out["loss/eval"] = means["loss"]
    out["eval_pairs"] = totals["n"]
    # best response ranked first, over ranked records (for plain pairs: the pair accuracy)
    out["rewards_eval/best_of_k"] = totals["best_of_k"] / max(totals["n_units"], 1.0)
    # every distinct eval response's reward: their mean and population std (normalisation statistics)
    k = max(totals["n_responses"], 1.0)
    mean = totals["reward_sum"] / k
    out["rewards_eval/mean"] = mean
    out["rewards_eval/std"] = math.sqrt(max(totals["reward_sq_sum"] / k - mean * mean, 0.0))
    return out
