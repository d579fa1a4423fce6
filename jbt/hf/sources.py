"""Read-only access to the tensors of Hugging Face checkpoints, one tensor at a time, as float32
numpy arrays: safetensors (single or sharded), pytorch_model*.bin, or GGUF (dequantised by
transformers on the host)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from jbt.errors import JbtError


class TensorSource:
  """Read-only access to named HF tensors, one at a time, as float32 numpy arrays."""

  def keys(self) -> set[str]:
    raise NotImplementedError

  def shape(self, key: str) -> tuple[int, ...]:
    raise NotImplementedError

  def get(self, key: str) -> np.ndarray:
    raise NotImplementedError


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


def weight_files(d: Path) -> tuple[str, list[Path]]:
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


def gguf_source(gguf: Path, config: Any = None) -> TensorSource:
  """GGUF tensors are quantised: transformers dequantises them to float32 on the host. `config`:
  the file's transformers config, if already read (each read parses the whole file's metadata,
  seconds for a 262k-token vocabulary)."""
  import torch
  import transformers

  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, config=config,
                                                              dtype=torch.float32)
  except Exception as e:
    raise JbtError(f"{gguf}: cannot load GGUF weights ({type(e).__name__}: {e})") from None
  state = {k: v for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  return DictSource(state)
