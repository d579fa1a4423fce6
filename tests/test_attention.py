"""jbt.attention's block-sparse flash attention against the dense masked softmax it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbt import model
from jbt.model.attention.flash import flash_attention
from jbt.model.attention.mask import dense_mask
from jbt.model.attention.xla import blocked_attention


def packed_rows(rng, B, L, branches: int):
  """Rows of contiguous segments of random length (some with branches: True for chosen/rejected,
  an int k for k branches, a ranked record's responses), padded."""
  seg = np.zeros((B, L), np.int32)
  br = np.zeros((B, L), np.int32)
  pos = np.zeros((B, L), np.int32)
  for b in range(B):
    start, n = 0, 1
    while True:
      size = int(rng.integers(5, 40))
      if start + size > L - 3:
        break
      seg[b, start:start + size] = n
      pos[b, start:start + size] = np.arange(size)
      n_br = 2 if branches is True else int(branches)
      if n_br and size >= 4 * n_br:
        p = size // 2
        cuts = np.linspace(start + p, start + size, n_br + 1).astype(int)
        for j in range(n_br):
          br[b, cuts[j]:cuts[j + 1]] = j + 1
          pos[b, cuts[j]:cuts[j + 1]] = np.arange(p, p + cuts[j + 1] - cuts[j])
      start, n = start + size, n + 1
  return seg, br, pos


def random_qkvw(rng, B, L, K, G, H):
  """Random queries, keys, values and output weights (the loss is sum(out * w))."""
  return (jnp.asarray(rng.normal(size=(B, L, K, G, H)), jnp.float32), jnp.asarray(rng.normal(size=(B, L, K, H)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, L, K, H)), jnp.float32), jnp.asarray(rng.normal(size=(B, L, K, G, H)), jnp.float32))


def packed_case(seed, B, L, K, G, H, branches=True):
  """Packed rows with branches and random q, k, v, w: (q, k, v, w, real rows' mask, MaskInfo, dense mask)."""
  from jbt.model.attention.mask import MaskInfo

  rng = np.random.default_rng(seed)
  seg, br, pos = packed_rows(rng, B, L, branches)
  q, k, v, w = random_qkvw(rng, B, L, K, G, H)
  real = jnp.asarray(seg > 0)[:, :, None, None, None]
  seg, br, pos = jnp.asarray(seg), jnp.asarray(br), jnp.asarray(pos)
  return q, k, v, w, real, MaskInfo(seg, br, pos), dense_mask(seg, pos, None, br)


def assert_same_values_and_gradients(dense, other, q, k, v, atol, jit=False):
  ref_val, ref_grads = jax.value_and_grad(dense, argnums=(0, 1, 2))(q, k, v)
  got_fn = jax.value_and_grad(other, argnums=(0, 1, 2))
  val, grads = (jax.jit(got_fn) if jit else got_fn)(q, k, v)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=1e-4)
  for got, ref, name in zip(grads, ref_grads, "qkv"):
    assert np.abs(np.asarray(ref)).max() > 0.1, "gradients too small to mean anything"
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("branches, window, block, max_segment, L", [
    (True, None, 16, 0, 150), (False, 6, 16, 0, 150), (True, None, 7, 40, 150), (False, None, 64, 0, 150),
    (True, None, 256, 0, 150)])
def test_flash_equals_dense_values_and_gradients(branches, window, block, max_segment, L):
  rng = np.random.default_rng(block + L)
  B, K, G, H = 2, 2, 3, 8
  seg, br, pos = packed_rows(rng, B, L, branches)
  q, k, v, w = random_qkvw(rng, B, L, K, G, H)
  real = jnp.asarray(seg > 0)[:, :, None, None, None]  # padding outputs are never read
  branch = jnp.asarray(br) if branches else None
  mask = dense_mask(jnp.asarray(seg), jnp.asarray(pos), window, branch)

  def dense(q, k, v):
    return (blocked_attention(q, k, v, mask, 0, 0) * real * w).sum()

  def flash(q, k, v):
    out = flash_attention(q, k, v, jnp.asarray(seg), jnp.asarray(pos), branch, sliding_window=window,
                          block=block, max_segment=max_segment)
    return (out * real * w).sum()

  assert_same_values_and_gradients(dense, flash, q, k, v, atol=2e-5, jit=True)


@pytest.mark.parametrize("kind", ["native", "flash", "xla"])
def test_a_per_layer_window_traced_in_a_scan_equals_the_dense_reference(kind):
  """Models that mix sliding and full layers feed each layer its window (0 = full) as a scanned
  int32: values and gradients of every layer equal the dense mask built with that static window."""
  from jbt.model import attention
  from jbt.model.attention.mask import MaskInfo

  rng = np.random.default_rng(3)
  B, L, K, G, H = 2, 90, 2, 2, 8
  seg, br, pos = packed_rows(rng, B, L, True)
  seg, br, pos = jnp.asarray(seg), jnp.asarray(br), jnp.asarray(pos)
  q, k, v, w = random_qkvw(rng, B, L, K, G, H)
  real = jnp.asarray(seg > 0)[:, :, None, None, None]
  windows = jnp.array([5, 0, 11], jnp.int32)
  dense_info = attention.mask_info(kind, seg, pos, br, None)

  def per_layer(q, k, v):
    def layer(total, window):
      info = MaskInfo(*dense_info[:4], window=window)
      out = attention.KINDS[kind].attend(q, k, v, info, sliding_window=None, block=16, max_segment=0)
      return total + (out * real * w).sum() * (1.0 + window), None
    return jax.lax.scan(layer, 0.0, windows)[0]

  def dense(q, k, v):
    total = 0.0
    for window in (5, 0, 11):
      mask = dense_mask(seg, pos, window or None, br)
      total += (blocked_attention(q, k, v, mask, 0, 0) * real * w).sum() * (1.0 + window)
    return total

  assert_same_values_and_gradients(dense, per_layer, q, k, v, atol=1e-4, jit=True)


@pytest.mark.parametrize("kind", ["native", "flash", "xla"])
def test_soft_capped_logits_equal_the_plain_formula_values_and_gradients(kind):
  """Gemma 2's cap * tanh(logits / cap) before the mask, against the formula written out."""
  from jbt.model import attention

  rng = np.random.default_rng(4)
  B, L, K, G, H, cap = 2, 70, 2, 2, 8, 1.5
  seg, br, pos = packed_rows(rng, B, L, True)
  seg, br, pos = jnp.asarray(seg), jnp.asarray(br), jnp.asarray(pos)
  q, k, v, w = random_qkvw(rng, B, L, K, G, H)
  q = q * 3.0  # logits well past the cap, so capping changes them
  real = jnp.asarray(seg > 0)[:, :, None, None, None]
  mask = dense_mask(seg, pos, None, br)
  info = attention.mask_info(kind, seg, pos, br, None)

  def dense(q, k, v):
    logits = jnp.einsum("BLKGH,BSKH->BKGLS", q, k) / np.sqrt(H)
    logits = jnp.where(mask[:, None, None], jnp.tanh(logits / cap) * cap, -1e30)
    out = jnp.einsum("BKGLS,BSKH->BLKGH", jax.nn.softmax(logits, axis=-1), v)
    return (out * real * w).sum()

  def capped(q, k, v):
    out = attention.KINDS[kind].attend(q, k, v, info, sliding_window=None, block=16, max_segment=0, softcap=cap)
    return (out * real * w).sum()

  assert_same_values_and_gradients(dense, capped, q, k, v, atol=1e-4, jit=True)
  uncapped = attention.KINDS[kind].attend(q, k, v, info, sliding_window=None, block=16, max_segment=0)
  assert abs(float((uncapped * real * w).sum()) - float(dense(q, k, v))) > 1e-2


def test_flash_sees_a_segment_cut_by_a_wrong_bound_and_bf16_stays_close():
  rng = np.random.default_rng(0)
  seg, br, pos = packed_rows(rng, 1, 120, True)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 120, 1, 2, 8), (1, 120, 1, 8), (1, 120, 1, 8)))
  real = np.asarray(seg > 0)
  full = np.asarray(flash_attention(q, k, v, seg, pos, br, block=8))[real]
  cut = np.asarray(flash_attention(q, k, v, seg, pos, br, block=8, max_segment=3))[real]
  assert np.abs(full - cut).max() > 1e-3  # the test can tell a wrong key range
  bf16 = flash_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, pos, br, block=8)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16.astype(jnp.float32))[real], full, atol=5e-2)


def _grad_hlo(remat: str, kind: str = "flash") -> str:
  cfg = model.ModelConfig(num_layers=2, remat=remat, attention=kind, flash_block=16)
  L = 64
  tokens, seg, pos = jnp.ones((1, L), jnp.int32), jnp.ones((1, L), jnp.int32), jnp.arange(L)[None]
  # Lowering needs the parameters' shapes only: eval_shape spares compiling and running the init.
  params = jax.eval_shape(
      lambda: model.RewardModel(cfg).init(jax.random.key(0), tokens[:, :1], seg[:, :1], pos[:, :1])["params"])
  grad = jax.grad(lambda p: model.RewardModel(cfg).apply({"params": p}, tokens, seg, pos, jnp.array([L - 1])).sum())
  return jax.jit(grad).lower(params).as_text()


def _while_loops(remat: str) -> int:
  return _grad_hlo(remat).count("stablehlo.while")


def test_remat_keeps_the_attention_forward_instead_of_rerunning_it():
  # The gradient program holds the layer scans and the attention loops. Under "attention" and
  # "dots" the backward reads flash attention's saved output and log-sum-exp, so it has no loops
  # beyond what no remat has; "full" recomputes the layer, attention forward loops included.
  none = _while_loops("none")
  assert _while_loops("attention") == _while_loops("dots") == none < _while_loops("full")


def test_remat_keeps_the_native_kernels_forward_instead_of_rerunning_it():
  # The same for the native kernel's calls: one forward call per layer scan's body under "attention" and
  # "dots" (the backward reads its saved output, log-sum-exp, q, k and v), two under "full".
  from jbt.model.attention import native

  calls = {remat: _grad_hlo(remat, "native").count(native.FORWARD) for remat in ("none", "attention", "dots", "full")}
  assert calls["attention"] == calls["dots"] == calls["none"] >= 1
  assert calls["full"] > calls["none"]


@pytest.mark.parametrize("kind, branches, max_segment", [
    ("splash", True, 0), ("splash", False, 40), ("splash", True, 40), ("pallas_gpu", True, 0), ("pallas_gpu", False, 0),
    ("splash", 4, 0), ("pallas_gpu", 4, 0)])
def test_fused_kernels_equal_dense_values_and_gradients_in_interpret_mode(kind, branches, max_segment):
  """The TPU and GPU kernels (Pallas interpret mode here) on packed and shared-prompt rows whose
  length is not a multiple of the block: values and gradients of every real token."""
  from jbt.model.attention import KINDS, mask_info

  rng = np.random.default_rng(7 + branches + max_segment)
  B, L, K, G, H = 2, 150, 2, 2, 16
  seg, br, pos = packed_rows(rng, B, L, branches)
  q, k, v, w = random_qkvw(rng, B, L, K, G, H)
  real = jnp.asarray(seg > 0)[:, :, None, None, None]
  branch = jnp.asarray(br) if branches else None
  mask = dense_mask(jnp.asarray(seg), jnp.asarray(pos), None, branch)
  info = mask_info(kind, jnp.asarray(seg), jnp.asarray(pos), branch, None)
  assert info.dense_BxLxS is None  # no [L, S] array on the fused path

  def dense(q, k, v):
    return (blocked_attention(q, k, v, mask, 0, 0) * real * w).sum()

  def fused(q, k, v):
    out = KINDS[kind].attend(q, k, v, info, sliding_window=None, block=32, max_segment=max_segment,
                             branches=max(int(branches), 2))
    return (out * real * w).sum()

  assert_same_values_and_gradients(dense, fused, q, k, v, atol=5e-5)


def test_a_branch_call_is_what_lets_the_fused_kernels_see_branches():
  """Without the per-branch calls the rejected branch would see the chosen one: the test can fail."""
  from jbt.model.attention import fused

  rng = np.random.default_rng(3)
  seg, br, pos = packed_rows(rng, 1, 128, True)  # chosen and rejected branches
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 128, 1, 1, 16), (1, 128, 1, 16), (1, 128, 1, 16)))
  call = lambda q, k, v, s: fused.splash_call(q, k, v, s, block=32, max_segment=0)  # noqa: E731
  ref = blocked_attention(q, k, v, dense_mask(jnp.asarray(seg), jnp.asarray(pos), None, jnp.asarray(br)), 0, 0)
  rejected = np.asarray(br) == 2
  one_call = np.asarray(call(q, k, v, jnp.asarray(seg)))
  assert np.abs(one_call - np.asarray(ref))[rejected].max() > 1e-2
  both = fused.branch_calls(call, q, k, v, model.attention.MaskInfo(jnp.asarray(seg), jnp.asarray(br), None))
  np.testing.assert_allclose(np.asarray(both)[np.asarray(seg) > 0], np.asarray(ref)[np.asarray(seg) > 0], atol=1e-5)


def test_auto_falls_back_visibly_from_a_fused_kernel_for_a_sliding_window(caplog):
  from jbt.model.attention import resolve

  with caplog.at_level("WARNING", logger="jbt"):
    assert resolve("auto", "tpu", sliding_window=4096) == "xla"
  assert "splash does not take the model's sliding window (4096)" in caplog.text
  assert resolve("auto", "tpu") == "splash" and resolve("auto", "cpu", sliding_window=8) == "native"
  with caplog.at_level("WARNING", logger="jbt"):
    assert resolve("auto", "gpu", softcap=50.0) == "xla"
  assert "pallas_gpu does not take attention-logit soft-capping (50.0)" in caplog.text
  with pytest.raises(ValueError, match="'splash' does not take attention-logit soft-capping"):
    resolve("splash", "tpu", softcap=50.0)
  with pytest.raises(ValueError, match="'pallas_gpu' does not take sliding windows"):
    resolve("pallas_gpu", "gpu", sliding_window=8)


@pytest.mark.parametrize("kind", ["splash", "pallas_gpu", "native"])
def test_fused_kernels_run_per_shard_under_a_mesh(kind):
  """Rows over the data axes and kv heads over "tensor": each device runs the kernel on its shard
  (shard_map), with the dense reference's values and gradients."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jbt.model.attention import KINDS, mask_info
  from jbt.runtime.mesh import make_mesh

  mesh = make_mesh((2, 2, 2), devices=jax.devices()[:8])
  rng = np.random.default_rng(11)
  B, L, K, G, H = 4, 100, 2, 2, 16
  seg, br, pos = packed_rows(rng, B, L, True)
  q = jnp.asarray(rng.normal(size=(B, L, K, G, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(B, L, K, H)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, L, K, H)), jnp.float32)
  real = jnp.asarray(seg > 0)[:, :, None, None, None]
  mask = dense_mask(jnp.asarray(seg), jnp.asarray(pos), None, jnp.asarray(br))
  ref, ref_dq = jax.value_and_grad(lambda q: (blocked_attention(q, k, v, mask, 0, 0) * real).sum())(q)

  def loss(q, k, v, seg, br):
    info = mask_info(kind, seg, None, br, None)
    return (KINDS[kind].attend(q, k, v, info, sliding_window=None, block=32, max_segment=0) * real).sum()

  with jax.set_mesh(mesh):
    shard = lambda x, *rest: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, *rest)))  # noqa: E731
    args = (shard(q, "tensor", None, None), shard(k, "tensor", None), shard(v, "tensor", None),
            shard(jnp.asarray(seg)), shard(jnp.asarray(br)))
    fn = jax.jit(jax.value_and_grad(loss))
    assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
    val, dq = fn(*args)
  np.testing.assert_allclose(val, ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dq), np.asarray(ref_dq), atol=5e-5)


def test_saved_attention_output_is_kept_as_bits_and_changes_nothing(capsys):
  """Under remat the flash output is saved as uint16 bits (XLA's CPU backend writes bfloat16
  slices of a layer scan's saved stack by converting the whole stack); values and gradients are
  those of the unsaved computation."""
  from jax.ad_checkpoint import checkpoint_name

  from jbt.model.attention import flash

  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.bfloat16)
  policy = jax.checkpoint_policies.save_only_these_names("kept")

  def f(x, saver):
    y = jax.lax.stop_gradient(jnp.sin(x))
    return (saver(y, "kept") * x).astype(jnp.float32).sum()

  bits = jax.checkpoint(lambda x: f(x, flash.saved_bits), policy=policy)
  plain = jax.checkpoint(lambda x: f(x, checkpoint_name), policy=policy)
  jax.ad_checkpoint.print_saved_residuals(bits, x)
  saved = capsys.readouterr().out.splitlines()
  assert any(r.startswith("u16[4,8]") for r in saved), saved
  assert all(r.startswith(("u16", "bf16[4,8] from the argument")) for r in saved), saved
  np.testing.assert_array_equal(jax.grad(bits)(x), jax.grad(plain)(x))
  assert bits(x) == plain(x)


def test_first_key_block_equals_the_running_maximum():
  from jbt.model.attention import flash

  rng = np.random.default_rng(0)
  for _ in range(5):
    L, block = 96, 16
    lengths = rng.integers(1, 30, 8)
    seg = np.zeros((2, L), np.int32)
    for b in range(2):
      at = 0
      for i, n in enumerate(rng.permutation(lengths)):
        n = min(n, L - at)
        seg[b, at:at + n] = 0 if i % 4 == 3 else i + 1  # some padding runs between segments too
        at += n
    for max_segment in (0, 20):
      got = np.asarray(flash._first_key_block(jnp.asarray(seg), block, max_segment))
      idx = np.arange(L)
      starts = np.concatenate([np.ones((2, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
      first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
      first = np.where(seg == 0, idx, first)
      if max_segment:
        first = np.maximum(first, idx - max_segment + 1)
      np.testing.assert_array_equal(got, first.reshape(2, L // block, block).min(axis=(0, 2)) // block)


def test_flash_block_helpers_equal_the_plain_ops():
  """The tree row maximum and the block-major, bit-level blocks that flash's loops use instead of
  x.max(-1) and dynamic slices (both slow on XLA's CPU backend) give exactly the same values."""
  from jbt.model.attention import flash

  rng = np.random.default_rng(0)
  for n in (1, 5, 32, 64):
    x = rng.normal(size=(2, 3, n)).astype(np.float32)
    x[0, 0, 0] = flash._NEG
    x[1, 2, :] = -np.inf
    np.testing.assert_array_equal(np.asarray(jax.jit(flash._row_max)(jnp.asarray(x))), x.max(-1))
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32):
    x = jnp.asarray(rng.normal(size=(2, 40, 3, 8)) * 100, dtype)  # [B, L, K, H]
    for perm in (flash._KEYS, flash._KEYS_T):
      blocks = jax.jit(flash._blocks, static_argnums=(1, 2))(x, 8, perm)
      np.testing.assert_array_equal(np.asarray(jax.jit(flash._unblocks, static_argnums=1)(blocks, perm)), np.asarray(x))
      for j in (0, 3, 4):
        got = jax.jit(lambda b, j: flash._block(flash._bits(b), j, b.dtype))(blocks, jnp.int32(j))
        assert got.dtype == x.dtype
        want = jnp.transpose(x[:, 8 * j:8 * (j + 1)], (0, 2, 3, 1) if perm == flash._KEYS_T else (0, 2, 1, 3))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("branches, window, H, L", [(True, None, 16, 150), (False, 6, 8, 150), (3, None, 32, 300),
                                                    (True, None, 64, 64)])
def test_native_equals_dense_values_and_gradients(branches, window, H, L):
  """The native CPU kernel (float32 inputs: its float32 path) against the dense reference: rows
  that end inside a block, a static window, several branches, head dims padded to its tiles."""
  from jbt.model.attention import native
  from jbt.model.attention.mask import MaskInfo

  rng = np.random.default_rng(H + L)
  B, K, G = 2, 2, 3
  seg, br, pos = packed_rows(rng, B, L, branches)
  q, k, v, w = random_qkvw(rng, B, L, K, G, H)
  real = jnp.asarray(seg > 0)[:, :, None, None, None]
  branch = jnp.asarray(br) if branches else None
  mask = dense_mask(jnp.asarray(seg), jnp.asarray(pos), window, branch)
  info = MaskInfo(jnp.asarray(seg), branch, jnp.asarray(pos))

  def dense(q, k, v):
    return (blocked_attention(q, k, v, mask, 0, 0) * real * w).sum()

  def kernel(q, k, v):
    return (native.native_attention(q, k, v, info, sliding_window=window) * real * w).sum()

  assert_same_values_and_gradients(dense, kernel, q, k, v, atol=2e-5, jit=True)


@pytest.mark.parametrize("amx", [True, False])
def test_native_bf16_is_as_close_to_float32_as_flash(amx, monkeypatch):
  """bfloat16 inputs: the AMX path where the CPU has it (P and dS rounded to bfloat16 for the tile
  matmuls, as flash rounds them) or the float32 one (JBT_NATIVE_NO_AMX): values and gradients within
  flash's own distance from the float32 reference, and close to flash's."""
  from jbt.model.attention import native

  if not amx:
    monkeypatch.setenv("JBT_NATIVE_NO_AMX", "1")
  q, k, v, w, real, info, _ = packed_case(5, 1, 300, 3, 3, 64)

  def run(fn, dtype):
    def loss(q, k, v):
      return (fn(q.astype(dtype), k.astype(dtype), v.astype(dtype)).astype(jnp.float32) * real * w).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  kernel = lambda q, k, v: native.native_attention(q, k, v, info)  # noqa: E731
  flash = lambda q, k, v: flash_attention(q, k, v, info.segment_ids_BxL, None, info.branch_ids_BxL)  # noqa: E731
  ref_val, ref_grads = run(kernel, jnp.float32)
  got_val, got_grads = run(kernel, jnp.bfloat16)
  flash_val, flash_grads = run(flash, jnp.bfloat16)
  assert abs(float(got_val) - float(ref_val)) <= 2 * abs(float(flash_val) - float(ref_val)) + 0.05
  for got, fl, ref, name in zip(got_grads, flash_grads, ref_grads, "qkv"):
    got, fl, ref = (np.asarray(x, np.float32) for x in (got, fl, ref))
    err, flash_err = np.abs(got - ref).max(), np.abs(fl - ref).max()
    assert err <= 2 * flash_err + 1e-3, f"d{name}: {err} from float32 against flash's {flash_err}"
    np.testing.assert_allclose(got, fl, atol=4 * flash_err + 1e-3, err_msg=f"d{name}")


def test_auto_takes_flash_where_the_native_kernel_cannot_be_built(monkeypatch, caplog):
  from jbt.model.attention import native, resolve

  def no_compiler():
    raise native.BuildError("no C++ compiler found")

  monkeypatch.setattr(native, "_compiler", no_compiler)
  native._register.cache_clear()
  native.available.cache_clear()
  try:
    with caplog.at_level("WARNING", logger="jbt"):
      assert resolve("auto", "cpu") == "flash"
    assert "the native CPU kernel is not available: no C++ compiler found" in caplog.text
    with pytest.raises(ValueError, match="attention 'native' needs its CPU kernel"):
      resolve("native", "cpu")
  finally:
    native._register.cache_clear()
    native.available.cache_clear()


def test_the_native_kernel_builds_once_per_source_and_cpu(tmp_path, monkeypatch):
  """Built into jbt's cache under a key of the source, compiler and CPU flags: a second build()
  reuses the library, a changed source gets a library of its own, a failed compile says why."""
  from jbt.model.attention import native

  monkeypatch.setenv("JBT_CACHE", str(tmp_path))
  first = native.build()
  assert first.parent == tmp_path / "kernels" and first.exists()
  stamp = first.stat().st_mtime_ns
  assert native.build() == first and first.stat().st_mtime_ns == stamp
  source = tmp_path / "native.cc"
  source.write_text(native.SOURCE.read_text() + "\n// changed\n")
  monkeypatch.setattr(native, "SOURCE", source)
  assert native.library_path() != first
  source.write_text("this is not C++")
  with pytest.raises(native.BuildError, match="compiling native.cc failed"):
    native.build()
  assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [first.name]  # nothing half-written left


_BUILD_ONLY = """
from jbt.model.attention import native
print("built", native.build().name, "ok")
"""

_OTHER_CPU_CHECK = """
import sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
from test_attention import packed_case
from jbt.model.attention import native
from jbt.model.attention.xla import blocked_attention
q, k, v, w, real, info, mask = packed_case(7, 2, 150, 2, 3, 32)
for dtype, atol in ((jnp.float32, 2e-5), (jnp.bfloat16, 0.1)):
  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q.astype(dtype), k.astype(dtype), v.astype(dtype))
                                                       .astype(jnp.float32) * real * w).sum(), argnums=(0, 1, 2)))
  ref = loss(lambda q, k, v: blocked_attention(q, k, v, mask, 0, 0))(q, k, v)
  got = loss(lambda q, k, v: native.native_attention(q, k, v, info))(q, k, v)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=atol)
  for g, r in zip(got[1], ref[1]):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=atol)
print("built", native.library_path().name, "ok")
"""


@pytest.mark.parametrize("arch", ["-march=x86-64-v3", "-march=x86-64-v4 -mavx512bf16"])
def test_the_native_kernel_built_for_other_cpu_kinds_equals_dense(arch, tmp_path):
  """The code another CPU kind gets (AVX2 only; AVX-512 with bf16 but no AMX, as AMD Zen 4 and 5),
  built here into a fresh cache: values and gradients against the dense reference where this CPU
  can run it, else the build alone (an AVX-512 build on an AVX2-only CPU)."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  from cpu_kinds import runs_here

  env = dict(os.environ, JBT_CACHE=str(tmp_path), JBT_NATIVE_ARCH_FLAGS=arch)
  root = Path(__file__).resolve().parents[1]
  check = _OTHER_CPU_CHECK if runs_here(arch) else _BUILD_ONLY
  done = subprocess.run([sys.executable, "-c", check], cwd=root, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "ok" in done.stdout and len(list((tmp_path / "kernels").glob("*.so"))) == 1


def test_native_gradients_are_the_same_every_run():
  """Each worker adds up its key blocks' gradients in a fixed order (a resumed run repeats the
  uninterrupted one's numbers): repeated backward passes give the same bits."""
  from jbt.model.attention import native

  q, k, v, w, _, info, _ = packed_case(9, 2, 640, 2, 2, 32)
  for dtype in (jnp.float32, jnp.bfloat16):
    grad = jax.jit(jax.grad(lambda q, k, v: (native.native_attention(q, k, v, info).astype(jnp.float32) * w).sum(),
                            argnums=(0, 1, 2)))
    args = tuple(x.astype(dtype) for x in (q, k, v))
    first = [np.asarray(g) for g in grad(*args)]
    for _ in range(6):
      for a, b in zip(first, grad(*args)):
        assert np.array_equal(a, np.asarray(b))


def test_native_takes_other_float_dtypes_through_float32():
  from jbt.model.attention import native

  q, k, v, w, real, info, _ = packed_case(3, 1, 100, 2, 2, 16)
  half = native.native_attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), info)
  full = native.native_attention(*(x.astype(jnp.float16).astype(jnp.float32) for x in (q, k, v)), info)
  assert half.dtype == jnp.float16
  np.testing.assert_array_equal(np.asarray(half), np.asarray(full.astype(jnp.float16)))


@pytest.mark.parametrize("threads", ["1", "2", "5"])
def test_native_kernels_give_the_same_bits_on_xla_pool_and_own_threads(threads, monkeypatch):
  """The native kernels share XLA's CPU thread pool (jbt_threads.h): the caller and helper tasks
  claim units until none is left, and a helper that starts late finds nothing. Every unit runs
  once and fixed-order sums keep their order whichever threads run them: attention's gradients,
  the SwiGLU kernels and the transpose give the same bits with the pool and with threads of their
  own (JBT_NATIVE_POOL=0), with fewer, as many and more workers than the pool has threads."""
  from jbt.model import swiglu, transpose
  from jbt.model.attention import native

  if not (transpose.available() and swiglu.available()):
    pytest.skip("no C++ compiler for the native kernels")
  q, k, v, w, _, info, _ = packed_case(11, 2, 640, 2, 2, 32)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1100, 1000)), jnp.bfloat16)  # 1.1M elements: several threads' worth
  g, u, dh = (jnp.asarray(rng.normal(size=(528, 1024)), jnp.bfloat16) for _ in range(3))

  def run():
    grad = jax.jit(jax.grad(lambda q, k, v: (native.native_attention(q, k, v, info).astype(jnp.float32) * w).sum(),
                            argnums=(0, 1, 2)))
    out = [np.asarray(a, np.float32) for a in grad(*(a.astype(jnp.bfloat16) for a in (q, k, v)))]
    out.append(np.asarray(jax.jit(transpose.transpose)(x), np.float32))
    out.append(np.asarray(jax.jit(swiglu.swiglu)(g, u), np.float32))
    out += [np.asarray(a, np.float32) for a in jax.jit(swiglu._backward_t)(g, u, dh)]
    return out

  monkeypatch.setenv("JBT_NATIVE_THREADS", threads)
  pooled = run()
  monkeypatch.setenv("JBT_NATIVE_POOL", "0")
  own = run()
  for a, b in zip(pooled, own):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(pooled[3], np.asarray(x, np.float32).T)  # every unit ran once
  np.testing.assert_array_equal(pooled[-1], np.asarray(swiglu.swiglu(g, u), np.float32).T)
