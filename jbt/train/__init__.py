"""Training: `python -m jbt.train --config configs/NAME.py [--config.a.b=value ...]`.

    trainer.py     run(): the stages of a run, set up, loop, finish (the Trainer)
    setup.py       config checks, model and data loading, step counts
    step.py        the jitted train and eval steps
    state.py       the train state and its shardings
    batches.py     batch iterators and host batches -> global arrays
    compiler.py    per-shape background compilation of the step
    optim.py       optimizer and learning-rate schedule
    trainable.py   which parameters train (LoRA, train.freeze); the split the step and optimizer see
    metrics.py     metrics.jsonl / TensorBoard / W&B
    throughput.py  examples/s, tokens/s, FLOP/s, MFU

The loss lives in jbt/loss, the model in jbt/model, checkpoints in jbt/checkpoint.
"""

from typing import Any


def __getattr__(name: str) -> Any:
  # `from jbt.train import run` without importing jax when `python -m jbt.train` starts: its
  # __main__ restarts the process first (jbt.runtime.host_memory).
  if name == "run":
    from jbt.train.trainer import run

    return run
  raise AttributeError(name)
