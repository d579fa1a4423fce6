"""Decoder backbone (Llama, Mistral, Qwen2, Qwen3) with a Bradley-Terry reward head.

Shape legend for array names and einsum strings:
  B: batch rows            L: tokens in a row (query side)   S: tokens in a row (key side)
  D: model width           F: MLP width                      V: vocabulary
  N: query heads           K: key/value heads                G: query heads per kv head (N // K)
  H: head dim              C: reward-head outputs (num_labels)
  P: pooled sequences (one reward each)   T: tokens of all rows (B * L)

One row may hold several sequences packed side by side: `segment_ids` numbers them (0 = padding)
and attention is causal within a segment. `positions` restart at 0 for every sequence and only
feed RoPE, so a padded batch is the one-segment-per-row case.

Shared prompts: with `branch_ids` (0 = trunk, 1, 2, ... = branches), a segment is a prompt
followed by several responses; a token attends to earlier trunk tokens and to earlier tokens of
its own branch only. With positions continuing from the prompt in every branch, each branch
computes exactly what prompt + that response would alone, while the prompt is computed once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jbt import attention as flash

Array = jax.Array

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = ("auto", "flash", "xla")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the model needs, built from cfg.model or a Hugging Face config."""

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
  # ("linear", factor) or None; a tuple so the dataclass stays hashable for jit.
  rope_scaling: tuple | None = None
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  num_labels: int = 2
  pad_token_id: int = 0
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: str = "none"  # "none" | "full" | "attention" (save attention results) | "dots" (and matmul outputs)
  # "flash": jbt.attention's block-sparse online softmax (skips blocks the packing masks out);
  # "xla": softmax over each query block's causal keys; "auto": flash on CPU, xla elsewhere.
  attention: str = "auto"
  attn_block: int = 128  # "xla" query block (0: dense); changes speed and memory, not results
  flash_block: int = 64  # "flash" query and key block
  scan_layers: bool = True

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
    if self.num_labels not in (1, 2):
      raise ValueError(f"num_labels must be 1 or 2, got {self.num_labels}")
    if self.attention not in ATTENTION:
      raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")

  @property
  def attention_impl(self) -> str:
    """The attention actually used: "auto" resolved for the default backend."""
    if self.attention != "auto":
      return self.attention
    return "flash" if jax.default_backend() == "cpu" else "xla"

  @property
  def reward_label(self) -> int:
    """The logit that is the reward: 1 for HALOs' two-label head, 0 for a one-label head."""
    return 1 if self.num_labels == 2 else 0

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count (no LM head), used for MFU estimates."""
    D, F, N, K, H = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
    attn = D * N * H * 2 + D * K * H * 2
    attn += (N * H + 2 * K * H) * self.qkv_bias + D * self.o_bias + 2 * H * self.qk_norm
    mlp = 3 * D * F + (2 * F + D) * self.mlp_bias
    return self.vocab_size * D + self.num_layers * (attn + mlp + 2 * D) + D + D * self.num_labels


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _constrain(x: Array, axes: tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, axes)


MATMUL_NAME = "matmul_out"  # a custom-VJP matmul's output, which remat "dots" cannot recognise as a dot


@jax.custom_vjp
def _dot_f32_acc(x_TxI: Array, w_IxO: Array) -> Array:
  """x @ w with bfloat16 inputs and the float32 result (cast by the caller)."""
  return jax.lax.dot(x_TxI, w_IxO.astype(x_TxI.dtype), preferred_element_type=jnp.float32)


def _dot_f32_acc_fwd(x_TxI: Array, w_IxO: Array) -> tuple[Array, tuple[Array, Array]]:
  return _dot_f32_acc(x_TxI, w_IxO), (x_TxI, w_IxO)


def _transposed(a_MxN: Array) -> Array:
  """a.T laid out row-major. XLA folds a plain transpose into the dot that reads it, and its CPU
  backend then computes that (transposed-operand) bfloat16 dot in float32; a gather of the rows
  in order is not folded, so the dot keeps bfloat16 inputs."""
  return jnp.take(a_MxN.T, jnp.arange(a_MxN.shape[1]), axis=0)


def _dot_f32_acc_bwd(res: tuple[Array, Array], g_TxO: Array) -> tuple[Array, Array]:
  x_TxI, w_IxO = res
  g_TxO = g_TxO.astype(x_TxI.dtype)
  dx_TxI = jax.lax.dot(g_TxO, _transposed(w_IxO.astype(x_TxI.dtype)), preferred_element_type=jnp.float32)
  dw_IxO = jax.lax.dot(_transposed(x_TxI), g_TxO, preferred_element_type=jnp.float32)
  return dx_TxI.astype(x_TxI.dtype), dw_IxO.astype(w_IxO.dtype)


_dot_f32_acc.defvjp(_dot_f32_acc_fwd, _dot_f32_acc_bwd)


def matmul(x_TxI: Array, w_IxO: Array, dt: jnp.dtype) -> Array:
  """x @ w in the compute dtype `dt`, for a float32 parameter w.

  On the CPU backend a bfloat16 x bfloat16 -> bfloat16 dot is computed by converting both sides to
  float32 (float32 speed, plus the converts), while bfloat16 inputs with a float32 result run at
  about twice float32's speed (~950 against ~460 GFLOP/s on 2 Zen 5 cores, a [2048, 576] x
  [576, 1536] dot). There the forward and both backward dots take bfloat16 inputs and accumulate
  in float32, and the weight gradient stays float32. The values equal the plain bfloat16 matmul's
  (XLA's CPU dot accumulates in float32 too); other backends and float32 use the plain matmul.

  Remat "dots" keeps the float32 result, not its bfloat16 cast: XLA's CPU backend updates a layer
  scan's stacked bfloat16 residuals by converting the whole stack to float32 and back at every
  layer, while a float32 stack is updated in place (docs/benchmarks.md).
  """
  if dt == jnp.float32 or jax.default_backend() != "cpu":
    return x_TxI @ w_IxO.astype(dt)
  return checkpoint_name(_dot_f32_acc(x_TxI.astype(dt), w_IxO), MATMUL_NAME).astype(dt)


class RMSNorm(nn.Module):
  """HF's RMSNorm: normalise in float32, cast back, then scale (that order matters in bf16)."""

  eps: float
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = _param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return w.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """RoPE inverse frequencies [H/2], with Llama 3 / linear scaling as transformers computes them."""
  H = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  if cfg.rope_scaling is None:
    return inv_freq
  kind = cfg.rope_scaling[0]
  if kind == "linear":
    return inv_freq / cfg.rope_scaling[1]
  if kind == "llama3":
    _, factor, low_ff, high_ff, old_len = cfg.rope_scaling
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"unsupported rope scaling {kind!r}")


def apply_rope(x_BxLxNxH: Array, cos_BxLxH: Array, sin_BxLxH: Array) -> Array:
  """HF's rotate_half layout: (x1, x2) halves, x*cos + (-x2, x1)*sin. No weight permutation needed."""
  x1, x2 = jnp.split(x_BxLxNxH, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxLxNxH * cos_BxLxH[:, :, None, :] + rotated * sin_BxLxH[:, :, None, :]


def attention_mask(
    segment_ids_BxL: Array, positions_BxL: Array, sliding_window: int | None, branch_ids_BxL: Array | None = None
) -> Array:
  """[B, L, S] boolean: same segment and not in the future (by array index, so packing works);
  with branches, keys in the trunk (branch 0) or in the query's own branch.

  Padding (segment 0) attends to earlier padding, so no row is fully masked and softmax never
  sees only -inf; padding outputs are never read.
  """
  L = segment_ids_BxL.shape[1]
  idx = jnp.arange(L)
  mask = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  mask &= idx[None, :, None] >= idx[None, None, :]
  if branch_ids_BxL is not None:
    mask &= (branch_ids_BxL[:, None, :] == 0) | (branch_ids_BxL[:, :, None] == branch_ids_BxL[:, None, :])
  if sliding_window is not None:
    mask &= (positions_BxL[:, :, None] - positions_BxL[:, None, :]) < sliding_window
  return mask


def _attend(q_BxLxKxGxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxLxS: Array) -> Array:
  H = q_BxLxKxGxH.shape[-1]
  logits_BxKxGxLxS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BxLxKxGxH, k_BxSxKxH).astype(jnp.float32)
  logits_BxKxGxLxS *= 1.0 / math.sqrt(H)
  # A finite fill (not -inf) keeps gradients finite; every row has at least its diagonal.
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
  return jnp.einsum("BKGLS,BSKH->BLKGH", probs_BxKxGxLxS, v_BxSxKxH)


def blocked_attention(
    q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, mask_BxLxS: Array, block: int, max_segment: int
) -> Array:
  """Causal attention computed block by block, skipping key blocks the mask rules out by shape.

  Query block [qs, qe) only needs keys before qe (causal) and, when no segment is longer than
  max_segment, none before qs - max_segment + 1 (same segment). Long packed rows then cost a
  fraction of the dense L x L scores, in time and in saved activations. The mask still decides;
  the skipped blocks are exactly those it would zero. block <= 0 or L <= block: dense.
  """
  L = q_BxLxKxGxH.shape[1]
  if block <= 0 or L <= block:
    return _attend(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxS)
  outs = []
  for qs in range(0, L, block):
    qe = min(qs + block, L)
    ks = 0 if max_segment <= 0 else max(0, (qs - max_segment + 1) // block * block)
    outs.append(_attend(q_BxLxKxGxH[:, qs:qe], k_BxLxKxH[:, ks:qe], v_BxLxKxH[:, ks:qe], mask_BxLxS[:, qs:qe, ks:qe]))
  return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
  cfg: ModelConfig
  max_segment: int = 0  # longest sequence in a row (0: the row length); bounds the keys a block needs

  @nn.compact
  def __call__(self, x_BxLxD: Array, mask_BxLxS: Array | None, info: flash.MaskInfo, cos_BxLxH: Array,
               sin_BxLxH: Array) -> Array:
    cfg = self.cfg
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    init = nn.initializers.normal(cfg.initializer_range)
    zeros = nn.initializers.zeros
    wq = _param(self, "q", (D, N, H), ("embed", "heads", "head_dim"), init)
    wk = _param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim"), init)
    wv = _param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim"), init)
    wo = _param(self, "o", (N, H, D), ("heads", "head_dim", "embed"), init)

    # Projections run as 2-D matmuls over all B*L tokens: XLA's CPU backend computes the weight
    # gradients of 3-D einsums (contracting B and L together) about half as fast.
    B, L = x_BxLxD.shape[:2]
    x_TxD = x_BxLxD.reshape(B * L, D)
    q_BxLxNxH = matmul(x_TxD, wq.reshape(D, N * H), dt).reshape(B, L, N, H)
    k_BxLxKxH = matmul(x_TxD, wk.reshape(D, K * H), dt).reshape(B, L, K, H)
    v_BxLxKxH = matmul(x_TxD, wv.reshape(D, K * H), dt).reshape(B, L, K, H)
    if cfg.qkv_bias:
      q_BxLxNxH += _param(self, "q_bias", (N, H), ("heads", "head_dim"), zeros).astype(dt)
      k_BxLxKxH += _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
      v_BxLxKxH += _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head's H before RoPE
      q_BxLxNxH = RMSNorm(cfg.rms_norm_eps, "head_dim", name="q_norm")(q_BxLxNxH)
      k_BxLxKxH = RMSNorm(cfg.rms_norm_eps, "head_dim", name="k_norm")(k_BxLxKxH)
    q_BxLxNxH = _constrain(apply_rope(q_BxLxNxH, cos_BxLxH, sin_BxLxH), ("batch", "length", "heads", "head_dim"))
    k_BxLxKxH = _constrain(apply_rope(k_BxLxKxH, cos_BxLxH, sin_BxLxH), ("batch", "length", "kv_heads", "head_dim"))
    v_BxLxKxH = _constrain(v_BxLxKxH, ("batch", "length", "kv_heads", "head_dim"))

    q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
    if mask_BxLxS is None:
      out_BxLxKxGxH = flash.flash_attention(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, info.segment_ids_BxL,
                                            info.positions_BxL, info.branch_ids_BxL,
                                            sliding_window=cfg.sliding_window, block=cfg.flash_block,
                                            max_segment=self.max_segment)
    else:
      out_BxLxKxGxH = blocked_attention(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxS, cfg.attn_block,
                                        self.max_segment)
      out_BxLxKxGxH = checkpoint_name(out_BxLxKxGxH, flash.OUT_NAME)  # what remat "attention" keeps
    out_TxNH = out_BxLxKxGxH.reshape(B * L, N * H)
    y_BxLxD = matmul(out_TxNH, wo.reshape(N * H, D), dt).reshape(B, L, D)
    if cfg.o_bias:
      y_BxLxD += _param(self, "o_bias", (D,), ("embed",), zeros).astype(dt)
    return y_BxLxD


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    cfg = self.cfg
    D, F = cfg.hidden_size, cfg.intermediate_size
    dt = cfg.compute_dtype
    init = nn.initializers.normal(cfg.initializer_range)
    B, L = x_BxLxD.shape[:2]
    x_TxD = x_BxLxD.reshape(B * L, D)  # 2-D matmuls, as in Attention
    gate_TxF = matmul(x_TxD, _param(self, "gate", (D, F), ("embed", "mlp"), init), dt)
    up_TxF = matmul(x_TxD, _param(self, "up", (D, F), ("embed", "mlp"), init), dt)
    if cfg.mlp_bias:
      zeros = nn.initializers.zeros
      gate_TxF += _param(self, "gate_bias", (F,), ("mlp",), zeros).astype(dt)
      up_TxF += _param(self, "up_bias", (F,), ("mlp",), zeros).astype(dt)
    h_BxLxF = _constrain((nn.silu(gate_TxF) * up_TxF).reshape(B, L, F), ("batch", "length", "mlp"))
    y_TxD = matmul(h_BxLxF.reshape(B * L, F), _param(self, "down", (F, D), ("mlp", "embed"), init), dt)
    if cfg.mlp_bias:
      y_TxD += _param(self, "down_bias", (D,), ("embed",), nn.initializers.zeros).astype(dt)
    return y_TxD.reshape(B, L, D)


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  max_segment: int = 0

  @nn.compact
  def __call__(self, x_BxLxD: Array, mask_BxLxS: Array | None, info: flash.MaskInfo, cos_BxLxH: Array,
               sin_BxLxH: Array):
    cfg = self.cfg
    h = RMSNorm(cfg.rms_norm_eps, "embed", name="attn_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + Attention(cfg, self.max_segment, name="attn")(h, mask_BxLxS, info, cos_BxLxH, sin_BxLxH)
    h = RMSNorm(cfg.rms_norm_eps, "embed", name="mlp_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + MLP(cfg, name="mlp")(h)
    x_BxLxD = _constrain(x_BxLxD, ("batch", "length", "embed"))
    return x_BxLxD, None  # (carry, per-layer output) for nn.scan


_KEEP_ATTENTION = jax.checkpoint_policies.save_only_these_names(flash.OUT_NAME, flash.LSE_NAME)
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    # each layer's input and the attention's results: recompute the matmuls, never the attention
    "attention": _KEEP_ATTENTION,
    # matmul outputs too, so only elementwise work is recomputed
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(flash.OUT_NAME, flash.LSE_NAME, MATMUL_NAME)),
}


class RewardModel(nn.Module):
  """Decoder + reward head. A pure function of its params; no I/O.

  max_segment: an upper bound on the length of any sequence in a row, when rows are packed with
  sequences shorter than the row (0: no bound); it only lets attention skip work.
  """

  cfg: ModelConfig
  max_segment: int = 0

  def setup(self):
    cfg = self.cfg
    self.embed = self.param(
        "embed",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size),
        jnp.float32,
    )
    layer_cls = DecoderLayer
    if cfg.remat != "none":
      if cfg.remat not in _REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {cfg.remat!r}; choose none, full, attention or dots")
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # One traced layer scanned over a leading "layers" axis: compile time independent of depth.
      self.layers = nn.scan(
          layer_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.max_segment, name="layers")
    else:
      self.layer_list = [layer_cls(cfg, self.max_segment, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, "embed")
    self.score = self.param(
        "score",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("embed", "labels")),
        (cfg.hidden_size, cfg.num_labels),
        jnp.float32,
    )

  def hidden(
      self, tokens_BxL: Array, segment_ids_BxL: Array, positions_BxL: Array, branch_ids_BxL: Array | None = None
  ) -> Array:
    """Final-norm hidden states [B, L, D] in the compute dtype."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    x_BxLxD = jnp.take(self.embed, tokens_BxL, axis=0).astype(dt)
    x_BxLxD = _constrain(x_BxLxD, ("batch", "length", "embed"))
    freqs_BxLxH2 = positions_BxL[..., None].astype(jnp.float32) * rope_inv_freq(cfg)
    freqs_BxLxH = jnp.concatenate([freqs_BxLxH2, freqs_BxLxH2], axis=-1)
    cos_BxLxH, sin_BxLxH = jnp.cos(freqs_BxLxH).astype(dt), jnp.sin(freqs_BxLxH).astype(dt)
    info = flash.MaskInfo(segment_ids_BxL, branch_ids_BxL, positions_BxL)
    mask_BxLxS = None
    if cfg.attention_impl == "xla":
      mask_BxLxS = attention_mask(segment_ids_BxL, positions_BxL, cfg.sliding_window, branch_ids_BxL)
    if cfg.scan_layers:
      x_BxLxD, _ = self.layers(x_BxLxD, mask_BxLxS, info, cos_BxLxH, sin_BxLxH)
    else:
      for layer in self.layer_list:
        x_BxLxD, _ = layer(x_BxLxD, mask_BxLxS, info, cos_BxLxH, sin_BxLxH)
    return self.final_norm(x_BxLxD)

  def __call__(
      self,
      tokens_BxL: Array,
      segment_ids_BxL: Array,
      positions_BxL: Array,
      pool_index_P: Array | None = None,
      branch_ids_BxL: Array | None = None,
  ) -> Array:
    """Rewards.

    With `pool_index_P` (flat indices row * L + t): the reward of each pooled sequence, [P].
    Without it: the reward read at every token, [B, L] (useful for checks and scoring).
    The head runs in float32: it is tiny, and the reward is what the loss differentiates.
    """
    cfg = self.cfg
    h_BxLxD = self.hidden(tokens_BxL, segment_ids_BxL, positions_BxL, branch_ids_BxL)
    w_D = self.score[:, cfg.reward_label]
    if pool_index_P is None:
      return jnp.einsum("BLD,D->BL", h_BxLxD.astype(jnp.float32), w_D)
    B, L, D = h_BxLxD.shape
    h_PxD = jnp.take(h_BxLxD.reshape(B * L, D), pool_index_P, axis=0)
    return jnp.einsum("PD,D->P", h_PxD.astype(jnp.float32), w_D)

  def logits(
      self,
      tokens_BxL: Array,
      segment_ids_BxL: Array,
      positions_BxL: Array,
      pool_index_P: Array,
      branch_ids_BxL: Array | None = None,
  ) -> Array:
    """All head outputs [P, C] at the pooled positions (what transformers calls logits)."""
    h_BxLxD = self.hidden(tokens_BxL, segment_ids_BxL, positions_BxL, branch_ids_BxL)
    B, L, D = h_BxLxD.shape
    h_PxD = jnp.take(h_BxLxD.reshape(B * L, D), pool_index_P, axis=0)
    return jnp.einsum("PD,DC->PC", h_PxD.astype(jnp.float32), self.score)


def pool_index(tokens_BxL: Array, segment_ids_BxL: Array, pad_token_id: int) -> Array:
  """Flat index of the reward token of each padded row, as transformers pools.

  transformers reads the rightmost token whose id != pad_token_id; with pad == eos a row ending
  in eos is read before its trailing eos run. Rows here hold one sequence each.
  """
  B, L = tokens_BxL.shape
  keep_BxL = (tokens_BxL != pad_token_id) & (segment_ids_BxL > 0)
  last_B = jnp.argmax(jnp.where(keep_BxL, jnp.arange(L)[None, :], -1), axis=1)
  return jnp.arange(B) * L + last_B
