"""jbt's train step compiled for a target it does not run on, and what that costs per chip.

The step is the one jbt.train runs (jbt.train.step.jit_train_step), over abstract parameters,
optimizer state and a batch of the largest shape the config can produce: every pair at
max_length tokens a member with nothing shared. Memory comes from the compiled program (XLA's
own buffer assignment for that chip); FLOPs are counted from the model's sizes, since XLA's cost
analysis counts a scanned layer once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jbt.errors import JbtError
from jbt.plan.targets import Target
from jbt.runtime import mesh as mesh_lib

GIB = 2**30
# Without the device XLA cannot autotune its GPU matmuls, and its Triton tiling rules alone fail
# on some shapes ("Couldn't find output tile sizes", a [10000, 4096] dot at max_length 1250):
# plan GPU steps with cuBLAS matmuls, one of the kernels the real compile chooses from.
PLAN_OPTIONS = {"gpu": {"xla_gpu_enable_triton_gemm": False}}


KERNEL_CALL = r'custom_call_target="(?:tpu_custom_call|__gpu\$xla\.gpu\.triton)"'


@dataclasses.dataclass
class Plan:
  """What one compile found, per chip unless named otherwise."""

  target: Target
  model_source: str
  params: int  # parameters of the model (all chips)
  mesh: dict[str, int]
  rows: int  # batch rows x row length, global, of the compiled (largest) batch
  row_length: int
  params_bytes: float
  opt_bytes: float
  batch_bytes: float
  temp_bytes: float | None  # None when the compiler ran out of memory
  total_bytes: float | None  # arguments + outputs - aliased + temporaries
  compile_s: float
  flops_per_step: float  # all chips, model FLOPs (no recomputation)
  batch_pairs: int
  error: str = ""  # the compiler's out-of-memory message
  attention: str = ""  # the attention kind compiled (jbt.model.attention.KINDS)
  kernel_calls: int = 0  # fused kernels (Mosaic / Triton custom calls) in the compiled program

  @property
  def fits(self) -> bool:
    return self.total_bytes is not None and self.total_bytes <= self.target.memory_bytes

  def step_seconds(self, mfu: float) -> float:
    return self.flops_per_step / (self.target.chips * self.target.chip.peak_tflops * 1e12 * mfu)


def topology_devices(target: Target) -> list[Any]:
  """Compile-only devices of the target (libtpu or the CUDA plugin; no TPU or GPU needed)."""
  from jax.experimental import topologies

  if target.platform == "gpu":
    return _gpu_devices(target)

  try:
    import libtpu  # noqa: F401  (the `plan` extra)
  except ImportError:
    raise JbtError("planning for TPUs needs libtpu: pip install -e '.[plan]'") from None
  # libtpu takes a machine-wide lock meant for processes that drive TPU chips; compiling drives
  # none, so several planners (or a planner beside a test run) may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                      chip_config_name=target.chip_config, chips_per_host_bounds=(2, 2, 1),
                                      wrap=target.wrap, num_slices=target.num_slices)
  return list(topo.devices)


def _gpu_devices(target: Target) -> list[Any]:
  from jax.experimental import topologies

  from jbt.plan.targets import gpu_target_config

  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    raise JbtError("planning for GPUs needs the CUDA plugin (no CUDA libraries): pip install -e '.[plan]'")
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                        target_config=gpu_target_config(target.chip_config))
  except (NotImplementedError, RuntimeError) as e:
    raise JbtError(f"--target {target.name}: the CUDA plugin did not start ({str(e).splitlines()[0]}); "
                   "on a machine without GPUs run with JAX_PLATFORMS=cpu") from None
  return list(topo.devices)


def per_chip_bytes(tree: Any) -> float:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return float(total)


def batch_shape(cfg: Any, model_cfg: Any, mesh: Any) -> tuple[int, int, int]:
  """(rows, row length, pairs) of the largest micro-batch the config's layout makes."""
  d = cfg.data
  dp = mesh_lib.data_parallel_size(mesh)
  pairs = cfg.train.batch_size // cfg.opt.grad_accum
  if d.layout == "padded":
    return 2 * pairs, d.max_length, pairs
  from jbt.model.attention import BLOCK_SPARSE

  if model_cfg.attention in BLOCK_SPARSE:  # one long row per device holds its pairs (Batches.iterator)
    return dp, -(-pairs // dp) * 2 * d.max_length, pairs
  # Every pair at 2 * max_length fills a row of pack_length (default 2 * max_length) alone.
  length = d.pack_length or 2 * d.max_length
  per_row = max(length // (2 * d.max_length), 1)
  rows = -(-pairs // per_row)
  rows = -(-rows // dp) * dp
  return rows, length, pairs


def abstract_batch(cfg: Any, model_cfg: Any, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
  from jbt import data

  rows, length, pairs = batch_shape(cfg, model_cfg, mesh)
  sh = NamedSharding(mesh, mesh_lib.batch_spec(mesh))
  out = {}
  for k in data.device_keys(cfg.data.layout):
    if k in ("pair_mask", "pair_margin", "pair_tie"):
      out[k] = jax.ShapeDtypeStruct((pairs,), jnp.float32, sharding=sh)
    elif k in ("chosen_index", "rejected_index", "chosen_response", "rejected_response", "pair_unit"):
      out[k] = jax.ShapeDtypeStruct((pairs,), jnp.int32, sharding=sh)
    else:
      out[k] = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sh)
  return out


def _oom_message(err: Exception) -> str | None:
  text = str(err)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text and "out of memory" not in text.lower():
    return None
  line = next((x for x in text.splitlines() if "memory" in x.lower()), text.splitlines()[0])
  return re.sub(r"\s+", " ", line).strip()


def compile_plan(cfg: Any, target: Target, shape: str | None = None) -> Plan:
  """Compiles cfg's train step for `target`; a Plan either way (error set when it does not fit)."""
  from jbt.model import abstract_params, attention, matmul
  from jbt.model.attention import fused
  from jbt.plan import models
  from jbt.train import optim, setup, trainable
  from jbt.train.state import TrainState, state_shardings
  from jbt.train.step import jit_train_step
  from jbt.train.throughput import train_flops_per_token

  setup.validate(cfg)
  m = cfg.model
  runtime = dict(setup.runtime_fields(cfg), attention=attention.resolve(m.attention, target.platform),
                 matmul=matmul.resolve("auto", target.platform))
  model_cfg, source = models.model_config(cfg, shape, **runtime)
  devices = topology_devices(target)
  mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes, devices=devices)
  setup.check_mesh_batch(cfg, mesh, eval_batch=False)
  rules = tuple(tuple(r) for r in cfg.mesh.rules)
  # The schedule's length changes no shape: any positive step count compiles the same program.
  tx, lr_fn = optim.make_optimizer(cfg.opt, max(cfg.train.max_steps, 1000))
  mask = trainable.trainable_mask(model_cfg, cfg.train.get("freeze", ()))  # the optimizer keeps state for these
  state_sh = state_shardings(model_cfg, tx, mesh, rules, mask)
  params = abstract_params(model_cfg)
  opt_shapes = nn.unbox(jax.eval_shape(tx.init, trainable.split(params, mask)[0]))
  shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_shapes)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sh)
  batch = abstract_batch(cfg, model_cfg, mesh)
  rows, length, pairs = batch_shape(cfg, model_cfg, mesh)
  step = jit_train_step(cfg, model_cfg, tx, lr_fn, mesh, rules, state_sh, backend=target.platform)
  tokens = cfg.train.batch_size * 2 * cfg.data.max_length
  plan = Plan(target=target, model_source=source, params=model_cfg.num_params(), mesh=dict(mesh.shape),
              rows=rows, row_length=length, params_bytes=per_chip_bytes(state.params),
              opt_bytes=per_chip_bytes(state.opt_state), batch_bytes=per_chip_bytes(batch), temp_bytes=None,
              total_bytes=None, compile_s=0.0,
              flops_per_step=train_flops_per_token(model_cfg, cfg.data.max_length) * tokens,
              batch_pairs=cfg.train.batch_size, attention=model_cfg.attention)
  t0 = time.time()
  try:
    with jax.set_mesh(mesh), fused.compile_for(target.platform):
      compiled = step.lower(state, batch).compile(compiler_options=PLAN_OPTIONS.get(target.platform))
  except Exception as e:  # the compiler's out-of-memory error is a result, anything else a failure
    oom = _oom_message(e)
    if oom is None:
      raise
    plan.error, plan.compile_s = oom, time.time() - t0
    return plan
  plan.compile_s = time.time() - t0
  plan.kernel_calls = len(re.findall(KERNEL_CALL, compiled.as_text()))
  mem = compiled.memory_analysis()
  plan.temp_bytes = float(mem.temp_size_in_bytes)
  plan.total_bytes = float(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                           + mem.temp_size_in_bytes)
  return plan
