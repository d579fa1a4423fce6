"""Golden partition specs: a change to logical names or rules must show up here."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jbt import model
from jbt.runtime import mesh as sharding

CFG = model.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=8,
                        num_kv_heads=4, head_dim=8, qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True)

# (data=1, fsdp=2, tensor=4): FSDP shards "embed", tensor parallel shards heads / mlp / vocab.
GOLDEN = {
    "embed": P("tensor", "fsdp"),
    "final_norm/scale": P("fsdp"),
    "score": P("fsdp", None),
    "layers/attn_norm/scale": P(None, "fsdp"),
    "layers/mlp_norm/scale": P(None, "fsdp"),
    "layers/attn/q": P(None, "fsdp", "tensor", None),
    "layers/attn/k": P(None, "fsdp", "tensor", None),
    "layers/attn/v": P(None, "fsdp", "tensor", None),
    "layers/attn/o": P(None, "tensor", None, "fsdp"),
    "layers/attn/q_bias": P(None, "tensor", None),
    "layers/attn/k_bias": P(None, "tensor", None),
    "layers/attn/v_bias": P(None, "tensor", None),
    "layers/attn/o_bias": P(None, "fsdp"),
    "layers/attn/q_norm/scale": P(None, None),
    "layers/attn/k_norm/scale": P(None, None),
    "layers/mlp/gate": P(None, "fsdp", "tensor"),
    "layers/mlp/up": P(None, "fsdp", "tensor"),
    "layers/mlp/down": P(None, "tensor", "fsdp"),
    "layers/mlp/gate_bias": P(None, "tensor"),
    "layers/mlp/up_bias": P(None, "tensor"),
    "layers/mlp/down_bias": P(None, "fsdp"),
}


# LoRA factors shard like their weight: A [layers, in..., R] along W's input axes, B [layers, R,
# out...] along its output axes; the rank axis is replicated.
GOLDEN_LORA = {
    "layers/attn/q_lora_a": P(None, "fsdp", None),
    "layers/attn/q_lora_b": P(None, None, "tensor", None),
    "layers/attn/k_lora_a": P(None, "fsdp", None),
    "layers/attn/k_lora_b": P(None, None, "tensor", None),
    "layers/attn/v_lora_a": P(None, "fsdp", None),
    "layers/attn/v_lora_b": P(None, None, "tensor", None),
    "layers/attn/o_lora_a": P(None, "tensor", None, None),
    "layers/attn/o_lora_b": P(None, None, "fsdp"),
    "layers/mlp/gate_lora_a": P(None, "fsdp", None),
    "layers/mlp/gate_lora_b": P(None, None, "tensor"),
    "layers/mlp/up_lora_a": P(None, "fsdp", None),
    "layers/mlp/up_lora_b": P(None, None, "tensor"),
    "layers/mlp/down_lora_a": P(None, "tensor", None),
    "layers/mlp/down_lora_b": P(None, None, "fsdp"),
}


# Parameters of other families' shapes: OLMo 2's post-norms and q/k norms over whole projections,
# Gemma 2's four norms a layer (Phi-3's fused tensors are split into the standard parameters).
GOLDEN_FAMILIES = {
    "olmo2": (CFG.replace(pre_norms=False, post_norms=True, qk_norm_scope="projection"), {
        "layers/post_attn_norm/scale": P(None, "fsdp"),
        "layers/post_mlp_norm/scale": P(None, "fsdp"),
        "layers/attn/q_norm/scale": P(None, "tensor", None),
        "layers/attn/k_norm/scale": P(None, "tensor", None),
    }),
    "gemma2": (CFG.replace(post_norms=True, norm_offset=1.0), {
        "layers/attn_norm/scale": P(None, "fsdp"),
        "layers/post_attn_norm/scale": P(None, "fsdp"),
        "layers/mlp_norm/scale": P(None, "fsdp"),
        "layers/post_mlp_norm/scale": P(None, "fsdp"),
    }),
}


def _flat_specs(cfg: model.ModelConfig, mesh) -> dict[str, P]:
  shardings = sharding.model_shardings(cfg, mesh)
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {"/".join(k.key for k in path): s.spec for path, s in flat}


def test_golden_partition_specs_on_a_2x4_mesh():
  mesh = sharding.make_mesh([1, 2, 4])
  specs = _flat_specs(CFG, mesh)
  assert set(specs) == set(GOLDEN)
  for k, want in GOLDEN.items():
    assert specs[k] == want, (k, specs[k], want)


def test_golden_lora_adapter_specs_on_a_2x4_mesh():
  mesh = sharding.make_mesh([1, 2, 4])
  specs = _flat_specs(CFG.replace(lora_rank=4), mesh)
  assert set(specs) == set(GOLDEN) | set(GOLDEN_LORA)
  for k, want in {**GOLDEN, **GOLDEN_LORA}.items():
    assert specs[k] == want, (k, specs[k], want)
  shapes = dict(zip(specs, (x.shape for x in jax.tree.leaves(model.abstract_params(CFG.replace(lora_rank=4))))))
  assert shapes["layers/attn/q_lora_b"] == (3, 4, 8, 8) and shapes["layers/attn/o_lora_a"] == (3, 8, 8, 4)


def test_golden_partition_specs_of_other_families():
  mesh = sharding.make_mesh([1, 2, 4])
  for name, (cfg, golden) in GOLDEN_FAMILIES.items():
    specs = _flat_specs(cfg, mesh)
    for k, want in golden.items():
      assert specs.get(k) == want, (name, k, specs.get(k), want)


def test_dimensions_the_mesh_does_not_divide_are_replicated():
  mesh = sharding.make_mesh([1, 2, 4])
  specs = _flat_specs(CFG.replace(num_kv_heads=2, num_heads=6, vocab_size=250), mesh)
  assert specs["layers/attn/k"] == P(None, "fsdp", None, None)  # 2 kv heads on 4 tensor shards
  assert specs["layers/attn/q"] == P(None, "fsdp", None, None)
  assert specs["embed"] == P(None, "fsdp")


def test_mesh_errors_are_clear():
  import pytest

  from jbt.errors import JbtError

  with pytest.raises(JbtError, match="needs 16 devices, found 8"):
    sharding.make_mesh([2, 2, 4])
  assert sharding.make_mesh([1, -1, 2]).shape == {"data": 1, "fsdp": 4, "tensor": 2}


def test_sharded_init_places_each_parameter_by_its_spec():
  mesh = sharding.make_mesh([2, 2, 2])
  shardings = sharding.model_shardings(CFG, mesh)
  tok = jax.numpy.zeros((1, 1), jax.numpy.int32)
  init = jax.jit(lambda: model.RewardModel(CFG).init(jax.random.key(0), tok, tok, tok)["params"],
                 out_shardings=shardings)
  import flax.linen as nn

  params = nn.unbox(init())
  q = params["layers"]["attn"]["q"]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  shard_shapes = {s.data.shape for s in q.addressable_shards}
  assert shard_shapes == {(3, 32, 4, 8)}
  assert np.isfinite(np.asarray(q)).all()
