"""Attention kinds, by name (ModelConfig.attention). To add a kernel: a module with an
`attend(q_BxLxKxGxH, k_BxLxKxH, v_BxLxKxH, info, *, sliding_window, block, max_segment, branches, softcap)`
function,
one Kind entry below, and its case in tests/test_attention.py (values and gradients against the
dense reference).

- "native": flash's block-sparse attention as a compiled CPU kernel (native.py, native.cc through
  XLA's FFI): every core works inside the block loop, AMX tile matmuls where the CPU has them. The
  CPU default where a C++ compiler builds it (else "flash", with a warning).
- "flash": block-sparse online softmax with its own backward pass in XLA ops (flash.py); cost
  follows the real attention pairs of packed and shared-prompt rows. Any backend.
- "xla": softmax over each query block's causal keys from a dense mask (xla.py). Any backend,
  any mask (sliding windows included); its dense [B, L, S] mask grows with the row squared.
- "splash": Pallas splash attention (fused.py), segment ids plus a static band, one call per
  shared-prompt branch. The TPU default.
- "pallas_gpu": jax's Pallas (Triton) flash attention with segment ids (fused.py), one call per
  branch. The GPU default.

The fused kernels take neither sliding windows (one for all layers or per layer) nor Gemma 2's
attention-logit soft-capping: "auto" picks "xla" for such a model, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax

from jbt.model.attention import flash, fused, native, xla
from jbt.model.attention.mask import MaskInfo, dense_mask


@dataclasses.dataclass(frozen=True)
class Kind:
  attend: Callable[..., jax.Array]
  dense_mask: bool  # reads MaskInfo.dense_BxLxS (built once per forward, outside the layers)
  block_field: str  # the ModelConfig field that sizes its blocks
  saved_names: tuple[str, ...]  # checkpoint names of its results, kept by remat "attention"


KINDS: dict[str, Kind] = {
    "native": Kind(native.attend, dense_mask=False, block_field="flash_block",
                   saved_names=(native.OUT_NAME, native.LSE_NAME, *native.INPUT_NAMES.values())),
    "flash": Kind(flash.attend, dense_mask=False, block_field="flash_block", saved_names=(flash.OUT_NAME, flash.LSE_NAME, *flash.LAYOUT_NAMES.values())),
    "xla": Kind(xla.attend, dense_mask=True, block_field="attn_block", saved_names=(xla.OUT_NAME,)),
    "splash": Kind(fused.splash_attend, dense_mask=False, block_field="attn_block", saved_names=(fused.OUT_NAME,)),
    "pallas_gpu": Kind(fused.gpu_attend, dense_mask=False, block_field="attn_block", saved_names=(fused.OUT_NAME,)),
}
DEFAULT_BY_BACKEND = {"cpu": "native", "tpu": "splash", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}  # others: "xla"
FUSED = ("splash", "pallas_gpu")  # kinds that cannot apply a sliding window
# Kinds whose cost follows the segments, not the row: one long row per device holds its pairs.
BLOCK_SPARSE = ("native", "flash")
NATIVE_FALLBACK = "flash"  # "auto"'s CPU kind where the native kernel cannot be built
SAVED_NAMES = tuple(n for k in KINDS.values() for n in k.saved_names)


def resolve(kind: str, backend: str | None = None, sliding_window: int | None = None,
            softcap: float | None = None) -> str:
  """A name of KINDS; "auto" becomes the default of `backend` (JAX's default backend if None),
  or "xla" where that default is a fused kernel and the model has a sliding window or soft-capping."""
  needs = ([f"the model's sliding window ({sliding_window})"] if sliding_window is not None else []) + (
      [f"attention-logit soft-capping ({softcap})"] if softcap is not None else [])
  if kind == "auto":
    backend = backend or jax.default_backend()
    kind = DEFAULT_BY_BACKEND.get(backend, "xla")
    if kind == "native" and not native.available():  # available() logs why
      kind = NATIVE_FALLBACK
    if kind in FUSED and needs:
      logging.getLogger("jbt").warning("attention: %s does not take %s; using xla attention on %s",
                                       kind, " or ".join(needs), backend)
      kind = "xla"
    return kind
  if kind not in KINDS:
    raise ValueError(f"attention must be auto or one of {', '.join(KINDS)}, got {kind!r}")
  if kind == "native" and not native.available():
    raise ValueError("attention 'native' needs its CPU kernel, which could not be built here (the log says why); "
                     "use attention='flash' or 'auto'")
  if kind in FUSED and sliding_window is not None:
    raise ValueError(f"attention {kind!r} does not take sliding windows (the model's is {sliding_window}); "
                     "use attention='xla' or 'auto'")
  if kind in FUSED and softcap is not None:
    raise ValueError(f"attention {kind!r} does not take attention-logit soft-capping ({softcap}); "
                     "use attention='xla' or 'auto'")
  return kind


def mask_info(kind: str, segment_ids_BxL: jax.Array, positions_BxL: jax.Array, branch_ids_BxL: jax.Array | None,
              sliding_window: int | None) -> MaskInfo:
  """What the layers' attention of `kind` reads about the mask."""
  dense = dense_mask(segment_ids_BxL, positions_BxL, sliding_window, branch_ids_BxL) if KINDS[kind].dense_mask else None
  return MaskInfo(segment_ids_BxL, branch_ids_BxL, positions_BxL, dense)


__all__ = ["BLOCK_SPARSE", "KINDS", "Kind", "MaskInfo", "dense_mask", "mask_info", "resolve"]
