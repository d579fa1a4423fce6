"""Everything jbt stores and restores.

    model_dir.py  jbt model directories: orbax params + jbt_model.json + tokenizer/
    load.py       the one model loader (jbt directory, HF directory, GGUF) into shardings
    run.py        a training run's checkpoints (train state, data position, counters) and its lock
"""
