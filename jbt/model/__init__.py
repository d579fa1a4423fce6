"""The reward model: a decoder backbone with a Bradley-Terry head, a pure function of its params.

    config.py     ModelConfig: sizes, feature flags, compute dtype, kernels
    decoder.py    the Flax modules (RMSNorm, RoPE, attention, MLP, layers, RewardModel)
    matmul.py     projection matmul kinds
    lora.py       LoRA adapters: init, split from the base, merge into it
    attention/    attention kinds (registry in attention/__init__.py)
"""

from jbt.model import attention, lora, matmul
from jbt.model.config import ModelConfig
from jbt.model.decoder import RewardModel, abstract_params, init_params, pool_index

__all__ = ["attention", "lora", "matmul", "ModelConfig", "RewardModel", "abstract_params", "init_params", "pool_index"]
