"""The model a plan compiles: read from the config's model (config files only, never weights),
or a published shape when the checkpoint is not on this machine.

Shapes are the sizes in the models' published config.json files; the planner needs nothing else
(embedding size, layers, heads, MLP width). Names: llama3-1b (Llama-3.2-1B), llama3-8b
(Llama-3.1-8B / Meta-Llama-3-8B), llama3-70b (Llama-3.1-70B / Meta-Llama-3-70B).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jbt.errors import JbtError

_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, rms_norm_eps=1e-5,
               rope_theta=500000.0, eos_token_id=128009, max_position_embeddings=131072)
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64),
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128),
}


def shape_of_name(spec: str) -> str | None:
  """The SHAPES key a checkpoint's name points at ("/models/Meta-Llama-3-8B-Instruct" -> llama3-8b)."""
  m = re.search(r"llama-?3(?:\.\d)?-(\d+)b", Path(str(spec)).name.lower())
  if m is None:
    return None
  name = f"llama3-{m.group(1)}b"
  return name if name in SHAPES else None


def model_config(cfg: Any, shape: str | None, **runtime: Any) -> tuple[Any, str]:
  """(ModelConfig, where its sizes came from) for cfg.model, with the runtime fields given."""
  from jbt.checkpoint.load import is_jbt_dir, resolve_model_path
  from jbt.checkpoint.model_dir import read_model_meta
  from jbt.hf.config import model_config_from_hf
  from jbt.hf.files import read_hf

  m = cfg.model
  if shape is not None:
    if shape not in SHAPES:
      raise JbtError(f"--shape {shape}: unknown; known shapes: {', '.join(SHAPES)}")
    return model_config_from_hf(SHAPES[shape], num_labels=m.num_labels, **runtime), f"shape {shape}"
  if m.init_from == "random":
    from jbt.train import setup

    return setup.model(cfg, None).cfg.replace(**runtime), "model.random"
  path = resolve_model_path(m.init_from)
  if path.exists():
    if is_jbt_dir(path):
      mc, _ = read_model_meta(path)
      return mc.replace(num_labels=m.num_labels, **runtime), str(path)
    mc = read_hf(path, num_labels=m.num_labels, **runtime)[0]
    return mc, str(path)
  name = shape_of_name(m.init_from)
  if name is None:
    raise JbtError(f"model.init_from {m.init_from}: not on this machine, and its name matches no known shape; "
                   f"give --shape NAME ({', '.join(SHAPES)}) or a local model directory")
  return model_config_from_hf(SHAPES[name], num_labels=m.num_labels, **runtime), f"shape {name} (from the name {m.init_from})"
