"""Opening a Hugging Face model (directory or GGUF: config, tensors, tokenizer) and writing one."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from jbt.atomic import atomic_dir, atomic_file, cache_dir
from jbt.errors import JbtError
from jbt.hf import families
from jbt.hf.config import hf_config_for_export, is_seq_cls, model_config_from_hf
from jbt.hf.params import to_hf_state_dict
from jbt.hf.sources import TensorSource, find_gguf, gguf_source, open_source, weight_files
from jbt.model import ModelConfig


def tokenizer_cache_dir(gguf: Path) -> Path:
  """Where the tokenizer of a GGUF file is kept once converted: transformers parses every string of
  the file to build it (about 7 s for SmolLM2's), a saved copy loads in well under a second. Keyed
  by the file's name, size and modification time; $JBT_CACHE or $XDG_CACHE_HOME/jbt (~/.cache/jbt)."""
  st = gguf.stat()
  return cache_dir() / "gguf_tokenizers" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


@contextlib.contextmanager
def gguf_metadata_read_once() -> Iterator[None]:
  """Inside: transformers' GGUF metadata reads (its tokenizer and its config each parse the whole
  file's metadata, vocabulary included, in Python: about 14 s for Gemma 3's 262k tokens) share
  one parse per file. The weights' read, which needs the tensors, still parses on its own."""
  try:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
  except ImportError:
    yield
    return
  original = gguf_utils.load_gguf_checkpoint
  parsed: dict[str, Any] = {}

  def once(path: Any, return_tensors: bool = False, **kw: Any) -> Any:
    if return_tensors or kw:
      return original(path, return_tensors=return_tensors, **kw)
    if str(path) not in parsed:
      parsed[str(path)] = original(path, return_tensors=False)
    return copy.deepcopy(parsed[str(path)])  # callers may edit what they get

  gguf_utils.load_gguf_checkpoint = once
  try:
    yield
  finally:
    gguf_utils.load_gguf_checkpoint = original


def load_gguf_config(gguf: Path) -> Any:
  """The transformers config of a GGUF file, kept beside its converted tokenizer
  (tokenizer_cache_dir): reading it from the file parses all of the file's metadata, the
  vocabulary included (about 14 s for Gemma 3's 262k tokens), once per read."""
  import transformers

  kept = tokenizer_cache_dir(gguf) / "gguf_config.json"
  if kept.is_file():
    try:
      return transformers.AutoConfig.for_model(**json.loads(kept.read_text()))
    except (ValueError, KeyError, TypeError):
      pass  # damaged or from another transformers: read the file again
  try:
    config = transformers.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  except Exception as e:
    raise JbtError(f"{gguf}: cannot read the GGUF config ({type(e).__name__}: {e})") from None
  try:
    with atomic_file(kept) as f:
      f.write(config.to_json_string())
  except (OSError, JbtError):
    pass  # a cache that cannot be written only costs the parse next time
  return config


def load_tokenizer(path: Path, gguf_file: str | None = None) -> Any:
  """The tokenizer of an HF directory, or of the GGUF file `gguf_file` in directory `path` (from
  tokenizer_cache_dir when converted before; converted and saved there otherwise)."""
  import transformers

  cached = tokenizer_cache_dir(Path(path) / gguf_file) if gguf_file else None
  try:
    if cached is not None and (cached / "tokenizer_config.json").is_file():
      return transformers.AutoTokenizer.from_pretrained(str(cached))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
  except Exception as e:
    raise JbtError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if cached is not None:
    try:
      with atomic_dir(cached, overwrite=True) as tmp:
        tokenizer.save_pretrained(str(tmp))
    except (OSError, JbtError):
      pass  # a cache that cannot be written only costs the conversion next time
  return tokenizer


def align_pad(tokenizer: Any, cfg: ModelConfig, where: str) -> Any:
  """Make the tokenizer pad with the model's pad_token_id, the id transformers pools around."""
  if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
    raise JbtError(f"{where}: the tokenizer has neither a pad token nor an eos token; add one")
  if tokenizer.pad_token_id != cfg.pad_token_id:
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(cfg.pad_token_id)
  return tokenizer


def read_hf(
    path: str | Path, *, num_labels: int | None = None, **overrides: Any
) -> tuple[ModelConfig, TensorSource, dict[str, Any], Any, bool]:
  """Opens an HF directory or GGUF file: (model config, tensor source, HF config dict, tokenizer,
  whether it carries a reward head). Nothing is loaded onto a device here.

  num_labels sizes a fresh head; a checkpoint's own head keeps its size (change_head converts).
  """
  import transformers

  path = Path(path)
  if not path.exists():
    raise JbtError(f"{path}: no such file or directory")
  gguf = find_gguf(path)
  if gguf is not None:
    with gguf_metadata_read_once():
      tokenizer = load_tokenizer(gguf.parent, gguf.name)  # first: its cache directory is written whole
      hf_config = load_gguf_config(gguf)
    hf_cfg = hf_config.to_dict()
    cfg = model_config_from_hf(hf_cfg, num_labels=num_labels, **overrides)
    source = gguf_source(gguf, hf_config)
    has_head = False
  elif path.is_dir():
    if not (path / "config.json").exists():
      raise JbtError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
      hf_cfg = json.loads((path / "config.json").read_text())
    except ValueError as e:
      raise JbtError(f"{path / 'config.json'}: invalid JSON ({e})") from None
    hf_cfg = transformers.AutoConfig.for_model(**hf_cfg).to_dict() if hf_cfg.get("model_type") in (
        families.FAMILIES) else hf_cfg
    has_head = is_seq_cls(hf_cfg)
    cfg = model_config_from_hf(hf_cfg, num_labels=num_labels if not has_head else None, **overrides)
    tokenizer = load_tokenizer(path)
    kind, files = weight_files(path)
    source = open_source(files, kind)
  else:
    raise JbtError(f"{path}: expected a Hugging Face model directory or a .gguf file")
  tokenizer = align_pad(tokenizer, cfg, str(path))
  return cfg, source, hf_cfg, tokenizer, has_head


def write_hf_dir(
    cfg: ModelConfig,
    params: Any,
    out_dir: Path,
    *,
    base_config: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
  """Writes config.json, model.safetensors (sharded with an index past max_shard_bytes) and the
  tokenizer into out_dir (which the caller makes and later moves into place)."""
  from safetensors.numpy import save_file

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  state = to_hf_state_dict(cfg, params)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k, v in state.items():
    if size and size + v.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = v
    size += v.nbytes
  if len(shards) == 1:
    save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for n, shard in enumerate(shards, 1):
      name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(out_dir / name), metadata={"format": "pt"})
      weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in state.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
  (out_dir / "config.json").write_text(json.dumps(hf_config_for_export(cfg, base_config), indent=2, sort_keys=True))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(out_dir))
