"""Loading pairs: every file format, the hub conversions, bad input, specs and splits."""

import gzip
import json
import random
from pathlib import Path

import pytest

from jbt.data import hub, load_pairs
from jbt.data.records import Pair
from jbt.data.report import DataReport
from jbt.errors import JbtError

SHARED_HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-harmless" / "pairs.jsonl.gz"


def U(text):
  return {"role": "user", "content": text}


def A(text):
  return {"role": "assistant", "content": text}


def write_jsonl(path, records, gz=False):
  lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(lines)
  else:
    path.write_text(lines, encoding="utf-8")
  return str(path)


def halos_record(prompt, a, b, label, **extra):
  return {"prompt_id": extra.pop("prompt_id", prompt), "prompt": [U(prompt)], "output_A": [A(a)],
          "output_B": [A(b)], "label": label, "reward_A": 0.5, "reward_B": 0.1,
          "reward_difference": 0.4, "type": "pairwise_feedback", **extra}


def triples(pairs):
  return [(p.prompt, p.chosen, p.rejected) for p in pairs]


# --- formats -----------------------------------------------------------------------------------

def test_halos_json_array_label_picks_preferred_output(tmp_path):
  path = tmp_path / "feedback.json"
  path.write_text(json.dumps([halos_record("q1", "good", "bad", 1),
                              halos_record("q2", "worse", "better", 0)], indent=2))
  pairs, report = load_pairs([str(path)])
  assert triples(pairs) == [([U("q1")], [A("good")], [A("bad")]),
                            ([U("q2")], [A("better")], [A("worse")])]
  assert report.n_skipped == 0
  # Each record of a pretty-printed array keeps the line it starts on.
  assert pairs[0].source == f"{path}:2" and pairs[1].source.startswith(f"{path}:")
  assert int(pairs[1].source.rsplit(":", 1)[1]) > 2


def test_halos_split_field_is_respected(tmp_path):
  path = write_jsonl(tmp_path / "f.jsonl", [
      halos_record("q1", "a", "b", 1, split="train"),
      halos_record("q2", "a", "b", 1, split="test"),
      halos_record("q3", "a", "b", 1)])  # no split: belongs to both
  train, report = load_pairs([path], split="train")
  test, _ = load_pairs([path], split="test")
  assert [p.prompt[0]["content"] for p in train] == ["q1", "q3"]
  assert [p.prompt[0]["content"] for p in test] == ["q2", "q3"]
  assert report.excluded["other_split"] == 1


def test_hh_raw_transcripts_jsonl_gz(tmp_path):
  record = {"chosen": "\n\nHuman: Hi  there\n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant: Sure.",
            "rejected": "\n\nHuman: Hi  there\n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant: No."}
  path = write_jsonl(tmp_path / "hh.jsonl.gz", [record], gz=True)
  pairs, report = load_pairs([path])
  # HALOs' get_hh: turns split on the markers, stripped, double spaces collapsed.
  assert triples(pairs) == [([U("Hi there"), A("Hello!"), U("Help?")], [A("Sure.")], [A("No.")])]
  assert report.n_skipped == 0


def test_hh_empty_final_reply_is_kept_as_halos_keeps_it(tmp_path):
  record = {"chosen": "\n\nHuman: Say a bad word\n\nAssistant: ",
            "rejected": "\n\nHuman: Say a bad word\n\nAssistant: Ok"}
  pairs, report = load_pairs([write_jsonl(tmp_path / "hh.jsonl", [record])])
  assert triples(pairs) == [([U("Say a bad word")], [A("")], [A("Ok")])]


def test_trl_strings_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  table = pa.table({"prompt": ["The sky is", "Grass is"], "chosen": [" blue.", " green."],
                    "rejected": [" green.", " blue."]})
  path = tmp_path / "prefs.parquet"
  pq.write_table(table, path)
  pairs, _ = load_pairs([str(path)])
  assert triples(pairs) == [([U("The sky is")], [A(" blue.")], [A(" green.")]),
                            ([U("Grass is")], [A(" green.")], [A(" blue.")])]
  assert pairs[1].source == f"{path}:2"


def test_trl_message_lists_explicit_implicit_and_repeated_prompt(tmp_path):
  explicit = {"prompt": [U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]}
  implicit = {"chosen": [U("Sky?"), A("Hm"), U("Color?"), A("Blue.")],
              "rejected": [U("Sky?"), A("Hm"), U("Color?"), A("Green.")]}
  # UltraFeedback-binarized style: the prompt string and full conversations.
  repeated = {"prompt": "Sky?", "chosen": [U("Sky?"), A("Blue.")],
              "rejected": [U("Sky?"), A("Green.")]}
  pairs, report = load_pairs([write_jsonl(tmp_path / "trl.jsonl", [explicit, implicit, repeated])])
  assert triples(pairs) == [
      ([U("Sky?")], [A("Blue.")], [A("Green.")]),
      ([U("Sky?"), A("Hm"), U("Color?")], [A("Blue.")], [A("Green.")]),
      ([U("Sky?")], [A("Blue.")], [A("Green.")])]
  assert report.n_skipped == 0


def test_json_file_with_json_lines_and_several_specs_combined(tmp_path):
  lines = write_jsonl(tmp_path / "a.json", [halos_record("q1", "x", "y", 1)])
  other = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q2", "chosen": "x", "rejected": "y"}])
  pairs, _ = load_pairs([lines, other])
  assert [p.prompt[0]["content"] for p in pairs] == ["q1", "q2"]


# --- bad input ---------------------------------------------------------------------------------

BAD_LINES = [
    '{"prompt": "q", "chosen": "a", "rejected": "b"}',            # 1 good (sets the format)
    '{"prompt": "q", "chosen": "a", ',                            # 2 malformed JSON
    '{"prompt": "q", "chosen": "a"}',                             # 3 missing field
    '{"prompt": 7, "chosen": "a", "rejected": "b"}',              # 4 mistyped field
    '{"prompt": "q", "chosen": "  ", "rejected": "b"}',           # 5 empty response
    '{"prompt": "q", "chosen": "same", "rejected": "same"}',      # 6 identical
    '{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, '
    '{"role": "user", "content": "b"}], "rejected": "c"}',        # 7 not ending with assistant
    '{"prompt": "q", "chosen": "fine", "rejected": "ok"}',        # 8 good
]


def write_bad_file(tmp_path):
  path = tmp_path / "bad.jsonl"
  data = "\n".join(BAD_LINES).encode() + b'\n{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n'
  path.write_bytes(data)  # line 9 is not UTF-8
  return str(path)


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
  path = write_bad_file(tmp_path)
  pairs, report = load_pairs([path])
  assert [p.chosen[0]["content"] for p in pairs] == ["a", "fine"]
  assert dict(report.skipped) == {
      "malformed_json": 1, "missing_field": 1, "wrong_type": 1, "empty_response": 1,
      "identical_responses": 1, "no_final_assistant_turn": 1, "not_utf8": 1}
  assert report.locations["malformed_json"] == [f"{path}:2"]
  assert report.locations["not_utf8"] == [f"{path}:9"]
  assert f"{path}:3" in report.summary()


@pytest.mark.parametrize("line_no, field", [(2, "malformed JSON"), (3, "'rejected'"),
                                            (4, "'prompt'"), (5, "'chosen'"), (7, "'chosen'")])
def test_on_error_raise_names_file_line_and_field(tmp_path, line_no, field):
  lines = [BAD_LINES[0], BAD_LINES[line_no - 1]]
  path = write_jsonl(tmp_path / "one_bad.jsonl", lines)
  with pytest.raises(JbtError) as e:
    load_pairs([path], on_error="raise")
  assert str(e.value).startswith(f"{path}:2: ") and field in str(e.value)


def test_halos_label_must_be_zero_or_one(tmp_path):
  path = write_jsonl(tmp_path / "f.jsonl", [halos_record("q", "a", "b", 1),
                                            halos_record("q", "a", "b", "yes")])
  with pytest.raises(JbtError, match=r"f.jsonl:2: field 'label'"):
    load_pairs([path], on_error="raise")


def test_more_than_a_few_locations_are_counted_but_not_listed(tmp_path):
  lines = [BAD_LINES[0]] + ["{broken"] * 10
  pairs, report = load_pairs([write_jsonl(tmp_path / "f.jsonl", lines)])
  assert report.skipped["malformed_json"] == 10 and len(report.locations["malformed_json"]) == 3


def test_broken_json_array_reports_where_reading_stopped(tmp_path):
  path = tmp_path / "f.json"
  path.write_text('[\n' + json.dumps(halos_record("q", "a", "b", 1)) + ',\n{"prompt": oops}\n]')
  pairs, report = load_pairs([str(path)])
  assert len(pairs) == 1 and report.locations["malformed_json"] == [f"{path}:3"]


@pytest.mark.parametrize("spec", ["no/such/file.jsonl", "not_a_hub_name", "nothing-*.jsonl"])
def test_spec_matching_nothing_fails_before_any_work(tmp_path, spec):
  good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
  with pytest.raises(JbtError, match="data spec"):
    load_pairs([good, str(tmp_path / spec) if "/" in spec or "*" in spec else spec])


def test_directory_and_glob_specs(tmp_path):
  for name in ("b.jsonl", "a.jsonl"):
    write_jsonl(tmp_path / name, [{"prompt": name, "chosen": "x", "rejected": "y"}])
  (tmp_path / "notes.txt").write_text("ignored")
  by_dir, _ = load_pairs([str(tmp_path)])
  by_glob, _ = load_pairs([str(tmp_path / "*.jsonl")])
  assert [p.prompt[0]["content"] for p in by_dir] == ["a.jsonl", "b.jsonl"]
  assert triples(by_glob) == triples(by_dir)


def test_file_of_unknown_or_unpaired_format_is_an_error(tmp_path):
  with pytest.raises(JbtError, match="no record in a known format"):
    load_pairs([write_jsonl(tmp_path / "u.jsonl", [{"text": "hello"}])])
  binary = {"prompt": [U("q")], "output": [A("a")], "label": 1, "type": "binary_feedback"}
  with pytest.raises(JbtError, match="not pairwise"):
    load_pairs([write_jsonl(tmp_path / "b.jsonl", [binary])])


def test_bad_arguments_are_jbt_errors(tmp_path):
  path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
  for kwargs in ({"split": "dev"}, {"on_error": "ignore"}, {"eval_fraction": 1.0}):
    with pytest.raises(JbtError):
      load_pairs([path], **kwargs)


# --- held-out split ----------------------------------------------------------------------------

def test_eval_fraction_holds_out_whole_prompts_reproducibly(tmp_path):
  records = [{"prompt": f"q{i // 2}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
  path = write_jsonl(tmp_path / "f.jsonl", records)
  train, _ = load_pairs([path], split="train", eval_fraction=0.25, seed=3)
  test, _ = load_pairs([path], split="test", eval_fraction=0.25, seed=3)
  again, _ = load_pairs([path], split="test", eval_fraction=0.25, seed=3)
  other_seed, _ = load_pairs([path], split="test", eval_fraction=0.25, seed=4)
  train_ids = {p.chosen[0]["content"] for p in train}
  test_ids = {p.chosen[0]["content"] for p in test}
  assert not train_ids & test_ids and len(train_ids | test_ids) == 40
  assert len(test) == 10  # 5 of 20 prompts, 2 pairs each
  assert {p.prompt[0]["content"] for p in test}.isdisjoint({p.prompt[0]["content"] for p in train})
  assert triples(again) == triples(test) and triples(other_seed) != triples(test)


# --- hub conversions (rows shaped like the hub's; no network) ----------------------------------

def test_hh_hub_rows_convert_like_files():
  rows = [{"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"},
          {"chosen": "\n\nHuman: Q\n\nAssistant: same", "rejected": "\n\nHuman: Q\n\nAssistant: same"}]
  report = DataReport()
  pairs = hub.convert_hh_rows(rows, "hub:hh:train", report, "skip")
  assert triples(pairs) == [([U("Q")], [A("yes")], [A("no")])]
  assert report.locations["identical_responses"] == ["hub:hh:train:1"]


def shp_row(history, a, b, score_a, score_b, label):
  return {"history": history, "human_ref_A": a, "human_ref_B": b, "score_A": score_a,
          "score_B": score_b, "labels": label}


def test_shp_keeps_ratio_at_least_2_and_labels_pick_the_winner():
  rows = [shp_row("p1", "A  one", "B one", 10, 2, 1),   # ratio 5, A wins
          shp_row("p1", "A two", "B two", 3, 6, 0),     # ratio 2 exactly, B wins
          shp_row("p2", "A", "B", 3, 4, 1)]             # ratio 1.33: left out of train
  report = DataReport()
  pairs = hub.convert_shp_rows(rows, "train", "hub:shp", report, "skip")
  kept = [([U("p1")], [A("A one")], [A("B one")]), ([U("p1")], [A("B two")], [A("A two")])]
  # The per-prompt sample (2 of 2 here) may reorder a prompt's pairs, as HALOs' does.
  assert triples(pairs) == random.Random(0).sample(kept, 2)
  assert report.excluded["shp_score_ratio_below_2"] == 1
  test_pairs = hub.convert_shp_rows(rows, "test", "hub:shp", DataReport(), "skip")
  assert len(test_pairs) == 3  # no ratio filter outside train, as in HALOs


def test_shp_keeps_at_most_5_pairs_per_prompt_sampled_with_seed_0():
  rows = [shp_row("p", f"a{i}", f"b{i}", 10, 1, 1) for i in range(8)]
  rows.append(shp_row("q", "a", "b", 10, 1, 1))
  report = DataReport()
  pairs = hub.convert_shp_rows(rows, "train", "hub:shp", report, "skip")
  expected = [f"a{i}" for i in random.Random(0).sample(range(8), 5)]
  assert [p.chosen[0]["content"] for p in pairs] == expected + ["a"]
  assert report.excluded["shp_over_5_pairs_per_prompt"] == 3


def test_ultrabin_takes_last_message_of_chosen_and_rejected():
  rows = [{"prompt": "Write  a poem", "prompt_id": "x", "score_chosen": 8.0, "score_rejected": 4.0,
           "chosen": [U("Write  a poem"), A("Roses  are red")],
           "rejected": [U("Write  a poem"), A("No.")]}]
  pairs = hub.convert_ultrabin_rows(rows, "hub:ultrabin", DataReport(), "skip")
  assert triples(pairs) == [([U("Write a poem")], [A("Roses are red")], [A("No.")])]
  assert hub.hub_split("ultrabin", "test") == "test_prefs" and hub.hub_split("hh", "test") == "test"


def test_hub_load_without_network_is_a_clear_jbt_error(monkeypatch):
  datasets = pytest.importorskip("datasets")

  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(JbtError, match=r"Anthropic/hh-rlhf.*network") as e:
    load_pairs(["hh"])
  assert e.value.__cause__ is None and "\n" not in str(e.value)


# --- the shared HH sample ----------------------------------------------------------------------

@pytest.mark.shared_data
def test_shared_hh_sample_loads_every_pair():
  if not SHARED_HH.exists():
    pytest.skip("../shared/data is absent")
  pairs, report = load_pairs([str(SHARED_HH)])
  assert len(pairs) == 1520 and report.n_skipped == 0
  assert all(isinstance(p, Pair) and p.chosen[-1]["role"] == "assistant" for p in pairs)
  assert all(p.prompt[0]["role"] == "user" for p in pairs)


@pytest.mark.parametrize("line, where", [
    ('{"prompt": "q", "chosen": "a", "rejected": "b" x}', "Expecting ',' delimiter at column 48"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b"', "Expecting ',' delimiter at the end of the line"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b\u0001"}', "Invalid control character at column 46"),
])
def test_malformed_json_names_the_column_where_it_breaks(tmp_path, line, where):
  path = tmp_path / "cut.jsonl"
  path.write_bytes((line + "\r\n").encode())  # a Windows line end, and no line after it
  with pytest.raises(JbtError) as e:
    load_pairs([str(path)], on_error="raise")
  assert str(e.value) == f"{path}:1: malformed JSON: {where}"


def test_a_record_s_preference_strength_becomes_the_pair_s_margin(tmp_path):
  from jbt.data import tokenize_pairs

  recs = [{"prompt": "p1", "chosen": "a", "rejected": "b", "margin": 1.5},
          {"prompt": "p2", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "score_rejected": 5.5},
          {"prompt": "p3", "chosen": "a", "rejected": "b"},
          {"prompt": "p4", "chosen": "a", "rejected": "b", "margin": "big"}]
  pairs, report = load_pairs([write_jsonl(tmp_path / "trl.jsonl", recs)])
  assert [p.margin for p in pairs] == [1.5, 2.5, None]
  assert report.n_skipped == 1 and "wrong_type 1" in report.summary()
  # HALOs' reward_difference, either label: its size (the label says which side is preferred)
  halos = [halos_record("q", "x", "y", 1), halos_record("r", "x", "y", 0, reward_difference=-0.4)]
  hp, _ = load_pairs([write_jsonl(tmp_path / "halos.jsonl", halos)])
  assert [p.margin for p in hp] == [0.4, 0.4]
  import tinymodels

  tok, _ = tokenize_pairs(pairs, tinymodels.make_tokenizer(), max_length=64, max_prompt_length=32)
  np = pytest.importorskip("numpy")
  np.testing.assert_array_equal(tok.margins, np.array([1.5, 2.5, np.nan], np.float32))


def test_ties_are_dropped_and_counted_or_kept_for_the_tie_loss(tmp_path):
  halos = [halos_record("q", "x", "y", 1), halos_record("r", "x", "y", 0.5), halos_record("s", "x", "y", 0)]
  trl = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 3, "score_rejected": 3},
         {"prompt": "p2", "chosen": "a", "rejected": "b", "score_chosen": 4, "score_rejected": 3}]
  files = [write_jsonl(tmp_path / "h.jsonl", halos), write_jsonl(tmp_path / "t.jsonl", trl)]
  pairs, report = load_pairs(files)  # default: drop
  assert len(pairs) == 3 and report.excluded["tie"] == 2 and "excluded: tie 2" in report.summary()
  kept, report = load_pairs(files, ties="tie_loss")
  assert [p.tie for p in kept] == [False, True, False, True, False] and report.altered["tie"] == 2
  assert kept[1].margin is None and kept[3].margin is None  # a tie has no preference strength
  with pytest.raises(JbtError, match="data.ties must be one of drop, tie_loss"):
    load_pairs(files, ties="keep")
  bad, report = load_pairs([write_jsonl(tmp_path / "b.jsonl", [halos_record("u", "x", "y", 0.7)])] + files)
  assert report.skipped["wrong_type"] == 1


def test_ranked_records_become_every_ordered_pair_with_score_gaps_and_ties(tmp_path):
  recs = [{"prompt": "pick", "responses": ["a", "b", "c", "d"], "scores": [3, 1, 2, 2]},
          {"prompt": "two", "responses": ["x", [A("y")]], "scores": [0.5, 1.5], "split": "test"},
          {"prompt": "bad", "responses": ["x", "y"], "scores": [1]}]
  path = write_jsonl(tmp_path / "ranked.jsonl", recs)
  pairs, report = load_pairs([path], ties="tie_loss", split="train")
  got = [(p.chosen[0]["content"], p.rejected[0]["content"], p.margin, p.tie) for p in pairs]
  assert got == [("a", "b", 2.0, False), ("a", "c", 1.0, False), ("a", "d", 1.0, False), ("c", "b", 1.0, False),
                 ("c", "d", None, True), ("d", "b", 1.0, False)]
  assert len({p.group for p in pairs}) == 1 and len({p.source for p in pairs}) == 6
  assert report.skipped["wrong_type"] == 1 and report.excluded["other_split"] == 1
  # k = 2 is one pair, exactly the pairwise record it stands for
  test, _ = load_pairs([path], split="test")  # records without a split belong to both
  two = [p for p in test if p.prompt == [U("two")]]
  assert triples(two) == [([U("two")], [A("y")], [A("x")])] and two[0].margin == 1.0
