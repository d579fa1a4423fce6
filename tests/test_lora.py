"""LoRA and frozen parameters: adapters start at the base, merge and export exactly (transformers
and PEFT), train only what they should with optimizer state for that only, and resume exactly."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import transformers  # noqa: E402

import tinymodels  # noqa: E402
from jbt import model  # noqa: E402
from jbt.checkpoint.load import load_model  # noqa: E402
from jbt.errors import JbtError  # noqa: E402
from jbt.hf import adapter  # noqa: E402
from jbt.model import lora  # noqa: E402
from jbt.runtime import mesh as mesh_lib  # noqa: E402
from jbt.tools.convert import export_hf  # noqa: E402
from jbt.train import optim, trainable  # noqa: E402
from jbt.train import run  # noqa: E402
from jbt.train.state import init_state  # noqa: E402
from test_train import _same_run, load_config, needs_smollm2, tiny  # noqa: E402

TARGETS = tuple(adapter.HF_MODULES)


def _rows(tok):
  texts = ["<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\nthe quick brown fox<|im_end|>\n",
           "<|im_start|>user\nhow are you today?<|im_end|>\n",
           "a reward model scores answers over the lazy dog"]
  enc = tok(texts, padding=True, return_tensors="np", add_special_tokens=False)
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _jbt_rewards(cfg, params, ids, mask):
  pos = np.tile(np.arange(ids.shape[1], dtype=np.int32), (len(ids), 1)) * mask
  return np.asarray(model.RewardModel(cfg).apply({"params": params}, ids, mask, pos,
                                                 model.pool_index(ids, mask, cfg.pad_token_id)))


def _torch_rewards(m, ids, mask):
  with torch.no_grad():
    return m(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 1].numpy()


def test_adapters_start_at_the_base_and_export_merged_and_as_a_peft_adapter(tmp_path):
  peft = pytest.importorskip("peft")
  base_dir = tinymodels.save_model(tinymodels.make_model("llama", seed=3), tmp_path / "base")
  base = load_model(base_dir, dtype="float32")
  ad = load_model(base_dir, dtype="float32", lora_rank=4, lora_alpha=8.0, lora_rslora=True, lora_targets=TARGETS)
  ids, mask = _rows(ad.tokenizer)
  # Step 0: B is zero, so the adapted model is its base, bit for bit; A is PEFT's kaiming-uniform.
  np.testing.assert_array_equal(_jbt_rewards(ad.cfg, ad.params, ids, mask), _jbt_rewards(base.cfg, base.params, ids, mask))
  a = np.asarray(ad.params["layers"]["mlp"]["down_lora_a"])  # [layers, F, R]: bound 1/sqrt(F)
  assert a.shape == (2, 80, 4) and 0.9 / np.sqrt(80) < np.abs(a).max() <= 1 / np.sqrt(80)
  assert not np.asarray(ad.params["layers"]["attn"]["q_lora_b"]).any()

  # Trained-looking adapters and head: random B, a new score.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: (rng.standard_normal(x.shape) * 0.2).astype(np.float32)
      if p[-1].key.endswith("_lora_b") or p[-1].key == "score" else x, ad.params)
  ours = _jbt_rewards(ad.cfg, params, ids, mask)
  assert np.abs(ours - _jbt_rewards(base.cfg, base.params, ids, mask)).max() > 0.1

  # Merged: a plain transformers model, no PEFT, the same scores.
  export_hf(ad.cfg, params, tmp_path / "merged", hf_config=ad.hf_config, tokenizer=ad.tokenizer)
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"),
                                                                           dtype=torch.float32).eval()
  np.testing.assert_allclose(_torch_rewards(merged, ids, mask), ours, atol=1e-4)

  # A PEFT adapter: PEFT's own key names, loaded on the base with nothing missing or unexpected.
  adapter.write_adapter_dir(ad.cfg, params, tmp_path / "adapter", base=str(base_dir))
  ref = peft.get_peft_model(
      transformers.AutoModelForSequenceClassification.from_pretrained(str(base_dir)),
      peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_rslora=True, modules_to_save=["score"],
                      target_modules=[adapter.HF_MODULES[t].split(".")[-1] for t in TARGETS]))
  ref.save_pretrained(str(tmp_path / "peft_ref"))
  from safetensors.numpy import load_file

  want = load_file(str(tmp_path / "peft_ref" / "adapter_model.safetensors"))
  got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  assert set(got) == set(want) and all(got[k].shape == want[k].shape for k in want)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pm = peft.PeftModel.from_pretrained(
        transformers.AutoModelForSequenceClassification.from_pretrained(str(base_dir), dtype=torch.float32),
        str(tmp_path / "adapter")).eval()
  assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
  loaded = peft.get_peft_model_state_dict(pm)
  assert set(loaded) == set(got) and all(np.array_equal(loaded[k].numpy(), got[k]) for k in got)
  np.testing.assert_allclose(_torch_rewards(pm, ids, mask), ours, atol=1e-4)


def test_optimizer_state_holds_the_trainable_params_only():
  cfg = model.ModelConfig(dtype="float32", lora_rank=4, lora_targets=("q", "v", "down"))
  mask = trainable.trainable_mask(cfg)
  n_adapters = lora.num_adapter_params(cfg)
  n_head = cfg.hidden_size * cfg.num_labels
  tx, _ = optim.make_optimizer(load_config("default").opt, 10)
  mesh = mesh_lib.make_mesh([1, 2, 4])
  with jax.set_mesh(mesh):
    state, _ = init_state(cfg, tx, mesh, mesh_lib.DEFAULT_RULES, seed=0, mask=mask)
  n_train, n_frozen = trainable.counts(mask, state.params)
  assert n_train == n_adapters + n_head and n_frozen == cfg.num_params() - n_head
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]  # AdamW's mu and nu; counts are scalars
  assert sum(x.size for x in moments) == 2 * n_train
  assert sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) <= 4 * (2 * n_train + 8)
  # The adapters' moments shard as the adapters do (A like W's input axis, B like its output).
  specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  assert any(k.endswith("['q_lora_b']") and s == jax.sharding.PartitionSpec(None, None, "tensor", None)
             for k, s in specs.items())
  # train.frozen_dtype: the frozen params stored in bfloat16, the trainable ones float32
  with jax.set_mesh(mesh):
    narrow, _ = init_state(cfg, tx, mesh, mesh_lib.DEFAULT_RULES, seed=0, mask=mask, frozen_dtype="bfloat16")
  t, f = trainable.split(narrow.params, mask)
  assert {x.dtype.name for x in jax.tree.leaves(t)} == {"float32"} and {x.dtype.name for x in jax.tree.leaves(f)} == {"bfloat16"}
  # train.freeze with a full fine-tune: the embedding and the first layer's norms stay out.
  full = model.ModelConfig(dtype="float32", scan_layers=False)
  m = trainable.trainable_mask(full, ("embed", "layers:1", r"final_norm/.*"))
  assert not m["embed"] and not m["layer_0"]["attn"]["q"] and m["layer_1"]["attn"]["q"] and m["score"]
  assert not m["final_norm"]["scale"]
  head = trainable.trainable_mask(full, ("head_only",))
  assert [k for k, v in jax.tree_util.tree_leaves_with_path(head) if v] and trainable.counts(
      head, model.abstract_params(full))[0] == n_head
  for bad, match in [(("layers:x",), "layers:N"), (("nothing_here",), "matches no parameter"),
                     (("head_only", "score"), "no parameter to train")]:
    with pytest.raises(JbtError, match=match):
      trainable.trainable_mask(full, bad)
  with pytest.raises(JbtError, match="has 2 layers"):
    trainable.trainable_mask(cfg, ("layers:3",))


def test_freezing_the_first_layers_of_a_scanned_stack_keeps_them_bit_identical():
  from jbt.train.step import make_train_step

  cfg = model.ModelConfig(dtype="float32", num_layers=3)
  freeze = ("layers:2", "embed")
  mask, rows = trainable.trainable_mask(cfg, freeze), trainable.frozen_rows(cfg, freeze)
  V, D = cfg.vocab_size, cfg.hidden_size
  per_layer = (cfg.num_params() - V * D - D - 2 * D) // 3  # less embedding, final norm and head
  assert rows == 2 and trainable.counts(mask, model.abstract_params(cfg), rows)[1] == V * D + 2 * per_layer
  tx, lr = optim.make_optimizer(load_config("default").opt, 10)
  mesh = mesh_lib.make_mesh([1, 8, 1])
  with jax.set_mesh(mesh):
    state, _ = init_state(cfg, tx, mesh, mesh_lib.DEFAULT_RULES, seed=0, mask=mask)
  before = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, (8, 16)).astype(np.int32)
  batch = dict(tokens=tokens, segment_ids=np.ones_like(tokens), positions=np.tile(np.arange(16, dtype=np.int32), (8, 1)),
               chosen_index=np.arange(4, dtype=np.int32) * 16 + 15, rejected_index=np.arange(4, 8, dtype=np.int32) * 16 + 15,
               pair_mask=np.ones(4, np.float32))
  step = jax.jit(make_train_step(cfg, tx, lr, mask=mask, frozen_rows=rows))
  for _ in range(2):
    state, _ = step(state, batch)
  after = jax.device_get(state.params)
  q0, q1 = np.asarray(before["layers"]["attn"]["q"]), np.asarray(after["layers"]["attn"]["q"])
  assert np.array_equal(q0[:2], q1[:2]) and not np.array_equal(q0[2], q1[2])
  assert np.array_equal(before["embed"], after["embed"]) and not np.array_equal(before["score"], after["score"])


@needs_smollm2
@pytest.mark.heavy  # about 40 s
def test_lora_run_learns_keeps_the_base_bit_identical_and_resumes_exactly(tmp_path, capsys):
  # 8 steps, checkpoints at 4 and 8, evaluations before and after; FINAL/ is tested above (same export)
  cfg = tiny(tmp_path, **{"lora.rank": 8, "mesh.shape": (1, 2, 4), "train.max_steps": 8, "train.eval_every": 0,
                          "ckpt.save_every": 4, "ckpt.export_final": False, "ckpt.export_adapter": True})
  out = run(cfg)
  said = capsys.readouterr().out
  mc = load_model(tmp_path / "runs" / "tiny" / "final").cfg
  n_adapters = lora.num_adapter_params(mc)
  n_train = n_adapters + mc.hidden_size * 2
  assert f"parameters: {n_train:,} trainable (LoRA rank 8 on q,k,v,o,gate,up,down + head), " \
         f"{mc.num_params() - mc.hidden_size * 2:,} frozen; optimizer state {8 * n_train / 2**20:.2f} MiB" in said
  assert out["rewards_eval/accuracies"] > 0.9  # held-out prompts, chance is 0.5; it starts at 0.14
  run_dir = tmp_path / "runs" / "tiny"
  # The frozen base is bit for bit what the run started from; every adapter and the head moved.
  final = load_model(run_dir / "final").params
  mesh = mesh_lib.make_mesh(cfg.mesh.shape)  # the run's initial state, drawn into the run's shardings
  mask = trainable.trainable_mask(mc)
  with jax.set_mesh(mesh):
    start = init_state(mc, optim.make_optimizer(cfg.opt, 10)[0], mesh, mesh_lib.DEFAULT_RULES, seed=cfg.train.seed,
                       mask=mask)[0].params
  (trained_now, frozen_now), (trained_then, frozen_then) = trainable.split(final, mask), trainable.split(start, mask)
  for x, y in zip(jax.tree.leaves(frozen_now), jax.tree.leaves(frozen_then), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(trained_now), jax.tree.leaves(trained_then), strict=True):
    assert not np.array_equal(np.asarray(x), np.asarray(y))
  assert (run_dir / "FINAL_adapter" / "adapter_config.json").exists()
  # Checkpoints hold the trainable params and their optimizer state, not the frozen base.
  size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
  assert size(run_dir / "checkpoints" / "4") < 0.1 * size(run_dir / "final")

  # Resume from the checkpoint at step 4 (of 8): the same final params and losses.
  again = tmp_path / "again"
  shutil.copytree(tmp_path / "runs", again)
  d = again / "tiny"
  for p in (d / "checkpoints" / "8", d / "final", d / "FINAL_adapter"):
    shutil.rmtree(p)
  cfg.ckpt.cache_dir = str(again)
  run(cfg)
  assert "resumed from" in capsys.readouterr().out
  _same_run(run_dir, d, steps=8)
