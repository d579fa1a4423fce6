"""Time one backward pass of SmolLM2-135M's shape at a fixed batch shape (random weights).

    python scripts/profile_step.py ROWS LENGTH [--remat none|full|attention|dots] [--attn_block 128] [--max_segment 0]
    python scripts/profile_step.py --report TRACE_DIR [TOP]   # a trace of --trace or train.profile

Prints seconds per jax.grad of the summed rewards, the kernel time and page faults per pass,
compile time and peak resident memory. Like `python -m jbt.train` it first restarts itself under
the malloc tunables that keep freed memory (unless JBT_KEEP_MEMORY=0) and those JBT_HUGEPAGES=1
asks for (jbt/runtime/host_memory.py). With
--max_segment S the rows hold segments of S tokens (a packed layout), else one sequence a row.
With --trace DIR one more backward pass runs under the JAX profiler (per-op events, so slower
than untraced), the trace is written to DIR and the ops' own times are printed, largest first,
grouped by what they compute (their source op name from the optimized HLO) and by kind
(jbt/runtime/trace.py). A real training step: `python -m jbt.train ... --config.train.profile=3:5`
traces steps 3 and 4 into {run dir}/profile; --report reads it.
"""

from __future__ import annotations

if __name__ == "__main__":
  from jbt.runtime import host_memory

  host_memory.restart()

import argparse
import resource
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jbt import model as M
from jbt.runtime import trace, xla_options


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  if sys.argv[1:2] == ["--report"]:  # a trace directory written by --trace or train.profile
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    print(trace.report(sys.argv[2], top))
    return
  ap.add_argument("rows", type=int)
  ap.add_argument("length", type=int)
  ap.add_argument("--remat", default="none")
  ap.add_argument("--attention", default="auto", choices=("auto", "native", "flash", "xla"))
  ap.add_argument("--attn_block", type=int, default=128)
  ap.add_argument("--flash_block", type=int, default=64)
  ap.add_argument("--max_segment", type=int, default=0)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--no_scan", action="store_true", help="unrolled layers (model.scan_layers=False)")
  ap.add_argument("--trace", default="", help="trace one more backward pass into this directory; print op times")
  ap.add_argument("--top", type=int, default=30, help="rows of the --trace table")
  ap.add_argument("--optimizer", action="store_true",
                  help="also time one AdamW + clip update with optax's clipping, jbt.optim's and the fused kernel")
  a = ap.parse_args()
  cfg = M.ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, pad_token_id=2, remat=a.remat,
                      dtype=a.dtype, attention=a.attention, attn_block=a.attn_block, flash_block=a.flash_block,
                      scan_layers=not a.no_scan)
  R, L = a.rows, a.length
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 49000, (R, L)), jnp.int32)
  seg = np.arange(L) // a.max_segment + 1 if a.max_segment else np.ones(L, int)
  segments = jnp.asarray(np.tile(seg, (R, 1)), jnp.int32)
  positions = jnp.tile(jnp.arange(L), (R, 1))
  index = jnp.arange(R) * L + L - 1
  tiny = tokens[:1, :1]
  params = nn.unbox(jax.jit(lambda: M.RewardModel(cfg).init(jax.random.key(0), tiny, tiny, tiny)["params"])())
  grad = jax.jit(jax.grad(lambda p: M.RewardModel(cfg, a.max_segment).apply(
      {"params": p}, tokens, segments, positions, index).sum()), compiler_options=xla_options.compiler_options(a.dtype))
  t = time.time()
  jax.block_until_ready(grad(params))
  compile_s = time.time() - t
  t, r0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(a.repeats):
    jax.block_until_ready(grad(params))
  step = (time.time() - t) / a.repeats
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  sys_s, faults = (r1.ru_stime - r0.ru_stime) / a.repeats, (r1.ru_minflt - r0.ru_minflt) // a.repeats
  rss = r1.ru_maxrss / 2**20
  print(f"rows {R} x {L} dtype={a.dtype} remat={a.remat} attention={cfg.attention} max_segment={a.max_segment}: "
        f"backward {step:.2f} s (kernel {sys_s:.2f} s, {faults} page faults), compile {compile_s:.0f} s, "
        f"peak RSS {rss:.1f} GiB")

  if a.trace:
    trace_ops(grad.lower(params).compile(), (params,), a.trace, a.top)

  if a.optimizer:
    time_optimizers(params, a.repeats)


def trace_ops(compiled, args: tuple, trace_dir: str, top: int) -> None:
  """Run a compiled program once under the profiler and print its ops' self times (the op names
  come from that same executable's optimized HLO)."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True, profiler_options=trace.options()):
    jax.block_until_ready(compiled(*args))
  Path(trace_dir, trace.HLO_FILE).write_text(compiled.as_text())  # for regrouping the trace later
  print(trace.report(trace_dir, top))


def time_optimizers(params, repeats: int) -> None:
  """One clip + AdamW update of `params` as the train step's update program runs it (the logged
  grad, param and update norms included, xla_options.update_options): optax's clipping, jbt's,
  and the fused CPU kernel (jbt.train.fused_update)."""
  import optax
  from ml_collections import ConfigDict

  from jbt.train import fused_update, optim

  opt = ConfigDict(dict(lr=1e-5, warmup_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, clip=1.0, grad_accum=1))
  tx, lr = optim.make_optimizer(opt, 1000)
  grads = jax.tree.map(lambda p: p * 0.1, params)

  def with_tx(tx):
    def update(p, o, g):
      u, o = tx.update(g, o, p)
      p = optax.apply_updates(p, u)
      return p, o, (optax.tree.norm(g), optax.tree.norm(p), optax.tree.norm(u))
    return update

  variants = {"optax.clip_by_global_norm": with_tx(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))),
              "jbt.optim.clip_by_global_norm": with_tx(tx)}
  fused = fused_update.plan(opt, lr, 1, 0)
  if fused is not None:
    def fused_step(p, o, g):
      p, o, updates_sq, params_sq = fused.update(g, o, p)
      return p, o, (optax.tree.norm(g), jnp.sqrt(params_sq), jnp.sqrt(updates_sq))
    variants["jbt.train.fused_update"] = fused_step
  for name, update in variants.items():
    f = jax.jit(update, donate_argnums=(0, 1), compiler_options=xla_options.update_options())
    p, o, _ = f(jax.tree.map(jnp.copy, params), tx.init(params), grads)
    jax.block_until_ready(p)
    t = time.time()
    for _ in range(max(repeats, 3)):
      p, o, norms = f(p, o, grads)
    jax.block_until_ready(p)
    print(f"AdamW update with {name} and the logged norms: {(time.time() - t) / max(repeats, 3):.3f} s "
          f"(update norm {float(norms[2]):.6g})")


if __name__ == "__main__":
  main()
