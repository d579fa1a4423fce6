"""jbt: Bradley-Terry reward models in JAX/Flax."""

__version__ = "0.1.0"
