"""jbt.label: HALOs' train.label records, field by field, with rewards equal to transformers'."""

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymodels
from jbt.tools import label

torch = pytest.importorskip("torch")

# (prompt_id, prompt turns, sampled output, the text HALOs scores after its chop).
SAMPLES = [
    (0, [{"role": "user", "content": "hello world"}], "The fox jumps. And then the", "The fox jumps."),
    (0, [{"role": "user", "content": "hello world"}], "  hello! how are you today? the quick ",
     "hello! how are you today?"),
    (0, [{"role": "user", "content": "hello world"}], "a reward model scores answers", "a reward model scores answers"),
    (1, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog"},
         {"role": "assistant", "content": "yes"}, {"role": "user", "content": "and the fox?"}],
     "brown fox... over the lazy dog", "brown fox..."),
    (1, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog"},
         {"role": "assistant", "content": "yes"}, {"role": "user", "content": "and the fox?"}],
     "Quick! The dog", "Quick!"),
    (2, [{"role": "user", "content": "how are you?"}], "today the world is a fox.", "today the world is a fox."),
]


def sample_records() -> list[dict]:
  """train.sample's records (its field order), with --mode other than alpacaeval so 'prompt' is set."""
  counts: dict[int, int] = {}
  out = []
  for pid, prompt, output, _ in SAMPLES:
    k = counts[pid] = counts.get(pid, -1) + 1
    out.append({"output": output, "generator": "tiny", "dataset": "toy_test", "prompt_id": pid, "sample_id": k,
                "type": "sample", "prompt": prompt})
  return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  """(HF directory, jbt checkpoint of it, transformers' logits[:, 1] of each sample's scored text)."""
  from jbt.tools.convert import hf_to_jbt

  root = tmp_path_factory.mktemp("label")
  model = tinymodels.make_model("llama", seed=3)
  hf_dir = tinymodels.save_model(model, root / "FINAL")
  hf_to_jbt(hf_dir, root / "ckpt")
  tok = tinymodels.make_tokenizer()
  with torch.no_grad():
    ref = []
    for _, prompt, _, scored in SAMPLES:
      ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": scored}], return_tensors="pt")
      ref.append(model(input_ids=ids["input_ids"]).logits[0, 1].item())
  return hf_dir, root / "ckpt", ref


@pytest.fixture
def samples_file(tmp_path):
  path = tmp_path / "samples.json"
  path.write_text(json.dumps(sample_records(), indent=2))
  return path


def run_label(capsys, *argv):
  label.main([str(a) for a in argv])
  return capsys.readouterr()


def assert_records_equal(got: list[dict], want: list[dict]) -> None:
  """Same records, same field order; reward fields equal within 1e-4, every other field exactly."""
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert list(g) == list(w)
    for key in w:
      if key.startswith("reward"):
        assert g[key] == pytest.approx(w[key], abs=1e-4), key
      else:
        assert g[key] == w[key], key


def test_chop_cuts_the_trailing_fragment():
  for _, _, output, scored in SAMPLES:
    assert label.chop(output) == scored
  assert label.chop("What? Yes. ok\nmore") == "What? Yes."
  assert label.chop("no mark at all ") == "no mark at all"


@pytest.mark.parametrize("which", ["hf", "jbt"])
def test_scalar_records_and_rewards_match_transformers(which, model_dirs, samples_file, tmp_path, capsys):
  hf_dir, ckpt, ref = model_dirs
  out = tmp_path / "scalar.json"
  run_label(capsys, samples_file, out, "--reward_model_path", hf_dir if which == "hf" else ckpt, "--batch_size", 4)
  # HALOs: a copy of the sample, 'output' wrapped as one assistant turn in place, 'type' replaced in
  # place, 'reward' appended.
  want = []
  for sample, r in zip(sample_records(), ref):
    rec = dict(sample, output=[{"role": "assistant", "content": sample["output"]}], type="scalar_feedback")
    rec["reward"] = r
    want.append(rec)
  text = out.read_text()
  assert text.startswith("[\n{\n  \"output\"") and text.endswith("}\n]")  # HALOs' streaming layout
  assert_records_equal(json.loads(text), want)
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pairwise_max_and_binary_records(model_dirs, samples_file, tmp_path, capsys):
  hf_dir, _, ref = model_dirs
  recs = sample_records()
  wrapped = [[{"role": "assistant", "content": s["output"]}] for s in recs]

  # Pairwise, HALOs' default mode "max" and jbt's pairwise default threshold 0, seed 1. Prompt 2 has
  # one sample and makes no pair. HALOs draws random.random() once per pair to swap A and B; with
  # seed 1 the draws are 0.134 (swap) then 0.847 (keep).
  draws = random.Random(1)
  assert [draws.random() < 0.5 for _ in range(2)] == [True, False]
  out = tmp_path / "pairs.json"
  run_label(capsys, samples_file, out, "--reward_model_path", hf_dir, "--feedback_type", "pairwise", "--seed", 1,
            "--split", "train")
  want = []
  for pid, idx, swap in ((0, [0, 1, 2], True), (1, [3, 4], False)):
    best = max(idx, key=lambda i: ref[i])
    worst = min(idx, key=lambda i: ref[i])
    a, b = (worst, best) if swap else (best, worst)
    want.append({"prompt_id": pid, "prompt": recs[a]["prompt"], "output_A": wrapped[a], "output_B": wrapped[b],
                 "label": int(ref[a] > ref[b]), "reward_A": ref[a], "reward_B": ref[b],
                 "reward_difference": abs(ref[a] - ref[b]), "type": "pairwise_feedback", "split": "train"})
  assert [w["label"] for w in want] == [0, 1]
  assert_records_equal(json.loads(out.read_text()), want)

  # Binary with HALOs' default threshold, the median of all rewards: label 1 when reward >= it.
  out = tmp_path / "binary.json"
  run_label(capsys, samples_file, out, "--reward_model_path", hf_dir, "--feedback_type", "binary")
  median = float(np.median(ref))
  want = [{"prompt_id": s["prompt_id"], "prompt": s["prompt"], "output": w, "label": int(r >= median), "reward": r,
           "type": "binary_feedback"} for s, w, r in zip(recs, wrapped, ref)]
  assert sum(w["label"] for w in want) == 3
  assert_records_equal(json.loads(out.read_text()), want)


def processed(rewards_by_prompt: dict[int, list[float]]) -> list[dict]:
  return [{"prompt_id": pid, "prompt": [{"role": "user", "content": f"p{pid}"}],
           "output": [{"role": "assistant", "content": f"p{pid}s{k}"}], "reward": r}
          for pid, rewards in rewards_by_prompt.items() for k, r in enumerate(rewards)]


def halos_item(pid, a, b, swap):
  if swap:
    a, b = b, a
  return {"prompt_id": pid, "prompt": a["prompt"], "output_A": a["output"], "output_B": b["output"],
          "label": int(a["reward"] > b["reward"]), "reward_A": a["reward"], "reward_B": b["reward"],
          "reward_difference": abs(a["reward"] - b["reward"]), "type": "pairwise_feedback"}


def test_pairwise_random_mode_follows_halos_draws():
  samples = processed({0: [0.1, 0.9, -0.4, 0.3, 0.35], 1: [1.0, 1.0], 2: [2.0, -1.0, 0.5, 0.0]})
  # HALOs: random.seed(seed); per prompt, shuffle, pair consecutive samples, skip gaps <= threshold;
  # one random.random() per pair decides the A/B swap.
  rng = random.Random(7)
  want = []
  for pid in (0, 1, 2):
    group = [s for s in samples if s["prompt_id"] == pid]
    rng.shuffle(group)
    for i in range(0, len(group) - 1, 2):
      a, b = group[i], group[i + 1]
      if abs(a["reward"] - b["reward"]) > 0.2:
        want.append(halos_item(pid, a, b, rng.random() < 0.5))
  got = label.pairwise_feedback(copy.deepcopy(samples), 7, mode="random", threshold=0.2)
  assert got == want and len(got) >= 2


def test_pairwise_min_mode_closest_gap_above_threshold():
  samples = processed({0: [5.0, 1.0, 3.5, 4.0], 1: [0.0, 0.5, 0.45]})
  s = {x["output"][0]["content"]: x for x in samples}
  # Prompt 0 sorted: 5, 4, 3.5, 1. Gaps >= 0.6 to the next sample down: 5-4=1.0, 4-1=3, 3.5-1=2.5.
  # Prompt 1: 0.5, 0.45, 0: first gap >= 0.6 exists for none, and max-min 0.5 <= 0.6: no pair.
  rng = random.Random(0)
  swap = rng.random() < 0.5
  assert label.pairwise_feedback(samples, 0, mode="min", threshold=0.6) == [
      halos_item(0, s["p0s0"], s["p0s3"], swap)]
  # Threshold 0: the closest pair of distinct samples (HALOs would pair a sample with itself).
  got = label.pairwise_feedback(samples, 0, mode="min", threshold=0.0)
  assert [(g["prompt_id"], sorted([g["reward_A"], g["reward_B"]])) for g in got] == [(0, [3.5, 4.0]), (1, [0.45, 0.5])]


def test_thresholds():
  assert label.resolve_threshold("binary", None) == "median"
  assert label.resolve_threshold("binary", "0.5") == 0.5  # HALOs' int("0.5") raises
  assert label.resolve_threshold("pairwise", None) == 0.0
  for bad in (("pairwise", "median"), ("binary", "high"), ("binary", "nan")):
    with pytest.raises(label.JbtError):
      label.resolve_threshold(*bad)
  recs = processed({0: [0.2, 0.7, 0.5]})
  assert [r["label"] for r in label.binary_feedback(recs, 0.5)] == [0, 1, 1]
  assert [r["label"] for r in label.binary_feedback(recs, "mean")] == [0, 1, 1]


def test_write_is_atomic(tmp_path):
  out = tmp_path / "out.json"
  out.write_text("old")
  with pytest.raises(TypeError):
    label.write_json_array(out, [{"a": 1}, {"b": object()}])
  assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def expect_error(capsys, argv, *fragments):
  with pytest.raises(SystemExit) as e:
    label.main([str(a) for a in argv])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  for f in fragments:
    assert f in err[0], err[0]


def test_bad_input_is_one_error_line(model_dirs, samples_file, tmp_path, capsys):
  hf_dir = model_dirs[0]
  out = tmp_path / "out.json"
  expect_error(capsys, [samples_file, out], "--reward_model_path is required")
  expect_error(capsys, [samples_file, out, "--reward_model_path", tmp_path / "missing"], "missing", "no such")
  expect_error(capsys, [tmp_path / "nope.json", out, "--reward_model_path", hf_dir], "nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text('{"prompt_id": 0}')
  expect_error(capsys, [bad, out, "--reward_model_path", hf_dir], "bad.json", "JSON array")
  bad.write_text("[{\"output\": \"x\", \"prompt")
  expect_error(capsys, [bad, out, "--reward_model_path", hf_dir], "bad.json", "not a JSON array")
  recs = sample_records()
  del recs[1]["prompt"]
  bad.write_text(json.dumps(recs))
  expect_error(capsys, [bad, out, "--reward_model_path", hf_dir], "bad.json", "record 1", "'prompt'")
  recs = sample_records()
  del recs[2]["prompt_id"]
  bad.write_text(json.dumps(recs))
  expect_error(capsys, [bad, out, "--reward_model_path", hf_dir, "--feedback_type", "binary"], "record 2",
               "prompt_id")
  expect_error(capsys, [samples_file, out, "--reward_model_path", hf_dir, "--feedback_type", "pairwise",
                        "--threshold", "median"], "threshold")
  expect_error(capsys, [samples_file, out, "--reward_model_path", hf_dir, "--feedback_type", "ranked"], "ranked")
  expect_error(capsys, [samples_file, out, "--api_type", "openai"], "API labeling")
  assert not out.exists()


def test_cli_process_exit_code(tmp_path):
  samples = tmp_path / "s.json"
  samples.write_text(json.dumps([{"prompt_id": 0, "output": "x"}]))
  p = subprocess.run([sys.executable, "-m", "jbt.label", str(samples), str(tmp_path / "o.json"),
                      "--reward_model_path", str(tmp_path)], capture_output=True, text=True,
                     cwd=Path(__file__).resolve().parents[1])
  assert p.returncode == 2
  err = [line for line in p.stderr.splitlines() if line.strip()]
  assert err == [f"error: {samples}: record 0: no 'prompt' field (train.sample writes the prompt turns unless "
                 "--mode is alpacaeval)"]


def test_an_output_whose_directory_cannot_be_made_is_one_error_line(capsys, tmp_path, samples_file):
  blocker = tmp_path / "some_file"
  blocker.write_text("not a directory")
  with pytest.raises(SystemExit) as e:
    run_label(capsys, samples_file, blocker / "out.json", "--reward_model_path", tmp_path)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1, err
  assert err[0].startswith(f"error: {blocker / 'out.json'}: cannot create its directory") and "is a file" in err[0]


def test_a_run_directory_given_as_the_model_names_its_model_folders(capsys, tmp_path, samples_file):
  run_dir = tmp_path / "runs" / "tiny"
  (run_dir / "checkpoints").mkdir(parents=True)
  (run_dir / "config.json").write_text("{}")  # a run's resolved config, not a model's
  with pytest.raises(SystemExit) as e:
    run_label(capsys, samples_file, tmp_path / "out.json", "--reward_model_path", run_dir)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and err[-1] == (f"error: {run_dir}: a training run directory, not a model; use "
                                           f"{run_dir / 'FINAL'} or {run_dir / 'final'}")
