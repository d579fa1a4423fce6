"""Block-sparse causal attention for packed rows, with an online softmax and its own backward pass.

Rows of a packed or shared-prompt batch hold several sequences (segments) side by side, so most
(query block, key block) pairs of a long row are masked out entirely: a query only sees keys of
its own segment. `flash_attention` visits, for each query block, only the key blocks from the
start of its earliest segment up to the diagonal (a run-time loop bound), skips any of those
whose mask is still all false (branches of a shared prompt, rows of a batch that differ), and
keeps a running max and sum (FlashAttention's online softmax), so no [L, S] score matrix is
ever materialised. The backward pass recomputes each visited block's probabilities from the
saved log-sum-exp and the forward's block-major inputs. The cost follows the segments' lengths,
not the row's: one long row packed with many pairs costs what the pairs would alone, and a
block's scores stay in cache on a CPU.

Shapes follow jbt.model: B rows, L tokens, K key/value heads, G query heads per kv head, H head dim.
The mask is jbt.model.attention.mask.dense_mask's (same segment, not in the future, trunk-or-own-branch,
inside the sliding window) for every real token. Each segment must be one contiguous run of its
row, as every jbt layout makes them. Padding (segment 0) attends to itself only: its outputs
are never read, and the softmax denominator is never zero.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jbt.model.attention.mask import MaskInfo, layer_window

Array = jax.Array
_NEG = float(jnp.finfo(jnp.float32).min)


def _slice_tokens(x_BxL: Array | None, start: Array, size: int) -> Array | None:
  return None if x_BxL is None else jax.lax.dynamic_slice_in_dim(x_BxL, start, size, axis=1)


def _block_mask(info: MaskInfo, qs: Array, ks: Array, block: int, sliding_window: int | None) -> Array:
  """[B, block, block] boolean mask of the query block at qs against the key block at ks."""
  seg_q, seg_k = _slice_tokens(info.segment_ids_BxL, qs, block), _slice_tokens(info.segment_ids_BxL, ks, block)
  iq, ik = qs + jnp.arange(block), ks + jnp.arange(block)
  causal = (iq[:, None] >= ik[None, :])[None]
  mask = (seg_q[:, :, None] == seg_k[:, None, :]) & causal
  mask &= (seg_q[:, :, None] != 0) | (iq[:, None] == ik[None, :])[None]  # padding: itself only
  if info.branch_ids_BxL is not None:
    br_q, br_k = _slice_tokens(info.branch_ids_BxL, qs, block), _slice_tokens(info.branch_ids_BxL, ks, block)
    mask &= (br_k[:, None, :] == 0) | (br_q[:, :, None] == br_k[:, None, :])
  if sliding_window is not None:
    pos_q, pos_k = _slice_tokens(info.positions_BxL, qs, block), _slice_tokens(info.positions_BxL, ks, block)
    mask &= (pos_q[:, :, None] - pos_k[:, None, :]) < sliding_window
  if info.window is not None:
    mask = layer_window(mask, _slice_tokens(info.positions_BxL, qs, block), _slice_tokens(info.positions_BxL, ks, block),
                        info.window)
  return mask


def _first_key_block(segment_ids_BxL: Array, block: int, max_segment: int) -> Array:
  """[L / block] int32: for each query block, the first key block any of its queries can see.

  A token's earliest key is the start of its segment (itself for padding). Segments are
  contiguous runs, so that start never decreases along a row and a block's earliest is its first
  token's: the last segment start at or before it. max_segment > 0 (a promise that no segment is
  longer) caps how far back that can be.
  """
  B, L = segment_ids_BxL.shape
  N = L // block
  idx_L = jnp.arange(L)
  starts_BxL = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  starts_BxL |= segment_ids_BxL == 0  # a padding token starts its own run
  at_N = idx_L[::block]
  # The last start at or before a block's first token: one that token itself, or the last start
  # of the blocks before it ([N, N] per row; no scan: XLA's CPU backend runs a cumulative max as
  # quadratic reduce-window work, and a log-depth scan as dozens of small ops, every layer).
  last_BxN = jnp.where(starts_BxL, idx_L, -1).reshape(B, N, block).max(-1)
  before_NxN = jnp.arange(N)[None, :] < jnp.arange(N)[:, None]
  first_BxN = jnp.maximum(jnp.where(starts_BxL[:, ::block], at_N, -1),
                          jnp.where(before_NxN[None], last_BxN[:, None, :], -1).max(-1))
  if max_segment > 0:
    first_BxN = jnp.maximum(first_BxN, at_N - max_segment + 1)
  return (first_BxN.min(axis=0) // block).astype(jnp.int32)


def _pad_tokens(x: Array, n: int, value: int = 0) -> Array:
  return x if n == 0 else jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _row_max(x: Array) -> Array:
  """x.max(-1) as a tree of elementwise maxima: XLA's CPU backend runs a max-reduction over the minor
  axis element by element (NaN checks), several times slower than vectorised jnp.maximum."""
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    top = jnp.maximum(x[..., :half], x[..., half:2 * half])
    x = top if x.shape[-1] % 2 == 0 else jnp.concatenate([top, x[..., -1:]], axis=-1)
  return x[..., 0]


def _visit_key_blocks(q_BxKxGxQxH: Array, keys: dict[str, Array], info: MaskInfo, qs: Array,
                      first: Array, last: Array, block: int, sliding_window: int | None, visit, init,
                      softcap: float | None = None):
  """Folds visit(carry, ks, bias, blocks, scaled scores) over the key blocks first..last of the
  query block at qs, skipping those whose mask is all false. keys maps names to block-major
  arrays as _bits of q's dtype; blocks maps the same names to each one's block j (at ks = j * block).
  keys["kT"] are the keys' blocks transposed, [N, B, K, H, block]. bias ([B, 1, 1, Q, S]) is 0
  where the mask holds and _NEG where not, added to the scores: a row masked in all the blocks
  visited so far gets a running max near _NEG and garbage sums, which exp(_NEG - max) = 0 erases
  exactly at its first unmasked key (every row sees itself). With softcap the scores are
  cap * tanh(scores / cap) (Gemma 2)."""
  scale = 1.0 / math.sqrt(q_BxKxGxQxH.shape[-1])

  def key_block(j, carry):
    ks = j * block
    mask_BxQxS = _block_mask(info, qs, ks, block, sliding_window)

    def go(c):
      blocks = {name: _block(x, j, q_BxKxGxQxH.dtype) for name, x in keys.items()}
      s = jnp.einsum("BKGQH,BKHS->BKGQS", q_BxKxGxQxH, blocks["kT"], preferred_element_type=jnp.float32) * scale
      if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
      # A sum, not a select: no pass of its own over the block.
      return visit(c, ks, jnp.where(mask_BxQxS, 0.0, _NEG)[:, None, None], blocks, s)

    return jax.lax.cond(mask_BxQxS.any(), go, lambda c: c, carry)

  return jax.lax.fori_loop(first, last + 1, key_block, init)


def _bits(x: Array) -> Array:
  """x as its bits (uint16) if a 16-bit float, else x: _block's input."""
  if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _block(x_Nx_: Array, j: Array, dtype: jnp.dtype) -> Array:
  """Block j of a block-major array ([N, ...], one contiguous piece) from _bits, in dtype. A
  block sliced as bits costs a copy of itself on XLA's CPU backend: a bfloat16 slice is computed by
  converting the whole array to float32 and the slice back, and a slice fused with a bitcast of the
  whole array is costed as the whole array, so the copy is split over two threads (a thread
  wake-up a visit)."""
  return jax.lax.bitcast_convert_type(jax.lax.dynamic_index_in_dim(x_Nx_, j, 0, keepdims=False), dtype)


# Every block a loop reads or writes is one contiguous piece of a block-major array, laid out as
# XLA's CPU dot kernels take their operands as is ((batch, rows, contracted) and (batch,
# contracted, columns)), so no block is transposed per visit: each array is rearranged once a
# layer, from [B, L, K, (G,) H] reshaped to [B, N, T, K, (G,) H] (N blocks of T tokens) by these
# permutations.
_KEYS_T = (1, 0, 3, 4, 2)  # [N, B, K, H, T]: keys for the scores, values for dP, dK and dV accumulated
_KEYS = (1, 0, 3, 2, 4)  # [N, B, K, T, H]: values for the output, keys for dQ
_QUERIES = (1, 0, 3, 4, 2, 5)  # [N, B, K, G, T, H]: queries, dO, the output and dQ accumulated
_QUERIES_T = (1, 0, 3, 5, 4, 2)  # [N, B, K, H, G, T]: queries for dK, dO for dV


def _add_block(x_Nx_: Array, j: Array, update: Array) -> Array:
  """x_Nx_ with update added to its block j."""
  block = jax.lax.dynamic_index_in_dim(x_Nx_, j, 0, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(x_Nx_, block + update, j, 0)


def _blocks(x_BxLx_: Array, block: int, perm: tuple[int, ...]) -> Array:
  """x [B, L, ...] as blocks of `block` tokens, [B, N, block, ...] permuted by perm."""
  B, L = x_BxLx_.shape[:2]
  return jnp.transpose(x_BxLx_.reshape(B, L // block, block, *x_BxLx_.shape[2:]), perm)


def _unblocks(x: Array, perm: tuple[int, ...]) -> Array:
  """_blocks' inverse."""
  y = jnp.transpose(x, tuple(perm.index(i) for i in range(len(perm))))
  return y.reshape(y.shape[0], -1, *y.shape[3:])


def _layouts(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, block: int) -> dict[str, Array]:
  """The forward's inputs block-major, as _bits: q [N, B, K, G, T, H], kT [N, B, K, H, T], v [N, B, K, T, H]
  (T = block). Saved for the backward pass (LAYOUT_NAMES), which then needs neither q, k, v nor
  the work that made them (RoPE, under remat)."""
  return {"q": _bits(_blocks(q_BxLxKxGxH, block, _QUERIES)), "kT": _bits(_blocks(k_BxLxKxH, block, _KEYS_T)),
          "v": _bits(_blocks(v_BxLxKxH, block, _KEYS))}


def _forward(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, info: MaskInfo, block: int, max_segment: int,
             sliding_window: int | None, softcap: float | None = None) -> tuple[Array, Array]:
  """(output [B, L, K, G, H] in q's dtype, log-sum-exp [B, K, G, L] float32); L a multiple of block."""
  return _forward_blocks(_layouts(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, block), q_BxLxKxGxH.dtype, info, max_segment,
                         sliding_window, softcap)


def _forward_blocks(layouts: dict[str, Array], dtype: jnp.dtype, info: MaskInfo, max_segment: int,
                    sliding_window: int | None, softcap: float | None = None) -> tuple[Array, Array]:
  """_forward from _layouts' arrays of inputs in `dtype`."""
  N, B, K, G, block, H = layouts["q"].shape
  L = N * block
  f32 = jnp.float32
  first_key_block = _first_key_block(info.segment_ids_BxL, block, max_segment)
  keys = {"kT": layouts["kT"], "v": layouts["v"]}

  def visit(c, ks, bias, blocks, s):
    del ks
    v_BxKxSxH = blocks["v"]
    m_BxKxGxQ, l_BxKxGxQ, acc_BxKxGxQxH = c
    s = s + bias
    m_new = jnp.maximum(m_BxKxGxQ, _row_max(s))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m_BxKxGxQ - m_new)
    pv = jnp.einsum("BKGQS,BKSH->BKGQH", p.astype(v_BxKxSxH.dtype), v_BxKxSxH, preferred_element_type=f32)
    return m_new, l_BxKxGxQ * corr + p.sum(-1), acc_BxKxGxQxH * corr[..., None] + pv

  def query_block(i, outputs):
    out_NxBxKxGxQxH, lse_BxKxGxL = outputs
    qs = i * block
    init = (jnp.full((B, K, G, block), _NEG, f32), jnp.zeros((B, K, G, block), f32),
            jnp.zeros((B, K, G, block, H), f32))
    m_BxKxGxQ, l_BxKxGxQ, acc_BxKxGxQxH = _visit_key_blocks(
        _block(layouts["q"], i, dtype), keys, info, qs, first_key_block[i], i, block, sliding_window, visit, init,
        softcap)
    out_NxBxKxGxQxH = jax.lax.dynamic_update_index_in_dim(out_NxBxKxGxQxH, acc_BxKxGxQxH / l_BxKxGxQ[..., None], i, 0)
    lse_BxKxGxL = jax.lax.dynamic_update_slice_in_dim(lse_BxKxGxL, m_BxKxGxQ + jnp.log(l_BxKxGxQ), qs, axis=3)
    return out_NxBxKxGxQxH, lse_BxKxGxL

  # The output is gathered in float32 and rounded once: XLA's CPU backend writes a bfloat16 block
  # into a bfloat16 buffer by converting the whole buffer (per query block).
  init = (jnp.zeros(layouts["q"].shape, f32), jnp.zeros((B, K, G, L), f32))
  out_NxBxKxGxQxH, lse_BxKxGxL = jax.lax.fori_loop(0, L // block, query_block, init)
  return _unblocks(out_NxBxKxGxQxH, _QUERIES).astype(dtype), lse_BxKxGxL


def _backward(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, info: MaskInfo, out_BxLxKxGxH: Array,
              lse_BxKxGxL: Array, dout_BxLxKxGxH: Array, block: int, max_segment: int,
              sliding_window: int | None, softcap: float | None = None) -> tuple[Array, Array, Array]:
  """(dq, dk, dv) from the forward's output and log-sum-exp and the output's gradient."""
  return _backward_blocks(_layouts(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, block), info, out_BxLxKxGxH, lse_BxKxGxL,
                          dout_BxLxKxGxH, max_segment, sliding_window, softcap)


def _backward_blocks(layouts: dict[str, Array], info: MaskInfo, out_BxLxKxGxH: Array, lse_BxKxGxL: Array,
                     dout_BxLxKxGxH: Array, max_segment: int, sliding_window: int | None,
                     softcap: float | None = None) -> tuple[Array, Array, Array]:
  """_backward from _layouts' arrays (of inputs in the output's dtype)."""
  N, B, K, G, block, H = layouts["q"].shape
  dtype = out_BxLxKxGxH.dtype
  f32 = jnp.float32
  scale = 1.0 / math.sqrt(H)
  first_key_block = _first_key_block(info.segment_ids_BxL, block, max_segment)
  # D = rowsum(dO * O): the softmax backward's per-query term (FlashAttention-2's dS = P (dP - D)).
  d_BxKxGxL = jnp.einsum("BLKGH,BLKGH->BKGL", dout_BxLxKxGxH.astype(f32), out_BxLxKxGxH.astype(f32))
  # The layouts the forward did not need, from the ones it saved (_QUERIES_T, _KEYS, _KEYS_T).
  queries = {"q": layouts["q"], "qT": jnp.transpose(layouts["q"], (0, 1, 2, 5, 3, 4)),
             "do": _bits(_blocks(dout_BxLxKxGxH, block, _QUERIES)),
             "doT": _bits(_blocks(dout_BxLxKxGxH, block, _QUERIES_T))}
  keys = {"kT": layouts["kT"], "vT": jnp.swapaxes(layouts["v"], -1, -2), "k": jnp.swapaxes(layouts["kT"], -1, -2)}

  def query_block(i, grads):
    dq_NxBxKxGxQxH, dkT_NxBxKxHxS, dvT_NxBxKxHxS = grads
    qs = i * block
    q_BxKxGxQxH, qT_BxKxHxGxQ, do_BxKxGxQxH, doT_BxKxHxGxQ = (
        _block(queries[name], i, dtype) for name in ("q", "qT", "do", "doT"))
    lse_BxKxGxQ = jax.lax.dynamic_slice_in_dim(lse_BxKxGxL, qs, block, axis=3)
    d_BxKxGxQ = jax.lax.dynamic_slice_in_dim(d_BxKxGxL, qs, block, axis=3)

    def visit(c, ks, bias, blocks, s):
      dq_BxKxGxQxH, dkT_NxBxKxHxS, dvT_NxBxKxHxS = c
      j = ks // block
      p = jnp.exp(s + bias - lse_BxKxGxQ[..., None])
      dvT = jnp.einsum("BKHGQ,BKGQS->BKHS", doT_BxKxHxGxQ, p.astype(do_BxKxGxQxH.dtype), preferred_element_type=f32)
      dp = jnp.einsum("BKGQH,BKHS->BKGQS", do_BxKxGxQxH, blocks["vT"], preferred_element_type=f32)
      ds = p * (dp - d_BxKxGxQ[..., None]) * scale
      if softcap is not None:  # d(cap * tanh(x / cap)) / dx = 1 - (capped / cap)^2
        ds *= 1.0 - jnp.square(s / softcap)
      ds = ds.astype(q_BxKxGxQxH.dtype)
      dq_BxKxGxQxH += jnp.einsum("BKGQS,BKSH->BKGQH", ds, blocks["k"], preferred_element_type=f32)
      dkT = jnp.einsum("BKHGQ,BKGQS->BKHS", qT_BxKxHxGxQ, ds, preferred_element_type=f32)
      return dq_BxKxGxQxH, _add_block(dkT_NxBxKxHxS, j, dkT), _add_block(dvT_NxBxKxHxS, j, dvT)

    init = (jnp.zeros((B, K, G, block, H), f32), dkT_NxBxKxHxS, dvT_NxBxKxHxS)
    dq_BxKxGxQxH, dkT_NxBxKxHxS, dvT_NxBxKxHxS = _visit_key_blocks(
        q_BxKxGxQxH, keys, info, qs, first_key_block[i], i, block, sliding_window, visit, init, softcap)
    return jax.lax.dynamic_update_index_in_dim(dq_NxBxKxGxQxH, dq_BxKxGxQxH, i, 0), dkT_NxBxKxHxS, dvT_NxBxKxHxS

  init = (jnp.zeros(queries["q"].shape, f32), jnp.zeros(keys["kT"].shape, f32), jnp.zeros(keys["vT"].shape, f32))
  dq, dkT, dvT = jax.lax.fori_loop(0, N, query_block, init)
  return tuple(_unblocks(x, perm).astype(dtype) for x, perm in ((dq, _QUERIES), (dkT, _KEYS_T), (dvT, _KEYS_T)))


# The forward runs outside the custom VJP and its results enter it as inputs: under a remat
# policy that saves the names below (jbt.model's "attention" and "dots" do), the backward pass
# then reuses the forward's output, log-sum-exp and block-major inputs instead of running the
# forward loop again or recomputing q, k and v.
OUT_NAME, LSE_NAME = "flash_out", "flash_lse"
LAYOUT_NAMES = {name: f"flash_{name}" for name in ("q", "kT", "v")}


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _with_grads(q, k, v, info, layouts, out, lse, block, max_segment, sliding_window, softcap):
  """out, with the attention's gradients to q, k and v (layouts, out and lse: the forward's)."""
  del q, k, v, info, layouts, lse, block, max_segment, sliding_window, softcap
  return out


def _with_grads_fwd(q, k, v, info, layouts, out, lse, block, max_segment, sliding_window, softcap):
  del q, k, v, block, max_segment, sliding_window, softcap
  return out, (info, layouts, out, lse)


def _with_grads_bwd(block, max_segment, sliding_window, softcap, res, dout):
  del block
  info, layouts, out, lse = res
  dq, dk, dv = _backward_blocks(layouts, info, out, lse, dout, max_segment, sliding_window, softcap)
  none = functools.partial(jax.tree.map, lambda _: None)
  return dq, dk, dv, none(info), none(layouts), jnp.zeros_like(out), jnp.zeros_like(lse)


_with_grads.defvjp(_with_grads_fwd, _with_grads_bwd)


def saved_bits(x: Array, name: str) -> Array:
  """checkpoint_name(x, name) with x kept as its bits (an unsigned integer of its width), for a
  value with no gradient. A layer scan saves each layer's named values into one stacked buffer;
  XLA's CPU backend writes a bfloat16 slice of it by converting the whole stack to float32 and back
  (every layer: the layers' count squared in copies), an integer slice in place."""
  bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
  return jax.lax.bitcast_convert_type(checkpoint_name(jax.lax.bitcast_convert_type(x, bits), name), x.dtype)


def _flash(q, k, v, info, block, max_segment, sliding_window, softcap):
  layouts = {n: checkpoint_name(jax.lax.stop_gradient(x), LAYOUT_NAMES[n]) for n, x in _layouts(q, k, v, block).items()}
  out, lse = jax.lax.stop_gradient(_forward_blocks(layouts, q.dtype, info, max_segment, sliding_window, softcap))
  out, lse = saved_bits(out, OUT_NAME), checkpoint_name(lse, LSE_NAME)
  return _with_grads(q, k, v, info, layouts, out, lse, block, max_segment, sliding_window, softcap)


def flash_attention(
    q_BxLxKxGxH: Array,
    k_BxLxKxH: Array,
    v_BxLxKxH: Array,
    segment_ids_BxL: Array,
    positions_BxL: Array | None = None,
    branch_ids_BxL: Array | None = None,
    *,
    sliding_window: int | None = None,
    window: Array | None = None,
    block: int = 64,
    max_segment: int = 0,
    softcap: float | None = None,
) -> Array:
  """Masked softmax(q k^T / sqrt(H)) v over the blocks the mask leaves, [B, L, K, G, H].

  sliding_window: a static window; window: a traced int32 scalar one (a layer's, 0 = full).
  block: the query and key block size (rows are padded to a multiple of it internally).
  softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2).
  max_segment > 0 promises that no segment is longer, bounding how far back a block looks.
  """
  windowed = sliding_window is not None or window is not None
  if windowed and positions_BxL is None:
    raise ValueError("a sliding window needs positions")
  L = q_BxLxKxGxH.shape[1]
  block = max(1, min(block, L))
  extra = -L % block
  info = MaskInfo(_pad_tokens(segment_ids_BxL, extra),
                  None if branch_ids_BxL is None else _pad_tokens(branch_ids_BxL, extra),
                  _pad_tokens(positions_BxL, extra) if windowed else None,
                  window=None if window is None else jnp.asarray(window, jnp.int32))
  out = _flash(_pad_tokens(q_BxLxKxGxH, extra), _pad_tokens(k_BxLxKxH, extra), _pad_tokens(v_BxLxKxH, extra), info,
               block, max_segment, sliding_window, softcap)
  return out[:, :L]


def attend(q_BxLxKxGxH: Array, k_BxLxKxH: Array, v_BxLxKxH: Array, info: MaskInfo, *, sliding_window: int | None,
           block: int, max_segment: int, branches: int = 2, softcap: float | None = None) -> Array:
  """The attention registry's entry point (the mask handles any number of branches)."""
  del branches
  return flash_attention(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, info.segment_ids_BxL, info.positions_BxL,
                         info.branch_ids_BxL, sliding_window=sliding_window, window=info.window, block=block,
                         max_segment=max_segment, softcap=softcap)
