"""Hardware a run can be planned for: TPU slices (compiled for with libtpu) and GPU hosts.

A target is written `tpu:v5e-16`, `tpu:v5p-128`, `tpu:2xv5e-16` (two slices over the data-center
network), `gpu:h100x8` or `gpu:2xh100x8` (two hosts of 8). TPU names follow Cloud TPU's: v5e-N and v6e-N count chips, v4-N and
v5p-N count TensorCores (two per chip). The topology a name maps to is the one Cloud TPU
provisions for it: 2-D for v5e/v6e (2x2, 2x4, 4x4, 4x8, ...), 3-D for v4/v5p (2x2x1, 2x2x2,
2x2x4, 2x4x4, 4x4x4, ...), four chips a host, a torus along each dimension of 16 chips (v5e/v6e)
or in every dimension from 4x4x4 up (v4/v5p).

Chip figures are the vendors' published ones: memory is what XLA reports as available (v5e:
15.75 GiB) or the capacity CUDA reports, less nothing else; peak is dense bfloat16 TFLOP/s per
chip. GPU targets compile through the CUDA PJRT plugin (`jax-cuda12-plugin`, no CUDA libraries
needed) against a device description built from the properties in _GPU_PROPS.
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
    "h100": Chip("NVIDIA H100 80GB HBM3", 79.1, 989.0),
    "h200": Chip("NVIDIA H200", 139.8, 989.0),
    "a100": Chip("NVIDIA A100-SXM4-80GB", 79.1, 312.0),
    "a100-40gb": Chip("NVIDIA A100-SXM4-40GB", 39.4, 312.0),
    "l4": Chip("NVIDIA L4", 22.0, 121.0),
    "a10": Chip("NVIDIA A10", 22.0, 125.0),
}
# What XLA's GPU compiler reads about a device it cannot see (a GpuTargetConfigProto): the
# device's properties as CUDA reports them. Only the compilable ones are listed.
_GPU_PROPS = {
    # name: (compute capability, SMs, clock GHz, memory bytes, bandwidth B/s, L2 bytes, shared memory per SM)
    "h100": ((9, 0), 132, 1.98, 84942979072, 3352320000000, 52428800, 233472),
    "h200": ((9, 0), 132, 1.98, 150119546880, 4800000000000, 52428800, 233472),
    "a100": ((8, 0), 108, 1.41, 84974239744, 2039000000000, 41943040, 167936),
    "a100-40gb": ((8, 0), 108, 1.41, 42298834944, 1555000000000, 41943040, 167936),
}
# device_kind substrings (lower case) -> chip, most specific first, for peak_flops()
_KINDS = (("h200", GPU_CHIPS["h200"]), ("h100", GPU_CHIPS["h100"]), ("a100", GPU_CHIPS["a100"]),
          ("l4", GPU_CHIPS["l4"]), ("a10", GPU_CHIPS["a10"]), ("v5 lite", TPU_CHIPS["v5e"]),
          ("v5e", TPU_CHIPS["v5e"]), ("v5p", TPU_CHIPS["v5p"]), ("v6", TPU_CHIPS["v6e"]), ("v4", TPU_CHIPS["v4"]))


def peak_flops(device_kind: str) -> float | None:
  """Dense bfloat16 peak FLOP/s of a device (jax's device_kind), None where unknown (CPU)."""
  kind = device_kind.lower()
  return next((chip.peak_tflops * 1e12 for sub, chip in _KINDS if sub in kind), None)


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as the user wrote it
  platform: str  # "tpu" or "gpu"
  chip: Chip
  chips: int  # in all slices / hosts
  topology: str = ""  # libtpu topology, e.g. "v5e:4x4"; GPUs: "1 x hosts x GPUs per host"
  chip_config: str = "default"  # TPU: libtpu's chip config; GPU: the _GPU_PROPS key
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


def gpu_target_config(gpu: str) -> str:
  """The GpuTargetConfigProto text XLA compiles for when the GPU is not on this machine."""
  (major, minor), sms, ghz, mem, bandwidth, l2, smem = _GPU_PROPS[gpu]
  name = GPU_CHIPS[gpu].kind
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem} shared_memory_per_block_optin: {smem - 1024} threads_per_core_limit: 2048
  core_count: {sms} fpus_per_core: {128 if major >= 9 else 64} block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: {l2}
  clock_rate_ghz: {ghz} device_memory_size: {mem} registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  device_vendor: "NVIDIA Corporation" name: "{name}" device_address_bits: 64
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 patch: 0 }}
device_description_str: "{name}"
"""


def _gpu(name: str, spec: str) -> Target:
  m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9-]+?)x(\d+)", spec)
  if m is None or m.group(2) not in _GPU_PROPS:
    raise JbtError(f"--target {name}: GPU targets look like gpu:h100x8 or gpu:2xh100x8 (two hosts); "
                   f"GPUs: {', '.join(_GPU_PROPS)}")
  hosts, gpu, per_host = int(m.group(1) or 1), m.group(2), int(m.group(3))
  return Target(name, "gpu", GPU_CHIPS[gpu], hosts * per_host, topology=f"1x{hosts}x{per_host}",
                chip_config=gpu, num_slices=hosts)


def parse(name: str) -> Target:
  platform, _, spec = name.strip().lower().partition(":")
  if platform == "tpu":
    return _tpu(name, spec)
  if platform == "gpu":
    return _gpu(name, spec)
  raise JbtError(f"--target {name}: give tpu:NAME (e.g. tpu:v5e-16) or gpu:NAMExCOUNT (e.g. gpu:h100x8)")
