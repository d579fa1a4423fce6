"""Tiny random Hugging Face models and a tiny tokenizer, built offline for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 320

# One entry (or more, "family_variant") per family of jbt.hf.families.FAMILIES; tests loop over
# these, and tests/test_families.py fails for a registered family without one. Small variations:
# Llama 3 rope scaling and biases, Mistral sliding window shorter than the test rows, Qwen2 q/k/v
# bias, Qwen3 q/k norm, Qwen2 / Qwen3 mixing sliding and full layers (from max_window_layers or
# layer_types), OLMo 2 post-norms with q/k norms over whole projections (and
# biases), Phi-3 fused qkv / gate_up with a sliding window, partial rotary and LongRoPE (long, short), Gemma 2, Gemma 3 text.
FAMILY_KW: dict[str, dict[str, Any]] = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "llama_bias": dict(attention_bias=True, mlp_bias=True),
    "mistral": dict(sliding_window=7),
    "qwen2": dict(),
    "qwen3": dict(head_dim=24),
    "qwen2_mixed": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3_mixed": dict(head_dim=24, use_sliding_window=True, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"]),
    "olmo2": dict(attention_bias=True),
    "phi3": dict(sliding_window=11),
    # Phi-4-mini's kind: partial rotary, LongRoPE with its long factors in use (rows pass 8 positions)
    "phi3_longrope": dict(hidden_size=64, partial_rotary_factor=0.75, max_position_embeddings=128,
                          original_max_position_embeddings=8,
                          rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                                               short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                               long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0])),
    # query_pre_attn_scalar != head_dim, a soft cap that bites, layer 0 sliding and layer 1 full
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=12, sliding_window=5, attn_logit_softcapping=2.0,
                   attention_bias=True),
    # Gemma 3 text: q/k norms, local rope base on the sliding layer, linear rope scaling on the global one
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                        layer_types=["sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                                         "sliding_attention": dict(rope_type="default", rope_theta=100.0)}),
    # Phi-3-mini-128k's kind: LongRoPE with its short factors in use (rows within 64 positions)
    "phi3_short": dict(max_position_embeddings=256, original_max_position_embeddings=64,
                       rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                            short_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0], long_factor=[1.0] * 6)),
}
FAMILIES = tuple(FAMILY_KW)


def model_type(name: str) -> str:
  """The model_type of a FAMILY_KW entry: the longest registered family it is, or starts with + "_"."""
  from jbt.hf.families import FAMILIES as REGISTERED

  return max((f for f in REGISTERED if name == f or name.startswith(f + "_")), key=len)


def make_tokenizer(out: Path | None = None) -> Any:
  """A byte-level BPE tokenizer of VOCAB ids with a ChatML template; pad id 0, eos <|im_end|>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
            "a reward model scores answers", "user assistant system"] * 20
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                 bos_token="<|im_start|>")
  fast.chat_template = CHATML
  if out is not None:
    fast.save_pretrained(str(out))
  return fast


def hf_config(family: str, num_labels: int = 2, **kw: Any) -> Any:
  import transformers

  args = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=num_labels,
              initializer_range=0.1, max_position_embeddings=128, tie_word_embeddings=False)
  args.update(FAMILY_KW[family])
  args.update(kw)
  return transformers.AutoConfig.for_model(model_type(family), **args)


def make_model(family: str, head: bool = True, seed: int = 0, num_labels: int = 2, **kw: Any) -> Any:
  """A random ...ForSequenceClassification (head=True) or ...ForCausalLM model in float32, eval mode."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = hf_config(family, num_labels=num_labels, **kw)
  cls = transformers.AutoModelForSequenceClassification if head else transformers.AutoModelForCausalLM
  model = cls.from_config(cfg, dtype=torch.float32).eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb them so the mapping is tested
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_model(model: Any, out: Path, tokenizer: Any = None, **kw: Any) -> Path:
  model.save_pretrained(str(out), **kw)
  (tokenizer or make_tokenizer()).save_pretrained(str(out))
  return out
