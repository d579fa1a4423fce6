"""Time one backward pass of SmolLM2-135M's shape at a fixed batch shape (random weights).

    python scripts/profile_step.py ROWS LENGTH [--remat none|full|attention|dots] [--attn_block 128] [--max_segment 0]

Prints seconds per jax.grad of the summed rewards, compile time and peak resident memory. With
--max_segment S the rows hold segments of S tokens (a packed layout), else one sequence a row.
"""

from __future__ import annotations

import argparse
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbt import model as M


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("rows", type=int)
  ap.add_argument("length", type=int)
  ap.add_argument("--remat", default="none")
  ap.add_argument("--attention", default="auto", choices=("auto", "flash", "xla"))
  ap.add_argument("--attn_block", type=int, default=128)
  ap.add_argument("--flash_block", type=int, default=64)
  ap.add_argument("--max_segment", type=int, default=0)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--optimizer", action="store_true",
                  help="also time one AdamW + clip update with optax's clipping and with jbt.optim's")
  a = ap.parse_args()
  cfg = M.ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, pad_token_id=2, remat=a.remat,
                      dtype=a.dtype, attention=a.attention, attn_block=a.attn_block, flash_block=a.flash_block)
  R, L = a.rows, a.length
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 49000, (R, L)), jnp.int32)
  seg = np.arange(L) // a.max_segment + 1 if a.max_segment else np.ones(L, int)
  segments = jnp.asarray(np.tile(seg, (R, 1)), jnp.int32)
  positions = jnp.tile(jnp.arange(L), (R, 1))
  index = jnp.arange(R) * L + L - 1
  tiny = tokens[:1, :1]
  params = nn.unbox(jax.jit(lambda: M.RewardModel(cfg).init(jax.random.key(0), tiny, tiny, tiny)["params"])())
  grad = jax.jit(jax.grad(lambda p: M.RewardModel(cfg, a.max_segment).apply(
      {"params": p}, tokens, segments, positions, index).sum()))
  t = time.time()
  jax.block_until_ready(grad(params))
  compile_s = time.time() - t
  t = time.time()
  for _ in range(a.repeats):
    jax.block_until_ready(grad(params))
  step = (time.time() - t) / a.repeats
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"rows {R} x {L} dtype={a.dtype} remat={a.remat} attention={cfg.attention_impl} max_segment={a.max_segment}: "
        f"backward {step:.2f} s, compile {compile_s:.0f} s, peak RSS {rss:.1f} GiB")

  if a.optimizer:
    time_optimizers(params, a.repeats)


def time_optimizers(params, repeats: int) -> None:
  import optax

  from jbt.optim import clip_by_global_norm

  grads = jax.tree.map(lambda p: p * 0.1, params)
  for name, clip in (("optax.clip_by_global_norm", optax.clip_by_global_norm),
                     ("jbt.optim.clip_by_global_norm", clip_by_global_norm)):
    tx = optax.chain(clip(1.0), optax.adamw(1e-5))

    def update(p, o, g):
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o

    f = jax.jit(update, donate_argnums=(0, 1))
    p, o = f(jax.tree.map(jnp.copy, params), tx.init(params), grads)
    jax.block_until_ready(p)
    t = time.time()
    for _ in range(max(repeats, 3)):
      p, o = f(p, o, grads)
    jax.block_until_ready(p)
    print(f"AdamW update with {name}: {(time.time() - t) / max(repeats, 3):.3f} s")


if __name__ == "__main__":
  main()
