"""Hugging Face hub data sets by short name, converted to pairs the way HALOs' train/data.py does.

The conversions take rows shaped like the hub's (dicts), so they are testable offline; only
`load_hub` touches the network.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Callable, Iterable

from jbt.data.records import (BadRecord, Pair, convert_hh, convert_ranked, make_pair, remove_extra_spaces,
                              to_turns)
from jbt.data.report import DataReport
from jbt.errors import JbtError

# name -> (hub repository, data_dir)
HUB_DATASETS = {
    "hh": ("Anthropic/hh-rlhf", None),
    "hh_helpful": ("Anthropic/hh-rlhf", "helpful-base"),
    "hh_harmless": ("Anthropic/hh-rlhf", "harmless-base"),
    "shp": ("stanfordnlp/SHP", None),
    "ultrabin": ("HuggingFaceH4/ultrafeedback_binarized", None),
    "ultrafeedback": ("openbmb/UltraFeedback", None),
}
# Hub sets with a train split only: their pairs have no split of their own, so data.eval_fraction
# holds prompts out of them.
TRAIN_ONLY = ("ultrafeedback",)

# HALOs' get_shp constants: pairs whose score ratio is below 2 are left out of training (as in
# the SHP paper), and at most 5 pairs a prompt are kept so that busy threads do not dominate.
SHP_MIN_SCORE_RATIO = 2
SHP_MAX_PAIRS_PER_PROMPT = 5


def hub_split(name: str, split: str) -> str:
  """The hub's split name for jbt's "train"/"test" (ultrabin calls them train_prefs/test_prefs)."""
  if name in TRAIN_ONLY:
    return "train"
  if name == "ultrabin":
    if split not in ("train", "test"):
      raise JbtError(f"ultrabin has only the splits train and test, not {split!r}")
    return f"{split}_prefs"
  return split


def _convert_rows(rows: Iterable[dict], where: str, report: DataReport, on_error: str,
                  convert: Callable[[dict, str], Pair | list[Pair]]) -> list[Pair]:
  """Converts rows one by one (a row gives a pair, or a ranked record's pairs); a bad row is
  counted (or raised) with its location."""
  pairs: list[Pair] = []
  for i, row in enumerate(rows):
    location = f"{where}:{i}"
    try:
      out = convert(row, location)
      if isinstance(out, list):
        pairs.extend(out)
      else:
        pairs.append(out)
    except BadRecord as e:
      report.handle(e, location, on_error)
  return pairs


def convert_hh_rows(rows: Iterable[dict], where: str, report: DataReport,
                    on_error: str) -> list[Pair]:
  """HALOs' get_hh: each raw {"chosen", "rejected"} transcript pair becomes a Pair."""
  return _convert_rows(rows, where, report, on_error, convert_hh)


def _shp_pair(row: dict, location: str) -> tuple[str, Pair, float]:
  history = row.get("history")
  if not isinstance(history, str):
    raise BadRecord("missing_field", "field 'history' must be a string")
  scores = (row.get("score_A"), row.get("score_B"))
  if not all(isinstance(s, (int, float)) for s in scores):
    raise BadRecord("wrong_type", "fields 'score_A' and 'score_B' must be numbers")
  if row.get("labels") not in (0, 1):
    raise BadRecord("wrong_type", f"field 'labels' must be 1 (A preferred) or 0, got {row.get('labels')!r}")
  a, b = scores
  if min(a, b) > 0:
    ratio = max(a / b, b / a)
  else:  # SHP's scores are positive; guard the division anyway.
    ratio = 1.0 if a == b else float("inf")
  ref_a = to_turns(row.get("human_ref_A"), "human_ref_A", "assistant")
  ref_b = to_turns(row.get("human_ref_B"), "human_ref_B", "assistant")
  chosen, rejected = (ref_a, ref_b) if row["labels"] == 1 else (ref_b, ref_a)
  clean = lambda turns: [{"role": t["role"], "content": remove_extra_spaces(t["content"])}
                         for t in turns]
  prompt = clean([{"role": "user", "content": history}])
  pair = make_pair(prompt, clean(chosen), clean(rejected), source=location, group=history)
  return history, pair, ratio


def convert_shp_rows(rows: Iterable[dict], split: str, where: str, report: DataReport,
                     on_error: str, seed: int = 0) -> list[Pair]:
  """HALOs' get_shp.

  In the train split, pairs with score ratio below 2 are left out, then each prompt keeps a
  sample of at most 5 of its pairs drawn with random.Random(seed), seed 0 as in HALOs. Pairs come
  out grouped by prompt in order of first appearance.
  """
  by_prompt: dict[str, list[Pair]] = collections.defaultdict(list)
  for i, row in enumerate(rows):
    location = f"{where}:{i}"
    try:
      history, pair, ratio = _shp_pair(row, location)
    except BadRecord as e:
      report.handle(e, location, on_error)
      continue
    if ratio < SHP_MIN_SCORE_RATIO and split == "train":
      report.excluded["shp_score_ratio_below_2"] += 1
      continue
    by_prompt[history].append(pair)
  pairs = []
  for prompt_pairs in by_prompt.values():
    if split == "train":
      kept = random.Random(seed).sample(
          prompt_pairs, min(SHP_MAX_PAIRS_PER_PROMPT, len(prompt_pairs)))
      report.excluded["shp_over_5_pairs_per_prompt"] += len(prompt_pairs) - len(kept)
      prompt_pairs = kept
    pairs.extend(prompt_pairs)
  return pairs


def _ultrabin_pair(row: dict, location: str) -> Pair:
  prompt_text = row.get("prompt")
  if not isinstance(prompt_text, str):
    raise BadRecord("missing_field", "field 'prompt' must be a string")
  responses = []
  for name in ("chosen", "rejected"):
    if name not in row:
      raise BadRecord("missing_field", f"missing field '{name}'")
    turns = to_turns(row[name], name, "assistant")
    if not turns:
      raise BadRecord("empty_response", f"field '{name}': empty response")
    # HALOs takes the content of the last message and makes it the assistant reply.
    responses.append([{"role": "assistant", "content": remove_extra_spaces(turns[-1]["content"])}])
  prompt = [{"role": "user", "content": remove_extra_spaces(prompt_text)}]
  return make_pair(prompt, responses[0], responses[1], source=location, group=prompt_text)


def convert_ultrabin_rows(rows: Iterable[dict], where: str, report: DataReport,
                          on_error: str) -> list[Pair]:
  """HALOs' get_ultrabin: the prompt as one user turn, the last message of chosen/rejected as reply."""
  return _convert_rows(rows, where, report, on_error, _ultrabin_pair)


def _ultrafeedback_record(row: dict, location: str) -> list[Pair]:
  instruction = row.get("instruction")
  if not isinstance(instruction, str):
    raise BadRecord("missing_field", "field 'instruction' must be a string")
  completions = row.get("completions")
  if not isinstance(completions, list):
    raise BadRecord("missing_field", "field 'completions' must be a list")
  responses, scores = [], []
  for k, c in enumerate(completions):
    if not isinstance(c, dict) or not isinstance(c.get("response"), str):
      raise BadRecord("wrong_type", f"completions[{k}] needs a 'response' string")
    score = c.get("fine-grained_score")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
      raise BadRecord("missing_field", f"completions[{k}] has no numeric 'fine-grained_score'")
    responses.append(remove_extra_spaces(c["response"]))
    scores.append(float(score))
  prompt = [{"role": "user", "content": remove_extra_spaces(instruction)}]
  return convert_ranked({"prompt": prompt, "responses": responses, "scores": scores}, location)


def convert_ultrafeedback_rows(rows: Iterable[dict], where: str, report: DataReport, on_error: str) -> list[Pair]:
  """openbmb/UltraFeedback, all completions kept: each row is a ranked record (jbt.data.records.
  convert_ranked) of its completions scored by their `fine-grained_score` (the mean of the four
  aspect ratings, the score ultrafeedback_binarized picks its pair by), instead of one pair."""
  return _convert_rows(rows, where, report, on_error, _ultrafeedback_record)


def _download(repo: str, data_dir: str | None, split: str) -> Any:
  import datasets  # Deferred: importing datasets costs about a second and most runs use files.

  try:
    return datasets.load_dataset(repo, data_dir=data_dir, split=split)
  except Exception as e:  # noqa: BLE001 - any failure here is the user's environment, not a bug.
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise JbtError(
        f"could not load hub data set {repo} (split {split}): {type(e).__name__}: {detail}. "
        "Hub data sets need network access to huggingface.co or a local datasets cache; "
        "local files (.json, .jsonl, .jsonl.gz, .parquet) work offline") from None


def load_hub(name: str, split: str, report: DataReport, on_error: str) -> list[Pair]:
  """Downloads (or reads from the datasets cache) one hub data set and converts it."""
  repo, data_dir = HUB_DATASETS[name]
  split_name = hub_split(name, split)
  rows = _download(repo, data_dir, split_name)
  where = f"hub:{name}:{split_name}"
  if name == "shp":
    return convert_shp_rows(rows, split, where, report, on_error)
  if name == "ultrabin":
    return convert_ultrabin_rows(rows, where, report, on_error)
  if name == "ultrafeedback":
    return convert_ultrafeedback_rows(rows, where, report, on_error)
  return convert_hh_rows(rows, where, report, on_error)
