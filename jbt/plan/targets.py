"""Hardware a run can be planned for: TPU slices (compiled for with libtpu) and GPU hosts.

A target is written `tpu:v5e-16`, `tpu:v5p-128`, `tpu:2xv5e-16` (two slices over the data-center
network), or `gpu:h100x8`. TPU names follow Cloud TPU's: v5e-N and v6e-N count chips, v4-N and
v5p-N count TensorCores (two per chip). The topology a name maps to is the one Cloud TPU
provisions for it: 2-D for v5e/v6e (2x2, 2x4, 4x4, 4x8, ...), 3-D for v4/v5p (2x2x1, 2x2x2,
2x2x4, 2x4x4, 4x4x4, ...), four chips a host, a torus along each dimension of 16 chips (v5e/v6e)
or in every dimension from 4x4x4 up (v4/v5p).

Chip figures are the vendors' published ones: memory is what XLA reports as available (v5e:
15.75 GiB) or the published capacity; peak is dense bfloat16 TFLOP/s per chip.
"""

from __future__ import annotations

import dataclasses
import re

from jbt.errors import JbtError


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str
  memory_gib: float  # per chip
  peak_tflops: float  # dense bfloat16, per chip
  dims: int = 2  # topology dimensions (TPU)
  cores_per_chip: int = 1  # TensorCores a Cloud TPU name counts per chip (v4 / v5p: 2)


TPU_CHIPS = {
    "v4": Chip("TPU v4", 32.0, 275.0, dims=3, cores_per_chip=2),
    "v5e": Chip("TPU v5 lite", 15.75, 197.0),
    "v5p": Chip("TPU v5p", 95.0, 459.0, dims=3, cores_per_chip=2),
    "v6e": Chip("TPU v6 lite", 31.25, 918.0),
}
TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}  # libtpu's topology names

GPU_CHIPS = {
    "h100": Chip("NVIDIA H100 80GB", 80.0, 989.0),
    "h200": Chip("NVIDIA H200", 141.0, 989.0),
    "a100": Chip("NVIDIA A100 80GB", 80.0, 312.0),
    "a100-40gb": Chip("NVIDIA A100 40GB", 40.0, 312.0),
}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as the user wrote it
  platform: str  # "tpu" or "gpu"
  chip: Chip
  chips: int  # in all slices / hosts
  topology: str = ""  # libtpu topology, e.g. "v5e:4x4"
  chip_config: str = "default"
  wrap: tuple[bool, ...] = (False, False, False)
  num_slices: int = 1

  @property
  def memory_bytes(self) -> float:
    return self.chip.memory_gib * 2**30


def _grid(chips: int, dims: int) -> tuple[int, ...] | None:
  """The slice shape Cloud TPU uses for `chips` chips: doubling the smallest dimension from the
  last backwards (2-D: 1x1, 2x2, 2x4, 4x4, 4x8, ...; 3-D: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
  if dims == 2:
    if chips == 1:
      return (1, 1)
    shape = [2, 2]
  else:
    shape = [2, 2, 1]
  while True:
    n = 1
    for s in shape:
      n *= s
    if n == chips:
      return tuple(shape)
    if n > chips:
      return None
    i = max(k for k in range(len(shape)) if shape[k] == min(shape))
    shape[i] *= 2


def _tpu(name: str, spec: str) -> Target:
  m = re.fullmatch(r"(?:(\d+)x)?(v4|v5e|v5p|v6e)-(\d+)", spec)
  if m is None:
    raise JbtError(f"--target {name}: TPU targets look like tpu:v5e-16, tpu:v5p-128, tpu:v4-32, tpu:v6e-8 "
                   "or tpu:2xv5e-16 (two slices)")
  slices, gen, count = int(m.group(1) or 1), m.group(2), int(m.group(3))
  chip = TPU_CHIPS[gen]
  if count % chip.cores_per_chip:
    raise JbtError(f"--target {name}: {gen} sizes count TensorCores, {chip.cores_per_chip} a chip")
  chips = count // chip.cores_per_chip
  shape = _grid(chips, chip.dims)
  if shape is None:
    raise JbtError(f"--target {name}: no {gen} slice of {chips} chips (sizes double: "
                   f"{', '.join(f'{gen}-{n * chip.cores_per_chip}' for n in (4, 8, 16, 32, 64, 128, 256))}, ...)")
  if chip.dims == 2:
    wrap = tuple(s >= 16 for s in shape) + (False,)
  else:
    wrap = (min(shape) >= 4,) * 3
  return Target(name, "tpu", chip, chips * slices, topology=f"{TOPOLOGY_PREFIX[gen]}:{'x'.join(map(str, shape))}",
                chip_config="megacore" if chip.cores_per_chip == 2 else "default", wrap=wrap, num_slices=slices)


def _gpu(name: str, spec: str) -> Target:
  m = re.fullmatch(r"([a-z0-9-]+?)x(\d+)", spec)
  if m is None or m.group(1) not in GPU_CHIPS:
    raise JbtError(f"--target {name}: GPU targets look like gpu:h100x8 ({', '.join(GPU_CHIPS)})")
  return Target(name, "gpu", GPU_CHIPS[m.group(1)], int(m.group(2)))


def parse(name: str) -> Target:
  platform, _, spec = name.strip().lower().partition(":")
  if platform == "tpu":
    return _tpu(name, spec)
  if platform == "gpu":
    return _gpu(name, spec)
  raise JbtError(f"--target {name}: give tpu:NAME (e.g. tpu:v5e-16) or gpu:NAMExCOUNT (e.g. gpu:h100x8)")
