"""Scoring with transformers directly (`--backend torch` of jbt.evaluate and jbt.label).

Any `AutoModelForSequenceClassification` scores here, families jbt does not implement included
(GPT-2, OPT, ...), and custom heads with `trust_remote_code` (ArmoRM-style models whose output
carries a `score`). The scorers take exactly what jbt's own take (token id sequences, or a
jbt.data.TokenizedPairs) and give the same outputs, so the two backends are compared on the
same inputs: the reward of a sequence is the model's output for it scored alone (right padding
and an attention mask; transformers reads the reward at the last non-pad token).

The reward is logit 1 of a two-label head (HALOs' convention, as jbt reads it), logit 0 of a
one-label head, or the output's `score` where the model returns one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jbt.errors import JbtError

TORCH_DTYPES = ("float32", "bfloat16")


def reward_of(output: Any, where: str) -> Any:
  """[B] rewards from a transformers model output (see the module docstring)."""
  score = getattr(output, "score", None)
  if score is not None:
    return score.reshape(score.shape[0], -1)[:, 0]
  logits = output.logits
  n = logits.shape[-1]
  if n not in (1, 2):
    raise JbtError(f"{where}: the head has {n} labels; a reward model has one (the reward) or two (logit 1, HALOs)")
  return logits[:, n - 1]


class TorchScorer:
  """`scorer(list_of_id_arrays) -> rewards_N` with a transformers model, longest first."""

  def __init__(self, model: Any, pad_token_id: int, *, batch_size: int = 16, where: str = "model"):
    if batch_size <= 0:
      raise JbtError(f"batch_size must be positive, got {batch_size}")
    self.model, self.pad, self.batch_size, self.where = model, pad_token_id, batch_size, where

  def __call__(self, sequences: Sequence[Sequence[int] | np.ndarray], *, progress: bool | None = None,
               desc: str = "scoring") -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    for i, s in enumerate(seqs):
      if s.size == 0 or not np.any(s != self.pad):
        raise JbtError(f"sequence {i} holds only pad tokens (id {self.pad}); there is no token to read a reward at")
    rewards_N = np.zeros(len(seqs), np.float32)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    device = next(self.model.parameters()).device
    bar = tqdm(total=len(seqs), desc=desc, unit="seq", disable=None if progress is None else not progress,
               dynamic_ncols=True)
    with torch.no_grad():
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        L = max(len(seqs[i]) for i in chunk)
        ids = np.full((len(chunk), L), self.pad, np.int64)
        mask = np.zeros((len(chunk), L), np.int64)
        for row, i in enumerate(chunk):
          ids[row, :len(seqs[i])] = seqs[i]
          mask[row, :len(seqs[i])] = 1
        out = self.model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
        rewards_N[chunk] = reward_of(out, self.where).float().cpu().numpy()
        bar.update(len(chunk))
    bar.close()
    return rewards_N


class TorchPairScorer:
  """`scorer(tokenized_pairs) -> rewards [P, 2]` (chosen, rejected): each member scored alone."""

  def __init__(self, scorer: TorchScorer):
    self.scorer = scorer

  def __call__(self, tok: Any, *, progress: bool | None = None, desc: str = "scoring") -> np.ndarray:
    members = [tok.member(i, j) for i in range(len(tok)) for j in (0, 1)]
    return self.scorer(members, progress=progress, desc=desc).reshape(len(tok), 2)


def load_torch_scorer(path: str | Path, *, batch_size: int = 16, dtype: str = "float32", pairs: bool = False,
                      trust_remote_code: bool = False) -> tuple[TorchScorer | TorchPairScorer, Any]:
  """(scorer, tokenizer) for an HF sequence-classification directory, on the GPU when there is one.
  The tokenizer gets jbt's default chat template when it has none, as the jax backend's does."""
  import torch
  import transformers

  from jbt.data import ensure_chat_template

  path = Path(path)
  if not path.is_dir():
    raise JbtError(f"{path}: no such model directory (the torch backend reads HF directories)")
  if dtype not in TORCH_DTYPES:
    raise JbtError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(path), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
  except (OSError, ValueError, KeyError) as e:
    raise JbtError(f"{path}: transformers cannot load it as a sequence-classification model "
                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
  if pad is None:
    pad = tokenizer.eos_token_id
  if model.config.pad_token_id is None:
    model.config.pad_token_id = pad  # transformers needs it to find each row's last token
  ensure_chat_template(tokenizer)
  scorer = TorchScorer(model, int(pad), batch_size=batch_size, where=str(path))
  return (TorchPairScorer(scorer) if pairs else scorer), tokenizer
