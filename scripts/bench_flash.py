"""Time flash attention's forward and backward loops alone, one layer of SmolLM2-135M's shape, beside
the native CPU kernel's (jbt/model/attention/native.py) on the same row.

    python scripts/bench_flash.py [--length 1792] [--lengths 150:700] [--block 64] [--repeats 11]

One row of `--length` tokens packed like a shared-prompt batch: segments of random lengths in
`--lengths` (a trunk, then two branches), random bfloat16 q, k, v (9 query heads, 3 key/value
heads, head dim 64), jbt's CPU compiler options. Prints the median milliseconds of the forward
(output and log-sum-exp) and of the backward (dq, dk, dv from the saved output), the blocks
visited and each pass's cost per visited block; then the native kernel's, timed alternately with
flash's in the same rounds, and the ratios. `--trace DIR` also traces one run of each
and prints its ops by total time (per-visit ops are the ones run once per visit).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbt.model.attention import flash, native
from jbt.model.attention.mask import MaskInfo, dense_mask
from jbt.runtime import trace, xla_options


def shared_prompt_row(L: int, lo: int, hi: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """[1, L] segment and branch ids: segments of lo..hi tokens (a quarter to half of each the
  trunk, the rest two branches), padding after the last one that fits."""
  seg, br = np.zeros(L, np.int32), np.zeros(L, np.int32)
  at, q = 0, 1
  while True:
    n = int(rng.integers(lo, hi))
    if at + n > L:
      return seg[None], br[None]
    trunk = int(rng.integers(n // 4, n // 2))
    half = (n - trunk) // 2
    seg[at:at + n] = q
    br[at + trunk:at + trunk + half], br[at + trunk + half:at + n] = 1, 2
    at, q = at + n, q + 1


def visits(seg: np.ndarray, br: np.ndarray, block: int) -> int:
  """The (query block, key block) pairs the loops compute: at or below the diagonal, any pair unmasked."""
  L = seg.shape[1]
  mask = np.array(dense_mask(jnp.asarray(seg), None, None, jnp.asarray(br))[0])
  mask &= (seg[0] != 0)[:, None] | np.eye(L, dtype=bool)  # flash's padding sees itself only
  n = L // block
  return int(mask.reshape(n, block, n, block).any(axis=(1, 3)).sum())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--length", type=int, default=1792)
  ap.add_argument("--lengths", default="150:700", help="segment lengths lo:hi")
  ap.add_argument("--block", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=11)
  ap.add_argument("--trace", default="", help="trace one forward and one backward into this directory")
  a = ap.parse_args()
  lo, hi = (int(x) for x in a.lengths.split(":"))
  L, K, G, H, T = a.length, 3, 3, 64, a.block
  if L % T:
    raise SystemExit(f"--length {L} must be a multiple of --block {T}")
  rng = np.random.default_rng(0)
  seg, br = shared_prompt_row(L, lo, hi, rng)
  info = MaskInfo(jnp.asarray(seg), jnp.asarray(br), None)
  q, do = (jnp.asarray(rng.normal(size=(1, L, K, G, H)), jnp.bfloat16) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(1, L, K, H)), jnp.bfloat16) for _ in range(2))
  opts = xla_options.compiler_options("bfloat16")
  fwd = jax.jit(lambda q, k, v, info: flash._forward(q, k, v, info, T, 0, None), compiler_options=opts)
  bwd = jax.jit(lambda q, k, v, info, o, lse, do: flash._backward(q, k, v, info, o, lse, do, T, 0, None),
                compiler_options=opts)
  out, lse = fwd(q, k, v, info)
  jax.block_until_ready(bwd(q, k, v, info, out, lse, do))
  ids = native._ids(info, q, None)
  attrs = native._typed(native._attrs(info, H, None, None))
  native._register()
  n_fwd = jax.jit(lambda q, k, v, ids: native._forward(q, k, v, ids, attrs))
  n_bwd = jax.jit(lambda q, k, v, ids, o, lse, do: native._backward(q, k, v, ids, o, lse, do, attrs))
  n_out, n_lse = n_fwd(q, k, v, ids)
  jax.block_until_ready(n_bwd(q, k, v, ids, n_out, n_lse, do))
  times, n_times = [], []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(q, k, v, info))
    t1 = time.perf_counter()
    jax.block_until_ready(bwd(q, k, v, info, out, lse, do))
    t2 = time.perf_counter()
    jax.block_until_ready(n_fwd(q, k, v, ids))
    t3 = time.perf_counter()
    jax.block_until_ready(n_bwd(q, k, v, ids, n_out, n_lse, do))
    times.append((t1 - t0, t2 - t1))
    n_times.append((t3 - t2, time.perf_counter() - t3))
  f_s, b_s = (float(np.median([t[i] for t in times])) for i in (0, 1))
  nf_s, nb_s = (float(np.median([t[i] for t in n_times])) for i in (0, 1))
  n = visits(seg, br, T)
  print(f"row {L} tokens, {int(seg.max())} segments of {lo}-{hi}, block {T}: {n} visited blocks")
  print(f"forward {f_s * 1e3:.1f} ms ({f_s / n * 1e6:.0f} us a block), "
        f"backward {b_s * 1e3:.1f} ms ({b_s / n * 1e6:.0f} us a block)")
  print(f"native (blocks of 64, {os.cpu_count()} CPUs): forward {nf_s * 1e3:.1f} ms ({f_s / nf_s:.2f}x flash), "
        f"backward {nb_s * 1e3:.1f} ms ({b_s / nb_s:.2f}x flash)")
  if a.trace:
    from pathlib import Path

    for name, fn, args in (("forward", fwd, (q, k, v, info)), ("backward", bwd, (q, k, v, info, out, lse, do))):
      compiled = fn.lower(*args).compile()
      d = Path(a.trace) / name
      with jax.profiler.trace(str(d), profiler_options=trace.options()):
        jax.block_until_ready(compiled(*args))
      (d / trace.HLO_FILE).write_text(compiled.as_text())
      print(f"\n{name}:\n{trace.report(d, 20)}")


if __name__ == "__main__":
  main()
