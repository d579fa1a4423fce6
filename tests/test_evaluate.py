"""jbt.tools.score and jbt.tools.evaluate: rewards equal transformers', accuracy equal to a hand count."""

import json
import random

import numpy as np
import pytest

import tinymodels
from jbt.tools import evaluate
from jbt.tools import score as scoring

torch = pytest.importorskip("torch")

WORDS = ("the quick brown fox jumps over the lazy dog hello world how are you today a reward model "
         "scores answers").split()


def text(rng: random.Random, n: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A tiny reward model, two data files, and transformers' reward of every pair member."""
  root = tmp_path_factory.mktemp("evaluate")
  model = tinymodels.make_model("qwen2", seed=5)
  hf_dir = tinymodels.save_model(model, root / "FINAL")
  tok = tinymodels.make_tokenizer()
  rng = random.Random(0)

  # File 1, TRL message lists, no split: all 12 pairs are scored.
  trl = [{"prompt": [{"role": "user", "content": text(rng, 4)}],
          "chosen": [{"role": "assistant", "content": text(rng, rng.randint(1, 14))}],
          "rejected": [{"role": "assistant", "content": text(rng, rng.randint(1, 14))}]} for _ in range(12)]
  (root / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
  # File 2, HALOs pairwise feedback with a split: only the 5 test records are scored.
  halos = [{"prompt_id": i, "prompt": [{"role": "user", "content": text(rng, 3)}],
            "output_A": [{"role": "assistant", "content": text(rng, rng.randint(1, 10))}],
            "output_B": [{"role": "assistant", "content": text(rng, rng.randint(1, 10))}],
            "label": i % 2, "type": "pairwise_feedback", "split": "test" if i < 5 else "train"} for i in range(9)]
  (root / "halos.json").write_text(json.dumps(halos))

  def reward(turns):
    ids = tok.apply_chat_template(turns, return_tensors="pt")["input_ids"]
    return model(input_ids=ids).logits[0, 1].item()

  with torch.no_grad():
    ref_trl = [(reward(r["prompt"] + r["chosen"]), reward(r["prompt"] + r["rejected"])) for r in trl]
    ref_halos = []
    for r in halos[:5]:
      chosen, rejected = (r["output_A"], r["output_B"]) if r["label"] == 1 else (r["output_B"], r["output_A"])
      ref_halos.append((reward(r["prompt"] + chosen), reward(r["prompt"] + rejected)))
  return hf_dir, root, np.array(ref_trl), np.array(ref_halos)


def test_scorer_matches_transformers_in_any_order(setup):
  hf_dir = setup[0]
  model = tinymodels.make_model("qwen2", seed=5)
  rng = np.random.default_rng(0)
  seqs = [rng.integers(3, tinymodels.VOCAB, size=n) for n in (5, 70, 1, 130, 64, 65, 9, 3, 33)]
  with torch.no_grad():
    ref = np.array([model(input_ids=torch.tensor(s[None])).logits[0, 1].item() for s in seqs])
  scorer, _ = scoring.load_scorer(hf_dir, batch_size=4)
  assert scorer.batch_size == 8  # rounded up to the 8 data-parallel devices
  np.testing.assert_allclose(scorer(seqs), ref, atol=1e-4)
  # Trailing pad ids (id 0 here) do not change a reward: transformers pools before them.
  padded = [np.concatenate([s, np.zeros(3, np.int64)]) for s in seqs[::-1]]
  np.testing.assert_allclose(scorer(padded), ref[::-1], atol=1e-4)
  with pytest.raises(scoring.JbtError, match="sequence 1 holds only pad"):
    scorer([seqs[0], np.zeros(4, np.int64)])


@pytest.mark.parametrize("layout,attention", [("shared_prompt", "flash"), ("shared_prompt", "xla"),
                                              ("packed", "flash"), ("padded", "xla")])
def test_pair_scorer_matches_transformers_in_any_order(setup, layout, attention):
  from jbt.checkpoint.load import load_model
  from jbt.data import TokenizedPair, TokenizedPairs
  from jbt.runtime import mesh as mesh_lib

  model = tinymodels.make_model("qwen2", seed=5)
  rng = np.random.default_rng(1)
  pairs = []
  for n_prompt, n_a, n_b in ((5, 3, 9), (60, 1, 70), (1, 0, 4), (20, 40, 2), (3, 3, 3), (40, 24, 25), (7, 0, 0)):
    prompt = rng.integers(3, tinymodels.VOCAB, size=n_prompt)
    a, b = (np.concatenate([prompt, rng.integers(3, tinymodels.VOCAB, size=n)]).astype(np.int32) for n in (n_a, n_b))
    pairs.append(TokenizedPair(chosen=a, rejected=b, altered=()))
  tok = TokenizedPairs.from_pairs(pairs, pad_token_id=0)
  with torch.no_grad():
    ref = np.array([[model(input_ids=torch.tensor(tok.member(i, j)[None].astype(np.int64))).logits[0, 1].item()
                     for j in (0, 1)] for i in range(len(tok))])
  mesh = mesh_lib.make_mesh((1, -1, 1), mesh_lib.MESH_AXES)
  m = load_model(setup[0], shardings_fn=lambda c: mesh_lib.model_shardings(c, mesh, mesh_lib.DEFAULT_RULES),
                 dtype="float32", attention=attention)
  scorer = scoring.PairScorer(m.cfg, m.params, mesh, max_length=130, pairs_per_batch=3, layout=layout)
  np.testing.assert_allclose(scorer(tok), ref, atol=1e-4)
  with pytest.raises(scoring.JbtError, match="more than max_length 64"):
    scoring.PairScorer(m.cfg, m.params, mesh, max_length=64, layout=layout)(tok)


def test_accuracy_equals_hand_count(setup, tmp_path, capsys):
  hf_dir, root, ref_trl, ref_halos = setup
  plot = tmp_path / "rewards.png"
  evaluate.main(["--model", str(hf_dir), "--data", str(root / "trl.jsonl"), "--data", str(root / "halos.json"),
                 "--plot", str(plot), "--batch_size", "8"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  res = json.loads(lines[0])
  both = np.concatenate([ref_trl, ref_halos])
  wins = int(np.sum(both[:, 0] > both[:, 1]))
  assert 0 < wins < len(both)  # the count is not trivially all or nothing
  assert res["n_pairs"] == 17 and res["accuracy"] == wins / 17
  assert res["mean_margin"] == pytest.approx(np.mean(both[:, 0] - both[:, 1]), abs=1e-4)
  assert res["loss"] == pytest.approx(np.mean(np.log1p(np.exp(both[:, 1] - both[:, 0]))), abs=1e-4)
  trl, halos = res["per_dataset"][str(root / "trl.jsonl")], res["per_dataset"][str(root / "halos.json")]
  assert (trl["n_pairs"], trl["split"], halos["n_pairs"], halos["split"]) == (12, "all", 5, "test")
  assert trl["accuracy"] == np.mean(ref_trl[:, 0] > ref_trl[:, 1])
  assert halos["accuracy"] == np.mean(ref_halos[:, 0] > ref_halos[:, 1])
  assert halos["mean_chosen"] == pytest.approx(ref_halos[:, 0].mean(), abs=1e-4)
  assert -1 <= res["reward_length_corr"] <= 1
  data = plot.read_bytes()
  assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_split_rule(tmp_path):
  recs = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad", **({"split": s} if s else {})}
          for i, s in enumerate(["train", "test", "validation", None, "train"])]
  f = tmp_path / "mixed.jsonl"
  f.write_text("".join(json.dumps(r) + "\n" for r in recs))
  prompts = lambda pairs: [p.prompt[0]["content"] for p in pairs]  # noqa: E731
  pairs, _, used = evaluate.load_split(str(f), "auto")
  assert (prompts(pairs), used) == (["q1", "q2", "q3"], "test")  # test records, and those without a split
  pairs, _, used = evaluate.load_split(str(f), "all")
  assert (sorted(prompts(pairs)), used) == (["q0", "q1", "q2", "q3", "q4"], "all")
  assert prompts(evaluate.load_split(str(f), "train")[0]) == ["q0", "q3", "q4"]
  only_train = tmp_path / "train_only.jsonl"
  only_train.write_text("".join(json.dumps(dict(r, split="train")) + "\n" for r in recs))
  pairs, _, used = evaluate.load_split(str(only_train), "auto")
  assert (len(pairs), used) == (5, "all")  # no test split: everything
  only_test = tmp_path / "test_only.jsonl"
  only_test.write_text("".join(json.dumps(dict(r, split="test")) + "\n" for r in recs))
  assert len(evaluate.load_split(str(only_test), "auto")[0]) == 5
  assert len(evaluate.load_split(str(only_test), "all")[0]) == 5


def test_pair_metrics_counts_ties_as_wrong():
  m = evaluate.pair_metrics(np.array([1.0, 2.0, 0.5]), np.array([0.0, 2.0, 1.5]))
  assert m["accuracy"] == pytest.approx(1 / 3) and m["mean_margin"] == 0.0 and m["n_pairs"] == 3
  assert m["loss"] == pytest.approx(np.mean([np.log1p(np.exp(-1.0)), np.log(2.0), np.log1p(np.exp(1.0))]))


@pytest.mark.parametrize("case", ["model", "data", "plot_dir", "split"])
def test_bad_input_is_one_error_line(case, setup, tmp_path, capsys):
  hf_dir, root = setup[0], setup[1]
  argv = {"model": ["--model", str(tmp_path / "missing"), "--data", str(root / "trl.jsonl")],
          "data": ["--model", str(hf_dir), "--data", str(tmp_path / "nothing.jsonl")],
          "plot_dir": ["--model", str(hf_dir), "--data", str(root / "trl.jsonl"), "--plot", str(tmp_path)],
          "split": ["--model", str(hf_dir), "--data", str(root / "trl.jsonl"), "--split", "dev"]}[case]
  with pytest.raises(SystemExit) as e:
    evaluate.main(argv)
  assert e.value.code == 2
  out = capsys.readouterr()
  err = out.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and out.out == ""
  assert {"model": "missing", "data": "nothing.jsonl", "plot_dir": "directory", "split": "dev"}[case] in err[0]


def test_calibrated_statistics_normalise_labels_to_mean_0_and_std_1(setup, tmp_path, capsys):
  import shutil

  from jbt.tools import label, normalization

  hf_dir, root, ref_trl, _ = setup
  model_dir = shutil.copytree(hf_dir, tmp_path / "model")
  assert normalization.read(model_dir) is None
  res = evaluate.evaluate(model_dir, [str(root / "trl.jsonl")], batch_size=8, calibrate=True)
  st = normalization.read(model_dir)
  assert st["responses"] == 24 and res["normalization"] == st
  assert (st["mean"], st["std"]) == pytest.approx((ref_trl.mean(), ref_trl.std()), abs=1e-4)
  assert res["normalized"]["mean_margin"] == pytest.approx((ref_trl[:, 0] - ref_trl[:, 1]).mean() / st["std"], abs=1e-4)
  # transformers still scores the raw reward: the logits are untouched
  raw = evaluate.evaluate(model_dir, [str(root / "trl.jsonl")], batch_size=8, keep_rewards=True)
  np.testing.assert_allclose(np.array(raw["rewards"][str(root / "trl.jsonl")]), ref_trl, atol=1e-4)

  # jbt.label --normalize on the calibration set's responses: mean ~0, std ~1
  trl = [json.loads(x) for x in (root / "trl.jsonl").read_text().splitlines()]
  samples = [{"prompt_id": i, "prompt": r["prompt"], "output": r[k][0]["content"]} for i, r in enumerate(trl)
             for k in ("chosen", "rejected")]
  (tmp_path / "samples.json").write_text(json.dumps(samples))
  label.main([str(tmp_path / "samples.json"), str(tmp_path / "out.json"), "--reward_model_path", str(model_dir),
              "--normalize"])
  got = np.array([r["reward"] for r in json.loads((tmp_path / "out.json").read_text())])
  assert abs(got.mean()) < 1e-3 and abs(got.std() - 1) < 1e-3
  with pytest.raises(SystemExit):  # a model without statistics: one error line
    label.main([str(tmp_path / "samples.json"), str(tmp_path / "out2.json"), "--reward_model_path", str(hf_dir),
                "--normalize"])
  assert "stores no reward statistics" in capsys.readouterr().err
