"""Label sampled outputs with a reward model: HALOs' `train.label`, batched on JAX.

    python -m jbt.label SAMPLES OUT --reward_model_path PATH [--feedback_type pairwise|binary|scalar]
        [--feedback_mode max|random|min] [--threshold median|mean|NUMBER] [--seed 0] [--split NAME]
        [--batch_size 16] [--max_length N] [--dtype float32|bfloat16] [--mesh 1,-1,1]

SAMPLES is what HALOs' `train.sample` writes: a JSON array of {"prompt_id", "sample_id",
"prompt": [turns], "output": str, ...}. PATH is an HF reward-model directory (such as a run's
FINAL/) or a jbt checkpoint. Each sample is scored as HALOs scores it: the chat template over its
prompt turns plus one assistant turn holding the output with its trailing unfinished sentence cut
(`chop`), reward = logit 1 of a two-label head (logit 0 of a one-label head). OUT is a JSON array
of HALOs feedback records, laid out as HALOs writes them, written atomically.

Deliberate differences from HALOs: pairwise feedback defaults to threshold 0 (HALOs' default
"median" crashes there), a numeric binary threshold may have decimals, --split works, "min" never
pairs a sample with itself, and API labeling is not offered. See docs/label_evaluate.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jbt.atomic import atomic_file, make_parent
from jbt.errors import ArgParser, JbtError, cli_main
from jbt.tools.evaluate import add_backend_args, load_backend

FEEDBACK_TYPES = ("binary", "pairwise", "scalar")
FEEDBACK_MODES = ("max", "random", "min")
# HALOs' tie tolerance in "min" mode.
_EPS = 1e-12
# The last sentence-ending mark and whatever unfinished fragment follows it to the end.
_TRAILING_FRAGMENT = re.compile(r"([.!?])[^.!?]*\Z")


def chop(text: str) -> str:
  """HALOs' chop: strip, then drop the fragment after the last '.', '!' or '?' (kept)."""
  return _TRAILING_FRAGMENT.sub(r"\1", text.strip())


def read_samples(path: Path, *, need_prompt_id: bool) -> list[dict[str, Any]]:
  """train.sample's JSON array, each record checked for what labeling reads."""
  if not path.is_file():
    raise JbtError(f"{path}: no such samples file")
  try:
    samples = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise JbtError(f"{path}: not a JSON array of train.sample records ({type(e).__name__}: {e})") from None
  if not isinstance(samples, list):
    raise JbtError(f"{path}: expected a JSON array of train.sample records, got a JSON {type(samples).__name__}")
  if not samples:
    raise JbtError(f"{path}: holds no samples")
  for i, s in enumerate(samples):
    where = f"{path}: record {i}"
    if not isinstance(s, dict):
      raise JbtError(f"{where}: expected an object, got {type(s).__name__}")
    if "prompt" not in s:
      raise JbtError(f"{where}: no 'prompt' field (train.sample writes the prompt turns unless --mode is "
                     "alpacaeval)")
    turns = s["prompt"]
    if not (isinstance(turns, list) and turns and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns)):
      raise JbtError(f"{where}: 'prompt' must be a non-empty list of {{\"role\", \"content\"}} turns")
    if not isinstance(s.get("output"), str):
      got = type(s["output"]).__name__ if "output" in s else "nothing"
      raise JbtError(f"{where}: 'output' must be the sampled text (a string), got {got}")
    if need_prompt_id and not isinstance(s.get("prompt_id"), (str, int)):
      raise JbtError(f"{where}: binary and pairwise feedback need 'prompt_id' (a string or an integer)")
  return samples


def scored_conversation(sample: dict[str, Any]) -> list[dict[str, str]]:
  """The turns HALOs scores: the prompt, then the chopped output as the assistant's turn."""
  return list(sample["prompt"]) + [{"role": "assistant", "content": chop(sample["output"])}]


def tokenize_samples(samples: Sequence[dict[str, Any]], tokenizer: Any, where: str, *,
                     chunk: int = 256) -> list[list[int]]:
  """Chat-templated token ids of each sample's scored conversation (no generation prompt)."""
  from tqdm.auto import tqdm

  ids: list[list[int]] = []
  for start in tqdm(range(0, len(samples), chunk), desc="tokenizing", unit="chunk", disable=None):
    convs = [scored_conversation(s) for s in samples[start:start + chunk]]
    try:
      ids.extend(tokenizer.apply_chat_template(convs, tokenize=True, add_generation_prompt=False, return_dict=False))
    except Exception:
      for k, conv in enumerate(convs):  # find the record the chat template rejects
        try:
          tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=False, return_dict=False)
        except Exception as e:
          raise JbtError(f"{where}: record {start + k}: the chat template fails on it "
                         f"({type(e).__name__}: {e})") from None
      raise
  return ids


def with_rewards(samples: Sequence[dict[str, Any]], rewards: Sequence[float]) -> list[dict[str, Any]]:
  """HALOs' processed samples: a copy of each with its reward, and the output as one assistant turn."""
  out = []
  for sample, reward in zip(samples, rewards):
    s = dict(sample)
    s["reward"] = float(reward)
    s["output"] = [{"role": "assistant", "content": s["output"]}]
    out.append(s)
  return out


def resolve_threshold(feedback_type: str, threshold: str | None) -> str | float:
  """'mean' / 'median' (binary only) or a number; the default is per feedback type."""
  if threshold is None:
    return "median" if feedback_type == "binary" else 0.0
  if threshold in ("mean", "median"):
    if feedback_type == "pairwise":
      raise JbtError(f"--threshold {threshold} is for binary feedback; a pairwise threshold is the least reward "
                     "difference a pair needs, a number (default 0)")
    return threshold
  try:
    value = float(threshold)
  except ValueError:
    raise JbtError(f"--threshold must be mean, median or a number, got {threshold!r}") from None
  if not math.isfinite(value):
    raise JbtError(f"--threshold must be finite, got {threshold!r}")
  return value


def binary_feedback(samples: Sequence[dict[str, Any]], threshold: str | float) -> list[dict[str, Any]]:
  """label 1 when reward >= threshold (a number, or the mean / median of all rewards)."""
  rewards = np.array([s["reward"] for s in samples], np.float64)
  # numpy's mean and median, as HALOs computes them, so a tie at the cut falls the same way.
  if threshold == "mean":
    cut = float(np.mean(rewards))
  elif threshold == "median":
    cut = float(np.median(rewards))
  else:
    cut = float(threshold)
  return [{"prompt_id": s["prompt_id"], "prompt": s["prompt"], "output": s["output"],
           "label": 1 if s["reward"] >= cut else 0, "reward": s["reward"], "type": "binary_feedback"}
          for s in samples]


def _pair_item(prompt_id: Any, a: dict[str, Any], b: dict[str, Any], rng: random.Random) -> dict[str, Any]:
  # One draw per pair, in HALOs' order, so a seed gives HALOs' A/B order.
  if rng.random() < 0.5:
    a, b = b, a
  return {"prompt_id": prompt_id, "prompt": a["prompt"], "output_A": a["output"], "output_B": b["output"],
          "label": int(a["reward"] > b["reward"]), "reward_A": a["reward"], "reward_B": b["reward"],
          "reward_difference": abs(a["reward"] - b["reward"]), "type": "pairwise_feedback"}


def _closest_pairs(ranked: list[dict[str, Any]], threshold: float) -> list[tuple[dict[str, Any], dict[str, Any]]]:
  """The pairs whose reward gap is the smallest one >= threshold, ties kept, higher reward first.

  `ranked` is sorted by reward, highest first. Each sample is paired with the first sample below
  it whose gap reaches the threshold (the partner index never decreases); HALOs' walk visits
  the same pairs in the same order, except that it can pair a sample with itself when the
  threshold is <= 0.
  """
  best, pairs = math.inf, []
  end = 0
  for start, upper in enumerate(ranked):
    end = max(end, start + 1)
    while end < len(ranked) and upper["reward"] - ranked[end]["reward"] + _EPS < threshold:
      end += 1
    if end == len(ranked):
      break  # lower samples have smaller gaps still
    diff = upper["reward"] - ranked[end]["reward"]
    if diff < best:
      best, pairs = diff, [(upper, ranked[end])]
    elif math.isclose(diff, best, abs_tol=_EPS):
      pairs.append((upper, ranked[end]))
  return pairs


def pairwise_feedback(samples: Sequence[dict[str, Any]], seed: int, mode: str = "max",
                      threshold: float = 0.0) -> list[dict[str, Any]]:
  """HALOs' pairs of samples sharing a prompt_id, with a gap above `threshold`.

  max: the best and the worst sample of each prompt. random: a seeded shuffle, then consecutive
  samples paired. min: the pairs with the smallest gap >= threshold. A and B are swapped at random
  (seeded); label is 1 when A's reward is higher.
  """
  if mode not in FEEDBACK_MODES:
    raise JbtError(f"feedback mode must be one of {', '.join(FEEDBACK_MODES)}, got {mode!r}")
  rng = random.Random(seed)  # the same draws as HALOs' random.seed(seed) then random.*
  groups: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
  for s in samples:
    groups[s["prompt_id"]].append(s)
  feedback = []
  for prompt_id, group in groups.items():
    if len(group) < 2:
      continue
    if mode == "random":
      rng.shuffle(group)
      for i in range(0, len(group) - 1, 2):
        a, b = group[i], group[i + 1]
        if abs(a["reward"] - b["reward"]) > threshold:
          feedback.append(_pair_item(prompt_id, a, b, rng))
      continue
    ranked = sorted(group, key=lambda s: s["reward"], reverse=True)
    if ranked[0]["reward"] - ranked[-1]["reward"] <= threshold:
      continue
    chosen = [(ranked[0], ranked[-1])] if mode == "max" else _closest_pairs(ranked, threshold)
    feedback.extend(_pair_item(prompt_id, a, b, rng) for a, b in chosen)
  return feedback


def scalar_feedback(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each processed sample as it is, typed scalar_feedback."""
  out = [dict(s) for s in samples]
  for s in out:
    s["type"] = "scalar_feedback"
  return out


def write_json_array(path: Path, items: Sequence[dict[str, Any]]) -> None:
  """HALOs' layout (one indented object per item), written atomically (jbt.atomic)."""
  text = "[\n" + ",\n".join(json.dumps(item, indent=2) for item in items) + "\n]"
  with atomic_file(path) as f:
    f.write(text)


def build_parser() -> argparse.ArgumentParser:
  ap = ArgParser(prog="python -m jbt.label", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("samples_path", help="train.sample output: a JSON array of samples")
  ap.add_argument("output_path", help="where to write the feedback JSON array")
  ap.add_argument("--reward_model_path", help="HF reward-model directory (e.g. a run's FINAL/) or jbt checkpoint")
  ap.add_argument("--feedback_type", choices=FEEDBACK_TYPES, default=None,
                  help="binary, pairwise, or scalar (the default: every sample with its reward)")
  ap.add_argument("--feedback_mode", choices=FEEDBACK_MODES, default="max",
                  help="pairwise: max (best vs worst per prompt), random (seeded pairs), min (closest gap)")
  ap.add_argument("--threshold", default=None,
                  help="binary: median (default), mean or a number; pairwise: least reward gap (default 0)")
  ap.add_argument("--seed", type=int, default=0, help="seed of pairing and A/B order")
  ap.add_argument("--split", default=None, help="add this 'split' field to every record")
  ap.add_argument("--batch_size", type=int, default=16, help="sequences per scoring batch")
  ap.add_argument("--max_length", type=int, default=None,
                  help="cut longer token sequences to this length (default: no cut, as HALOs)")
  ap.add_argument("--max_prompt_length", type=int, default=None,
                  help="accepted for HALOs command lines; its reward-model path does not use it either")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  ap.add_argument("--mesh", default="1,-1,1", help="(data, fsdp, tensor) sizes over the local devices")
  ap.add_argument("--normalize", action="store_true",
                  help="write (reward - mean) / std with the model's stored statistics (set at the end of "
                       "training, or by jbt.evaluate --calibrate)")
  add_backend_args(ap)
  ap.add_argument("--api_type", help=argparse.SUPPRESS)
  return ap


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Scores the samples and writes the feedback; returns the records written."""
  from jbt.tools import score as scoring
  from jbt.tools import normalization

  if args.api_type:
    raise JbtError("API labeling is not offered by jbt.label; use HALOs' train.label for it")
  if not args.reward_model_path:
    raise JbtError("--reward_model_path is required (an HF reward-model directory or a jbt checkpoint)")
  if args.batch_size <= 0:
    raise JbtError(f"--batch_size must be positive, got {args.batch_size}")
  if args.max_length is not None and args.max_length <= 0:
    raise JbtError(f"--max_length must be positive, got {args.max_length}")
  feedback_type = args.feedback_type or "scalar"
  threshold = resolve_threshold(feedback_type, args.threshold)
  mesh_shape = scoring.parse_mesh(args.mesh)
  model_path = Path(args.reward_model_path)
  if not model_path.exists():
    raise JbtError(f"--reward_model_path {model_path}: no such directory")
  out = Path(args.output_path)
  if out.is_dir():
    raise JbtError(f"{out}: is a directory; give the output file's path")
  samples_path = Path(args.samples_path)
  samples = read_samples(samples_path, need_prompt_id=feedback_type != "scalar")
  make_parent(out)  # before the model loads: a bad output path fails at once
  norm = None
  if args.normalize:
    norm = normalization.read(model_path)
    if norm is None:
      raise JbtError(f"--normalize: {model_path} stores no reward statistics; a jbt run's FINAL/ has them when the "
                     "run evaluated, or run `python -m jbt.evaluate --calibrate --model MODEL --data PAIRS` first")

  scorer, tokenizer = load_backend(args.backend, model_path, batch_size=args.batch_size, dtype=args.dtype,
                                   mesh_shape=mesh_shape, pairs_max_length=None,
                                   trust_remote_code=args.trust_remote_code)
  print(f"scoring {len(samples)} samples from {samples_path} with {model_path}", file=sys.stderr)
  ids = tokenize_samples(samples, tokenizer, str(samples_path))
  if args.max_length is not None:
    n_cut = sum(len(x) > args.max_length for x in ids)
    ids = [x[:args.max_length] for x in ids]
    if n_cut:
      print(f"{n_cut} samples cut to --max_length {args.max_length} tokens", file=sys.stderr)
  rewards = scorer(ids, desc="labeling")
  if norm is not None:
    rewards = normalization.apply(rewards, norm)
  processed = with_rewards(samples, rewards.tolist())

  if feedback_type == "binary":
    feedback = binary_feedback(processed, threshold)
  elif feedback_type == "pairwise":
    feedback = pairwise_feedback(processed, args.seed, mode=args.feedback_mode, threshold=float(threshold))
  else:
    feedback = scalar_feedback(processed)
  if args.split:
    for item in feedback:
      item["split"] = args.split
  write_json_array(out, feedback)
  print(f"wrote {len(feedback)} {feedback_type} feedback records to {out}", file=sys.stderr)
  return feedback


@cli_main
def main(argv: list[str] | None = None) -> None:
  run(build_parser().parse_args(argv))


if __name__ == "__main__":
  main()
