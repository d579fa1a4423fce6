"""Preference pairs, and the conversion of one record of each supported format into a pair.

A converter takes one decoded record (a dict) and returns a Pair, or raises BadRecord naming the
field at fault; the loader decides whether that skips the record or stops the run.

Formats (detected per file from its first record, see `detect_format`):
  halos   HALOs pairwise feedback: {"prompt_id", "prompt": [turns], "output_A": [turns],
          "output_B": [turns], "label": 1 if A is preferred else 0, "type": "pairwise_feedback",
          "split": optional}.
  hh      Anthropic HH raw transcripts: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
          "rejected": "..."}.
  trl     TRL preference records: {"prompt", "chosen", "rejected"} as strings or message lists,
          or the implicit-prompt form {"chosen": [msgs], "rejected": [msgs]} whose shared leading
          messages are the prompt.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from jbt.data.report import BadRecord

Turn = dict[str, str]

FORMATS = ("halos", "hh", "trl")

# HALOs' get_hh splits on exactly these two markers (with the trailing space).
_HH_SPLIT = re.compile(r"\n\n(Human|Assistant): ")
_HH_ASSISTANT = "\n\nAssistant: "
_HH_HUMAN = "\n\nHuman: "
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

# HALOs' Example.remove_extra_spaces, applied to every hub conversion (and HH files, which hold
# the hub's own records).
_EXTRA_SPACES = re.compile(r"[ \t]{2,}")


@dataclasses.dataclass(frozen=True)
class Pair:
  """One preference: the prompt turns, then the preferred and the dispreferred response turns.

  Attributes:
    prompt: turns {"role", "content"} before the responses (at least one).
    chosen: the preferred response: turns ending with an assistant turn.
    rejected: the dispreferred response, same shape.
    source: where the pair came from ("file:line", "hub:hh:train:17"), for messages.
    split: the record's own split ("train", "test", ...) or None when it has none.
    group: key that ties pairs sharing a prompt, so a held-out split never separates them.
    tie: neither response is preferred (HALOs' label 0.5, equal scores); chosen / rejected is
      then only the records' order. data.ties decides whether such pairs train.
    margin: how strongly chosen is preferred (a record's `margin`, HALOs' `reward_difference`,
      or `score_chosen - score_rejected`), or None; loss.margin_from_data trains on it.
    unit: "" for a pair of its own; the pairs of one ranked record (k responses) share its source
      here, and are then batched together, each response computed once (jbt.data.layouts).
  """

  prompt: list[Turn]
  chosen: list[Turn]
  rejected: list[Turn]
  source: str = ""
  split: str | None = None
  group: str = ""
  margin: float | None = None
  tie: bool = False
  unit: str = ""


def remove_extra_spaces(text: str) -> str:
  """Collapses runs of spaces and tabs to one space, as HALOs does for hub data."""
  return _EXTRA_SPACES.sub(" ", text)


def _clean_turns(turns: list[Turn]) -> list[Turn]:
  return [{"role": t["role"], "content": remove_extra_spaces(t["content"])} for t in turns]


def prompt_key(turns: list[Turn]) -> str:
  """A string identifying a prompt, used to group pairs that share it."""
  return "\x1e".join(f"{t['role']}\x1f{t['content']}" for t in turns)


def record_margin(record: dict) -> float | None:
  """A record's preference strength: `margin` (TRL), `reward_difference` (HALOs; its size, since
  the label already says which side wins) or `score_chosen - score_rejected` (UltraFeedback)."""
  def number(name: str) -> float:
    v = record[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise BadRecord("wrong_type", f"field {name!r} must be a finite number, got {v!r}")
    return float(v)

  if record.get("margin") is not None:
    return number("margin")
  if record.get("reward_difference") is not None:
    return abs(number("reward_difference"))
  if record.get("score_chosen") is not None and record.get("score_rejected") is not None:
    return number("score_chosen") - number("score_rejected")
  return None


def make_pair(prompt: list[Turn], chosen: list[Turn], rejected: list[Turn], *, source: str,
              split: str | None = None, group: str | None = None, margin: float | None = None,
              tie: bool = False, unit: str = "") -> Pair:
  """Builds a Pair after the checks every format shares (BadRecord when one fails)."""
  if not prompt:
    raise BadRecord("empty_prompt", "the prompt has no turns")
  for name, response in (("chosen", chosen), ("rejected", rejected)):
    _check_response(response, name)
  if chosen == rejected:
    raise BadRecord("identical_responses", "chosen and rejected responses are identical")
  if split is not None and not isinstance(split, str):
    raise BadRecord("wrong_type", f"field 'split' must be a string, got {type(split).__name__}")
  return Pair(prompt, chosen, rejected, source, split,
              group if group is not None else prompt_key(prompt), None if tie else margin, tie, unit)


def _check_response(response: list[Turn], field: str) -> None:
  if not response:
    raise BadRecord("empty_response", f"field '{field}': empty response")
  if response[-1]["role"] != "assistant":
    raise BadRecord("no_final_assistant_turn",
                    f"field '{field}': conversation does not end with an assistant turn")
  if not response[-1]["content"].strip():
    raise BadRecord("empty_response", f"field '{field}': empty response")


def _field(record: dict, name: str) -> Any:
  if name not in record:
    raise BadRecord("missing_field", f"missing field '{name}'")
  return record[name]


def to_turns(value: Any, field: str, default_role: str) -> list[Turn]:
  """A string becomes one turn of default_role; a list must hold {"role", "content"} dicts."""
  if isinstance(value, str):
    return [{"role": default_role, "content": value}]
  if not isinstance(value, list):
    raise BadRecord("wrong_type",
                    f"field '{field}' must be a string or a list of turns, got {type(value).__name__}")
  turns = []
  for i, turn in enumerate(value):
    if not isinstance(turn, dict):
      raise BadRecord("wrong_type", f"field '{field}[{i}]' must be an object with role and content")
    for key in ("role", "content"):
      if key not in turn:
        raise BadRecord("missing_field", f"missing field '{field}[{i}].{key}'")
      if not isinstance(turn[key], str):
        raise BadRecord("wrong_type", f"field '{field}[{i}].{key}' must be a string, "
                        f"got {type(turn[key]).__name__}")
    turns.append({"role": turn["role"], "content": turn["content"]})
  return turns


def detect_format(record: Any) -> str | None:
  """The format of a file, judged from one of its records; None when no format fits."""
  if not isinstance(record, dict):
    return None
  if "output_A" in record or "output_B" in record or record.get("type") == "pairwise_feedback":
    return "halos"
  if "responses" in record and "scores" in record:
    return "ranked"
  if "chosen" in record and "rejected" in record:
    if "prompt" not in record and isinstance(record["chosen"], str):
      return "hh"
    return "trl"
  return None


def split_hh_transcript(text: str) -> list[Turn]:
  """Splits an HH transcript on its "\\n\\nHuman: " / "\\n\\nAssistant: " markers into turns.

  Text before the first marker is dropped, as HALOs drops it. Roles follow the markers; HALOs
  alternates user/assistant instead, which gives the same turns for every transcript whose
  speakers alternate (all but a handful of malformed HH records).
  """
  parts = _HH_SPLIT.split(text)
  return [{"role": _HH_ROLES[role], "content": content.strip()}
          for role, content in zip(parts[1::2], parts[2::2])]


def convert_hh(record: dict, source: str) -> Pair:
  """HALOs' get_hh conversion of one raw HH record.

  The chosen transcript gives the prompt and the chosen reply (its last turn, which must be an
  Assistant turn); the rejected reply is the text after the rejected transcript's last
  "\\n\\nAssistant: ". An Assistant marker followed by nothing is an empty reply that annotators
  did prefer or reject (two pairs of HH harmless-base are like that); HALOs keeps it, and so do we.
  """
  chosen_text = _field(record, "chosen")
  rejected_text = _field(record, "rejected")
  for name, value in (("chosen", chosen_text), ("rejected", rejected_text)):
    if not isinstance(value, str):
      raise BadRecord("wrong_type", f"field '{name}' must be a string, got {type(value).__name__}")
  turns = split_hh_transcript(chosen_text)
  if not turns or turns[-1]["role"] != "assistant":
    raise BadRecord("no_final_assistant_turn",
                    "field 'chosen': conversation does not end with an assistant turn")
  if _HH_ASSISTANT not in rejected_text or _HH_HUMAN in rejected_text.rsplit(_HH_ASSISTANT, 1)[1]:
    raise BadRecord("no_final_assistant_turn",
                    "field 'rejected': conversation does not end with an assistant turn")
  rejected = rejected_text.split(_HH_ASSISTANT)[-1].strip()
  prompt = _clean_turns(turns[:-1])
  chosen = _clean_turns(turns[-1:])
  rejected_turns = [{"role": "assistant", "content": remove_extra_spaces(rejected)}]
  if not prompt:
    raise BadRecord("empty_prompt", "field 'chosen': the transcript has no turn before the reply")
  if chosen == rejected_turns:
    raise BadRecord("identical_responses", "chosen and rejected responses are identical")
  return Pair(prompt, chosen, rejected_turns, source, _optional_split(record), prompt_key(prompt))


def _optional_split(record: dict) -> str | None:
  split = record.get("split")
  if split is not None and not isinstance(split, str):
    raise BadRecord("wrong_type", f"field 'split' must be a string, got {type(split).__name__}")
  return split


def convert_halos(record: dict, source: str) -> Pair:
  """One HALOs pairwise-feedback record: label 1 means output_A is preferred, 0 output_B."""
  kind = record.get("type", "pairwise_feedback")
  if kind != "pairwise_feedback":
    raise BadRecord("wrong_type", f"field 'type' must be 'pairwise_feedback', got {kind!r}")
  prompt = to_turns(_field(record, "prompt"), "prompt", "user")
  output_a = to_turns(_field(record, "output_A"), "output_A", "assistant")
  output_b = to_turns(_field(record, "output_B"), "output_B", "assistant")
  label = _field(record, "label")
  # bool is an int subclass; 1.0/0.0 come out of some JSON writers, so accept equal numbers.
  if not isinstance(label, (int, float)) or label not in (0, 1, 0.5):
    raise BadRecord("wrong_type", f"field 'label' must be 1 (output_A preferred), 0, or 0.5 (a tie), got {label!r}")
  _check_response(output_a, "output_A")
  _check_response(output_b, "output_B")
  chosen, rejected = (output_a, output_b) if label == 1 else (output_b, output_a)
  prompt_id = record.get("prompt_id")
  group = None if prompt_id is None else f"prompt_id:{prompt_id}"
  return make_pair(prompt, chosen, rejected, source=source, split=_optional_split(record),
                   group=group, margin=record_margin(record), tie=label == 0.5)


def _strip_prefix(turns: list[Turn], prefix: list[Turn]) -> list[Turn]:
  return turns[len(prefix):] if turns[: len(prefix)] == prefix else turns


def convert_trl(record: dict, source: str) -> Pair:
  """A TRL preference record, explicit prompt or implicit (shared leading messages)."""
  chosen_value = _field(record, "chosen")
  rejected_value = _field(record, "rejected")
  if "prompt" in record:
    prompt = to_turns(record["prompt"], "prompt", "user")
    chosen = to_turns(chosen_value, "chosen", "assistant")
    rejected = to_turns(rejected_value, "rejected", "assistant")
    # Some datasets (UltraFeedback binarized among them) repeat the prompt messages at the start
    # of chosen and rejected; the response is what follows them.
    chosen = _strip_prefix(chosen, prompt)
    rejected = _strip_prefix(rejected, prompt)
  else:
    if isinstance(chosen_value, str) and isinstance(rejected_value, str):
      return convert_hh(record, source)
    chosen_all = to_turns(chosen_value, "chosen", "assistant")
    rejected_all = to_turns(rejected_value, "rejected", "assistant")
    shared = 0
    while (shared < min(len(chosen_all), len(rejected_all)) - 1
           and chosen_all[shared] == rejected_all[shared]):
      shared += 1
    if shared == 0:
      raise BadRecord("empty_prompt", "chosen and rejected share no leading message (the prompt)")
    prompt, chosen, rejected = chosen_all[:shared], chosen_all[shared:], rejected_all[shared:]
  margin = record_margin(record)
  tie = record.get("score_chosen") is not None and record.get("score_chosen") == record.get("score_rejected")
  return make_pair(prompt, chosen, rejected, source=source, split=_optional_split(record),
                   margin=margin, tie=tie)


def convert_ranked(record: dict, source: str) -> list[Pair]:
  """k scored responses to one prompt, {"prompt", "responses": [k], "scores": [k]} (higher is
  better): every ordered pair (i, j) with score_i > score_j, as InstructGPT trained on all K
  choose 2 comparisons, with margin score_i - score_j; equal scores make tie pairs (data.ties).
  The pairs share the record's prompt group, so a held-out split keeps them together, and its
  unit (the record's source), so a batch holds all of them and computes each response once."""
  prompt = to_turns(_field(record, "prompt"), "prompt", "user")
  responses_value, scores = _field(record, "responses"), _field(record, "scores")
  if not isinstance(responses_value, list) or len(responses_value) < 2:
    raise BadRecord("wrong_type", "field 'responses' must be a list of at least two responses")
  if not isinstance(scores, list) or len(scores) != len(responses_value):
    raise BadRecord("wrong_type", f"field 'scores' must be a list of {len(responses_value)} numbers, one per response")
  for k, v in enumerate(scores):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise BadRecord("wrong_type", f"field 'scores' item {k} must be a finite number, got {v!r}")
  responses = [to_turns(r, f"responses[{k}]", "assistant") for k, r in enumerate(responses_value)]
  split = _optional_split(record)
  out = []
  for i in range(len(responses)):
    for j in range(len(responses)):
      tie = scores[i] == scores[j]
      if scores[i] > scores[j] or (tie and i < j):
        out.append(make_pair(prompt, responses[i], responses[j], source=f"{source} ({i} vs {j})", split=split,
                             margin=float(scores[i] - scores[j]), tie=tie, unit=source))
  return out


CONVERTERS = {"halos": convert_halos, "hh": convert_hh, "trl": convert_trl, "ranked": convert_ranked}
