"""Train a Bradley-Terry reward model.

    python -m jbt.train --config configs/NAME.py [--config.a.b=value ...]

Writes {cache_dir}/{exp_name}/: checkpoints/, metrics.jsonl, tb/, config.json, final/ (jbt
checkpoint) and FINAL/ (Hugging Face directory). Re-running the same command resumes from the
newest checkpoint.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported: the restart would redo that work
  from jbt import host

  host.restart_with_hugepages()

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from jbt import checkpoint, convert, data, optim, setup, sharding, trainer, xla_options
from jbt.errors import JbtError, cli_main
from jbt.metrics import MetricsWriter
from jbt.run_ckpt import RunCheckpoints, RunLock, is_primary


def log(msg: str) -> None:
  if is_primary():
    print(msg, flush=True)


def _load(cfg: ConfigDict, specs: list[str], split: str) -> tuple[list[Any], Any]:
  d = cfg.data
  return data.load_pairs(list(specs), split=split, on_error=d.on_error, eval_fraction=d.eval_fraction,
                         seed=cfg.train.seed)


def _tokenize(cfg: ConfigDict, pairs: list[Any], report: Any, split: str, tokenizer: Any) -> tuple[Any, str]:
  d = cfg.data
  tok, tok_report = data.tokenize_pairs(pairs, tokenizer, max_length=d.max_length,
                                        max_prompt_length=d.max_prompt_length, truncation=d.truncation,
                                        on_error=d.on_error, num_workers=d.num_workers)
  return tok, f"{len(tok)} {split} pairs ({report.summary()}; {tok_report.summary()})"


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


class Runner:
  """Holds the compiled steps and places host batches on the mesh."""

  def __init__(self, cfg: ConfigDict, model_cfg: Any, mesh: Any, state_shardings: Any, tx: Any, lr_fn: Any):
    self.mesh = mesh
    self.rules = tuple(tuple(r) for r in cfg.mesh.rules)
    self.pad = model_cfg.pad_token_id
    dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    self.rows_multiple = max(dp // jax.process_count(), 1)
    self.flash = model_cfg.attention_impl == "flash"
    # Packed rows hold members of at most max_length tokens; attention skips keys further back.
    max_segment = cfg.data.max_length if cfg.data.layout == "packed" else 0
    batch_sh = jax.sharding.NamedSharding(mesh, trainer.batch_spec(mesh))  # every batch array: rows / pairs split
    step = trainer.make_train_step(model_cfg, tx, lr_fn, margin=cfg.loss.margin, center_coef=cfg.loss.center_coef,
                                   grad_accum=cfg.opt.grad_accum, nan_at_step=cfg.train.get("inject_nan_at_step", -1),
                                   max_segment=max_segment)
    evals = trainer.make_eval_step(model_cfg, margin=cfg.loss.margin, max_segment=max_segment)
    options = xla_options.compiler_options(model_cfg.dtype)
    self.train_step = jax.jit(self._ruled(step), in_shardings=(state_shardings, batch_sh),
                              out_shardings=(state_shardings, None), donate_argnums=0, compiler_options=options)
    self._compiled: dict[Any, Any] = {}  # batch shapes -> compiled train step
    self._compiling: dict[Any, Any] = {}  # batch shapes -> future of a compile started by prepare()
    self._pool: Any = None
    self.eval_step = jax.jit(self._ruled(evals), in_shardings=(state_shardings.params, batch_sh),
                             compiler_options=options)

  @staticmethod
  def _key(batch: dict[str, jax.Array]) -> tuple:
    return tuple(sorted((k, v.shape) for k, v in batch.items()))

  def _compile(self, state: Any, batch: dict[str, jax.Array]) -> Any:
    with jax.set_mesh(self.mesh):  # the mesh context is per thread
      return self.train_step.lower(state, batch).compile()

  def prepare(self, state: Any, batch: dict[str, jax.Array]) -> None:
    """Starts compiling the step for a batch shape not seen yet, in a background thread, so it
    overlaps the steps still running (XLA compiles on one core and a step rarely keeps every core
    busy). Only shapes and shardings are read: `state` may be donated meanwhile."""
    key = self._key(batch)
    if key in self._compiled or key in self._compiling:
      return
    if self._pool is None:
      from concurrent.futures import ThreadPoolExecutor

      self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jbt-compile")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (state, batch))
    self._compiling[key] = self._pool.submit(self._compile, *abstract)

  def step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array], float]:
    """One train step; compiles each new batch shape ahead of running it.

    Returns (state, metrics, seconds this call waited for compilation: 0.0 for a shape compiled
    before, or one prepare() finished compiling in the background).
    """
    key = self._key(batch)
    compile_s = 0.0
    if key not in self._compiled:
      t0 = time.time()
      future = self._compiling.pop(key, None)
      self._compiled[key] = future.result() if future is not None else self._compile(state, batch)
      compile_s = time.time() - t0
    state, metrics = self._compiled[key](state, batch)
    return state, metrics, compile_s

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  @property
  def compiled_shapes(self) -> int:
    return len(self._compiled)

  def iterator(self, cfg: ConfigDict, tok: Any, *, batch_size: int, epochs: int | None, seed: int) -> Any:
    """The batch iterator, at least one row per data-parallel device. With flash attention (cost
    follows the pairs, not the rows) a packed batch may be one long row per device: pack_length
    defaults to the whole batch."""
    d = cfg.data
    pack_length = d.pack_length or None
    if pack_length is None and self.flash:
      per_process = batch_size // jax.process_count()
      pack_length = -(-per_process // self.rows_multiple) * 2 * d.max_length
    return data.make_batch_iterator(
        tok, layout=d.layout, batch_size=batch_size, max_length=d.max_length, seed=seed, epochs=epochs,
        process_index=jax.process_index(), process_count=jax.process_count(),
        length_multiple=d.length_multiple or None, pack_length=pack_length, row_bucket=d.row_bucket,
        length_bucket=setup.length_bucket(d.length_bucket), min_rows=self.rows_multiple)

  def _ruled(self, fn: Any) -> Any:
    def wrapped(*args):
      with nn.logical_axis_rules(self.rules):
        return fn(*args)
    return wrapped

  def place(self, local: dict[str, np.ndarray]) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    dev, stats = data.split_batch(local)
    rows, length = dev["tokens"].shape
    if jax.process_count() > 1:  # every process must contribute the same shape
      from jax.experimental import multihost_utils

      rows, length = (int(x) for x in np.max(multihost_utils.process_allgather(np.int32([rows, length])), axis=0))
    # Packed rows vary in number; the rows of a process are split over its data-parallel devices.
    rows = -(-rows // self.rows_multiple) * self.rows_multiple
    dev = trainer.pad_rows(dev, rows, self.pad, length)
    return trainer.global_batch(dev, self.mesh, jax.process_index(), jax.process_count()), stats

  def evaluate(self, cfg: ConfigDict, params: Any, tok: Any) -> dict[str, float]:
    totals: dict[str, float] = {}
    it = self.iterator(cfg, tok, batch_size=cfg.train.eval_batch_size, epochs=1, seed=cfg.train.seed)
    with jax.set_mesh(self.mesh):
      for local in it:
        batch, _ = self.place(local)
        for k, v in jax.device_get(self.eval_step(params, batch)).items():
          totals[k] = totals.get(k, 0.0) + float(v)
    n = max(totals.pop("n", 0.0), 1.0)
    out = {f"rewards_eval/{k}": v / n for k, v in totals.items() if k != "loss"}
    out["loss/eval"] = totals.get("loss", 0.0) / n
    out["eval_pairs"] = n
    return out


def run(cfg: ConfigDict) -> dict[str, Any]:
  """Trains (or resumes) per cfg; returns the last train and eval metrics."""
  setup.validate(cfg)
  setup.maybe_init_distributed(cfg)
  setup.enable_compilation_cache(cfg)
  run_dir = Path(cfg.ckpt.cache_dir) / cfg.ckpt.exp_name
  lock = RunLock(run_dir).acquire() if is_primary() else None
  try:
    return _run(cfg, run_dir)
  finally:
    if lock is not None:
      lock.release()


def _run(cfg: ConfigDict, run_dir: Path) -> dict[str, Any]:
  t_start = time.time()
  from jbt.data.sources import resolve_spec

  for spec in (*cfg.data.train, *cfg.data.eval):  # a spec that matches nothing fails before the model loads
    resolve_spec(spec)
  mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
  setup.check_mesh_batch(cfg, mesh)
  rules = tuple(tuple(r) for r in cfg.mesh.rules)
  shardings_fn = lambda mc: sharding.model_shardings(mc, mesh, rules)  # noqa: E731
  model_cfg, params, hf_cfg, tokenizer = setup.load_model(cfg, shardings_fn)
  data.ensure_chat_template(tokenizer)
  log(f"model: {model_cfg.family}, {model_cfg.num_layers} layers, {model_cfg.num_params() / 1e6:.1f}M parameters, "
      f"{cfg.model.dtype} compute, mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

  train_pairs, report = _load(cfg, list(cfg.data.train), "train")
  train_tok, msg = _tokenize(cfg, train_pairs, report, "train", tokenizer)
  log(f"data: {msg}")
  eval_tok = None
  if cfg.train.eval_every >= 0:
    try:
      eval_tok, msg = _tokenize(cfg, *_eval_pairs(cfg, train_pairs), "test", tokenizer)
      log(f"eval: {msg}")
    except JbtError as e:
      if cfg.data.eval:
        raise
      log(f"eval: none ({e}); set data.eval or data.eval_fraction to evaluate")
  del train_pairs

  accum = cfg.opt.grad_accum
  micro_bs = cfg.train.batch_size // accum
  micro_per_epoch = data.batches_per_epoch(len(train_tok), micro_bs)
  updates = (micro_per_epoch * max(cfg.train.epochs, 1)) // accum
  if cfg.train.max_steps > 0:
    updates = min(updates, cfg.train.max_steps) if cfg.train.epochs > 0 else cfg.train.max_steps
  if updates <= 0:
    raise JbtError(f"{len(train_tok)} train pairs make no optimizer step of {cfg.train.batch_size} pairs")
  tx, lr_fn = optim.make_optimizer(cfg.opt, updates)

  with jax.set_mesh(mesh):
    state, state_sh = trainer.init_state(model_cfg, tx, shardings_fn(model_cfg), mesh, seed=cfg.train.seed,
                                         params=params)
  del params
  ckpts = RunCheckpoints(run_dir, keep=cfg.ckpt.keep, async_save=cfg.ckpt.async_save)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)
  restored = ckpts.restore_latest(abstract)
  data_state = None
  if restored is not None:
    step0, state, data_state = restored
    log(f"resumed from {ckpts.dir / str(step0)} (update {step0 // accum} of {updates})")
  if is_primary():
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    checkpoint.write_model_meta(run_dir / "model", model_cfg, hf_cfg, tokenizer)

  micro_done = int(jax.device_get(state.step))
  writer = MetricsWriter(run_dir, resume_step=micro_done // accum, tensorboard=cfg.log.tensorboard,
                         wandb_project=cfg.log.wandb_project, config=cfg.to_dict(), enabled=is_primary())
  runner = Runner(cfg, model_cfg, mesh, state_sh, tx, lr_fn)
  it = runner.iterator(cfg, train_tok, batch_size=micro_bs, epochs=None, seed=cfg.train.seed)
  if data_state is not None:
    it.set_state(data_state)
  # One batch of lookahead: the next batch is placed, and a new shape compiled, while the current
  # step (or the first evaluation) runs. it_state is the data position right after the batch
  # being trained, what a checkpoint saved after it records: the iterator is one batch ahead.
  def read_ahead(state: Any) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    batch_and_stats = runner.place(next(it))
    runner.prepare(state, batch_and_stats[0])
    return batch_and_stats

  it_state = it.get_state()
  ahead = read_ahead(state) if micro_done < updates * accum else None
  last: dict[str, Any] = {}
  eval_last: dict[str, Any] = {}
  if micro_done == 0 and eval_tok is not None:
    eval_last = writer.write(0, runner.evaluate(cfg, state.params, eval_tok))
    log(f"eval before training: accuracy {eval_last['rewards_eval/accuracies']:.3f}, "
        f"loss {eval_last['loss/eval']:.4f}")

  progress = None
  if cfg.log.progress and is_primary():
    from tqdm import tqdm

    progress = tqdm(total=updates, initial=micro_done // accum, desc="train", unit="step", dynamic_ncols=True,
                    file=sys.stdout, mininterval=1.0)
  last_saved = max(ckpts.steps(), default=None)
  pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
  t_update = time.time()
  compile_s = None
  n_tokens = 0
  examples = _examples_before(run_dir, micro_done // accum)

  def finish_update(update: int, metrics_list: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    nonlocal t_update, examples, n_tokens
    host = [(jax.device_get(m), s) for m, s in metrics_list]
    out: dict[str, Any] = {}
    for k in host[0][0]:
      vals = [float(m[k]) for m, _ in host]
      out[k] = sum(vals) / len(vals)
    for k in ("loss/train", "grad_norm"):
      if not math.isfinite(out[k]):
        ckpts.wait()
        good = max(ckpts.steps(), default=None)
        raise JbtError(f"non-finite {k} ({out[k]}) at step {update}: stopping; last good checkpoint: "
                       + (f"{ckpts.dir / str(good)}" if good is not None else "none (nothing saved)"))
    pairs = int(sum(float(s["n_pairs"]) for _, s in host))
    toks = int(sum(float(s["n_tokens"]) for _, s in host))
    examples += pairs
    n_tokens += toks
    now = time.time()
    dt = max(now - t_update, 1e-9)
    t_update = now
    out.pop("n_pairs", None)
    out.update({"counters/examples": examples, "counters/updates": update, "examples_per_second": pairs / dt,
                "tokens_per_second": toks / dt})
    flops = trainer.train_flops_per_token(model_cfg, toks / max(2 * pairs, 1)) * toks / dt
    out["perf/tflops"] = flops / 1e12
    peak = trainer.device_peak_flops()
    if peak:
      out["perf/mfu"] = flops / (peak * jax.device_count())
    return out

  update_compile_s = 0.0  # seconds the current update waited for compilation (new batch shapes)
  try:
    with jax.set_mesh(mesh):
      for micro in range(micro_done, updates * accum):
        batch, stats = ahead
        it_state = it.get_state()
        state, m, step_compile_s = runner.step(state, batch)
        if micro + 1 < updates * accum:
          ahead = read_ahead(state)
        update_compile_s += step_compile_s
        pending.append((m, stats))
        if (micro + 1) % accum:
          continue
        update = (micro + 1) // accum
        prev_examples = examples
        last = finish_update(update, pending)
        last["perf/compile_seconds"] = update_compile_s  # included in this update's wall time
        compile_s = (compile_s or 0.0) + update_compile_s
        pending, update_compile_s = [], 0.0
        if update % cfg.train.log_every == 0 or update == updates:
          writer.write(update, last)
        if progress is not None:
          progress.set_postfix(loss=f"{last['loss/train']:.4f}", acc=f"{last['rewards_train/accuracies']:.2f}")
          progress.update(1)
        if eval_tok is not None and cfg.train.eval_every > 0 and update < updates and (
            examples // cfg.train.eval_every > prev_examples // cfg.train.eval_every):
          eval_last = writer.write(update, runner.evaluate(cfg, state.params, eval_tok))
        if cfg.ckpt.save_every > 0 and update % cfg.ckpt.save_every == 0 and update < updates:
          ckpts.save(micro + 1, state, it_state)
          last_saved = micro + 1
  finally:
    runner.close()
  if progress is not None:
    progress.close()

  final_step = updates * accum
  if last_saved != final_step:
    ckpts.save(final_step, state, it_state)
  ckpts.wait()
  if eval_tok is not None and (micro_done < final_step or not eval_last):
    eval_last = writer.write(updates, runner.evaluate(cfg, state.params, eval_tok))
  if eval_last:
    log(f"eval after training: accuracy {eval_last['rewards_eval/accuracies']:.3f}, "
        f"loss {eval_last['loss/eval']:.4f}, margin {eval_last['rewards_eval/margins']:.3f} "
        f"on {int(eval_last['eval_pairs'])} pairs")
  _save_final(cfg, run_dir, model_cfg, state.params, hf_cfg, tokenizer)
  writer.close()
  ckpts.close()
  summary = {**last, **eval_last, "compile_seconds": compile_s,
             "compiled_shapes": runner.compiled_shapes, "wall_seconds": time.time() - t_start}
  if is_primary():
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
  log(f"done in {summary['wall_seconds']:.0f}s: {run_dir / 'FINAL'}")
  return summary


def _examples_before(run_dir: Path, update: int) -> int:
  """counters/examples at `update`, read back from metrics.jsonl when resuming."""
  f = run_dir / "metrics.jsonl"
  if update == 0 or not f.exists():
    return 0
  best = 0
  for line in f.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if row.get("step", 0) <= update and "counters/examples" in row:
      best = row["counters/examples"]
  return int(best)


def _save_final(cfg: ConfigDict, run_dir: Path, model_cfg: Any, params: Any, hf_cfg: dict, tokenizer: Any) -> None:
  """{run}/final: jbt checkpoint; {run}/FINAL: HF directory. Both appear only when complete."""
  from jbt import hf_io

  if jax.process_count() == 1:
    with hf_io.atomic_dir(run_dir / "final", overwrite=True) as tmp:
      checkpoint.write_model_meta(tmp, model_cfg, hf_cfg, tokenizer)
      checkpoint.save_params(tmp / "params", params)
  else:  # every process writes its shards; orbax renames the params into place when complete
    from jax.experimental import multihost_utils

    final = run_dir / "final"
    if is_primary():
      shutil.rmtree(final, ignore_errors=True)
      checkpoint.write_model_meta(final, model_cfg, hf_cfg, tokenizer)
    multihost_utils.sync_global_devices("jbt_final_meta")
    checkpoint.save_params(final / "params", params)
    params = multihost_utils.process_allgather(params, tiled=True)
  if not is_primary():
    return
  if cfg.ckpt.export_final:
    convert.export_hf(model_cfg, params, run_dir / "FINAL", hf_config=hf_cfg, tokenizer=tokenizer, overwrite=True)


def main(argv: list[str]) -> None:
  from absl import logging as absl_logging

  from jbt.config_cli import CONFIG

  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  cli_main(run)(CONFIG.value)


if __name__ == "__main__":
  from absl import app

  from jbt.config_cli import parse_flags_with_usage

  app.run(main, flags_parser=parse_flags_with_usage)
