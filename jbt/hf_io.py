"""Reading Hugging Face checkpoints (directories, shards, .bin, GGUF) and writing HF directories.

The parameter mapping itself lives in jbt.hf; this module only finds, opens and writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

from jbt.errors import JbtError
from jbt.hf import TensorSource, hf_config_for_export, model_config_from_hf, to_hf_state_dict
from jbt.model import ModelConfig


class DictSource(TensorSource):
  """Tensors already in memory (a GGUF file dequantised by transformers, or a test's state dict)."""

  def __init__(self, tensors: Mapping[str, Any]):
    self._t = dict(tensors)

  def keys(self) -> set[str]:
    return set(self._t)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._t[key].shape)

  def get(self, key: str) -> np.ndarray:
    return _to_numpy_f32(self._t[key])


class SafetensorsSource(TensorSource):
  """One or more .safetensors files, memory-mapped; each tensor read only when asked for."""

  def __init__(self, files: Iterable[Path]):
    from safetensors import safe_open

    self._where: dict[str, Any] = {}
    self._handles = []
    for f in files:
      h = safe_open(str(f), framework="pt")
      self._handles.append(h)
      for k in h.keys():
        self._where[k] = h

  def keys(self) -> set[str]:
    return set(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key].get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    return _to_numpy_f32(self._where[key].get_tensor(key))


class TorchBinSource(DictSource):
  """pytorch_model*.bin shards, loaded memory-mapped with weights_only=True."""

  def __init__(self, files: Iterable[Path]):
    import torch

    tensors: dict[str, Any] = {}
    for f in files:  # memory-mapped: a tensor is read from disk only when asked for
      tensors.update(torch.load(str(f), map_location="cpu", mmap=True, weights_only=True))
    super().__init__(tensors)


def _to_numpy_f32(t: Any) -> np.ndarray:
  if hasattr(t, "detach"):  # torch tensor: bf16 has no numpy dtype, upcast in torch (exact)
    import torch

    return t.detach().to(torch.float32).cpu().numpy()
  return np.asarray(t, dtype=np.float32)

# ---------------------------------------------------------------------------------------------
# Finding and opening a checkpoint


@contextlib.contextmanager
def atomic_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary sibling of `out`; on success it is renamed to `out`, on failure removed.

  A kill at any moment leaves either the old `out` or the new one, never a half-written one.
  """
  out = Path(out).absolute()
  nonempty = out.is_file() or (out.is_dir() and any(out.iterdir()))
  if nonempty and not overwrite:
    raise JbtError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
    if out.exists():
      trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
      os.replace(out, trash / "old")
      os.replace(tmp, out)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _weight_files(d: Path) -> tuple[str, list[Path]]:
  for index, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
    if (d / index).exists():
      try:
        weight_map = json.loads((d / index).read_text())["weight_map"]
      except (ValueError, KeyError) as e:
        raise JbtError(f"{d / index}: not a valid shard index ({e})") from None
      files = [d / f for f in sorted(set(weight_map.values()))]
      missing = [str(f) for f in files if not f.exists()]
      if missing:
        raise JbtError(f"{d / index} names shards that are missing: {', '.join(missing[:3])}")
      return kind, files
  st = sorted(d.glob("*.safetensors"))
  if st:
    return "safetensors", st
  bins = sorted(d.glob("pytorch_model*.bin"))
  if bins:
    return "bin", bins
  raise JbtError(f"{d}: no weights found (model.safetensors, sharded safetensors or pytorch_model.bin)")


def open_source(files: list[Path], kind: str) -> TensorSource:
  try:
    return SafetensorsSource(files) if kind == "safetensors" else TorchBinSource(files)
  except JbtError:
    raise
  except Exception as e:  # corrupt or truncated file: name it
    raise JbtError(f"cannot read weights from {', '.join(str(f) for f in files[:3])}: {type(e).__name__}: {e}") from None


def find_gguf(path: Path) -> Path | None:
  if path.is_file() and path.suffix == ".gguf":
    return path
  return None


def load_tokenizer(path: Path, gguf_file: str | None = None) -> Any:
  import transformers

  try:
    return transformers.AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
  except Exception as e:
    raise JbtError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


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
    try:
      hf_cfg = transformers.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
    except Exception as e:
      raise JbtError(f"{gguf}: cannot read the GGUF config ({type(e).__name__}: {e})") from None
    cfg = model_config_from_hf(hf_cfg, num_labels=num_labels, **overrides)
    tokenizer = load_tokenizer(gguf.parent, gguf.name)
    source = _gguf_source(gguf)
    has_head = False
  elif path.is_dir():
    if not (path / "config.json").exists():
      raise JbtError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
      hf_cfg = json.loads((path / "config.json").read_text())
    except ValueError as e:
      raise JbtError(f"{path / 'config.json'}: invalid JSON ({e})") from None
    hf_cfg = transformers.AutoConfig.for_model(**hf_cfg).to_dict() if hf_cfg.get("model_type") in (
        "llama", "mistral", "qwen2", "qwen3") else hf_cfg
    has_head = any(a.endswith("ForSequenceClassification") for a in hf_cfg.get("architectures") or [])
    cfg = model_config_from_hf(hf_cfg, num_labels=num_labels if not has_head else None, **overrides)
    tokenizer = load_tokenizer(path)
    kind, files = _weight_files(path)
    source = open_source(files, kind)
  else:
    raise JbtError(f"{path}: expected a Hugging Face model directory or a .gguf file")
  tokenizer = align_pad(tokenizer, cfg, str(path))
  return cfg, source, hf_cfg, tokenizer, has_head


def _gguf_source(gguf: Path) -> TensorSource:
  """GGUF tensors are quantised: transformers dequantises them to float32 on the host."""
  import torch
  import transformers

  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
  except Exception as e:
    raise JbtError(f"{gguf}: cannot load GGUF weights ({type(e).__name__}: {e})") from None
  state = {k: v for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  return DictSource(state)


def change_head(cfg: ModelConfig, params: Any, num_labels: int) -> tuple[ModelConfig, Any]:
  """Re-shapes the reward head so the reward logit is unchanged (2 -> 1: keep logit 1's row;
  1 -> 2: the reward becomes logit 1, logit 0 is zero, as HALOs reads it)."""
  if num_labels == cfg.num_labels:
    return cfg, params
  w = np.asarray(jax.device_get(params["score"]))[:, cfg.reward_label]
  new = np.zeros((w.shape[0], num_labels), np.float32)
  new[:, 1 if num_labels == 2 else 0] = w
  return cfg.replace(num_labels=num_labels), {**params, "score": jax.numpy.asarray(new)}


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
