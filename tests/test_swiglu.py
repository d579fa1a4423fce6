"""The native SwiGLU kernels (jbt/model/swiglu.py): the same values as JAX's silu(g) * u and its
gradient, and the gated MLP's fused backward pass, alone and in the model."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jbt.model import matmul, swiglu
from jbt.runtime import xla_options

pytestmark = pytest.mark.skipif(not swiglu.available(), reason="no C++ compiler builds the native SwiGLU here")
BF16_ULP = 2.0 ** -7  # relative spacing of bfloat16 values


def _ref(g, u):
  return (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(jnp.bfloat16)


def _arrays(shape, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(0, s, shape), jnp.bfloat16) for s in (3.0, 1.0, 1.0)]


def _close_to_one_ulp(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.all(np.abs(a - b) <= BF16_ULP * np.abs(b) + 1e-30), np.abs(a - b).max()
  assert (a != b).mean() < 1e-3  # a last-place difference now and then, not a different formula


@pytest.mark.parametrize("shape", [(33,), (7, 13), (256, 768)])  # ragged tails; the last runs on several threads
def test_swiglu_and_its_gradient_are_jax_silu_times_u(shape):
  g, u, dh = _arrays(shape)
  assert swiglu.usable(g, u)
  h, back = jax.jit(lambda g, u: jax.vjp(swiglu.swiglu, g, u))(g, u)
  h_ref, back_ref = jax.vjp(_ref, g, u)
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_ref, np.float32))
  (dg, du), (dg_ref, du_ref) = jax.jit(back)(dh), jax.jit(back_ref)(dh)
  assert dg.dtype == du.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(du, np.float32), np.asarray(du_ref, np.float32))
  _close_to_one_ulp(dg, dg_ref)


def test_extreme_values_come_out_as_jax_computes_them():
  """Infinities, NaN and gates past exp's float32 range: h, dg and du as XLA's (NaN where XLA
  gives NaN, whatever its sign bit; results of ~1e-36 from gates near -87 may differ in a last
  place, where the two exp approximations meet their range's end)."""
  g = jnp.asarray([-np.inf, -1e4, -100, -90, -88.5, -87, -80, 80, 88.5, 90, 100, 1e4, np.inf, np.nan, 0, -0.0] * 2,
                  jnp.bfloat16)
  u = jnp.asarray(np.repeat([1.0, -3.0], 16), jnp.bfloat16)
  dh = jnp.asarray(np.tile([1.0, -0.5], 16), jnp.bfloat16)
  got = jax.jit(lambda g, u: (swiglu.swiglu(g, u), *jax.vjp(swiglu.swiglu, g, u)[1](dh)))(g, u)
  want = jax.jit(lambda g, u: (_ref(g, u), *jax.vjp(_ref, g, u)[1](dh)))(g, u)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=1e-35)


@pytest.mark.parametrize("T,F,D", [(70, 45, 24), (5, 3, 4), (256, 1024, 64)])  # ragged rows, columns (8 or 16 lanes); threads
def test_gated_down_is_swiglu_then_the_down_projection(T, F, D, monkeypatch):
  """Values and gradients equal swiglu() followed by matmul's bf16_f32 dot (dg to a last place
  now and then), on one thread or three alike."""
  g, u, _ = _arrays((T, F))
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(0, 0.05, (F, D)), jnp.float32)
  dy = jnp.asarray(rng.normal(0, 1, (T, D)), jnp.bfloat16)
  opts = xla_options.bf16_dot_options("single")  # XLA's side rounds h to bfloat16 (the fused kind may keep it float32)

  def run(f):
    return jax.jit(lambda g, u, w: (f(g, u, w), *jax.vjp(f, g, u, w)[1](dy)), compiler_options=opts)(g, u, w)

  ref = run(lambda g, u, w: matmul.matmul(_ref(g, u), w, jnp.bfloat16, "bf16_f32"))
  out = run(swiglu.gated_down)
  for name, a, b in zip(("y", "dg", "du", "dw"), out, ref):
    assert a.dtype == b.dtype, name
    if name == "dg":
      _close_to_one_ulp(a, b)
    else:
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
  monkeypatch.setenv("JBT_NATIVE_THREADS", "1")
  one = run(swiglu.gated_down)
  monkeypatch.setenv("JBT_NATIVE_THREADS", "3")
  three = run(swiglu.gated_down)
  for a, b, c in zip(out, one, three):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))


def test_swiglu_stays_out_of_a_mesh_of_several_devices_and_off_when_told(monkeypatch):
  from jbt.runtime.mesh import make_mesh

  g = jnp.ones((64, 32), jnp.bfloat16)
  with jax.set_mesh(make_mesh((1, 2, 1), devices=jax.devices()[:2])):
    assert not swiglu.usable(g, g)
  with jax.set_mesh(make_mesh((1, 1, 1), devices=jax.devices()[:1])):
    assert swiglu.usable(g, g)
  assert not swiglu.usable(g.astype(jnp.float32), g.astype(jnp.float32))  # float32 compute: XLA's code
  monkeypatch.setenv("JBT_NATIVE_SWIGLU", "0")
  assert not swiglu.usable(g, g)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_model_takes_the_native_mlp_and_gives_xlas_gradients(monkeypatch, lora_rank):
  """A bfloat16 Llama-style model under remat "dots" runs its MLPs through gated_down (no [T, F]
  stack of h kept, no h recomputed), or with a LoRA adapter on the down projection through
  swiglu() and its own backward kernel. Without adapters its gradients equal those of XLA's
  elementwise code; with them XLA's code differs: it adds the adapter's product to g and u in
  float32 inside the activation's fusion, skipping the bfloat16 rounding of g and u that the
  model (and torch) does, so there the native gradients are checked to be at least as close as
  XLA's to the float32 model's."""
  torch = pytest.importorskip("torch")  # noqa: F841 (tinymodels builds transformers models)
  import tinymodels
  from jbt import model
  from jbt.hf.config import model_config_from_hf
  from jbt.hf.params import load_params
  from jbt.hf.sources import DictSource

  m = tinymodels.make_model("llama")
  cfg = model_config_from_hf(m.config.to_dict(), num_labels=m.config.num_labels, remat="dots", dtype="bfloat16",
                             lora_rank=lora_rank)
  params = load_params(cfg, DictSource(m.state_dict()), where="test", allow_missing_head=False)
  if lora_rank:  # B = 0 at start; nonzero, so that the adapters' gradients carry the MLP's too
    from jbt.model import lora

    params = jax.tree_util.tree_map_with_path(lambda path, x: x + 0.01 if "lora_b" in jax.tree_util.keystr(path) else x,
                                              lora.add_adapters(cfg, params, seed=0))
  rng = np.random.default_rng(0)
  L = 64
  tokens = jnp.asarray(rng.integers(3, tinymodels.VOCAB, (1, L)), jnp.int32)
  seg = jnp.asarray(np.repeat([1, 2], L // 2)[None], jnp.int32)
  pos = jnp.asarray(np.tile(np.arange(L // 2), 2)[None], jnp.int32)
  idx = jnp.asarray([L // 2 - 1, L - 1], jnp.int32)

  def grads():
    loss = lambda p: (model.RewardModel(cfg).apply({"params": p}, tokens, seg, pos, idx) ** 2).sum()  # noqa: E731
    # single dots: XLA's side rounds h to bfloat16 as the kernel does (the fused kind may keep it float32)
    step = jax.jit(jax.grad(loss), compiler_options=xla_options.bf16_dot_options("single") if cfg.dtype == "bfloat16"
                   else xla_options.compiler_options(cfg.dtype))
    return step(params), step.lower(params).compile().as_text()

  native, hlo = grads()
  fused = "jbt_swiglu_bwd_t" in hlo
  assert "jbt_swiglu_fwd" in hlo and fused == (not lora_rank) and ("jbt_swiglu_bwd\"" in hlo) == bool(lora_rank)
  monkeypatch.setenv("JBT_NATIVE_SWIGLU", "0")
  xla, hlo_xla = grads()
  assert "jbt_swiglu" not in hlo_xla
  cfg = cfg.replace(dtype="float32")
  f32, _ = grads()
  for a, b, c in zip(jax.tree.leaves(native), jax.tree.leaves(xla), jax.tree.leaves(f32)):
    scale = float(jnp.abs(b).max()) + 1e-12
    if not lora_rank:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0.02 * scale)
    else:
      assert float(jnp.abs(a - c).max()) <= 1.25 * float(jnp.abs(b - c).max()) + 1e-3 * scale


_BUILD_ONLY = """
from jbt.model import swiglu
print("built", swiglu.build().name, "ok")
"""

_OTHER_CPU_CHECK = """
import sys
sys.path.insert(0, "tests")
import test_swiglu as t
for shape in ((33,), (256, 768)):
  t.test_swiglu_and_its_gradient_are_jax_silu_times_u(shape)
class Env:
  def setenv(self, k, v):
    import os
    os.environ[k] = v
t.test_gated_down_is_swiglu_then_the_down_projection(70, 45, 24, Env())
t.test_extreme_values_come_out_as_jax_computes_them()
print("ok")
"""


@pytest.mark.parametrize("arch", ["-march=x86-64-v3", "-march=x86-64-v4"])
def test_the_kernels_built_for_other_cpu_kinds_give_the_same_values(arch, tmp_path):
  """The code another CPU kind gets (AVX2 only; AVX-512 without its bfloat16 instructions), built
  here into a fresh cache: the same checks as above where this CPU can run it, else the build alone
  (an AVX-512 build on an AVX2-only CPU)."""
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
  assert "ok" in done.stdout and len(list((tmp_path / "kernels").glob("jbt_swiglu_*.so"))) == 1
