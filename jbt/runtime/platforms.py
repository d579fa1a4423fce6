"""Which JAX backends a jbt process starts.

With the libtpu wheel installed (the `plan` extra: jbt.plan compiles for TPUs on any machine),
JAX tries to start a TPU backend in every process, and on a machine without TPU chips that try
logs errors about TPU hosts and costs start-up time. Where JAX could only end up on the CPU
anyway (libtpu present, no TPU chip, no NVIDIA or AMD GPU, and JAX_PLATFORMS not set) jbt sets
JAX's platform list to "cpu" before any backend starts. Compiling for a TPU topology
(jbt.plan) loads libtpu on its own and is not affected.
"""

from __future__ import annotations

import importlib.util
import os


def cpu_only_machine() -> bool:
  """libtpu is installed but this machine has no accelerator JAX could use."""
  if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
    return False
  if importlib.util.find_spec("libtpu") is None or os.path.exists("/dev/kfd"):  # /dev/kfd: an AMD GPU
    return False
  try:
    from jax._src import hardware_utils
  except ImportError:  # a JAX without these probes: leave the choice to JAX
    return False
  try:
    return not (hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu())
  except Exception:
    return False


def skip_absent_tpu() -> None:
  """Start only the CPU backend where cpu_only_machine(); call before any backend starts."""
  if importlib.util.find_spec("libtpu") is None:  # the common case costs no jax import
    return
  if cpu_only_machine():
    import jax

    jax.config.update("jax_platforms", "cpu")
