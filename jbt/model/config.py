"""The model's configuration: sizes, feature flags and the kernels it runs, frozen and hashable."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

REMAT = ("none", "full", "attention", "dots")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections LoRA can adapt
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_rslora")
RUNTIME_FIELDS = ("dtype", "remat", "attention", "matmul", "scan_layers", "mlp_chunk")  # choices of the machine that runs it


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the model needs, built from cfg.model or a Hugging Face config (jbt.hf).

  `family` only names the Hugging Face mapping (jbt.hf.families); the model itself reads the
  feature flags. `attention` and `matmul` may be given as "auto": they are resolved for JAX's
  default backend when the config is built, so the model never looks at the backend.
  """

  family: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings),
  # ("linear", factor), ("longrope", short_factors, long_factors, original_max_position_embeddings,
  # attention_factor) or None; tuples so the dataclass stays hashable for jit.
  rope_scaling: tuple | None = None
  local_rope: tuple | None = None  # (rope_theta, rope_scaling) of sliding layers, if not the global ones (Gemma 3)
  partial_rotary_factor: float = 1.0  # the fraction of each head's dims RoPE rotates (Phi-4-mini: 0.75)
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  qk_norm_scope: str = "head"  # "head": RMSNorm over each head's H (Qwen3) | "projection": over all N*H (OLMo 2)
  pre_norms: bool = True  # RMSNorm on the input of attention and MLP (Llama)
  post_norms: bool = False  # RMSNorm on the output of attention and MLP, before the residual add (OLMo 2)
  norm_scale_f32: bool = False  # RMSNorm scales in float32, then casts (OLMo 2); else casts, then scales (Llama)
  norm_offset: float = 0.0  # RMSNorm scales by offset + w (Gemma: 1, its weights start at 0)
  embed_scale: bool = False  # embeddings times sqrt(hidden_size) in the compute dtype (Gemma)
  mlp_activation: str = "silu"  # the gate's activation: "silu" (Llama) | "gelu_tanh" (Gemma's GeGLU)
  query_scale: float | None = None  # logits over sqrt(this), not sqrt(head_dim) (Gemma's query_pre_attn_scalar)
  attn_softcap: float | None = None  # attention logits become cap * tanh(logits / cap) (Gemma 2)
  sliding_window: int | None = None  # every layer's window (Mistral)
  # per-layer windows for models that mix sliding and full layers (0: full), scanned with the
  # layers; None: every layer uses sliding_window. A tuple so the dataclass stays hashable.
  layer_windows: tuple[int, ...] | None = None
  num_labels: int = 2
  pad_token_id: int = 0
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: str = "none"  # "none" | "full" | "attention" (save attention results) | "dots" (and matmul outputs)
  attention: str = "auto"  # a kind of jbt.model.attention.KINDS, or "auto" (the backend's default)
  matmul: str = "auto"  # a kind of jbt.model.matmul.KINDS, or "auto" (the backend's default)
  attn_block: int = 128  # "xla" query block (0: dense), fused kernels' block; speed and memory, not results
  flash_block: int = 64  # "flash" query and key block
  mlp_chunk: int = 0  # tokens of a row the MLP computes at a time (0: all); memory, not results
  scan_layers: bool = True
  branches: int = 2  # most responses one shared-prompt segment holds (fused kernels run once per branch)
  # LoRA adapters (rank 0: none): y = x W + (x A) B * scale, scale alpha / r (rsLoRA: alpha / sqrt(r))
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = LORA_TARGETS
  lora_rslora: bool = False

  def __post_init__(self):
    from jbt.model import attention, matmul  # the kernel registries

    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
    if self.num_labels not in (1, 2):
      raise ValueError(f"num_labels must be 1 or 2, got {self.num_labels}")
    if self.qk_norm_scope not in ("head", "projection"):
      raise ValueError(f"qk_norm_scope must be head or projection, got {self.qk_norm_scope!r}")
    if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
      raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} gives "
                       f"{self.rotary_dim} rotated dims; that must be even and positive")
    if self.layer_windows is not None:
      if len(self.layer_windows) != self.num_layers or self.sliding_window is not None:
        raise ValueError(f"layer_windows needs one window per layer ({self.num_layers}) and no sliding_window, "
                         f"got {self.layer_windows} and {self.sliding_window}")
      object.__setattr__(self, "layer_windows", tuple(int(w) for w in self.layer_windows))
    if self.remat not in REMAT:
      raise ValueError(f"remat must be one of {', '.join(REMAT)}, got {self.remat!r}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    if self.lora_rank < 0 or not set(self.lora_targets) <= set(LORA_TARGETS) or (self.lora_rank and not self.lora_targets):
      raise ValueError(f"LoRA needs rank >= 0 and targets among {', '.join(LORA_TARGETS)}, got rank "
                       f"{self.lora_rank}, targets {list(self.lora_targets)}")
    # Decided once, here, for the backend this process computes on.
    if self.mlp_activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"mlp_activation must be silu or gelu_tanh, got {self.mlp_activation!r}")
    object.__setattr__(self, "attention", attention.resolve(self.attention, sliding_window=self.max_window,
                                                            softcap=self.attn_softcap))
    object.__setattr__(self, "matmul", matmul.resolve(self.matmul))

  @property
  def rotary_dim(self) -> int:
    """R: the head dims RoPE rotates (the first R; HF's int(head_dim * partial_rotary_factor))."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def max_window(self) -> int | None:
    """The widest sliding window of any layer (None: full attention everywhere)."""
    return (max(self.layer_windows) or None) if self.layer_windows else self.sliding_window

  @property
  def reward_label(self) -> int:
    """The logit that is the reward: 1 for HALOs' two-label head, 0 for a one-label head."""
    return 1 if self.num_labels == 2 else 0

  @property
  def lora_scale(self) -> float:
    """The adapters' factor: alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's use_rslora)."""
    return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_rslora else self.lora_rank)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def carry_dtype(self) -> jnp.dtype:
    """The layer scan's carry (the residual stream between layers, saved per layer for the
    backward pass). float32 with the CPU matmul kinds: XLA's CPU backend writes a bfloat16 slice
    of the saved stack by converting the whole stack and back, every layer. The values are the
    compute dtype's either way (each layer rounds its output to it)."""
    from jbt.model import matmul

    return jnp.dtype(jnp.float32) if self.matmul in matmul.CPU_KINDS else self.compute_dtype

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count (no LM head), used for MFU estimates."""
    D, F, N, K, H = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
    attn = D * N * H * 2 + D * K * H * 2
    qk_norm = (N + K) * H if self.qk_norm_scope == "projection" else 2 * H
    attn += (N * H + 2 * K * H) * self.qkv_bias + D * self.o_bias + qk_norm * self.qk_norm
    mlp = 3 * D * F + (2 * F + D) * self.mlp_bias
    norms = 2 * D * (self.pre_norms + self.post_norms)
    return self.vocab_size * D + self.num_layers * (attn + mlp + norms) + D + D * self.num_labels

  def to_json(self) -> dict[str, Any]:
    """The fields a model directory stores; attention and matmul stay "auto", since they are the
    choice of whichever machine loads it."""
    d = dataclasses.asdict(self)
    d.update(attention="auto", matmul="auto")
    d.pop("branches")  # a property of the data it runs on
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ModelConfig":
    """Inverse of to_json; raises ValueError naming unknown fields."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}")
    d = dict(d)
    def tuples(x: Any) -> Any:  # JSON lists back to (nested) tuples
      return tuple(tuples(y) for y in x) if isinstance(x, (list, tuple)) else x

    for key in ("rope_scaling", "layer_windows", "local_rope", "lora_targets"):
      if d.get(key) is not None:
        d[key] = tuples(d[key])
    return cls(**d)
