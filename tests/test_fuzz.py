"""Property-based fuzzing: any bytes or JSON fed to the loaders, label and evaluate end in a clean
error (JbtError / exit 2) or a counted skip, never a raw traceback or a hang."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jbt import data
from jbt.errors import JbtError

torch = pytest.importorskip("torch")

import tinymodels  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)  # unicode incl. RTL, emoji, NUL
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]), "content": text})
values = scalars | st.lists(turn, max_size=3) | st.lists(scalars, max_size=3) | st.dictionaries(text, scalars, max_size=3)
keys = st.sampled_from(["prompt", "chosen", "rejected", "output_A", "output_B", "label", "type", "split", "prompt_id",
                        "output", "sample_id"]) | text
records = st.dictionaries(keys, values, max_size=7)


def _load(path: Path) -> None:
  try:
    pairs, report = data.load_pairs([str(path)], on_error="skip")
  except JbtError:
    return
  assert all(p.chosen and p.rejected for p in pairs)
  assert isinstance(report.summary(), str)


@FUZZ
@given(raw=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".parquet"]))
def test_loaders_on_random_bytes(tmp_path_factory, raw, suffix):
  path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
  path.write_bytes(raw)
  _load(path)


@FUZZ
@given(rows=st.lists(records | scalars | st.lists(scalars, max_size=2), max_size=6), as_array=st.booleans())
def test_loaders_on_random_json(tmp_path_factory, rows, as_array):
  d = tmp_path_factory.mktemp("fuzz")
  path = d / ("data.json" if as_array else "data.jsonl")
  path.write_text(json.dumps(rows) if as_array else "".join(json.dumps(r) + "\n" for r in rows))
  _load(path)


@FUZZ
@given(rows=st.lists(records, max_size=4))
def test_loaders_raise_mode_names_the_place(tmp_path_factory, rows):
  path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  try:
    data.load_pairs([str(path)], on_error="raise")
  except JbtError as e:
    msg = str(e)
    assert str(path) in msg, msg
    named = re.match(re.escape(str(path)) + r":(\d+): ", msg)
    if named:  # a bad record, named by its 1-based line: that line alone is bad too
      line = int(named.group(1))
      assert 1 <= line <= len(rows), msg
      one = path.with_name("one.jsonl")
      one.write_text(json.dumps(rows[line - 1]) + "\n")
      with pytest.raises(JbtError, match=re.escape(f"{one}:1: ")):
        data.load_pairs([str(one)], on_error="raise")
    else:  # a whole-file problem (no records, no pairs): no single record was bad
      try:
        _, report = data.load_pairs([str(path)], on_error="skip")
        assert report.n_skipped == 0, (msg, report.summary())
      except JbtError:
        pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tinymodels.save_model(tinymodels.make_model("llama"), tmp_path_factory.mktemp("m") / "hf")


def _cli(main, argv: list[str], capsys) -> None:
  capsys.readouterr()
  try:
    main(argv)
  except SystemExit as e:
    assert e.code == 2, e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err


@FUZZ
@given(payload=st.lists(records, max_size=4) | records | scalars, mode=st.sampled_from(["scalar", "binary", "pairwise"]))
def test_label_on_random_samples(tmp_path_factory, model_dir, capsys, payload, mode):
  from jbt.tools.label import main

  d = tmp_path_factory.mktemp("fuzz")
  (d / "samples.json").write_text(json.dumps(payload))
  _cli(main, [str(d / "samples.json"), str(d / "out.json"), "--reward_model_path", str(model_dir),
              "--feedback_type", mode], capsys)
  assert not [p for p in d.iterdir() if p.name not in ("samples.json", "out.json")]  # no temp files left


@settings(FUZZ, max_examples=40)  # each example is a whole evaluate run (model load, compile)
@given(rows=st.lists(records, max_size=4))
def test_evaluate_on_random_data(tmp_path_factory, model_dir, capsys, rows):
  from jbt.tools.evaluate import main

  d = tmp_path_factory.mktemp("fuzz")
  (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  _cli(main, ["--model", str(model_dir), "--data", str(d / "data.jsonl"), "--max_length", "64",
              "--max_prompt_length", "32"], capsys)


def test_huge_fields_load_and_truncate(tmp_path):
  """A 2 MB response and a 10,000-turn prompt: loaded, then cut by HALOs' rule, not a crash."""
  path = tmp_path / "huge.jsonl"
  long_prompt = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi " * 3} for i in range(10_001)]
  rows = [{"prompt": "Tell me a story.", "chosen": "once upon a time " * 120_000, "rejected": "no."},
          {"prompt": long_prompt, "chosen": [{"role": "assistant", "content": "ok"}],
           "rejected": [{"role": "assistant", "content": "no"}]}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  pairs, report = data.load_pairs([str(path)])
  assert len(pairs) == 2
  tok, tok_report = data.tokenize_pairs(pairs, tinymodels.make_tokenizer(), max_length=128, max_prompt_length=64)
  assert len(tok) == 2 and int(tok.lengths.max()) <= 128
