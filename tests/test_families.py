"""The family registry and the kernel registries: every family is tested, fused HF tensors map to
several parameters and back bit-exactly, and the model's kernels are fixed when its config is built."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbt.hf import families
from jbt.hf.params import TRANSPOSE, fused, in_proj, load_params, param_table, standard_rows, to_hf_state_dict
from jbt.hf.sources import DictSource
from jbt.model import ModelConfig, RewardModel, attention, matmul

torch = pytest.importorskip("torch")
import tinymodels  # noqa: E402


def test_every_registered_family_has_a_tiny_test_model():
  tested = {tinymodels.model_type(name) for name in tinymodels.FAMILY_KW}
  assert set(families.FAMILIES) <= tested, f"add a tiny model for {set(families.FAMILIES) - tested} to tinymodels.py"
  for name, spec in families.FAMILIES.items():
    assert spec.name == name and spec.architecture.endswith("ForSequenceClassification")


def test_an_unknown_family_is_one_clear_error():
  from jbt.errors import JbtError
  from jbt.hf.config import model_config_from_hf

  hf = tinymodels.hf_config("llama").to_dict() | {"model_type": "gpt2"}
  with pytest.raises(JbtError, match="unsupported architecture: model_type 'gpt2'; supported: llama, mistral"):
    model_config_from_hf(hf)


def _fused_rows(cfg: ModelConfig) -> list:
  """Phi-3's layout on a Llama model: q/k/v in one qkv_proj, gate and up in one gate_up_proj."""
  N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  L = "model.layers.{i}."
  split = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
  rows = [e for e in standard_rows(cfg) if not e.hf_key.endswith(split)]
  rows.append(fused(L + "self_attn.qkv_proj.weight",
                    [("attn/q", N * H, in_proj(N, H)), ("attn/k", K * H, in_proj(K, H)), ("attn/v", K * H, in_proj(K, H))]))
  rows.append(fused(L + "mlp.gate_up_proj.weight", [("mlp/gate", F, TRANSPOSE), ("mlp/up", F, TRANSPOSE)]))
  return rows


def _fuse(state: dict) -> dict:
  out = dict(state)
  for i in range(2):
    a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    out[a + "qkv_proj.weight"] = np.concatenate([out.pop(a + p + "_proj.weight") for p in "qkv"])
    out[m + "gate_up_proj.weight"] = np.concatenate([out.pop(m + p + "_proj.weight") for p in ("gate", "up")])
  return out


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fused_hf_tensors_split_into_parameters_and_back_bit_exactly(monkeypatch, scan_layers):
  llama = families.FAMILIES["llama"]
  monkeypatch.setitem(families.FAMILIES, "llama_fused", dataclasses.replace(llama, name="llama_fused",
                                                                           rows=_fused_rows))
  m = tinymodels.make_model("llama")
  state = {k: v.numpy() for k, v in m.state_dict().items()}
  from jbt.hf.config import model_config_from_hf

  cfg = model_config_from_hf(m.config.to_dict(), scan_layers=scan_layers)
  fused_cfg = cfg.replace(family="llama_fused")
  assert sum(len(e.paths) > 1 for e in param_table(fused_cfg)) == 2
  plain = load_params(cfg, DictSource(state), where="plain", allow_missing_head=False)
  split = load_params(fused_cfg, DictSource(_fuse(state)), where="fused", allow_missing_head=False)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), plain, split)
  back = to_hf_state_dict(fused_cfg, split)
  want = _fuse(state)
  assert set(back) == set(want)
  for k in back:
    assert np.array_equal(back[k], want[k]), k


def test_a_fused_tensor_of_the_wrong_size_is_refused(monkeypatch):
  monkeypatch.setitem(families.FAMILIES, "llama_fused", dataclasses.replace(families.FAMILIES["llama"],
                                                                           name="llama_fused", rows=_fused_rows))
  from jbt.errors import JbtError
  from jbt.hf.config import model_config_from_hf

  m = tinymodels.make_model("llama")
  state = _fuse({k: v.numpy() for k, v in m.state_dict().items()})
  state["model.layers.1.mlp.gate_up_proj.weight"] = state["model.layers.1.mlp.gate_up_proj.weight"][:-1]
  cfg = model_config_from_hf(m.config.to_dict()).replace(family="llama_fused")
  with pytest.raises(JbtError, match="shape mismatch for model.layers.1.mlp.gate_up_proj.weight"):
    load_params(cfg, DictSource(state), where="t", allow_missing_head=False)


def test_kernels_are_chosen_per_backend_when_the_config_is_built():
  assert attention.resolve("auto", "cpu") == "native" and attention.resolve("auto", "gpu") == "pallas_gpu"
  assert attention.resolve("auto", "tpu") == "splash" and attention.resolve("flash", "gpu") == "flash"
  assert attention.resolve("auto", "rocm") == "xla"
  assert matmul.resolve("auto", "cpu") in matmul.CPU_KINDS and matmul.resolve("auto", "gpu") == "xla"
  with pytest.raises(ValueError, match="attention must be auto or one of native, flash, xla, splash, pallas_gpu"):
    attention.resolve("ring", "cpu")
  cfg = ModelConfig()
  here = jax.default_backend()
  assert (cfg.attention, cfg.matmul) == (attention.resolve("auto", here), matmul.resolve("auto", here))
  assert cfg.to_json()["attention"] == "auto"  # a stored model leaves the choice to whoever loads it


def test_the_model_is_a_function_of_its_config_not_the_backend():
  """A config resolved for a GPU runs the GPU's kernels here too (Pallas in interpret mode), with
  the same rewards."""
  gpu = ModelConfig(attention=attention.resolve("auto", "gpu"), matmul=matmul.resolve("auto", "gpu"),
                    dtype="bfloat16")
  cpu = gpu.replace(attention="flash", matmul="bf16_f32")
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 256, (2, 40)), jnp.int32)
  seg = jnp.ones((2, 40), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
  params = RewardModel(cpu).init(jax.random.key(0), tokens, seg, pos)
  jaxpr = str(jax.make_jaxpr(lambda p: RewardModel(gpu).apply(p, tokens, seg, pos))(params))
  assert gpu.attention == "pallas_gpu" and "pallas_call" in jaxpr and "mha_forward" in jaxpr
  r_gpu = RewardModel(gpu).apply(params, tokens, seg, pos)
  r_cpu = RewardModel(cpu).apply(params, tokens, seg, pos)
  np.testing.assert_allclose(np.asarray(r_gpu), np.asarray(r_cpu), atol=3e-2)


def _rows(seqs: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded rows, one sequence each: tokens, segment ids, positions."""
  tokens = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)] = s
  seg = (np.arange(length)[None] < np.array([len(s) for s in seqs])[:, None]).astype(np.int32)
  return tokens, seg, np.arange(length, dtype=np.int32)[None] * seg


def _hf_rewards(m, tokens: np.ndarray, seg: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = m(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(seg, dtype=torch.long))
  return out.logits[:, 1].float().numpy()


@pytest.mark.parametrize("family", tinymodels.FAMILIES)
def test_family_matches_transformers_in_every_layout_and_round_trips(family):
  """Right-padded batch, all sequences packed in one row, a shared prompt with two branches (each
  the prompt + response alone in transformers), bf16 close to float32, and HF -> jbt -> HF
  bit-exact with the config's own keys kept."""
  from jbt.hf.config import hf_config_for_export, model_config_from_hf

  m = tinymodels.make_model(family)
  cfg = model_config_from_hf(m.config.to_dict())
  state = {k: v.numpy() for k, v in m.state_dict().items()}
  params = load_params(cfg, DictSource(state), where="t", allow_missing_head=False)
  rng = np.random.default_rng(0)
  prompt, *rest = (rng.integers(3, tinymodels.VOCAB, n).astype(np.int32) for n in (9, 6, 4, 19, 11))
  seqs = [np.concatenate([prompt, rest[0]]), np.concatenate([prompt, rest[1]]), rest[2], rest[3]]
  tokens, seg, pos = _rows(seqs, 20)
  ref = _hf_rewards(m, tokens, seg)
  assert np.abs(ref).max() > 0.05, "rewards too small for the tolerance to mean anything"
  apply = jax.jit(RewardModel(cfg).apply)
  idx = np.array([i * 20 + len(s) - 1 for i, s in enumerate(seqs)])
  np.testing.assert_allclose(apply({"params": params}, tokens, seg, pos, idx), ref, atol=1e-4, rtol=0)
  fill = np.zeros(64 - sum(map(len, seqs)), np.int32)
  row = np.concatenate(seqs + [fill])[None]
  pseg = np.concatenate([np.full(len(s), i + 1) for i, s in enumerate(seqs)] + [fill])[None]
  ppos = np.concatenate([np.arange(len(s)) for s in seqs] + [fill])[None]
  pidx = np.cumsum([len(s) for s in seqs]) - 1
  np.testing.assert_allclose(apply({"params": params}, row, pseg.astype(np.int32), ppos.astype(np.int32), pidx),
                             ref, atol=1e-4, rtol=0)
  shared = np.concatenate([prompt, rest[0], rest[1], np.zeros(5, np.int32)])[None]
  sseg = (np.arange(24) < 19).astype(np.int32)[None]
  branch = np.array([[0] * 9 + [1] * 6 + [2] * 4 + [0] * 5], np.int32)
  spos = np.array([list(range(15)) + list(range(9, 13)) + [0] * 5], np.int32)
  got = RewardModel(cfg).apply({"params": params}, shared, sseg, spos, np.array([14, 18]), branch)
  np.testing.assert_allclose(np.asarray(got), ref[:2], atol=1e-4, rtol=0)

  back = to_hf_state_dict(cfg, params)
  assert set(back) == set(state)
  for k in state:
    assert np.array_equal(back[k], state[k]), k
  exported = hf_config_for_export(cfg, m.config.to_dict())
  assert model_config_from_hf(exported) == cfg
  for key in ("layer_types", "sliding_window", "rope_parameters", "partial_rotary_factor", "query_pre_attn_scalar",
              "attn_logit_softcapping", "final_logit_softcapping"):
    if getattr(m.config, key, None) is not None:
      assert exported[key] == getattr(m.config, key), key

  # bf16 within 2.5e-2 of float32, or no further than transformers' own bf16 (tiny random models
  # with large rope factors are that sensitive: llama_bias's rewards, float32 equal within 6e-7 for
  # every attention kind, are 0.015 (xla), 0.019 (flash) and 0.023 (native) from float32 in bf16)
  r16 = jax.jit(RewardModel(cfg.replace(dtype="bfloat16")).apply)({"params": params}, tokens, seg, pos, idx)
  hf16 = _hf_rewards(m.to(torch.bfloat16), tokens, seg).astype(np.float32)
  np.testing.assert_allclose(np.asarray(r16), ref, atol=max(2.5e-2, 1.5 * np.abs(hf16 - ref).max()), rtol=0)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_a_random_model_of_each_family_exports_as_that_family(family):
  """model.init_from='random' with model.random.family: the family's default features, so the
  exported config.json and tensors load in transformers with no missing or unexpected key and
  score as jbt does."""
  import transformers

  from jbt.hf.config import hf_config_for_export
  from jbt.model import init_params

  cfg = ModelConfig(family=family, vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2,
                    head_dim=8, initializer_range=0.2, **families.default_features(family))
  params = init_params(cfg, jax.random.key(0))
  assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))
  hf_cfg = transformers.AutoConfig.for_model(family, **{k: v for k, v in hf_config_for_export(cfg).items()
                                                         if k not in ("model_type", "transformers_version")})
  m = transformers.AutoModelForSequenceClassification.from_config(hf_cfg, dtype=torch.float32).eval()
  assert type(m).__name__ == families.FAMILIES[family].architecture
  state = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state_dict(cfg, params).items()}
  result = m.load_state_dict(state, strict=False)
  assert not result.missing_keys and not result.unexpected_keys
  tokens, seg, pos = _rows([np.arange(3, 15), np.arange(20, 27)], 16)
  idx = np.array([11, 16 + 6])
  got = RewardModel(cfg).apply({"params": params}, tokens, seg, pos, idx)
  np.testing.assert_allclose(np.asarray(got), _hf_rewards(m, tokens, seg), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family, windows", [("qwen3_mixed", (4, 0)), ("gemma2", (5, 0)), ("gemma3_text", (5, 0))])
def test_mixed_layer_kinds_in_every_kind_scanned_or_not(family, windows):
  """A model mixing sliding and full layers (per-layer windows scanned with the layers; Gemma 2's
  soft-capping too): xla, flash, unscanned and remat all give transformers' rewards, the windows
  matter, and the fused kernels fall back visibly (or refuse when named)."""
  from jbt.hf.config import model_config_from_hf

  m = tinymodels.make_model(family)
  cfg = model_config_from_hf(m.config.to_dict())
  assert cfg.layer_windows == windows and cfg.sliding_window is None and cfg.max_window == max(windows)
  state = {k: v.numpy() for k, v in m.state_dict().items()}
  tokens = np.random.default_rng(1).integers(3, tinymodels.VOCAB, (2, 20)).astype(np.int32)
  seg, pos, idx = np.ones_like(tokens), np.tile(np.arange(20, dtype=np.int32), (2, 1)), np.array([19, 39])
  ref = _hf_rewards(m, tokens, seg)
  for kw in (dict(attention="xla", attn_block=8), dict(attention="flash", flash_block=8, remat="dots"),
             dict(scan_layers=False), dict(layer_windows=(0, 0))):
    c = cfg.replace(**kw)
    params = load_params(c, DictSource(state), where="t", allow_missing_head=False)
    got = np.asarray(RewardModel(c).apply({"params": params}, tokens, seg, pos, idx))
    if "layer_windows" in kw:
      assert np.abs(got - ref).max() > 1e-2, "the windows must matter for this test to mean anything"
    else:
      np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=str(kw))
  assert attention.resolve("auto", "tpu", sliding_window=cfg.max_window, softcap=cfg.attn_softcap) == "xla"
  with pytest.raises(ValueError, match="does not take sliding windows"):
    cfg.replace(attention="splash")
