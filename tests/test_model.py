"""The Flax reward model against transformers' ...ForSequenceClassification, family by family."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import tinymodels  # noqa: E402
from jbt import model  # noqa: E402
from jbt.hf.config import model_config_from_hf  # noqa: E402
from jbt.hf.params import load_params  # noqa: E402
from jbt.hf.sources import DictSource  # noqa: E402
from jbt.model.matmul import matmul  # noqa: E402
from jbt.runtime import xla_options  # noqa: E402

LENGTHS = (19, 11, 6, 15)  # real tokens per sequence; rows are padded to 20


def _sequences(seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(3, tinymodels.VOCAB, n).astype(np.int32) for n in LENGTHS]


def _padded(seqs: list[np.ndarray], length: int = 20, pad: int = 0):
  tokens = np.full((len(seqs), length), pad, np.int32)
  seg = np.zeros_like(tokens)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)] = s
    seg[i, : len(s)] = 1
  pos = np.tile(np.arange(length, dtype=np.int32), (len(seqs), 1)) * seg
  return tokens, seg, pos


def _packed(seqs: list[np.ndarray], length: int = 64, pad: int = 0):
  """All sequences side by side in one row; positions restart; the pool index is each one's last token."""
  tokens = np.full((1, length), pad, np.int32)
  seg = np.zeros_like(tokens)
  pos = np.zeros_like(tokens)
  idx, t = [], 0
  for i, s in enumerate(seqs):
    tokens[0, t : t + len(s)] = s
    seg[0, t : t + len(s)] = i + 1
    pos[0, t : t + len(s)] = np.arange(len(s))
    t += len(s)
    idx.append(t - 1)
  return tokens, seg, pos, np.asarray(idx, np.int32)


def _hf_rewards(m, tokens: np.ndarray, seg: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = m(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(seg, dtype=torch.long))
  return out.logits[:, -1 if m.config.num_labels == 1 else 1].numpy()


def _jbt(m, **overrides):
  cfg = model_config_from_hf(m.config.to_dict(), num_labels=m.config.num_labels, **overrides)
  params = load_params(cfg, DictSource(m.state_dict()), where="test", allow_missing_head=False)
  return cfg, params


def _apply(cfg, params, tokens, seg, pos, idx):
  return np.asarray(jax.jit(model.RewardModel(cfg).apply)({"params": params}, tokens, seg, pos, idx))


@pytest.mark.parametrize("family", tinymodels.FAMILIES)
def test_rewards_match_transformers_padded_and_packed(family):
  m = tinymodels.make_model(family)
  cfg, params = _jbt(m)
  seqs = _sequences()
  tokens, seg, pos = _padded(seqs)
  ref = _hf_rewards(m, tokens, seg)
  assert np.abs(ref).max() > 0.05, "rewards too small for the tolerance to mean anything"
  idx = model.pool_index(jnp.asarray(tokens), jnp.asarray(seg), cfg.pad_token_id)
  np.testing.assert_allclose(_apply(cfg, params, tokens, seg, pos, idx), ref, atol=1e-4, rtol=0)
  ptokens, pseg, ppos, pidx = _packed(seqs)
  np.testing.assert_allclose(_apply(cfg, params, ptokens, pseg, ppos, pidx), ref, atol=1e-4, rtol=0)


def test_unscanned_layers_and_remat_give_the_same_rewards():
  m = tinymodels.make_model("qwen3")
  tokens, seg, pos = _padded(_sequences(1))
  idx = model.pool_index(jnp.asarray(tokens), jnp.asarray(seg), 0)
  cfg, params = _jbt(m)
  ref = _apply(cfg, params, tokens, seg, pos, idx)
  cfg2, params2 = _jbt(m, scan_layers=False, remat="dots")
  assert "layer_1" in params2
  np.testing.assert_allclose(_apply(cfg2, params2, tokens, seg, pos, idx), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["flash", "xla"])
def test_every_remat_policy_gives_the_same_gradients(attention):
  m = tinymodels.make_model("llama")
  tokens, seg, pos, idx = _packed(_sequences(2))
  grads = {}
  for remat in ("none", "full", "attention", "dots"):
    cfg, params = _jbt(m, remat=remat, attention=attention, flash_block=16, attn_block=16)
    loss = lambda p: (model.RewardModel(cfg).apply({"params": p}, tokens, seg, pos, idx) ** 2).sum()  # noqa: E731
    grads[remat] = jax.jit(jax.grad(loss))(params)
  for remat in ("full", "attention", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads[remat], grads["none"])
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["none"])) > 0


def test_pooling_when_pad_is_eos():
  """pad == eos: transformers reads the last token before a trailing eos run, and so must jbt."""
  m = tinymodels.make_model("llama", pad_token_id=2)
  cfg, params = _jbt(m)
  assert cfg.pad_token_id == 2
  seqs = _sequences(2)
  seqs[0] = np.concatenate([seqs[0][:-2], [2, 2]]).astype(np.int32)  # ends with eos eos
  seqs[1] = np.concatenate([seqs[1], [2]]).astype(np.int32)
  tokens, seg, pos = _padded(seqs, pad=2)
  ref = _hf_rewards(m, tokens, seg)
  idx = np.asarray(model.pool_index(jnp.asarray(tokens), jnp.asarray(seg), 2))
  assert idx[0] == len(seqs[0]) - 3 and idx[1] == 20 + len(seqs[1]) - 2
  np.testing.assert_allclose(_apply(cfg, params, tokens, seg, pos, idx), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_bfloat16_compute_close_to_float32(family):
  m = tinymodels.make_model(family)
  tokens, seg, pos = _padded(_sequences(3))
  idx = model.pool_index(jnp.asarray(tokens), jnp.asarray(seg), 0)
  cfg, params = _jbt(m)
  r32 = _apply(cfg, params, tokens, seg, pos, idx)
  r16 = _apply(cfg.replace(dtype="bfloat16"), params, tokens, seg, pos, idx)
  assert r16.dtype == np.float32
  np.testing.assert_allclose(r16, r32, atol=2e-2, rtol=0)
  assert not np.array_equal(r16, r32)  # bf16 really ran


def test_bfloat16_gradients_close_to_float32():
  """The bfloat16 path (on CPU: jbt.model.matmul's float32-accumulating custom VJP) gives gradients
  within bf16 rounding of float32's, for every parameter."""
  m = tinymodels.make_model("llama")
  tokens, seg, pos, idx = _packed(_sequences(4))
  cfg, params = _jbt(m, remat="attention", flash_block=16)
  grads = {}
  for dt in ("float32", "bfloat16"):
    c = cfg.replace(dtype=dt)
    loss = lambda p, c=c: (model.RewardModel(c).apply({"params": p}, tokens, seg, pos, idx) ** 2).sum()  # noqa: E731
    grads[dt] = jax.jit(jax.grad(loss))(params)
  flat32, flat16 = jax.tree.leaves(grads["float32"]), jax.tree.leaves(grads["bfloat16"])
  assert all(g.dtype == jnp.float32 for g in flat16)
  for g32, g16 in zip(flat32, flat16):
    scale = float(jnp.abs(g32).max()) + 1e-12
    assert float(jnp.abs(g16 - g32).max()) <= 0.05 * scale
  assert any(not np.array_equal(a, b) for a, b in zip(flat32, flat16))  # bf16 really ran


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_both_bfloat16_dot_kinds_give_the_same_rewards_loss_and_gradients():
  """YNNPACK's single dots (bfloat16 inputs) and its fused kind (the dot computed in float32), one
  of which jbt takes on each CPU (xla_options.bf16_dots): both compute bfloat16 products summed in
  float32, so the rewards, loss and every gradient agree with each other and with float32 compute
  as closely as bfloat16 rounding allows."""
  m = tinymodels.make_model("llama")
  tokens, seg, pos, idx = _packed(_sequences(4))
  cfg, params = _jbt(m, remat="dots", flash_block=16)
  results = {}
  for name, dt, options in (("float32", "float32", None), *(("bf16 " + k, "bfloat16", o) for k, o in xla_options.BF16_DOTS.items())):
    c = cfg.replace(dtype=dt)

    def loss(p, c=c):
      r = model.RewardModel(c).apply({"params": p}, tokens, seg, pos, idx)
      return -jax.nn.log_sigmoid(r[::2] - r[1::2]).mean(), r

    results[name] = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=options)(params)
  ((l32, r32), g32) = results["float32"]
  errors = {}
  for name in ("bf16 single", "bf16 fused"):
    (l16, r16), g16 = results[name]
    np.testing.assert_allclose(r16, r32, atol=2e-2, rtol=0)
    np.testing.assert_allclose(l16, l32, atol=1e-2, rtol=0)
    errors[name] = []
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
      scale = float(jnp.abs(b).max()) + 1e-12
      errors[name].append(float(jnp.abs(a - b).max()) / scale)
    assert max(errors[name]) <= 0.05, (name, max(errors[name]))
  (_, r_single), g_single = results["bf16 single"]
  (_, r_fused), g_fused = results["bf16 fused"]
  np.testing.assert_allclose(r_fused, r_single, atol=1e-2, rtol=0)
  for a, b, e_single, e_fused in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_single), errors["bf16 single"], errors["bf16 fused"]):
    scale = float(jnp.abs(b).max()) + 1e-12
    assert float(jnp.abs(a - b).max()) <= 0.05 * scale
    assert e_fused <= 2 * e_single + 5e-3, (e_fused, e_single)  # no further from float32 than bfloat16 allows


@pytest.mark.parametrize("kind", ["bf16_f32", "bf16_f32_gather"])
@pytest.mark.parametrize("tokens", [96, 97])  # 97: prime, no split of the tokens for dw
def test_matmul_equals_the_plain_bfloat16_matmul_and_keeps_bfloat16_dots(kind, tokens):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(tokens, 40)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(tokens, 24)), jnp.bfloat16)

  def vjp(f):
    def run(x, w, g):
      y, back = jax.vjp(f, x, w)
      return (y, *back(g))
    return jax.jit(run, compiler_options=xla_options.bf16_dot_options("single"))  # the fused kind widens every dot

  ours = vjp(lambda a, b: matmul(a, b, jnp.bfloat16, kind))
  y, dx, dw = ours(x, w, g)
  y_ref, dx_ref, dw_ref = vjp(lambda a, b: a @ b.astype(jnp.bfloat16))(x, w, g)
  assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-2, atol=1e-2)  # float32 here, bf16-rounded there
  exact = np.asarray(x, np.float32).T @ np.asarray(g, np.float32)
  np.testing.assert_allclose(dw, exact, rtol=1e-4, atol=1e-4)
  if jax.default_backend() == "cpu":  # all three dots read bfloat16: none was widened to float32
    hlo = ours.lower(x, w, g).compile().as_text()
    operands = [line.split(" dot(")[1].split(")")[0] for line in hlo.splitlines() if " dot(" in line]
    params = {line.split("=")[0].strip().lstrip("%").replace("ROOT ", ""): line.split("=")[1].split("{")[0].strip()
              for line in hlo.splitlines() if "parameter(" in line}
    types = [params.get(name.strip().lstrip("%"), "") for op in operands for name in op.split(",")]
    assert len(operands) == 3 and types and all(t.startswith("bf16") for t in types), (operands, types)
    # and none contracts its left operand's major axis (XLA's CPU dot is several times slower so)
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert all("lhs_contracting_dims={1}" in line for line in dots), dots


def test_bfloat16_remat_dots_keeps_matmul_outputs_as_bits_and_the_same_gradients():
  """Remat "dots" in bfloat16 saves each matmul's bfloat16 result as its bits (uint16: a bfloat16
  stack is rewritten whole at every layer by XLA's CPU backend), where the native transpose is
  built, else its float32 result; the gradients equal those of recomputing the matmuls (remat
  "attention")."""
  from jbt.model import transpose

  m = tinymodels.make_model("llama")
  tokens, seg, pos, idx = _packed(_sequences(3))
  grads, hlo = {}, ""
  for remat in ("attention", "dots"):
    cfg, params = _jbt(m, remat=remat, dtype="bfloat16", flash_block=16)
    loss = lambda p, c=cfg: (model.RewardModel(c).apply({"params": p}, tokens, seg, pos, idx) ** 2).sum()  # noqa: E731
    step = jax.jit(jax.grad(loss), compiler_options=xla_options.compiler_options("bfloat16"))
    grads[remat] = step(params)
    if remat == "dots":
      hlo = step.lower(params).compile().as_text()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads["dots"], grads["attention"])
  if jax.default_backend() == "cpu":
    L, F = cfg.num_layers, cfg.intermediate_size
    stacks = set(re.findall(rf"(\w+)\[{L},{tokens.size},{F}\]", hlo))  # the gate and up outputs of every layer
    assert stacks == ({"u16"} if transpose.available() else {"f32"}), stacks
    assert ("jbt_transpose" in hlo) == transpose.available()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(1, 1), (70, 33), (2304, 576)])
def test_native_transpose_is_the_transpose(dtype, shape):
  from jbt.model import transpose

  if not transpose.available():
    pytest.skip("no C++ compiler builds the native transpose here")
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
  assert transpose.usable(x)
  np.testing.assert_array_equal(np.asarray(jax.jit(transpose.transpose)(x)), np.asarray(x).T)


def test_native_transpose_stays_out_of_a_mesh_of_several_devices(monkeypatch):
  """An FFI call is opaque to XLA's partitioner: under a mesh of several devices the weight
  gradients keep XLA's transposing copies (and give the same values)."""
  from jbt.model import transpose
  from jbt.runtime.mesh import make_mesh

  if not transpose.available():
    pytest.skip("no C++ compiler builds the native transpose here")
  x = jnp.ones((64, 32), jnp.bfloat16)
  with jax.set_mesh(make_mesh((1, 2, 1), devices=jax.devices()[:2])):
    assert not transpose.usable(x)
  with jax.set_mesh(make_mesh((1, 1, 1), devices=jax.devices()[:1])):
    assert transpose.usable(x)
  monkeypatch.setenv("JBT_NATIVE_TRANSPOSE", "0")  # turned off
  assert not transpose.usable(x)


def test_bf16_f32_gradients_with_and_without_the_native_transpose(monkeypatch):
  """x^T g through the native transpose equals XLA's transposing copy (and the float32
  reference's gradients to bfloat16 rounding)."""
  from jbt.model import transpose

  if not transpose.available():
    pytest.skip("no C++ compiler builds the native transpose here")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(96, 40)), jnp.bfloat16)
  w1 = jnp.asarray(rng.normal(size=(40, 72)) * 0.1, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(72, 40)) * 0.1, jnp.float32)

  def loss(x, w1, w2, dt=jnp.bfloat16, kind="bf16_f32"):
    h = matmul(x, w1, dt, kind)
    return (matmul(jax.nn.silu(h.astype(jnp.float32)).astype(dt), w2, dt, kind).astype(jnp.float32) ** 2).sum()

  native = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w1, w2)
  monkeypatch.setattr(transpose, "usable", lambda _: False)
  xla = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w1, w2)
  f32 = jax.jit(jax.grad(functools.partial(loss, dt=jnp.float32), argnums=(0, 1, 2)))(x.astype(jnp.float32), w1, w2)
  for a, b, c in zip(native, xla, f32):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c), rtol=0.1, atol=0.05 * float(jnp.abs(c).max()))


def test_one_label_head_reads_logit_zero():
  m = tinymodels.make_model("mistral", num_labels=1)
  cfg, params = _jbt(m)
  assert cfg.num_labels == 1 and cfg.reward_label == 0
  tokens, seg, pos = _padded(_sequences(4))
  idx = model.pool_index(jnp.asarray(tokens), jnp.asarray(seg), 0)
  np.testing.assert_allclose(_apply(cfg, params, tokens, seg, pos, idx), _hf_rewards(m, tokens, seg), atol=1e-4)


def test_reward_ignores_extra_padding_and_neighbours():
  cfg = model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8,
                          initializer_range=0.2)
  tok = jnp.zeros((1, 1), jnp.int32)
  params = model.RewardModel(cfg).init(jax.random.key(0), tok, tok, tok)["params"]
  seqs = [np.arange(3, 12, dtype=np.int32), np.arange(20, 25, dtype=np.int32)]
  t1, s1, p1 = _padded(seqs, length=12)
  t2, s2, p2 = _padded(seqs, length=40)
  r1 = _apply(cfg, params, t1, s1, p1, model.pool_index(t1, s1, 0))
  r2 = _apply(cfg, params, t2, s2, p2, model.pool_index(t2, s2, 0))
  np.testing.assert_allclose(r1, r2, atol=1e-6)
  # Packing the same two next to a third, unrelated sequence changes nothing either.
  t3, s3, p3, i3 = _packed(seqs + [np.arange(30, 50, dtype=np.int32)])
  np.testing.assert_allclose(_apply(cfg, params, t3, s3, p3, i3)[:2], r1, atol=1e-5)


def test_shared_prompt_branches_equal_separate_sequences():
  """Prompt once, two responses as branches: each reward equals prompt + response scored alone."""
  m = tinymodels.make_model("qwen2")
  cfg, params = _jbt(m)
  rng = np.random.default_rng(7)
  prompt, resp_a, resp_b = (rng.integers(3, tinymodels.VOCAB, n).astype(np.int32) for n in (9, 6, 4))
  ref = _hf_rewards(m, *_padded([np.concatenate([prompt, resp_a]), np.concatenate([prompt, resp_b])])[:2])
  row = np.concatenate([prompt, resp_a, resp_b, np.zeros(5, np.int32)])[None]
  seg = (np.arange(row.shape[1]) < 19).astype(np.int32)[None]
  branch = np.array([[0] * 9 + [1] * 6 + [2] * 4 + [0] * 5], np.int32)
  pos = np.array([list(range(15)) + list(range(9, 13)) + [0] * 5], np.int32)
  r = model.RewardModel(cfg).apply({"params": params}, row, seg, pos, np.array([14, 18]), branch)
  np.testing.assert_allclose(np.asarray(r), ref, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("attention", ["xla", "flash"])
def test_blocked_attention_equals_dense(family, attention):
  """Block skipping (causal, by segment, by the longest segment) changes the work, not the rewards."""
  m = tinymodels.make_model(family)
  cfg, params = _jbt(m)
  seqs = _sequences(5)
  ptokens, pseg, ppos, pidx = _packed(seqs)
  dense_cfg = cfg.replace(attention="xla", attn_block=0)
  dense = np.asarray(model.RewardModel(dense_cfg).apply({"params": params}, ptokens, pseg, ppos, pidx))
  field = "attn_block" if attention == "xla" else "flash_block"
  # A bound that skips blocks, a block longer than the bound, an odd block with no bound.
  for block, max_segment in ((8, 19), (24, 20), (5, 0)):
    c = cfg.replace(attention=attention, **{field: block})
    got = model.RewardModel(c, max_segment).apply({"params": params}, ptokens, pseg, ppos, pidx)
    np.testing.assert_allclose(np.asarray(got), dense, atol=1e-5, err_msg=f"block {block}, max_segment {max_segment}")
  # A bound shorter than a real sequence must change the result: the test can tell.
  c = cfg.replace(attention=attention, **{field: 4})
  short = model.RewardModel(c, 4).apply({"params": params}, ptokens, pseg, ppos, pidx)
  assert np.abs(np.asarray(short) - dense).max() > 1e-4


def test_mlp_chunks_change_memory_not_results():
  """The MLP over chunks of a row (recomputed in the backward pass) gives the whole row's rewards
  and gradients; a chunk that does not divide the row falls back to a divisor."""
  from jbt.model.decoder import mlp_chunk

  assert (mlp_chunk(256, 0), mlp_chunk(256, 128), mlp_chunk(192, 128), mlp_chunk(64, 128), mlp_chunk(320, 256)) == (
      256, 128, 64, 64, 64)
  m = tinymodels.make_model("llama")
  cfg, params = _jbt(m, remat="dots")  # chunks recomputed inside the layer's own remat
  seqs = _sequences(5) + _sequences(6)
  ptokens, pseg, ppos, pidx = _packed(seqs, length=192)
  ptokens, pseg, ppos = (np.concatenate([a, a[:, ::-1]]) for a in (ptokens, pseg, ppos))  # two rows

  def loss(p, c):
    return model.RewardModel(c).apply({"params": p}, ptokens, pseg, ppos, pidx).sum()

  whole, g_whole = jax.value_and_grad(loss)(params, cfg)
  chunked, g_chunked = jax.value_and_grad(loss)(params, cfg.replace(mlp_chunk=64))
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_layer_carry_is_float32_with_the_cpu_matmul_kinds_and_changes_no_value(monkeypatch):
  """XLA's CPU backend writes bfloat16 slices of a scan's saved stack by converting the whole
  stack, so the CPU kinds carry the residual stream between layers in float32 (each layer still
  rounds to the compute dtype): rewards and gradients equal a bfloat16 carry's bit for bit."""
  assert model.ModelConfig(dtype="bfloat16", matmul="bf16_f32").carry_dtype == jnp.float32
  assert model.ModelConfig(dtype="bfloat16", matmul="xla").carry_dtype == jnp.bfloat16
  assert model.ModelConfig(dtype="float32", matmul="xla").carry_dtype == jnp.float32
  cfg = model.ModelConfig(dtype="bfloat16", matmul="bf16_f32", num_layers=2, remat="dots")
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 16)), jnp.int32)
  seg, pos = jnp.ones_like(tokens), jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))
  params = model.RewardModel(cfg).init(jax.random.key(0), tokens, seg, pos)["params"]

  def rewards_and_grads():
    f = lambda p: model.RewardModel(cfg).apply({"params": p}, tokens, seg, pos)  # noqa: E731
    return jax.jit(f)(params), jax.jit(jax.grad(lambda p: f(p).astype(jnp.float32).sum()))(params)

  r32, g32 = rewards_and_grads()
  monkeypatch.setattr(model.ModelConfig, "carry_dtype", property(lambda self: self.compute_dtype))
  r16, g16 = rewards_and_grads()
  assert float(jnp.abs(r32).max()) > 0
  np.testing.assert_array_equal(r32, r16)
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    np.testing.assert_array_equal(a, b)


def test_16_bit_norm_scale_gradient_sums_in_float32():
  """RMSNorm's 16-bit scale product: the value and the gradient to x are the plain product's, bit
  for bit; the gradient to the scale is the float32 sum over the leading axes, rounded once."""
  from jbt.model.decoder import _scale_16

  rng = np.random.default_rng(0)
  for dtype, shape, w_dims in ((jnp.bfloat16, (2, 96, 24), 1), (jnp.float16, (2, 40, 3, 8), 2)):
    x = jnp.asarray(rng.normal(size=shape), dtype)
    w = jnp.asarray(rng.normal(size=shape[-w_dims:]), dtype)
    g = jnp.asarray(rng.normal(size=shape), dtype)
    y, vjp = jax.vjp(jax.jit(_scale_16), w, x)
    y_plain, vjp_plain = jax.vjp(lambda w, x: w * x, w, x)
    dw, dx = vjp(g)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_plain, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(vjp_plain(g)[1], np.float32))
    lead = tuple(range(len(shape) - w_dims))
    want = (np.asarray(g, np.float64) * np.asarray(x, np.float64)).sum(lead)
    assert dw.dtype == dtype
    np.testing.assert_allclose(np.asarray(dw, np.float64), want, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(np.asarray(dw), np.asarray(jnp.asarray(want, jnp.float32).astype(dtype)))
