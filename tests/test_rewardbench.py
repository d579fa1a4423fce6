"""RewardBench 1 and 2 scoring from fixture files, and the transformers (torch) backend of
jbt.evaluate and jbt.label against plain transformers and against jbt's own forward pass."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import tinymodels
from jbt.errors import JbtError
from jbt.tools import evaluate, rewardbench
from jbt.tools import label as label_tool

torch = pytest.importorskip("torch")

FIXTURES = Path(__file__).parent / "fixtures" / "rewardbench"
# Rewards given by hand to each fixture record (chosen responses first, then rejected).
V1_REWARDS = {"a1": [2, 1], "a2": [0, 1], "m1": [1, 1], "l1": [3, 0], "l2": [1, 0.5], "x1": [0, 2], "p1": [1, 0],
              "h1": [-1, 0], "c1": [5, 0]}
V2_REWARDS = {"f1": [3, 1, 2, 0], "f2": [2, 2, 1, 0], "m2": [1, 3, 0, 0], "ref:1": [5, 1, 2],
              "tied:1": [4, 5, 6, 1, 2], "ref:2": [1, 2, 0], "tied:2": [3, 3.5, 0, 1]}


def test_rewardbench_1_scores_equal_a_hand_count():
  version, items = rewardbench.read(FIXTURES / "v1.jsonl")
  assert version == "1" and len(items) == 9
  res = rewardbench.scores(version, items, [np.array(V1_REWARDS[i["id"]], float) for i in items])
  s = {k: v["score"] for k, v in res["subsets"].items()}
  # a tie (m1: 1 vs 1) counts as wrong, as RewardBench counts it
  assert s == {"alpacaeval-easy": 0.5, "mt-bench-easy": 0.0, "llmbar-natural": 1.0, "xstest-should-respond": 0.0,
               "math-prm": 1.0, "hep-python": 0.0, "my-own-subset": 1.0}
  # sections weight subsets by the benchmark's example counts (math-prm 984, hep-* 164 each)
  assert res["sections"]["Chat"] == pytest.approx((0.5 * 100 + 0 * 28) / 128)
  assert res["sections"]["Chat Hard"] == 1.0 and res["sections"]["Safety"] == 0.0
  assert res["sections"]["Reasoning"] == pytest.approx(984 / (984 + 164))
  assert res["overall"] == pytest.approx((50 / 128 + 1 + 0 + 984 / 1148) / 4)
  assert res["outside_sections"] == ["my-own-subset"]


def test_accuracy_by_length_groups():
  assert rewardbench.response_lengths([[5, 6, 7, 8], [5, 6, 9], [5, 6, 7, 1, 2]]) == [2, 1, 3]
  got = rewardbench.accuracy_by_length(np.array([1.0, 0, 2, 3]), np.array([0.0, 1, 1, 4]), np.array([20, 10, 10, 5]),
                                       np.array([10, 10, 10, 10]))
  assert got["chosen longer"] == {"pairs": 1, "accuracy": 1.0}
  assert got["about as long"] == {"pairs": 2, "accuracy": 0.5} and got["chosen shorter"] == {"pairs": 1, "accuracy": 0.0}


def test_rewardbench_2_best_of_n_and_ties_equal_a_hand_count(tmp_path):
  # the same records from parquet: the published files are parquet
  import pyarrow as pa
  import pyarrow.parquet as pq

  rows = [json.loads(x) for x in (FIXTURES / "v2.jsonl").read_text().splitlines()]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000.parquet")
  for path in (FIXTURES / "v2.jsonl", tmp_path):
    version, items = rewardbench.read(path)
    assert version == "2" and len(items) == 7
    res = rewardbench.scores(version, items, [np.array(V2_REWARDS[i["id"]], float) for i in items])
    s = {k: v["score"] for k, v in res["subsets"].items()}
    assert s["Factuality"] == 0.75  # f1 best alone: 1; f2 ties for best two ways: 1/2
    assert s["Math"] == 0.0
    # Ties: ref accuracy 1/2, tied accuracy 1; correct-incorrect margins 2, 2 against spreads 2, 0.5:
    # preferred 1/2; with the ref margins (3, -1) taken where smaller: 0; tanh terms tanh(0), tanh(-3)
    ties = 0.3 * 1.0 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0.0 + 0.01 * (math.tanh(0) + math.tanh(-3)) / 2
    assert s["Ties"] == pytest.approx(ties)
    assert res["overall"] == pytest.approx((0.75 + 0.0 + ties) / 3)
    assert "sections" not in res


def test_bad_rewardbench_records_name_the_file_record_and_field(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "subset": "s"}) + "\n"
                 + json.dumps({"prompt": "p", "chosen": "a", "subset": "s"}) + "\n")
  with pytest.raises(JbtError, match=r"bad.jsonl: record 2: no 'rejected' field"):
    rewardbench.read(bad)
  bad.write_text(json.dumps({"prompt": "p", "chosen": ["a"], "rejected": ["b"], "subset": "s", "num_correct": 2}))
  with pytest.raises(JbtError, match=r"record 1: field 'num_correct' is 2 with 1 chosen"):
    rewardbench.read(bad)
  with pytest.raises(JbtError, match="no such file"):
    rewardbench.read(tmp_path / "missing")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """A tiny random GPT-2 reward model (a family jbt does not implement) with a one-label head."""
  import transformers

  root = tmp_path_factory.mktemp("gpt2")
  torch.manual_seed(3)
  cfg = transformers.GPT2Config(vocab_size=tinymodels.VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  model = transformers.GPT2ForSequenceClassification(cfg).eval()
  return tinymodels.save_model(model, root / "gpt2"), model


def _reward(model, tok, turns):
  ids = tok.apply_chat_template(turns, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    return model(input_ids=ids).logits[0, -1].item()


def test_torch_backend_scores_any_model_as_transformers_does(gpt2, tmp_path, capsys):
  model_dir, model = gpt2
  tok = tinymodels.make_tokenizer()
  rng = np.random.default_rng(0)
  words = "the quick brown fox jumps over a lazy dog hello world".split()
  say = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
  pairs = [{"prompt": say(3), "chosen": say(int(rng.integers(1, 12))), "rejected": say(int(rng.integers(1, 12)))}
           for _ in range(10)]
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
  ref = np.array([[_reward(model, tok, [{"role": "user", "content": p["prompt"]},
                                        {"role": "assistant", "content": p[k]}]) for k in ("chosen", "rejected")]
                  for p in pairs])
  res = evaluate.evaluate(model_dir, [str(data)], backend="torch", batch_size=4, keep_rewards=True)
  np.testing.assert_allclose(np.array(res["rewards"][str(data)]), ref, atol=1e-5)
  assert res["accuracy"] == np.mean(ref[:, 0] > ref[:, 1]) and res["n_pairs"] == 10
  with pytest.raises(JbtError, match="goes with --backend torch"):
    evaluate.evaluate(model_dir, [str(data)], trust_remote_code=True)

  # jbt.label --backend torch: HALOs' records carrying transformers' scores
  samples = [{"prompt_id": i // 2, "instruction": p["prompt"], "prompt": [{"role": "user", "content": p["prompt"]}],
              "output": p["chosen"] if i % 2 == 0 else p["rejected"]} for i, p in enumerate(pairs[:3] * 2)]
  (tmp_path / "samples.json").write_text(json.dumps(samples))
  label_tool.main([str(tmp_path / "samples.json"), str(tmp_path / "out.json"), "--reward_model_path", str(model_dir),
              "--backend", "torch"])
  out = json.loads((tmp_path / "out.json").read_text())
  assert len(out) == len(samples)
  for rec, s in zip(out, samples):
    want = _reward(model, tok, label_tool.scored_conversation(s))
    assert rec["reward"] == pytest.approx(want, abs=1e-5)


def test_rewardbench_command_with_both_backends_on_one_jbt_model(gpt2, tmp_path, capsys):
  """The command's table and JSON line; the torch backend on GPT-2 equals transformers' own scores,
  and on a jbt-family model the jax and torch backends agree within 1e-4."""
  model_dir, model = gpt2
  tok = tinymodels.make_tokenizer()
  evaluate.main(["--model", str(model_dir), "--rewardbench", str(FIXTURES / "v2.jsonl"), "--backend", "torch",
                 "--plot", str(tmp_path / "rb.png")])
  assert (tmp_path / "rb.png").read_bytes().startswith(b"\x89PNG")
  lines = capsys.readouterr().out.strip().splitlines()
  res = json.loads(lines[-1])
  text = "\n".join(lines)
  assert "| Ties | 4 |" in text and "overall (RewardBench 2): " in text and "| chosen longer |" in text
  _, items = rewardbench.read(FIXTURES / "v2.jsonl")
  ref = [np.array([_reward(model, tok, [{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": t}])
                   for t in it["chosen"] + it["rejected"]]) for it in items]
  want = rewardbench.scores("2", items, ref)
  for name, v in want["subsets"].items():  # float32 rewards batched or alone: the margin terms differ in 1e-10s
    assert res["subsets"][name]["n"] == v["n"] and res["subsets"][name]["score"] == pytest.approx(v["score"], abs=1e-6)
  assert res["overall"] == pytest.approx(want["overall"], abs=1e-6)
  assert sum(v["pairs"] for v in res["by_length"].values()) == sum(len(it["rejected"]) for it in items)

  qwen = tinymodels.save_model(tinymodels.make_model("qwen2", seed=4), tmp_path / "qwen2")
  both = {b: rewardbench.evaluate(qwen, FIXTURES / "v1.jsonl", backend=b, batch_size=4) for b in ("jax", "torch")}
  for name, v in both["jax"]["subsets"].items():
    assert v == both["torch"]["subsets"][name], name
  r_jax = evaluate.evaluate(qwen, [str(FIXTURES / "v1.jsonl")], backend="jax", keep_rewards=True)
  r_torch = evaluate.evaluate(qwen, [str(FIXTURES / "v1.jsonl")], backend="torch", keep_rewards=True)
  np.testing.assert_allclose(np.array(r_jax["rewards"][str(FIXTURES / "v1.jsonl")]),
                             np.array(r_torch["rewards"][str(FIXTURES / "v1.jsonl")]), atol=1e-4)
