"""Every config file loads, carries the stable keys, and documents its command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from jbt import configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / f"{name}.py" for name in configs.names()]
STABLE = ["model.init_from", "model.num_labels", "model.dtype", "data.train", "data.eval", "data.max_length",
          "data.max_prompt_length", "data.truncation", "data.layout", "data.on_error", "train.batch_size",
          "train.epochs", "train.max_steps", "train.eval_every", "train.seed", "opt.lr", "opt.warmup_ratio",
          "opt.weight_decay", "opt.clip", "opt.grad_accum", "mesh", "ckpt.cache_dir", "ckpt.exp_name",
          "ckpt.save_every", "ckpt.keep"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_stable_keys(path):
  spec = importlib.util.spec_from_file_location(f"c_{path.stem}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  for key in STABLE:
    node = cfg
    for part in key.split("."):
      assert part in node, f"{path.name}: missing {key}"
      node = node[part]
  assert "python -m jbt.train --config configs/" in (mod.__doc__ or ""), f"{path.name}: docstring lacks its command"
  from jbt.train.setup import validate

  validate(cfg)


def test_default_has_halos_defaults():
  spec = importlib.util.spec_from_file_location("c_default", ROOT / "configs" / "default.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert (c.opt.lr, c.train.batch_size, c.opt.grad_accum, c.train.epochs) == (5e-6, 32, 1, 1)
  assert (c.opt.warmup_ratio, c.opt.warmup_start, c.opt.weight_decay, c.opt.clip) == (0.1, 0.1, 0.01, 1.0)
  assert (c.opt.b1, c.opt.b2, c.opt.eps) == (0.9, 0.999, 1e-8)
  assert (c.data.max_length, c.data.max_prompt_length, c.train.eval_every, c.data.eval_pairs) == (1250, 625, 1024, 256)
  assert (c.train.seed, c.ckpt.cache_dir, c.model.num_labels) == (1, ".cache", 2)


def test_a_bad_fused_update_mode_is_a_one_line_config_error():
  from jbt.errors import JbtError
  from jbt.train.setup import validate

  spec = importlib.util.spec_from_file_location("c_default2", ROOT / "configs" / "default.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert c.opt.fused_update == "auto"
  c.opt.fused_update = "on"
  with pytest.raises(JbtError, match="opt.fused_update must be one of auto, off, got 'on'"):
    validate(c)
