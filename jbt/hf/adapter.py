"""A run's LoRA adapters as a PEFT adapter directory (adapter_config.json, adapter_model.safetensors).

    peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), DIR)

rebuilds the trained reward model: the base weights are those the run froze, the adapters and
the reward head (PEFT's modules_to_save) come from DIR. Key names are PEFT's own: jbt's
`layers/attn/q_lora_a` [layers, D, R] is `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[R, in] per layer, `..._lora_b` [layers, R, out...] is `lora_B.weight` [out, R].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jbt.errors import JbtError
from jbt.hf import families
from jbt.model import ModelConfig

HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PREFIX = "base_model.model."


def _module(name: str) -> str:
  return "attn" if name in ("q", "k", "v", "o") else "mlp"


def adapter_state_dict(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
  """PEFT's adapter_model.safetensors tensors (float32, host) of jbt params with adapters."""
  if not cfg.lora_rank:
    raise JbtError("a PEFT adapter needs a model with LoRA adapters (lora.rank > 0)")
  if families.get(cfg.family).rows is not None:
    raise JbtError(f"PEFT adapter export supports families with separate q/k/v and gate/up projections, "
                   f"not {cfg.family}; use the merged FINAL/")
  host = lambda x: np.asarray(jax.device_get(x), np.float32)  # noqa: E731
  R = cfg.lora_rank
  out: dict[str, np.ndarray] = {}
  for name in cfg.lora_targets:
    for i in range(cfg.num_layers):
      node = params["layers"][_module(name)] if cfg.scan_layers else params[f"layer_{i}"][_module(name)]
      a, b = host(node[f"{name}_lora_a"]), host(node[f"{name}_lora_b"])
      if cfg.scan_layers:
        a, b = a[i], b[i]
      key = f"{PREFIX}model.layers.{i}.{HF_MODULES[name]}"
      out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, R).T)  # [R, in]
      out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.reshape(R, -1).T)  # [out, R]
  out[f"{PREFIX}score.weight"] = np.ascontiguousarray(host(params["score"]).T)  # [labels, D]
  return out


def adapter_config(cfg: ModelConfig, base: str | None) -> dict[str, Any]:
  """adapter_config.json: PEFT fills the fields left out with its defaults."""
  return {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
          "lora_dropout": 0.0, "use_rslora": cfg.lora_rslora, "bias": "none", "fan_in_fan_out": False,
          "target_modules": sorted(HF_MODULES[n].split(".")[-1] for n in cfg.lora_targets),
          "modules_to_save": ["score"], "base_model_name_or_path": base, "inference_mode": True,
          "init_lora_weights": True}


def write_adapter_dir(cfg: ModelConfig, params: Any, out_dir: Path, *, base: str | None) -> None:
  """Writes the PEFT adapter files into out_dir (which the caller makes and moves into place)."""
  from safetensors.numpy import save_file

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  save_file(adapter_state_dict(cfg, params), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
  (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config(cfg, base), indent=2, sort_keys=True))
