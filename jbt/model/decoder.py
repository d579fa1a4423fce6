"""Decoder backbone (Llama, Mistral, Qwen2, Qwen3, OLMo 2, Phi-3, Gemma 2, Gemma 3) with a
Bradley-Terry reward head; jbt.hf.families maps each to the ModelConfig feature flags read here.

Shape legend for array names and einsum strings:
  B: batch rows            L: tokens in a row (query side)   S: tokens in a row (key side)
  D: model width           F: MLP width                      V: vocabulary
  N: query heads           K: key/value heads                G: query heads per kv head (N // K)
  H: head dim              C: reward-head outputs (num_labels)
  P: pooled sequences (one reward each)   T: tokens of all rows (B * L)
  I, O: a projection's input and output width   R: LoRA rank
  R: head dims RoPE rotates (H, or fewer with partial rotary)

One row may hold several sequences packed side by side: `segment_ids` numbers them (0 = padding)
and attention is causal within a segment. `positions` restart at 0 for every sequence and only
feed RoPE, so a padded batch is the one-segment-per-row case.

Shared prompts: with `branch_ids` (0 = trunk, 1, 2, ... = branches), a segment is a prompt
followed by several responses; a token attends to earlier trunk tokens and to earlier tokens of
its own branch only. With positions continuing from the prompt in every branch, each branch
computes exactly what prompt + that response would alone, while the prompt is computed once.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbt.model import attention, swiglu
from jbt.model.config import ModelConfig
from jbt.model.matmul import MATMUL_NAME, matmul

Array = jax.Array


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def lora_a_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
  """PEFT's LoRA A init: kaiming_uniform(a=sqrt(5)), i.e. uniform(+-1/sqrt(fan_in)), fan_in = all
  axes but the last (the rank)."""
  bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _adapter(module: nn.Module, cfg: ModelConfig, name: str, in_shape: tuple[int, ...], in_axes: tuple[str, ...],
             out_shape: tuple[int, ...], out_axes: tuple[str, ...]) -> tuple[Array, Array] | None:
  """LoRA factors of projection `name` as 2-D (A [I, R], B [R, O]), or None when LoRA leaves it
  alone. The params keep the weight's axes (A [in..., R], B [R, out...]), so they shard as it
  does. B starts at zero: an adapted model starts as its base."""
  if not (cfg.lora_rank and name in cfg.lora_targets):
    return None
  R = cfg.lora_rank
  a = _param(module, f"{name}_lora_a", (*in_shape, R), (*in_axes, "lora_rank"), lora_a_init)
  b = _param(module, f"{name}_lora_b", (R, *out_shape), ("lora_rank", *out_axes), nn.initializers.zeros)
  return a.reshape(-1, R), b.reshape(R, -1)


def _project(x_TxI: Array, w_IxO: Array, ab: tuple[Array, Array] | None, cfg: ModelConfig) -> Array:
  """x W, plus (x A) B * scale with an adapter, all in the compute dtype (as PEFT computes it)."""
  dt = cfg.compute_dtype
  y_TxO = matmul(x_TxI, w_IxO, dt, cfg.matmul)
  if ab is None:
    return y_TxO
  a_IxR, b_RxO = ab
  xa_TxR = matmul(x_TxI, a_IxR, dt, cfg.matmul) * jnp.asarray(cfg.lora_scale, dt)
  # (x A) B as a dot with a unit batch axis: remat "dots" keeps dots without batch axes, and this
  # one's [T, O] output would double what a projection keeps for a product of rank R, cheap to
  # recompute from the kept x A [T, R].
  dims = (((2,), (1,)), ((0,), (0,)))
  delta_1xTxO = jax.lax.dot_general(xa_TxR[None], b_RxO.astype(dt)[None], dims, preferred_element_type=jnp.float32)
  return y_TxO + delta_1xTxO[0].astype(dt)


def _constrain(x: Array, axes: tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """HF's RMSNorm over the last len(axis_names) axes: normalise in float32, then either cast back
  and scale (Llama) or scale in float32 and cast (scale_f32: OLMo 2); the order matters in bf16."""

  eps: float
  axis_names: tuple[str, ...] = ("embed",)
  scale_f32: bool = False
  offset: float = 0.0  # scale by offset + w (Gemma: 1 + w, w initialised to 0)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n = len(self.axis_names)
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    w = _param(self, "scale", x.shape[-n:], self.axis_names, init)
    if self.offset:
      w = w + self.offset
    axes = tuple(range(-n, 0))
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + self.eps)
    if self.scale_f32:
      return (w * x32).astype(x.dtype)
    if jnp.dtype(x.dtype).itemsize == 2:
      return _scale_16(w.astype(x.dtype), x32.astype(x.dtype))
    return w.astype(x.dtype) * x32.astype(x.dtype)


@jax.custom_vjp
def _scale_16(w: Array, x: Array) -> Array:
  """w * x in a 16-bit float dtype (w over x's last axes), whose gradient to w sums over the
  leading axes in float32: the plain product's gradient reduces in the 16-bit dtype, which XLA's
  CPU backend emulates in float32 rounding after each step (3-4x slower for a [1792, 576] row,
  and less accurate). The gradient to x and the value are the plain product's."""
  return w * x


def _scale_16_fwd(w: Array, x: Array) -> tuple[Array, tuple[Array, Array]]:
  return w * x, (w, x)


def _scale_16_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  w, x = res
  lead = tuple(range(x.ndim - w.ndim))
  dw = jnp.sum(g.astype(jnp.float32) * x.astype(jnp.float32), axis=lead)
  return dw.astype(w.dtype), g * w


_scale_16.defvjp(_scale_16_fwd, _scale_16_bwd)


def _norm(cfg: ModelConfig, name: str, *axis_names: str) -> RMSNorm:
  return RMSNorm(cfg.rms_norm_eps, axis_names or ("embed",), cfg.norm_scale_f32, cfg.norm_offset, name=name)


def rope_inv_freq(cfg: ModelConfig, long: bool = False, local: bool = False) -> Array:
  """RoPE inverse frequencies [R/2] over the rotated dims R (cfg.rotary_dim), with Llama 3 / linear /
  LongRoPE scaling as transformers computes them (long: LongRoPE's long factors; local: the
  sliding layers' own base and scaling, Gemma 3)."""
  R = cfg.rotary_dim
  theta, scaling = cfg.local_rope if local else (cfg.rope_theta, cfg.rope_scaling)
  inv_freq = 1.0 / (theta ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R))
  if scaling is None:
    return inv_freq
  kind = scaling[0]
  if kind == "linear":
    return inv_freq / scaling[1]
  if kind == "longrope":  # per-frequency factors: 1 / (factor * theta^(2i/R))
    _, short, long_, _, _ = scaling
    return inv_freq / jnp.asarray(long_ if long else short, jnp.float32)
  if kind == "llama3":
    _, factor, low_ff, high_ff, old_len = scaling
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"unsupported rope scaling {kind!r}")


def rope_cos_sin(cfg: ModelConfig, positions_BxL: Array, local: bool = False) -> tuple[Array, Array]:
  """cos and sin [B, L, R] in the compute dtype, as transformers computes them (in float32, scaled
  by LongRoPE's attention factor, then cast); local: the sliding layers' (cfg.local_rope)."""
  inv_freq_R2 = rope_inv_freq(cfg, local=local)
  scaling = cfg.local_rope[1] if local else cfg.rope_scaling
  scale = 1.0
  if scaling is not None and scaling[0] == "longrope":
    # transformers picks the long factors for a whole forward when its longest sequence
    # (max position + 1) passes the original context; jbt's positions restart per sequence.
    _, _, _, old_len, scale = scaling
    inv_freq_R2 = jnp.where(positions_BxL.max() + 1 > old_len, rope_inv_freq(cfg, long=True, local=local),
                            inv_freq_R2)
  freqs_BxLxR2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_R2
  freqs_BxLxR = jnp.concatenate([freqs_BxLxR2, freqs_BxLxR2], axis=-1)
  dt = cfg.compute_dtype
  return (jnp.cos(freqs_BxLxR) * scale).astype(dt), (jnp.sin(freqs_BxLxR) * scale).astype(dt)


def apply_rope(x_BxLxNxH: Array, cos_BxLxR: Array, sin_BxLxR: Array) -> Array:
  """HF's rotate_half layout: (x1, x2) halves, x*cos + (-x2, x1)*sin. No weight permutation needed.
  Partial rotary (R < H): the first R dims rotate, the rest pass through."""
  R = cos_BxLxR.shape[-1]
  f32 = jnp.float32
  x_rot, x_pass = x_BxLxNxH[..., :R].astype(f32), x_BxLxNxH[..., R:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  # In float32, rounded once: XLA's CPU backend computes bfloat16 elementwise ops in float32 with a
  # rounding after each, several times slower; the one rounding is also the more accurate result.
  out = (x_rot * cos_BxLxR[:, :, None, :].astype(f32) + rotated * sin_BxLxR[:, :, None, :].astype(f32))
  out = out.astype(x_BxLxNxH.dtype)
  return out if R == x_BxLxNxH.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


class Attention(nn.Module):
  cfg: ModelConfig
  max_segment: int = 0  # longest sequence in a row (0: the row length); bounds the keys a block needs

  @nn.compact
  def __call__(self, x_BxLxD: Array, info: attention.MaskInfo, cos_BxLxH: Array, sin_BxLxH: Array) -> Array:
    cfg = self.cfg
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = cfg.compute_dtype
    init = nn.initializers.normal(cfg.initializer_range)
    zeros = nn.initializers.zeros
    wq = _param(self, "q", (D, N, H), ("embed", "heads", "head_dim"), init)
    wk = _param(self, "k", (D, K, H), ("embed", "kv_heads", "head_dim"), init)
    wv = _param(self, "v", (D, K, H), ("embed", "kv_heads", "head_dim"), init)
    wo = _param(self, "o", (N, H, D), ("heads", "head_dim", "embed"), init)
    ad = {n: _adapter(self, cfg, n, (D,), ("embed",), (heads, H), (axis, "head_dim"))
          for n, heads, axis in (("q", N, "heads"), ("k", K, "kv_heads"), ("v", K, "kv_heads"))}
    ad["o"] = _adapter(self, cfg, "o", (N, H), ("heads", "head_dim"), (D,), ("embed",))

    # Projections run as 2-D matmuls over all B*L tokens: XLA's CPU backend computes the weight
    # gradients of 3-D einsums (contracting B and L together) about half as fast.
    B, L = x_BxLxD.shape[:2]
    x_TxD = x_BxLxD.reshape(B * L, D)
    q_BxLxNxH = _project(x_TxD, wq.reshape(D, N * H), ad["q"], cfg).reshape(B, L, N, H)
    k_BxLxKxH = _project(x_TxD, wk.reshape(D, K * H), ad["k"], cfg).reshape(B, L, K, H)
    v_BxLxKxH = _project(x_TxD, wv.reshape(D, K * H), ad["v"], cfg).reshape(B, L, K, H)
    if cfg.qkv_bias:
      q_BxLxNxH += _param(self, "q_bias", (N, H), ("heads", "head_dim"), zeros).astype(dt)
      k_BxLxKxH += _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
      v_BxLxKxH += _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zeros).astype(dt)
    if cfg.qk_norm and cfg.qk_norm_scope == "head":  # Qwen3: RMSNorm over each head's H before RoPE
      q_BxLxNxH = _norm(cfg, "q_norm", "head_dim")(q_BxLxNxH)
      k_BxLxKxH = _norm(cfg, "k_norm", "head_dim")(k_BxLxKxH)
    elif cfg.qk_norm:  # OLMo 2: over the whole projection (N*H, K*H), after the bias
      q_BxLxNxH = _norm(cfg, "q_norm", "heads", "head_dim")(q_BxLxNxH)
      k_BxLxKxH = _norm(cfg, "k_norm", "kv_heads", "head_dim")(k_BxLxKxH)
    q_BxLxNxH = _constrain(apply_rope(q_BxLxNxH, cos_BxLxH, sin_BxLxH), ("batch", "length", "heads", "head_dim"))
    k_BxLxKxH = _constrain(apply_rope(k_BxLxKxH, cos_BxLxH, sin_BxLxH), ("batch", "length", "kv_heads", "head_dim"))
    v_BxLxKxH = _constrain(v_BxLxKxH, ("batch", "length", "kv_heads", "head_dim"))

    if cfg.query_scale is not None and cfg.query_scale != H:
      # The kinds divide logits by sqrt(H); Gemma divides by sqrt(query_pre_attn_scalar).
      q_BxLxNxH = q_BxLxNxH * jnp.asarray(math.sqrt(H / cfg.query_scale), dt)
    q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
    kind = attention.KINDS[cfg.attention]
    out_BxLxKxGxH = kind.attend(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, info, sliding_window=cfg.sliding_window,
                                block=getattr(cfg, kind.block_field), max_segment=self.max_segment,
                                branches=cfg.branches, softcap=cfg.attn_softcap)
    out_TxNH = out_BxLxKxGxH.reshape(B * L, N * H)
    y_BxLxD = _project(out_TxNH, wo.reshape(N * H, D), ad["o"], cfg).reshape(B, L, D)
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
    w_gate = _param(self, "gate", (D, F), ("embed", "mlp"), init)
    w_up = _param(self, "up", (D, F), ("embed", "mlp"), init)
    w_down = _param(self, "down", (F, D), ("mlp", "embed"), init)
    zeros = nn.initializers.zeros
    b_gate = _param(self, "gate_bias", (F,), ("mlp",), zeros) if cfg.mlp_bias else None
    b_up = _param(self, "up_bias", (F,), ("mlp",), zeros) if cfg.mlp_bias else None
    b_down = _param(self, "down_bias", (D,), ("embed",), zeros) if cfg.mlp_bias else None
    ad = {n: _adapter(self, cfg, n, (D,), ("embed",), (F,), ("mlp",)) for n in ("gate", "up")}
    ad["down"] = _adapter(self, cfg, "down", (F,), ("mlp",), (D,), ("embed",))

    def mlp(x_BxCxD: Array) -> Array:
      C = x_BxCxD.shape[1]
      x_TxD = x_BxCxD.reshape(B * C, D)  # 2-D matmuls, as in Attention
      gate_TxF = _project(x_TxD, w_gate, ad["gate"], cfg)
      up_TxF = _project(x_TxD, w_up, ad["up"], cfg)
      if cfg.mlp_bias:
        gate_TxF += b_gate.astype(dt)
        up_TxF += b_up.astype(dt)
      native = cfg.mlp_activation == "silu" and swiglu.usable(gate_TxF, up_TxF)
      if native and ad["down"] is None and cfg.matmul == "bf16_f32":
        # the same values; the activation, its gradient and the down projection's weight gradient
        # without [T, F] passes of XLA's own (swiglu.py)
        y_TxD = swiglu.gated_down(gate_TxF, up_TxF, w_down)
      else:
        if native:
          h_TxF = swiglu.swiglu(gate_TxF, up_TxF)
        else:
          act = nn.silu if cfg.mlp_activation == "silu" else functools.partial(nn.gelu, approximate=True)
          # float32 inside, rounded once (as torch computes a bfloat16 activation; see apply_rope)
          h_TxF = (act(gate_TxF.astype(jnp.float32)) * up_TxF.astype(jnp.float32)).astype(dt)
        h_BxCxF = _constrain(h_TxF.reshape(B, C, F), ("batch", "length", "mlp"))
        y_TxD = _project(h_BxCxF.reshape(B * C, F), w_down, ad["down"], cfg)
      if cfg.mlp_bias:
        y_TxD += b_down.astype(dt)
      return y_TxD.reshape(B, C, D)

    C = mlp_chunk(L, cfg.mlp_chunk)
    if C == L:
      return mlp(x_BxLxD)
    # Chunks of the rows, one at a time, each recomputed in the backward pass: the [tokens, F]
    # intermediates (the largest activations of a long row) exist for one chunk only.
    x_NxBxCxD = jnp.moveaxis(x_BxLxD.reshape(B, L // C, C, D), 1, 0)
    y_NxBxCxD = jax.lax.map(jax.checkpoint(mlp), x_NxBxCxD)
    return jnp.moveaxis(y_NxBxCxD, 0, 1).reshape(B, L, D)


def mlp_chunk(L: int, chunk: int) -> int:
  """Tokens of a row the MLP computes at a time: the largest divisor of L that is at most `chunk`
  and a multiple of 64 (rows are), or L when chunk is 0 or L is not longer."""
  if chunk <= 0 or L <= chunk:
    return L
  return next((c for c in range(chunk - chunk % 64, 63, -64) if L % c == 0), L)


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  max_segment: int = 0

  @nn.compact
  def __call__(self, x_BxLxD: Array, info: attention.MaskInfo, cos_BxLxH: Array, sin_BxLxH: Array,
               window: Array | None = None):
    cfg = self.cfg
    carry_dtype = x_BxLxD.dtype
    x_BxLxD = x_BxLxD.astype(cfg.compute_dtype)
    if window is not None:  # this layer's window (0: full), scanned with the layers
      info = info._replace(window=window)
    if cos_BxLxH.ndim == 4:  # sliding layers have their own rope (Gemma 3): [global, local]
      cos_BxLxH, sin_BxLxH = cos_BxLxH[(window > 0).astype(jnp.int32)], sin_BxLxH[(window > 0).astype(jnp.int32)]
    # Pre-norms (Llama) normalise each block's input, post-norms (OLMo 2) its output before the add.
    h = _norm(cfg, "attn_norm")(x_BxLxD) if cfg.pre_norms else x_BxLxD
    h = Attention(cfg, self.max_segment, name="attn")(h, info, cos_BxLxH, sin_BxLxH)
    x_BxLxD = x_BxLxD + (_norm(cfg, "post_attn_norm")(h) if cfg.post_norms else h)
    h = _norm(cfg, "mlp_norm")(x_BxLxD) if cfg.pre_norms else x_BxLxD
    h = MLP(cfg, name="mlp")(h)
    x_BxLxD = x_BxLxD + (_norm(cfg, "post_mlp_norm")(h) if cfg.post_norms else h)
    x_BxLxD = _constrain(x_BxLxD, ("batch", "length", "embed"))
    return x_BxLxD.astype(carry_dtype), None  # (carry, per-layer output) for nn.scan


_KEEP_ATTENTION = jax.checkpoint_policies.save_only_these_names(*attention.SAVED_NAMES)
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    # each layer's input and the attention's results: recompute the matmuls, never the attention
    "attention": _KEEP_ATTENTION,
    # matmul outputs too, so only elementwise work is recomputed
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(*attention.SAVED_NAMES, MATMUL_NAME)),
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
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # One traced layer scanned over a leading "layers" axis: compile time independent of depth.
      self.layers = nn.scan(
          layer_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          # info, cos, sin are shared; per-layer windows (if any) are scanned with the layers
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast) + ((0,) if cfg.layer_windows else ()),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.max_segment, name="layers")
    else:
      self.layer_list = [layer_cls(cfg, self.max_segment, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, ("embed",), cfg.norm_scale_f32, cfg.norm_offset)
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
    if cfg.embed_scale:  # Gemma: times sqrt(D), the factor rounded to the compute dtype as transformers does
      x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
    x_BxLxD = _constrain(x_BxLxD, ("batch", "length", "embed"))
    cos_BxLxH, sin_BxLxH = rope_cos_sin(cfg, positions_BxL)  # [B, L, R]: R = H unless partial rotary
    if cfg.local_rope is not None and cfg.sliding_window is not None:  # every layer slides
      cos_BxLxH, sin_BxLxH = rope_cos_sin(cfg, positions_BxL, local=True)
    elif cfg.local_rope is not None and cfg.layer_windows:  # [2, B, L, R]: global, local; each layer picks
      cos_l, sin_l = rope_cos_sin(cfg, positions_BxL, local=True)
      cos_BxLxH, sin_BxLxH = jnp.stack([cos_BxLxH, cos_l]), jnp.stack([sin_BxLxH, sin_l])
    info = attention.mask_info(cfg.attention, segment_ids_BxL, positions_BxL, branch_ids_BxL, cfg.sliding_window)
    windows = (jnp.asarray(cfg.layer_windows, jnp.int32),) if cfg.layer_windows else ()
    if cfg.scan_layers:
      x_BxLxD, _ = self.layers(x_BxLxD.astype(cfg.carry_dtype), info, cos_BxLxH, sin_BxLxH, *windows)
      x_BxLxD = x_BxLxD.astype(dt)
    else:
      for i, layer in enumerate(self.layer_list):
        x_BxLxD, _ = layer(x_BxLxD, info, cos_BxLxH, sin_BxLxH, *(w[i] for w in windows))
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


def pool_index(tokens_BxL: Array, segment_ids_BxL: Array, pad_token_id: int) -> Array:
  """Flat index of the reward token of each padded row, as transformers pools.

  transformers reads the rightmost token whose id != pad_token_id; with pad == eos a row ending
  in eos is read before its trailing eos run. Rows here hold one sequence each.
  """
  B, L = tokens_BxL.shape
  keep_BxL = (tokens_BxL != pad_token_id) & (segment_ids_BxL > 0)
  last_B = jnp.argmax(jnp.where(keep_BxL, jnp.arange(L)[None, :], -1), axis=1)
  return jnp.arange(B) * L + last_B


def abstract_params(cfg: ModelConfig, *, boxed: bool = False) -> Any:
  """Parameter shapes (jax.ShapeDtypeStruct), without allocating: eval_shape of init. boxed keeps
  the nn.LogicallyPartitioned boxes, whose logical axis names give the shardings."""
  tok = jnp.zeros((1, 1), jnp.int32)
  boxed_params = jax.eval_shape(lambda: RewardModel(cfg).init(jax.random.key(0), tok, tok, tok)["params"])
  return boxed_params if boxed else nn.unbox(boxed_params)


def init_params(cfg: ModelConfig, key: jax.Array) -> Any:
  """Random parameters (unboxed); jit it with out_shardings to build them straight into shards."""
  tok = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(RewardModel(cfg).init(key, tok, tok, tok)["params"])
