"""Hugging Face checkpoints <-> jbt.

    families.py   the family registry: one spec per supported model family
    config.py     config.json <-> ModelConfig
    params.py     the parameter table (HF tensor <-> jbt parameters), import and export of tensors
    sources.py    reading tensors from safetensors, .bin shards and GGUF files
    files.py      opening an HF model (config, tensors, tokenizer) and writing an HF directory
"""
