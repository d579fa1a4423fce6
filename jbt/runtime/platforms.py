"""Which JAX backends a jbt process starts.

With the libtpu wheel or JAX's CUDA plugin installed (the `plan` extra: jbt.plan compiles for
TPUs and GPUs on any machine), JAX tries to start those backends in every process; on a machine
without the chips the tries log errors (TPU hosts, CUDA libraries). Where
JAX could only end up on the CPU anyway (no TPU chip, no NVIDIA or AMD GPU, JAX_PLATFORMS not
set) jbt sets JAX's platform list to "cpu" before any backend starts. That silences libtpu. The
CUDA plugin still loads (JAX imports every installed plugin) and logs that it found no CUDA
driver, before anything can stop it: install it only where GPU plans are made, or into a
directory of its own (docs/planning.md). Compiling for a TPU or GPU topology (jbt.plan) loads the
plugin on its own and is not affected.
"""

from __future__ import annotations

import importlib.util
import os


PLUGINS = ("libtpu", "jax_cuda12_plugin")  # accelerator plugins that may sit on a CPU-only machine


def _plugin_installed() -> bool:
  return any(importlib.util.find_spec(name) is not None for name in PLUGINS)


def cpu_only_machine() -> bool:
  """An accelerator plugin is installed but this machine has no accelerator JAX could use."""
  if os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_FORCE_TPU_INIT"):
    return False
  if not _plugin_installed() or os.path.exists("/dev/kfd"):  # /dev/kfd: an AMD GPU
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
  if not _plugin_installed():  # the common case costs no jax import
    return
  if cpu_only_machine():
    import jax

    jax.config.update("jax_platforms", "cpu")
