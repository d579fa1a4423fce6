"""bfloat16 dot rates on this CPU: each form a training step's matmuls take, under each XLA dot library.

    python scripts/bench_dots.py [--m 2048 --k 576 --n 1536] [--seconds 1]

Forms, for x [m, k], w [k, n], g [m, n] (bfloat16): the forward x w and the input gradient
g w^T (float32 results, as jbt.model.matmul computes them), the weight gradient x^T g written
plainly (XLA folds the transpose: the left operand contracts its major axis) and as jbt computes
it (the tokens split in two), a bfloat16-result forward and a float32 one. Libraries: XLA's
defaults, YNNPACK's single and fused dots (jbt's two bfloat16 kinds, jbt/runtime/xla_options.py), and
oneDNN where this jaxlib accepts its options. Then each bfloat16 dot kind's and each
jbt.model.matmul CPU kind's gradient time (the measurements jbt makes once per CPU). GFLOP/s, 2 m k n per product; the CPU is named first.
Then the read rate of a whole-leaf sum of squares (the update's norms) under the model's and
the update program's options (jbt.train.step.TwoPrograms). Last, where torch is installed, its
rates on the same product: bfloat16 and float32 matmuls, and a linear layer under bfloat16
autocast (TRL's default) and in float32.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from jbt.model import matmul
from jbt.runtime import cpu, xla_options

LIBRARIES = {
    "xla defaults": {},
    "ynn single dots (jbt: single)": xla_options.BF16_DOTS["single"],
    "ynn fused dots (jbt: fused)": xla_options.BF16_DOTS["fused"],
    "onednn": {"xla_cpu_use_onednn": True},
    "onednn custom call": {"xla_cpu_experimental_onednn_custom_call": True},
}


FORMS = {
    "x w": lambda x, w, g: jax.lax.dot(x, w, preferred_element_type=jnp.float32),
    "g w^T": lambda x, w, g: jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32),
    "x^T g plain": lambda x, w, g: jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())),
                                                       preferred_element_type=jnp.float32),
    "x^T g split": lambda x, w, g: matmul.tokens_contracted(x, g),
    "x w -> bf16": lambda x, w, g: x @ w,
    "float32": lambda x, w, g: x.astype(jnp.float32) @ w.astype(jnp.float32),
}


def rate(f, args, flop: float, seconds: float) -> float:
  jax.block_until_ready(f(*args))
  reps, start = 0, time.perf_counter()
  while True:
    jax.block_until_ready(f(*args))
    reps += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return flop * reps / elapsed / 1e9


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--m", type=int, default=2048)
  ap.add_argument("--k", type=int, default=576)
  ap.add_argument("--n", type=int, default=1536)
  ap.add_argument("--seconds", type=float, default=1.0)
  a = ap.parse_args()
  print(cpu.describe(), flush=True)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (a.m, a.k), jnp.bfloat16)
  w = jax.random.normal(keys[1], (a.k, a.n), jnp.bfloat16)
  g = jax.random.normal(keys[2], (a.m, a.n), jnp.bfloat16)
  flop = 2.0 * a.m * a.k * a.n
  print(f"\nGFLOP/s, x [{a.m}, {a.k}], w [{a.k}, {a.n}]\n")
  print("| library | " + " | ".join(FORMS) + " |")
  print("|---|" + "---|" * len(FORMS))
  for name, options in LIBRARIES.items():
    cells = []
    for form in FORMS.values():
      try:
        f = jax.jit(form).lower(x, w, g).compile(compiler_options=options)
      except Exception:  # an option this jaxlib does not know
        if not options:
          raise
        cells.append("n/a")
        continue
      cells.append(f"{rate(f, (x, w, g), flop, a.seconds):,.0f}")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
  print("\nbfloat16 dot kinds, one gradient through an up and a down projection (576 <-> 1536, 1024 tokens), "
        "best of 5:")
  for kind, options in xla_options.BF16_DOTS.items():
    print(f"  {kind}: {matmul.grad_seconds('bf16_f32', options=options) * 1e3:.1f} ms")
  print(f"bfloat16 dots on this CPU: {xla_options.bf16_dots()} ({cpu.choices_path()})")
  print("\njbt.model.matmul CPU kinds, one gradient through an up and a down projection (576 <-> 1536, "
        "1024 tokens), best of 5:")
  for kind in matmul.CPU_KINDS:
    print(f"  {kind}: {matmul.grad_seconds(kind) * 1e3:.1f} ms")
  print(f"model.matmul=auto on this CPU: {matmul.resolve('auto', 'cpu')} ({cpu.choices_path()})")
  # The optimizer update's whole-tree norms (clipping, logged norms): one stacked MLP weight's
  # gradient, [30, 576, 1536] float32, its sum of squares under the model's and the update's options.
  t = jax.random.normal(keys[0], (30, 576, 1536), jnp.float32)
  print("\nsum of squares of a [30, 576, 1536] float32 tree leaf (GB/s read):")
  for name, options in (("jbt model program", xla_options.compiler_options("bfloat16", "cpu")),
                        ("jbt update program", xla_options.update_options("cpu"))):
    f = jax.jit(lambda t: jnp.sum(t * t)).lower(t).compile(compiler_options=options)
    print(f"  {name} {options}: {rate(f, (t,), t.size * 4, a.seconds):,.1f}")
  torch_rates(a.m, a.k, a.n, a.seconds)


def torch_rates(m: int, k: int, n: int, seconds: float) -> None:
  """PyTorch's rates on the same product, where torch is installed (TRL's side of scripts/bench.py):
  a matmul in bfloat16 and float32, and a linear layer's forward and forward + backward (three
  products) under bfloat16 autocast, as TRL's default `bf16=True` runs them, and in float32."""
  try:
    import torch
  except ImportError:
    return
  torch.set_num_threads(len(os.sched_getaffinity(0)))

  def timed(f, products: int) -> float:  # (jax.block_until_ready passes torch's results through)
    return rate(f, (), products * 2.0 * m * k * n, seconds)

  print(f"\ntorch {torch.__version__} GFLOP/s, the same product ({torch.get_num_threads()} threads):")
  for dt in (torch.bfloat16, torch.float32):
    x, w = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
    print(f"  matmul {str(dt).removeprefix('torch.')}: {timed(lambda: x @ w, 1):,.1f}")
  lin = torch.nn.Linear(k, n, bias=False)
  x = torch.randn(m, k, requires_grad=True)

  def step(autocast: bool, backward: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      y = lin(x)
    if backward:
      y.float().sum().backward()

  for autocast in (True, False):
    name = "bf16 autocast" if autocast else "float32"
    print(f"  linear {name}: forward {timed(lambda: step(autocast, False), 1):,.1f}, "
          f"forward + backward {timed(lambda: step(autocast, True), 3):,.1f}")


if __name__ == "__main__":
  main()
