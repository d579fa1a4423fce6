"""Planning a run for hardware this machine does not have: `python -m jbt.plan`.

    targets.py   TPU slices and GPU hosts: names, topologies, memory and peak FLOP/s per chip
    models.py    the model's sizes, from its config files or a published shape
    compile.py   jbt's train step compiled for the target; memory per chip and FLOPs per step
    report.py    what the command prints, and its one-line refusal
    __main__.py  the command
"""
