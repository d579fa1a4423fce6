"""The first stage of a run: check the config, load the model and its tokenizer, load and
tokenize the data, and count the optimizer steps."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from jbt import data
from jbt.checkpoint.load import Loaded, load_model, resolve_model_path
from jbt.errors import JbtError
from jbt.hf import families
from jbt.hf.files import align_pad, load_tokenizer
from jbt.loss import RANKINGS
from jbt.model import ModelConfig, attention
from jbt.model.config import LORA_TARGETS, REMAT
from jbt.runtime import trace
from jbt.runtime.mesh import data_parallel_size
from jbt.train import fused_update, trainable
from jbt.train.batches import length_bucket


def validate(cfg: ConfigDict) -> None:
  """Impossible combinations fail here, before any work, with one line."""
  d, t, o, m = cfg.data, cfg.train, cfg.opt, cfg.model
  if d.max_prompt_length >= d.max_length:
    raise JbtError(f"data.max_prompt_length ({d.max_prompt_length}) must be below data.max_length ({d.max_length})")
  if d.layout not in data.LAYOUTS:
    raise JbtError(f"data.layout must be one of {', '.join(data.LAYOUTS)}, got {d.layout!r}")
  if d.truncation not in data.TRUNCATIONS:
    raise JbtError(f"data.truncation must be one of {', '.join(data.TRUNCATIONS)}, got {d.truncation!r}")
  if d.on_error not in ("skip", "raise"):
    raise JbtError(f"data.on_error must be skip or raise, got {d.on_error!r}")
  if d.get("ties", "drop") not in data.TIES:
    raise JbtError(f"data.ties must be one of {', '.join(data.TIES)}, got {d.ties!r}")
  if d.get("ties", "drop") == "tie_loss" and not cfg.loss.get("tie_nu", 1.0) > 0:
    raise JbtError(f"data.ties=tie_loss needs loss.tie_nu > 0 (Davidson's tie parameter), got {cfg.loss.tie_nu}")
  ranking = cfg.loss.get("ranking", "all_pairs")
  if ranking not in RANKINGS:
    raise JbtError(f"loss.ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
  if ranking == "plackett_luce" and (d.get("ties", "drop") == "tie_loss" or cfg.loss.get("margin_from_data", False)
                                     or cfg.loss.margin):
    raise JbtError("loss.ranking=plackett_luce has no margin and no tie term: use it with loss.margin=0, "
                   "loss.margin_from_data=False and data.ties=drop, or use loss.ranking=all_pairs")
  try:
    trace.parse_steps(t.get("profile", ""))
  except ValueError as e:
    raise JbtError(f"train.profile: {e}") from None
  if t.batch_size <= 0 or o.grad_accum <= 0 or t.batch_size % o.grad_accum:
    raise JbtError(f"train.batch_size ({t.batch_size}) must be a positive multiple of opt.grad_accum ({o.grad_accum})")
  if m.num_labels not in (1, 2):
    raise JbtError(f"model.num_labels must be 1 or 2, got {m.num_labels}")
  if m.dtype not in ("float32", "bfloat16"):
    raise JbtError(f"model.dtype must be float32 or bfloat16, got {m.dtype!r}")
  if m.remat not in REMAT:
    raise JbtError(f"model.remat must be one of {', '.join(REMAT)}, got {m.remat!r}")
  if m.attention != "auto" and m.attention not in attention.KINDS:
    raise JbtError(f"model.attention must be auto or one of {', '.join(attention.KINDS)}, got {m.attention!r}")
  length_bucket(d.length_bucket)
  if m.init_from == "random" and m.random.family not in families.FAMILIES:
    raise JbtError(f"model.random.family {m.random.family!r} is not one of {', '.join(families.FAMILIES)}")
  if t.epochs <= 0 and t.max_steps <= 0:
    raise JbtError("set train.epochs or train.max_steps to a positive number")
  if o.lr <= 0:
    raise JbtError(f"opt.lr must be positive, got {o.lr}")
  if o.get("fused_update", "auto") not in fused_update.MODES:
    raise JbtError(f"opt.fused_update must be one of {', '.join(fused_update.MODES)}, got {o.fused_update!r}")
  lo = cfg.get("lora")
  if lo is not None:
    if lo.rank < 0 or (lo.rank > 0 and lo.alpha <= 0):
      raise JbtError(f"lora.rank must be >= 0 (0: off) and lora.alpha > 0, got rank {lo.rank}, alpha {lo.alpha}")
    bad = sorted(set(lo.targets) - set(LORA_TARGETS))
    if bad or not lo.targets:
      raise JbtError(f"lora.targets must be names among {', '.join(LORA_TARGETS)}, got {list(lo.targets)}")
    if lo.dropout != 0:
      raise JbtError(f"lora.dropout must be 0 (LoRA dropout is not supported), got {lo.dropout}")
    if cfg.ckpt.get("export_adapter", False) and lo.rank == 0:
      raise JbtError("ckpt.export_adapter needs LoRA (lora.rank > 0)")
  trainable.check_specs(t.get("freeze", ()))
  if t.get("frozen_dtype", "float32") not in ("float32", "bfloat16"):
    raise JbtError(f"train.frozen_dtype must be float32 or bfloat16, got {t.frozen_dtype!r}")


def check_mesh_batch(cfg: ConfigDict, mesh: Any, eval_batch: bool = True) -> None:
  """The micro-batch's pairs (and padded rows) are split over the data-parallel devices; the eval
  batch's too unless eval_batch is False (jbt.plan compiles the train step only and warns)."""
  dp = data_parallel_size(mesh)
  micro = cfg.train.batch_size // cfg.opt.grad_accum
  if micro % dp:
    raise JbtError(f"train.batch_size / opt.grad_accum = {micro} pairs does not divide over the {dp} "
                   f"data-parallel devices of mesh {dict(mesh.shape)}")
  if eval_batch and cfg.train.eval_batch_size % dp:
    raise JbtError(f"train.eval_batch_size ({cfg.train.eval_batch_size}) does not divide over the {dp} "
                   "data-parallel devices")


def lora_fields(cfg: ConfigDict) -> dict[str, Any]:
  """cfg.lora as ModelConfig fields (none when the config has no lora block)."""
  lo = cfg.get("lora")
  if lo is None:
    return {}
  return dict(lora_rank=int(lo.rank), lora_alpha=float(lo.alpha), lora_targets=tuple(lo.targets),
              lora_rslora=bool(lo.rslora))


def runtime_fields(cfg: ConfigDict) -> dict[str, Any]:
  """cfg.model's choices that apply on top of whatever model is loaded, and cfg.lora's."""
  m = cfg.model
  return dict(dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers, attention=m.attention,
              mlp_chunk=m.get("mlp_chunk", 0), **lora_fields(cfg))


def model(cfg: ConfigDict, shardings_fn: Any) -> Loaded:
  """The model to train: cfg.model.init_from loaded into its shardings, or a random model's
  config (params None: the train state initialises them in place) with model.tokenizer's tokenizer."""
  m = cfg.model
  if m.init_from != "random":
    return load_model(m.init_from, shardings_fn=shardings_fn, num_labels=m.num_labels, seed=cfg.train.seed,
                      **runtime_fields(cfg))
  if not m.tokenizer:
    raise JbtError("model.init_from='random' needs model.tokenizer (an HF directory, a .gguf file or 'smollm2')")
  tok_path = resolve_model_path(m.tokenizer)
  if not tok_path.exists():
    raise JbtError(f"model.tokenizer: {tok_path}: no such file or directory")
  gguf = tok_path.name if tok_path.suffix == ".gguf" else None
  tokenizer = load_tokenizer(tok_path.parent if gguf else tok_path, gguf)
  unknown = sorted(set(m.random.keys()) - {f.name for f in dataclasses.fields(ModelConfig)})
  if unknown:
    raise JbtError(f"model.random has unknown fields {unknown}")
  fields = families.default_features(m.random.family) | m.random.to_dict()  # the family's features, then sizes
  model_cfg = ModelConfig(vocab_size=len(tokenizer), num_labels=m.num_labels,
                          pad_token_id=data.resolve_pad_token_id(tokenizer), **fields, **runtime_fields(cfg))
  return Loaded(model_cfg, None, {}, align_pad(tokenizer, model_cfg, m.tokenizer))


@dataclasses.dataclass
class Data:
  train: Any  # TokenizedPairs
  eval: Any | None  # TokenizedPairs, or None when the run does not evaluate
  messages: list[str]  # one line per split for the log


def _load(cfg: ConfigDict, specs: list[str], split: str) -> tuple[list[Any], Any]:
  """The pairs of one split; ties train with data.ties=tie_loss, and are never evaluated (an
  accuracy has no right answer for them)."""
  d = cfg.data
  return data.load_pairs(list(specs), split=split, on_error=d.on_error, eval_fraction=d.eval_fraction,
                         seed=cfg.train.seed, ties=d.get("ties", "drop") if split == "train" else "drop")


def _tokenize(cfg: ConfigDict, pairs: list[Any], load_report: Any, split: str, tokenizer: Any) -> tuple[Any, str]:
  d = cfg.data
  tok, tok_report = data.tokenize_pairs(pairs, tokenizer, max_length=d.max_length,
                                        max_prompt_length=d.max_prompt_length, truncation=d.truncation,
                                        on_error=d.on_error, num_workers=d.num_workers)
  both = data.DataReport()
  both.merge(load_report)  # one count of what loading and tokenizing skipped, altered, left out
  both.merge(tok_report)
  units = f" from {tok.n_units} ranked records (batch_size counts records)" if tok.units is not None else ""
  return tok, f"{len(tok)} {split} pairs{units} ({both.summary()})"


def _eval_pairs(cfg: ConfigDict, train_pairs: list[Any]) -> tuple[list[Any], Any]:
  """data.eval, else the train specs' test split without the pairs training sees (data without a
  split of its own would otherwise be evaluated on its training pairs); HALOs' seeded subset."""
  pairs, report = _load(cfg, list(cfg.data.eval) or list(cfg.data.train), "test")
  if not cfg.data.eval:
    seen = {p.source for p in train_pairs}
    pairs = [p for p in pairs if p.source not in seen]
    if not pairs:
      raise JbtError("the train data has no test split and no held-out fraction")
  n = cfg.data.eval_pairs
  if 0 < n < len(pairs):
    keep = np.sort(np.random.default_rng(cfg.train.seed).permutation(len(pairs))[:n])
    pairs = [pairs[i] for i in keep]
  return pairs, report


def check_specs(cfg: ConfigDict) -> None:
  """A data spec that matches nothing fails before the model loads."""
  for spec in (*cfg.data.train, *cfg.data.eval):
    data.resolve_spec(spec)


def datasets(cfg: ConfigDict, tokenizer: Any) -> Data:
  """The tokenized train pairs and, unless cfg.train.eval_every < 0, the eval pairs."""
  train_pairs, report = _load(cfg, list(cfg.data.train), "train")
  train_tok, msg = _tokenize(cfg, train_pairs, report, "train", tokenizer)
  messages = [f"data: {msg}"]
  if cfg.loss.get("margin_from_data", False):
    n = 0 if train_tok.margins is None else int(np.sum(~np.isnan(train_tok.margins)))
    messages.append(f"margins from data: {n} of {len(train_tok)} train pairs carry one"
                    + ("" if n == len(train_tok) else f"; the other {len(train_tok) - n} train with loss.margin "
                       f"({cfg.loss.margin}) alone"))
  eval_tok = None
  if cfg.train.eval_every >= 0:
    try:
      eval_tok, msg = _tokenize(cfg, *_eval_pairs(cfg, train_pairs), "test", tokenizer)
      messages.append(f"eval: {msg}")
    except JbtError as e:
      if cfg.data.eval:
        raise
      messages.append(f"eval: none ({e}); set data.eval or data.eval_fraction to evaluate")
  return Data(train_tok, eval_tok, messages)


def count_updates(cfg: ConfigDict, n_train: int) -> int:
  """Optimizer steps of the run: epochs over the train units (pairs, or ranked records: n_train is
  TokenizedPairs.n_units), capped (or set) by max_steps."""
  accum = cfg.opt.grad_accum
  micro_per_epoch = data.batches_per_epoch(n_train, cfg.train.batch_size // accum)
  updates = (micro_per_epoch * max(cfg.train.epochs, 1)) // accum
  if cfg.train.max_steps > 0:
    updates = min(updates, cfg.train.max_steps) if cfg.train.epochs > 0 else cfg.train.max_steps
  if updates <= 0:
    raise JbtError(f"{n_train} train units (pairs, or ranked records) make no optimizer step of "
                   f"{cfg.train.batch_size}")
  return updates
