"""The processes and the compiler: jax.distributed start-up, the primary process, the persistent
compilation cache."""

from __future__ import annotations

from pathlib import Path

import jax
from ml_collections import ConfigDict


def is_primary() -> bool:
  """Process 0: the one that logs and writes run-level files."""
  return jax.process_index() == 0


def maybe_init_distributed(cfg: ConfigDict) -> None:
  """jax.distributed for several hosts: explicit coordinator, or auto-detected (TPU pods, SLURM)."""
  dist = cfg.get("dist")
  if dist is None:
    return
  if dist.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
  if dist.get("coordinator"):
    jax.distributed.initialize(coordinator_address=dist.coordinator, num_processes=dist.num_processes,
                               process_id=dist.process_id,
                               local_device_ids=list(dist.local_device_ids) if dist.get("local_device_ids") else None)
  elif dist.get("auto"):
    jax.distributed.initialize()


def enable_compilation_cache(cfg: ConfigDict) -> Path | None:
  """Turns on JAX's persistent compilation cache (cfg.train.compilation_cache): a rerun, a
  resumed run or another run with the same shapes loads compiled steps instead of compiling."""
  value = cfg.train.compilation_cache
  if not value:
    return None
  path = Path(cfg.ckpt.cache_dir) / "xla_cache" if value == "auto" else Path(value).expanduser()
  if "://" in str(cfg.ckpt.cache_dir) and value == "auto":
    return None  # a remote cache_dir: keep compiled programs local, or set train.compilation_cache
  jax.config.update("jax_compilation_cache_dir", str(path.absolute()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path
