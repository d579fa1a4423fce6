"""Meshes and logical-axis rules: the model names logical axes, the config maps them to the mesh.

Switching data parallel, FSDP (ZeRO-3) and tensor parallel is a config edit of `cfg.mesh`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jbt.errors import JbtError

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")  # the mesh axes batch rows and pairs are split over

# Logical axis -> mesh axes, tried in order; flax skips a rule whose mesh axis is already used
# in the same spec, so activations ("batch" on data+fsdp) fall through to replicated "embed".
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("labels", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA factors shard along their weight's other axes
)


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all (or the given) devices; one size may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(axes):
    raise JbtError(f"mesh shape {shape} does not match its axes {list(axes)}")
  if shape.count(-1) > 1:
    raise JbtError(f"mesh shape {shape}: at most one size may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise JbtError(f"mesh shape {shape} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise JbtError(f"mesh shape {dict(zip(axes, shape))} needs {int(np.prod(shape))} devices, found {len(devices)}")
  try:
    from jax.experimental import mesh_utils

    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # CPU and odd shapes: plain row-major order is fine
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, tuple(axes))


def batch_spec(mesh: Mesh) -> PartitionSpec:
  """Rows and pairs of a batch are split over the data-parallel axes (data and fsdp)."""
  return PartitionSpec(tuple(a for a in DATA_AXES if a in mesh.axis_names))


def data_parallel_size(mesh: Mesh) -> int:
  """Devices that hold different rows of a batch: the product of the mesh's data axes."""
  return int(np.prod([mesh.shape[a] for a in DATA_AXES if a in mesh.axis_names]))


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
  """Logical names -> PartitionSpec, replicating any dimension the mesh axes do not divide.

  Small models (2 kv heads on a tensor axis of 4) then still run, with that tensor replicated.
  """
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    group = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in group]))
    out.append(axes if dim % size == 0 else None)
  return PartitionSpec(*out)


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """NamedShardings for a tree of nn.LogicallyPartitioned abstract params (from eval_shape of init)."""

  def one(leaf: Any) -> NamedSharding:
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_spec(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, boxed_abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def model_shardings(cfg: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """Params-shaped tree of NamedShardings for a ModelConfig."""
  from jbt.model import abstract_params

  return param_shardings(abstract_params(cfg, boxed=True), mesh, rules)
