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
  tested = {name.split("_")[0] for name in tinymodels.FAMILY_KW}
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
  assert attention.resolve("auto", "cpu") == "flash" and attention.resolve("auto", "gpu") == "pallas_gpu"
  assert attention.resolve("auto", "tpu") == "splash" and attention.resolve("flash", "gpu") == "flash"
  assert attention.resolve("auto", "rocm") == "xla"
  assert matmul.resolve("auto", "cpu") == "bf16_f32" and matmul.resolve("auto", "gpu") == "xla"
  with pytest.raises(ValueError, match="attention must be auto or one of flash, xla, splash, pallas_gpu"):
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
