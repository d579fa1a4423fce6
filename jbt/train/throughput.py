"""Step-time statistics: examples and tokens per second, model FLOP/s and MFU, in one place."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax

from jbt.model import ModelConfig


@functools.lru_cache(maxsize=None)
def device_peak_flops() -> float | None:
  """Dense bf16 peak of one device, for MFU; None where unknown (CPU)."""
  from jbt.plan.targets import peak_flops

  return peak_flops(jax.devices()[0].device_kind)


def train_flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
  """6N for the matmuls (no LM head) plus causal attention scores and values (forward + backward)."""
  n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # the embedding is a gather
  attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len  # 12 * ... * L / 2 (causal)
  return 6 * n + attn


class Throughput:
  """Times optimizer updates; each update's figures cover the wall time since the previous one."""

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg
    self._last = time.time()

  def restart(self) -> None:
    """Starts the clock again (after work that is not training, such as an evaluation)."""
    self._last = time.time()

  def update(self, pairs: int, tokens: int) -> dict[str, Any]:
    """examples_per_second, tokens_per_second, perf/tflops and (where the peak is known) perf/mfu."""
    now = time.time()
    dt = max(now - self._last, 1e-9)
    self._last = now
    flops = train_flops_per_token(self.cfg, tokens / max(2 * pairs, 1)) * tokens / dt
    out = {"examples_per_second": pairs / dt, "tokens_per_second": tokens / dt, "perf/tflops": flops / 1e12}
    peak = device_peak_flops()
    if peak:
      out["perf/mfu"] = flops / (peak * jax.device_count())
    return out
