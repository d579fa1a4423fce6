"""What users run on trained models (each module is also a command: python -m jbt.NAME).

    score.py      batched scoring of token sequences with a loaded reward model
    label.py      HALOs' train.label, batched (python -m jbt.label)
    evaluate.py   pairwise accuracy on preference data (python -m jbt.evaluate)
    plots.py      training curves and reward plots (python -m jbt.plots)
    convert.py    HF <-> jbt checkpoints (convert/hf_to_jbt.py, convert/jbt_to_hf.py)
"""
