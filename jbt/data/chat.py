"""Pairs -> token ids: chat template, HALOs' truncation rule, and the reward's pooling position.

A member of a pair (prompt + chosen, or prompt + rejected) is tokenized as HALOs does it and as
its labeling script scores it: the chat template applied to prompt turns + response turns, with
no generation prompt. The prompt alone is the template over the prompt turns with the generation
prompt.

Truncation "halos" (HALOs' DataLoader.tokenize_batch_element at commit 4831988):
  1. Walk the prompt turns, adding up each turn's length when templated alone (with the
     generation prompt). At the first turn that makes the sum exceed max_prompt_length, cut
     that many tokens (the overflow) from the end of its content and drop the later turns; the
     running length is then max_prompt_length.
  2. Walk the response turns the same way (templated alone, no generation prompt) against
     max_length, starting from the prompt's running length.
  3. Template the kept turns; any sequence still longer than max_length is cut to max_length,
     as HALOs' collate cuts it.
  Lengths are HALOs' per-turn measure, so a header the template puts before the first message
  (such as a default system prompt) counts once per turn: the rule is conservative, as HALOs is.
  A cut turn's content is its tokens minus BOS/EOS/PAD ids, shortened and decoded back to text.
  HALOs rewrites the prompt in place while tokenizing chosen, so the rejected member can see a
  leftover empty turn; here both members share the prompt truncated once, which is the same
  except in that case.
Truncation "drop": a pair whose prompt (templated) is longer than max_prompt_length or either
  of whose members is longer than max_length is skipped and counted as "too_long".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jbt.data.records import Pair, Turn
from jbt.data.report import BadRecord
from jbt.errors import JbtError

TRUNCATIONS = ("halos", "drop")

# Used when the tokenizer has no chat template: plain "Role: content" blocks, an optional BOS, and
# no EOS, so the reward is read at the final newline whatever the pad token is.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> bool:
  """Gives a tokenizer without a chat template DEFAULT_CHAT_TEMPLATE; True if it set it.

  Call it before saving the tokenizer with a trained model, so that scoring tools format text
  the way training did.
  """
  if getattr(tokenizer, "chat_template", None):
    return False
  tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
  return True


def resolve_pad_token_id(tokenizer: Any) -> int:
  """The pad id for batches: the tokenizer's, else its EOS id (HALOs' rule for the model config)."""
  pad = tokenizer.pad_token_id
  if pad is None:
    pad = tokenizer.eos_token_id
  if pad is None:
    raise JbtError("the tokenizer has neither a pad token nor an EOS token; set pad_token_id")
  return int(pad)


def pool_position(token_ids: Sequence[int] | np.ndarray, pad_token_id: int) -> int:
  """Where transformers' *ForSequenceClassification reads the score of a sequence scored alone.

  That is the rightmost token whose id is not pad_token_id, so with pad == EOS a sequence ending
  in EOS tokens is read at the token before them. Raises ValueError when every token is a pad.
  """
  ids = np.asarray(token_ids)
  real = np.flatnonzero(ids != pad_token_id)
  if real.size == 0:
    raise ValueError("the sequence holds only pad tokens; it has no position to read a reward at")
  return int(real[-1])


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
  """Token ids of both members of a pair, each ending at its pooling position.

  Tokens after the pooling position are pad ids (by definition of that position) and cannot
  change the reward under causal attention, so they are not kept: the reward of a member is
  read at its last token.

  Attributes:
    chosen: int32 ids of prompt + chosen.
    rejected: int32 ids of prompt + rejected.
    altered: what truncation did ("prompt_truncated", "response_truncated", ...).
  """

  chosen: np.ndarray
  rejected: np.ndarray
  altered: tuple[str, ...] = ()


class PairTokenizer:
  """Tokenizes pairs with fixed settings; picklable, so grain worker processes can run it."""

  def __init__(self, tokenizer: Any, *, max_length: int = 1250, max_prompt_length: int = 625,
               truncation: str = "halos"):
    if truncation not in TRUNCATIONS:
      raise JbtError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if not 0 < max_prompt_length <= max_length:
      raise JbtError(f"need 0 < max_prompt_length <= max_length, got {max_prompt_length} "
                     f"and {max_length}")
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.max_prompt_length = max_prompt_length
    self.truncation = truncation
    self.pad_token_id = resolve_pad_token_id(tokenizer)
    # Passed per call rather than set on the tokenizer, which belongs to the caller.
    self.chat_template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    self._special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}

  def _template(self, conversations: list[list[Turn]], add_generation_prompt: bool) -> list[list[int]]:
    return self.tokenizer.apply_chat_template(
        conversations, tokenize=True, add_generation_prompt=add_generation_prompt,
        return_dict=False, chat_template=self.chat_template)

  def _cut(self, turn: Turn, overflow: int) -> Turn:
    ids = [t for t in self.tokenizer.encode(turn["content"]) if t not in self._special]
    kept = ids[: max(len(ids) - overflow, 0)]
    return {"role": turn["role"], "content": self.tokenizer.decode(kept)}

  def _fit(self, turns: list[Turn], add_generation_prompt: bool, total: int,
           limit: int) -> tuple[list[Turn], int, bool]:
    """HALOs' walk over turns: cut the overflowing turn from its end, drop the turns after it."""
    if not turns:
      return turns, total, False
    lengths = [len(ids) for ids in self._template([[t] for t in turns], add_generation_prompt)]
    for i, (turn, n) in enumerate(zip(turns, lengths)):
      if total + n > limit:
        return turns[:i] + [self._cut(turn, total + n - limit)], limit, True
      total += n
    return turns, total, False

  def __call__(self, pair: Pair) -> TokenizedPair:
    """Tokenizes one pair; raises BadRecord when it is to be skipped."""
    altered = []
    prompt = pair.prompt
    responses = [pair.chosen, pair.rejected]
    if self.truncation == "halos":
      prompt, prompt_total, cut = self._fit(prompt, True, 0, self.max_prompt_length)
      if cut:
        altered.append("prompt_truncated")
      any_cut = False
      for k, response in enumerate(responses):
        responses[k], _, cut = self._fit(response, False, prompt_total, self.max_length)
        any_cut |= cut
      if any_cut:
        altered.append("response_truncated")
    members = self._template([prompt + r for r in responses], False)
    if self.truncation == "drop":
      prompt_ids = self._template([prompt], True)[0]
      if len(prompt_ids) > self.max_prompt_length or max(map(len, members)) > self.max_length:
        raise BadRecord("too_long", f"longer than max_prompt_length {self.max_prompt_length} or "
                        f"max_length {self.max_length} (truncation='drop')")
    out = []
    for ids in members:
      if len(ids) > self.max_length:
        ids = ids[: self.max_length]
        altered.append("cut_at_max_length")
      ids = np.asarray(ids, dtype=np.int32)
      try:
        end = pool_position(ids, self.pad_token_id) + 1
      except ValueError as e:
        raise BadRecord("all_pad", str(e)) from None
      if end < len(ids):
        altered.append("trailing_pad_dropped")
      out.append(ids[:end])
    return TokenizedPair(out[0], out[1], tuple(dict.fromkeys(altered)))

  def many(self, pairs: Sequence[Pair]) -> list[TokenizedPair | BadRecord]:
    """Tokenizes a list of pairs, returning each skip as its BadRecord (for worker processes)."""
    results: list[TokenizedPair | BadRecord] = []
    for pair in pairs:
      try:
        results.append(self(pair))
      except BadRecord as e:
        results.append(e)
    return results


def tokenize_pair(pair: Pair, tokenizer: Any, *, max_length: int = 1250,
                  max_prompt_length: int = 625, truncation: str = "halos") -> TokenizedPair:
  """Tokenizes one pair (see the module docstring); raises BadRecord when it must be skipped."""
  return PairTokenizer(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                       truncation=truncation)(pair)
