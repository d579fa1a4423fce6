"""Where and how jbt's programs run.

    mesh.py          device meshes and logical-axis rules (DP / FSDP / TP is a config edit)
    distributed.py   jax.distributed, the primary process, the compilation cache, data-parallel size
    xla_options.py   per-program XLA compiler options
    host_memory.py   the host-memory settings a process must start with (glibc's malloc tunables)
    platforms.py     which JAX backends a process starts (no TPU attempt on a machine without one)
"""
