"""jbt: Bradley-Terry reward models in JAX/Flax."""

from jbt.runtime import platforms as _platforms

__version__ = "0.1.0"

_platforms.skip_absent_tpu()
