"""A training run in three stages: set up, loop, finish.

    run(cfg) -> summary
      setup   config checks, mesh, model, data, optimizer, train state (restored when resuming)
      loop    one jitted step per micro-batch; metrics, evaluations and checkpoints on schedule
      finish  the last checkpoint and evaluation, final/ (jbt) and FINAL/ (Hugging Face)

Writes {cache_dir}/{exp_name}/: checkpoints/, metrics.jsonl, tb/, config.json, final/, FINAL/
(FINAL_adapter/ with ckpt.export_adapter) and summary.json. Re-running the same command resumes
from the newest checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from jbt.atomic import atomic_dir
from jbt.checkpoint import model_dir
from jbt.checkpoint.load import resolve_model_path
from jbt.checkpoint.run import RunCheckpoints, RunLock, is_remote, reconcile, run_path
from jbt.data import ensure_chat_template, max_responses
from jbt.errors import Interrupted, JbtError
from jbt.hf.adapter import write_adapter_dir
from jbt.model.attention import BLOCK_SPARSE
from jbt.runtime import host_memory
from jbt.runtime import mesh as mesh_lib
from jbt.runtime import trace
from jbt.runtime.distributed import enable_compilation_cache, is_primary, maybe_init_distributed
from jbt.tools import normalization
from jbt.tools.convert import export_hf
from jbt.train import fused_update, optim, setup, trainable
from jbt.train.batches import Batches
from jbt.train.compiler import StepCompiler
from jbt.train.evaluation import Evaluator
from jbt.train.metrics import MetricsWriter
from jbt.train.state import abstract_state, init_state
from jbt.train.step import jit_train_step
from jbt.train.stopping import StopRequests
from jbt.train.throughput import Throughput


ADAPTER_DIR = "FINAL_adapter"  # ckpt.export_adapter: the PEFT adapter of a LoRA run


def log(msg: str) -> None:
  if is_primary():
    print(msg, flush=True)


def run(cfg: ConfigDict) -> dict[str, Any]:
  """Trains (or resumes) per cfg; returns the last train and eval metrics."""
  setup.validate(cfg)
  maybe_init_distributed(cfg)
  enable_compilation_cache(cfg)
  run_dir = run_path(cfg.ckpt.cache_dir) / cfg.ckpt.exp_name
  # flock needs a local filesystem; a remote run directory relies on one job per exp_name.
  lock = RunLock(run_dir).acquire() if is_primary() and not is_remote(run_dir) else None
  try:
    if reconcile(cfg, run_dir, cfg.ckpt.get("resume", "auto")) == "moved" and lock is not None:
      lock.release()  # its file went aside with the old run
      lock = RunLock(run_dir).acquire()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("jbt_run_reconciled")
    with StopRequests() as stops:
      trainer = Trainer(cfg, run_dir, stops)
      try:
        trainer.loop()
      except Interrupted:
        trainer.writer.close()
        trainer.ckpts.close()
        raise
      finally:
        trainer.close()
      return trainer.finish()
  finally:
    if lock is not None:
      lock.release()


def disk_usage(run_dir: Any) -> str:
  """One line: what a run directory holds on disk, by part (checkpoints hold optimizer state too)."""
  def size(p: Any) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0

  parts = {name: size(run_dir / name) for name in ("checkpoints", "final", "FINAL")}
  total = size(run_dir)
  gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
  return (f"{run_dir} takes {gib(total)}: " + ", ".join(f"{k}/ {gib(v)}" for k, v in parts.items())
          + "; FINAL/ is the model to use, checkpoints/ only resume the run (remove them when done)")


class Trainer:
  """One run's state between the stages: __init__ sets up, loop() trains, finish() exports."""

  def __init__(self, cfg: ConfigDict, run_dir: Any, stops: StopRequests | None = None):
    self.cfg, self.run_dir, self.t_start = cfg, run_dir, time.time()
    self.stops = stops or StopRequests()
    self.memory_handbacks = 0  # updates after which kept host memory went back (host_memory.relieve)
    setup.check_specs(cfg)
    self.mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    setup.check_mesh_batch(cfg, self.mesh)
    self.rules = tuple(tuple(r) for r in cfg.mesh.rules)
    loaded = setup.model(cfg, lambda mc: mesh_lib.model_shardings(mc, self.mesh, self.rules))
    self.model_cfg, self.hf_cfg, self.tokenizer = loaded.cfg, loaded.hf_config, loaded.tokenizer
    ensure_chat_template(self.tokenizer)
    mc = self.model_cfg
    log(f"model: {mc.family}, {mc.num_layers} layers, {mc.num_params() / 1e6:.1f}M parameters, {mc.dtype} compute, "
        f"{mc.attention} attention, {mc.matmul} matmuls, mesh {dict(self.mesh.shape)} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices")
    ds = setup.datasets(cfg, self.tokenizer)
    for line in ds.messages:
      log(line)
    self.train_tok, self.eval_tok = ds.train, ds.eval
    self.accum = cfg.opt.grad_accum
    self.updates = setup.count_updates(cfg, self.train_tok.n_units)
    branches = max(max_responses(t) for t in (self.train_tok, self.eval_tok) if t is not None)
    if cfg.data.layout == "shared_prompt" and branches > mc.branches:  # fused kernels: one call per branch
      self.model_cfg = mc = mc.replace(branches=branches)
    self.tx, self.lr_fn = optim.make_optimizer(cfg.opt, self.updates)
    self.mask = trainable.trainable_mask(mc, cfg.train.get("freeze", ()))
    with jax.set_mesh(self.mesh):
      self.state, self.state_sh = init_state(mc, self.tx, self.mesh, self.rules, seed=cfg.train.seed,
                                             params=loaded.params, mask=self.mask,
                                             frozen_dtype=cfg.train.get("frozen_dtype", "float32"))
    del loaded
    frozen_rows = trainable.frozen_rows(mc, cfg.train.get("freeze", ()))
    log(trainable.describe(mc, self.mask, self.state, frozen_rows))
    if fused_update.plan(cfg.opt, self.lr_fn, self.mesh.size, frozen_rows):
      log("optimizer: gradient clipping and AdamW as one compiled CPU pass (opt.fused_update)")
    self.ckpts = RunCheckpoints(self.run_dir, keep=cfg.ckpt.keep, async_save=cfg.ckpt.async_save)
    self.examples = 0  # pairs trained on: counters/examples, and the eval schedule's clock
    self.tokens = 0
    self.data_state: dict[str, Any] | None = None
    restored = self.ckpts.restore_latest(abstract_state(self._saved(self.state), self._saved(self.state_sh)))
    if restored is not None:
      step, saved, self.data_state, progress = restored
      frozen = trainable.split(self.state.params, self.mask)[1]  # as loaded (or drawn) above: never changed
      self.state = saved.replace(params=trainable.merge(self.mask, saved.params, frozen))
      self.examples, self.tokens = int(progress["examples"]), int(progress.get("tokens", 0))
      log(f"resumed from {self.ckpts.dir / str(step)} (update {step // self.accum} of {self.updates})")
    self.micro_done = int(jax.device_get(self.state.step))
    if is_primary():
      self.run_dir.mkdir(parents=True, exist_ok=True)
      (self.run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    self.writer = MetricsWriter(self.run_dir, resume_step=self.micro_done // self.accum,
                                tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                                config=cfg.to_dict(), enabled=is_primary())
    self._build_steps()
    self.profile_steps = trace.parse_steps(cfg.train.get("profile", ""))  # train.profile, checked by setup.validate
    self.last: dict[str, Any] = {}
    self.eval_last: dict[str, Any] = {}

  def _build_steps(self) -> None:
    cfg, mc = self.cfg, self.model_cfg
    self.batches = Batches(cfg, self.mesh, mc.pad_token_id, flash=mc.attention in BLOCK_SPARSE)
    self.train_step = StepCompiler(jit_train_step(cfg, mc, self.tx, self.lr_fn, self.mesh, self.rules, self.state_sh),
                                   self.mesh)
    self.evaluator = Evaluator(cfg, self.mesh, self.rules, mc, self.state_sh.params)

  # -- evaluation ------------------------------------------------------------------------------

  def evaluate(self) -> dict[str, float]:
    return self.evaluator(self.state.params, self.eval_tok)

  def _write_eval(self, update: int) -> None:
    self.eval_last = self.writer.write(update, self.evaluate())

  # -- the loop --------------------------------------------------------------------------------

  def _read_ahead(self) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The next batch, placed on the mesh, its shape compiling in the background if it is new."""
    batch, stats = self.batches.place(next(self.iterator))
    self.train_step.prepare(self.state, batch)
    return batch, stats

  def loop(self) -> None:
    """Trains from the restored (or initial) state to the last optimizer step. One batch of
    lookahead: the next batch is placed, and a new shape compiled, while the current step (or
    the first evaluation) runs."""
    cfg, accum, total = self.cfg, self.accum, self.updates * self.accum
    self.iterator = self.batches.iterator(self.train_tok, batch_size=cfg.train.batch_size // accum, epochs=None,
                                          seed=cfg.train.seed)
    if self.data_state is not None:
      self.iterator.set_state(self.data_state)
    # The data position a checkpoint records: right after the batch being trained (the iterator
    # itself is one batch ahead).
    self.data_state = self.iterator.get_state()
    ahead = self._read_ahead() if self.micro_done < total else None
    if self.micro_done == 0 and self.eval_tok is not None:
      self._write_eval(0)
      log(f"eval before training: accuracy {self.eval_last['rewards_eval/accuracies']:.3f}, "
          f"loss {self.eval_last['loss/eval']:.4f}")
    self.progress = self._progress_bar()
    self.throughput = Throughput(self.model_cfg)
    pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
    compile_s = 0.0  # seconds the current update waited for compilation (new batch shapes)
    first_runs = self.train_step.first_runs  # before the current update's micro-batches
    self.stops.in_loop = True
    with jax.set_mesh(self.mesh):
      for micro in range(self.micro_done, total):
        batch, stats = ahead
        self.data_state = self.iterator.get_state()
        self._profile(micro, batch, start=True)
        self.state, metrics, waited = self.train_step(self.state, batch)
        self._profile(micro, batch, start=False)
        if micro + 1 < total:
          ahead = self._read_ahead()
        compile_s += waited
        pending.append((metrics, stats))
        if (micro + 1) % accum == 0:
          self._end_update((micro + 1) // accum, pending, compile_s, self.train_step.first_runs - first_runs)
          pending, compile_s, first_runs = [], 0.0, self.train_step.first_runs
          if micro + 1 < total and self.stops.requested():
            self._stop((micro + 1) // accum)
    self.stops.in_loop = False
    if self.progress is not None:
      self.progress.close()

  def _profile(self, micro: int, batch: dict[str, jax.Array], start: bool) -> None:
    """train.profile "A:B": the JAX profiler traces optimizer steps A..B-1 into {run dir}/profile,
    with the traced steps' optimized HLO (for scripts/profile_step.py --report)."""
    steps = self.profile_steps
    if steps is None:
      return
    first, end = ((s - 1) * self.accum for s in steps)
    out = self.run_dir / "profile"
    if start and micro == first:
      jax.block_until_ready(self.state)
      out.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(out), create_perfetto_trace=True, profiler_options=trace.options())
      self._profiled = []
    elif not start and first <= micro < end:
      self._profiled.append(batch)
      if micro + 1 == end or micro + 1 == self.updates * self.accum:
        jax.block_until_ready(self.state)
        jax.profiler.stop_trace()
        texts = {self.train_step.compiled_text(b) for b in self._profiled}
        for i, text in enumerate(sorted(texts) if is_primary() else []):
          (out / f"train_step_{i}.{trace.HLO_FILE}").write_text(text)
        log(f"profile of steps {steps[0]}..{min(steps[1], self.updates + 1) - 1} in {out}: "
            f"python scripts/profile_step.py --report {out}")

  def _stop(self, update: int) -> None:
    """Saves the state after `update` (unless save_every just did), waits for it, and raises."""
    self.stops.in_loop = False  # a further signal exits at once
    if self.progress is not None:
      self.progress.close()
    if update * self.accum not in self.ckpts.steps():
      self._save(update * self.accum)
    self.ckpts.wait()
    name = signal.Signals(self.stops.signal).name if self.stops.signal else "a stop request on another process"
    raise Interrupted(f"{name}: stopped at step {update} of {self.updates}; checkpoint saved in "
                      f"{self.ckpts.dir / str(update * self.accum)}; re-run the same command to resume")

  def _progress_bar(self) -> Any:
    if not (self.cfg.log.progress and is_primary()):
      return None
    from tqdm import tqdm

    return tqdm(total=self.updates, initial=self.micro_done // self.accum, desc="train", unit="step",
                dynamic_ncols=True, file=sys.stdout, mininterval=1.0)

  def _update_metrics(self, update: int, pending: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Means of the micro-steps' device metrics, host counters and throughput; stops on NaN."""
    host = [(jax.device_get(m), s) for m, s in pending]
    out = {k: sum(float(m[k]) for m, _ in host) / len(host) for k in host[0][0] if k != "n_pairs"}
    for k in ("loss/train", "grad_norm"):
      if not math.isfinite(out[k]):
        self.ckpts.wait()
        good = max(self.ckpts.steps(), default=None)
        raise JbtError(f"non-finite {k} ({out[k]}) at step {update}: stopping; last good checkpoint: "
                       + (f"{self.ckpts.dir / str(good)}" if good is not None else "none (nothing saved)"))
    pairs = int(sum(float(s["n_pairs"]) for _, s in host))
    tokens = int(sum(float(s["n_tokens"]) for _, s in host))
    self.examples += pairs
    self.tokens += tokens
    out.update({"counters/examples": self.examples, "counters/updates": update})
    out.update(self.throughput.update(pairs, tokens))
    return out

  def _end_update(self, update: int, pending: list[tuple[dict[str, Any], dict[str, Any]]], compile_s: float,
                  new_shapes: int) -> None:
    cfg = self.cfg
    before = self.examples
    self.last = self._update_metrics(update, pending)
    self.last["perf/compile_seconds"] = compile_s  # included in this update's wall time
    self.last["perf/new_shapes"] = new_shapes  # micro-batches whose shape ran for the first time
    if update % cfg.train.log_every == 0 or update == self.updates:
      self.writer.write(update, self.last)
    if self.progress is not None:
      self.progress.set_postfix(loss=f"{self.last['loss/train']:.4f}",
                                acc=f"{self.last['rewards_train/accuracies']:.2f}")
      self.progress.update(1)
    every = cfg.train.eval_every
    if self.eval_tok is not None and every > 0 and update < self.updates and self.examples // every > before // every:
      self._write_eval(update)
      self.throughput.restart()
    if cfg.ckpt.save_every > 0 and update % cfg.ckpt.save_every == 0 and update < self.updates:
      self._save(update * self.accum)
    if host_memory.relieve():  # the machine is short of memory: kept freed memory goes back to it
      self.memory_handbacks += 1
      if self.memory_handbacks == 1:
        log(f"host memory is short (less than 1/{host_memory.TIGHT} available): memory freed by the steps goes "
            "back to the system after every update while it stays short (JBT_KEEP_MEMORY=0 never keeps it)")

  def _saved(self, state: Any) -> Any:
    """What a checkpoint holds of a TrainState (or of its shardings): the trainable params and the
    optimizer state. Frozen params never change, so a resume takes them from model.init_from (or
    the seed) as the run's start did: a LoRA checkpoint holds the adapters and head only."""
    return state.replace(params=trainable.split(state.params, self.mask)[0])

  def _save(self, micro: int) -> None:
    progress = {"examples": self.examples, "tokens": self.tokens}
    if not all(jax.tree.leaves(self.mask)):
      progress["frozen_params_from"] = self.cfg.model.init_from  # not in the checkpoint: the base it refers to
    self.ckpts.save(micro, self._saved(self.state), self.data_state, progress)

  def close(self) -> None:
    self.train_step.close()

  # -- finish ----------------------------------------------------------------------------------

  def finish(self) -> dict[str, Any]:
    """The final checkpoint and evaluation, final/ and FINAL/, summary.json; returns the summary."""
    final_step = self.updates * self.accum
    if self.micro_done > final_step:  # resumed (ckpt.resume=force) past a now shorter run
      log(f"the run had already trained {self.micro_done // self.accum} steps, more than the {self.updates} asked "
          "for: nothing to train; exporting the restored parameters")
    elif final_step not in self.ckpts.steps():
      self._save(final_step)
    self.ckpts.wait()
    if self.eval_tok is not None and (self.micro_done < final_step or not self.eval_last):
      self._write_eval(self.updates)
    if self.eval_last:
      e = self.eval_last
      log(f"eval after training: accuracy {e['rewards_eval/accuracies']:.3f}, loss {e['loss/eval']:.4f}, "
          f"margin {e['rewards_eval/margins']:.3f} on {int(e['eval_pairs'])} pairs")
    self._save_final()
    self.writer.close()
    self.ckpts.close()
    summary = {**self.last, **self.eval_last, "compile_seconds": self.train_step.seconds_waited if self.last else None,
               "compiled_shapes": self.train_step.compiled_shapes, "wall_seconds": time.time() - self.t_start}
    if is_primary():
      (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    log(f"done in {summary['wall_seconds']:.0f}s: {self.run_dir / 'FINAL'}")
    if is_primary() and not is_remote(self.run_dir):
      log(disk_usage(self.run_dir))
    return summary

  def _save_final(self) -> None:
    """{run}/final: jbt checkpoint; {run}/FINAL: HF directory. Both appear only when complete."""
    params, mc = self.state.params, self.model_cfg
    # model directories are float32 (train.frozen_dtype may have stored frozen params narrower)
    params = jax.tree.map(lambda x: x if x.dtype == jnp.float32 else x.astype(jnp.float32), params)
    hf_cfg = dict(self.hf_cfg or {})
    hf_cfg.pop(normalization.NORM_KEY, None)  # an imported model's statistics do not hold for this one
    e = self.eval_last
    if e and e.get("eval_pairs") and "rewards_eval/std" in e:  # the final model's rewards on the eval pairs
      hf_cfg[normalization.NORM_KEY] = normalization.record(
          e["rewards_eval/mean"], e["rewards_eval/std"], 2 * e["eval_pairs"],
          f"eval pairs of {self.run_dir.name} at step {self.updates}")
    final = self.run_dir / "final"
    if jax.process_count() == 1:
      with atomic_dir(final, overwrite=True) as tmp:
        model_dir.write_model_meta(tmp, mc, hf_cfg, self.tokenizer)
        model_dir.save_params(tmp / "params", params)
    else:  # every process writes its shards; orbax renames the params into place when complete
      from jax.experimental import multihost_utils

      if is_primary():
        shutil.rmtree(final, ignore_errors=True)
        model_dir.write_model_meta(final, mc, hf_cfg, self.tokenizer)
      multihost_utils.sync_global_devices("jbt_final_meta")
      model_dir.save_params(final / "params", params)
      params = multihost_utils.process_allgather(params, tiled=True)
    if is_primary() and self.cfg.ckpt.export_final:
      export_hf(mc, params, self.run_dir / "FINAL", hf_config=hf_cfg, tokenizer=self.tokenizer, overwrite=True)
    if is_primary() and self.cfg.ckpt.get("export_adapter", False):
      init_from = self.cfg.model.init_from
      base = None if init_from == "random" else str(resolve_model_path(init_from).absolute())
      with atomic_dir(self.run_dir / ADAPTER_DIR, overwrite=True) as tmp:
        write_adapter_dir(mc, params, tmp, base=base)
        if self.tokenizer is not None:
          self.tokenizer.save_pretrained(str(tmp))
      log(f"PEFT adapter: {self.run_dir / ADAPTER_DIR} (base: {base or 'none, a random init; FINAL/ is the model'})")
