"""Every batch layout gives the same rewards, loss and gradients, and transformers' rewards.

The same chat-templated pairs go through the padded, packed and shared_prompt layouts and a
tiny random Hugging Face model imported into jbt (float32); each member is also scored alone by
transformers. Layouts move tokens around, so any error in positions, segments, branches or
pooling indices shows up as a different reward.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import tinymodels  # noqa: E402
from jbt import loss  # noqa: E402
from jbt.hf.config import model_config_from_hf  # noqa: E402
from jbt.hf.params import load_params  # noqa: E402
from jbt.hf.sources import DictSource  # noqa: E402
from jbt.train import batches, step  # noqa: E402
from jbt.data import LayoutSettings, Pair, split_batch, tokenize_pairs  # noqa: E402
from jbt.data.layouts import make_batch  # noqa: E402

MAX_LENGTH = 120  # the tiny models have 128 positions
# ChatML without the newline after <|im_end|>: with pad == eos every member ends in pad ids,
# which tokenizing trims and transformers skips when it pools.
CHATML_NO_NEWLINE = tinymodels.CHATML.replace("'<|im_end|>\n'", "'<|im_end|>'")
assert CHATML_NO_NEWLINE != tinymodels.CHATML


def turns(*texts: str, first: str = "user") -> list[dict[str, str]]:
  roles = ("user", "assistant") if first == "user" else ("assistant", "user")
  return [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]


def make_pairs() -> list[Pair]:
  """Multi-turn prompts of varied lengths; responses that share a start, that are a prefix of
  the other, and that are empty."""
  fox = turns("the quick fox", first="assistant")
  return [
      Pair(turns("hello world"), fox, turns("a lazy dog", first="assistant")),
      Pair(turns("how are you?", "hi", "a reward model scores answers"),
           turns("the quick brown fox", first="assistant"),  # shares "the quick" with rejected
           turns("the quick dog", first="assistant")),
      # One member is a prefix of the other: its branch is empty.
      Pair(turns("user system", "hello", "today?"), fox, fox + turns("and?", "over")),
      Pair(turns("world"), fox + turns("more", "over"), fox),
      Pair(turns("hi"), turns("", first="assistant"), turns("no", first="assistant")),
      Pair(turns("the lazy dog jumps over", "you", "how?", "brown", "world"),
           turns("hello, how are you today?", first="assistant"), turns("fox", first="assistant")),
  ]


def setup(variant: str):
  """(tokenizer, HF model) for a variant: pad id 0, or pad == eos (members end in pads)."""
  tok = tinymodels.make_tokenizer()
  if variant == "pad_is_eos":
    tok.pad_token = "<|im_end|>"
    tok.chat_template = CHATML_NO_NEWLINE
    return tok, tinymodels.make_model("mistral", pad_token_id=tok.pad_token_id)
  return tok, tinymodels.make_model("qwen3")


def hf_rewards(m, tok, pairs: list[Pair]) -> np.ndarray:
  """[N, 2] transformers' logits[:, 1] for each member templated and scored alone, untrimmed."""
  out = np.zeros((len(pairs), 2), np.float32)
  for i, pair in enumerate(pairs):
    for j, response in enumerate((pair.chosen, pair.rejected)):
      ids = tok.apply_chat_template(pair.prompt + response, tokenize=True, return_dict=False)
      with torch.no_grad():
        out[i, j] = m(torch.tensor([ids])).logits[0, 1].item()
  return out


def jbt_model(m):
  cfg = model_config_from_hf(m.config.to_dict(), num_labels=m.config.num_labels)
  params = load_params(cfg, DictSource(m.state_dict()), where="t",
                          allow_missing_head=False)
  return cfg, params


def layout_batches(data, n_slots: int) -> dict[str, dict[str, np.ndarray]]:
  """The same pairs in each layout, with a filler slot; small rows so that packing needs
  several rows and shares them between pairs."""
  settings = {
      "padded": LayoutSettings("padded", n_slots, MAX_LENGTH),
      "packed": LayoutSettings("packed", n_slots, MAX_LENGTH, pack_length=2 * MAX_LENGTH,
                               row_bucket=1),
      "shared_prompt": LayoutSettings("shared_prompt", n_slots, MAX_LENGTH,
                                      pack_length=MAX_LENGTH, row_bucket=1),
  }
  out = {}
  for name, s in settings.items():
    s.check(data)
    out[name], _ = split_batch(make_batch(data, np.arange(len(data)), s))
  return out


@pytest.mark.parametrize("variant", ["pad_0", "pad_is_eos"])
def test_layouts_agree_with_each_other_and_with_transformers(variant):
  tok, m = setup(variant)
  pairs = make_pairs()
  data, report = tokenize_pairs(pairs, tok, max_length=MAX_LENGTH, max_prompt_length=100)
  assert len(data) == len(pairs) and not report.altered.get("prompt_truncated")
  assert not report.altered.get("response_truncated")
  # The edge cases are really there: empty branches (members that are all shared prefix).
  assert (data.shared_prefix == data.lengths[:, 0]).any()
  assert (data.shared_prefix == data.lengths[:, 1]).any()
  if variant == "pad_is_eos":
    assert report.altered.get("trailing_pad_dropped")
  ref_Nx2 = hf_rewards(m, tok, pairs)
  assert np.abs(ref_Nx2).max() > 0.05, "rewards too small for the tolerance to mean anything"
  assert np.abs(ref_Nx2[:, 0] - ref_Nx2[:, 1]).min() > 1e-3, "members must score differently"

  cfg, params = jbt_model(m)

  def loss_fn(p, batch):
    chosen_P, rejected_P = step.rewards(cfg, p, batch)
    return loss.bt_loss(chosen_P, rejected_P, batch["pair_mask"])[0], (chosen_P, rejected_P)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  results = {}
  batches = layout_batches(data, len(pairs) + 1)
  assert batches["shared_prompt"]["tokens"].shape[0] > 1  # several rows, several pairs a row
  assert batches["shared_prompt"]["segment_ids"].max() > 1
  for name, batch in batches.items():
    (value, (chosen_P, rejected_P)), grads = grad_fn(params, jax.tree.map(jnp.asarray, batch))
    rewards_Nx2 = np.stack([chosen_P, rejected_P], axis=1)[: len(pairs)]
    np.testing.assert_allclose(rewards_Nx2, ref_Nx2, atol=1e-4, rtol=0, err_msg=name)
    results[name] = value, grads

  value, grads = results["padded"]
  leaves = jax.tree.leaves_with_path(grads)
  assert max(float(jnp.abs(g).max()) for _, g in leaves) > 1e-2
  for name in ("packed", "shared_prompt"):
    other_value, other_grads = results[name]
    np.testing.assert_allclose(other_value, value, atol=1e-4, rtol=0, err_msg=name)
    for (path, g), (_, h) in zip(leaves, jax.tree.leaves_with_path(other_grads), strict=True):
      np.testing.assert_allclose(h, g, atol=1e-4, rtol=0,
                                 err_msg=f"{name} {jax.tree_util.keystr(path)}")


def test_padding_a_batch_to_a_common_shape_keeps_the_rewards():
  """Processes pad their batches to the largest rows x length among them (batches.pad_rows):
  the flat pooling indices must follow the new row length."""
  tok, m = setup("pad_0")
  data, _ = tokenize_pairs(make_pairs(), tok, max_length=MAX_LENGTH, max_prompt_length=100)
  cfg, params = jbt_model(m)
  batch = layout_batches(data, len(data) + 1)["shared_prompt"]
  R, L = batch["tokens"].shape
  padded = batches.pad_rows(batch, R + 3, data.pad_token_id, L + 37)
  assert padded["tokens"].shape == (R + 3, L + 37)
  for a, b in zip(step.rewards(cfg, params, batch), step.rewards(cfg, params, padded)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
  assert not np.array_equal(padded["chosen_index"], batch["chosen_index"])  # the indices did move
