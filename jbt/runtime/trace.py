"""Where a step's time goes: JAX profiler traces of jbt's programs, read back as a table of ops.

`python -m jbt.train ... --config.train.profile=3:5` traces optimizer steps 3 and 4 into
{run dir}/profile (TensorBoard's profile plugin and Perfetto read it) and keeps the traced step's
optimized HLO beside it; `python scripts/profile_step.py --report DIR` prints the ops' own times
from such a directory, grouped by what they compute (their source op in the model) and by kind
(matmuls, attention, the layer scan's saved stacks, the optimizer, the rest).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
from pathlib import Path
from typing import Any

HLO_FILE = "optimized_hlo.txt"


def options() -> Any:
  import jax

  opts = jax.profiler.ProfileOptions()
  opts.host_tracer_level, opts.python_tracer_level = 3, 0  # level 3: one event per XLA op
  return opts


def parse_steps(spec: str) -> tuple[int, int] | None:
  """"A:B" -> (A, B) (trace optimizer steps A..B-1, 1-based); "" -> None. ValueError otherwise."""
  if not spec:
    return None
  m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec))
  if not m or not 1 <= int(m.group(1)) < int(m.group(2)):
    raise ValueError(f"expected START:END with 1 <= START < END (optimizer steps START..END-1), got {spec!r}")
  return int(m.group(1)), int(m.group(2))


def op_sources(hlo_text: str) -> dict[str, str]:
  """Each optimized-HLO instruction's source op name, by "module/instruction" (the text may hold
  several programs, whose instruction names repeat) and by instruction name alone (the first
  program's); ops XLA made without one (fusions of several ops) get their computation's most
  common source, else their shape."""
  source, shape, comp_of = {}, {}, {}
  by_comp: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  comp = module = ""
  for line in hlo_text.splitlines():
    mod = re.match(r"HloModule (\S+?),? ", line)
    if mod:
      module = mod.group(1)
      continue
    head = re.match(r"(?:ENTRY )?%(\S+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      comp = f"{module}/{head.group(1)}"
      continue
    inst = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+)", line)
    if not inst:
      continue
    name = f"{module}/{inst.group(1)}"
    comp_of[name], shape[name] = comp, inst.group(2)
    meta = re.search(r'op_name="([^"]*)"', line)
    if meta:
      src = re.sub(r"jit\([^)]*\)/|jvp\(|\)|RewardModel\.hidden/|while/body/|closed_call/?|checkpoint/", "",
                   meta.group(1).replace("transpose(", "bwd "))
      src = re.sub(r"layer_\d+", "layer_*", src)  # unrolled layers (model.scan_layers=False) add up
      source[name] = src
      by_comp[comp][src] += 1
  out = {}
  for name in shape:
    common = by_comp.get(comp_of[name])
    out[name] = source.get(name) or (common.most_common(1)[0][0] + " (fused)" if common else shape[name])
    out.setdefault(name.split("/", 1)[1], out[name])
  return out


def _source(sources: dict[str, str], event: dict) -> tuple[str, str]:
  """(the event's instruction name, its source op name)."""
  op = event["args"]["hlo_op"]
  return op, sources.get(f"{event['args'].get('hlo_module', '')}/{op}") or sources.get(op, op)


def category(source: str, op: str) -> str:
  """A coarse kind for an op: what a step's time is spent on."""
  dot = op.startswith(("ynn", "dot", "onednn")) or "[dot]" in op
  if re.search(r"attn/(?!dot_general)|flash|/attention", source) and not re.search(r"attn/dot_general", source):
    return "attention (scores, softmax, layouts)"
  if dot:
    return "matmuls"
  if "dynamic_update_slice" in source or "dynamic-update-slice" in op or "dynamic-slice" in op:
    return "layer scan: saved stacks"
  if re.search(r"optax|adam|clip|opt/|apply_updates|update", source, re.I):
    return "optimizer"
  if re.search(r"norm|rsqrt|mean|square", source):
    return "norms"
  if "convert" in source or "convert" in op:
    return "dtype converts"
  return "other elementwise"


def _events(trace_dir: str | Path) -> tuple[list[dict], str]:
  paths = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no *.trace.json.gz under it (not a JAX profiler trace directory)")
  with gzip.open(paths[-1]) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  per_thread = collections.defaultdict(list)
  for e in events:
    per_thread[e["tid"]].append(e)
  for evs in per_thread.values():  # self time: own time minus nested events'
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack: list[dict] = []
    for e in evs:
      while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
        stack.pop()
      e["self"] = e["dur"]
      if stack:
        stack[-1]["self"] -= e["dur"]
      stack.append(e)
  return events, paths[-1]


def op_times(trace_dir: str | Path, hlo_text: str | None = None) -> dict[str, Any]:
  """{"ops": Counter(source [kind] -> seconds), "categories": Counter(category -> seconds),
  "total": seconds, "trace": path} of the traced ops' self times. The HLO (for source names) is
  `hlo_text` or trace_dir's optimized_hlo.txt files (all of them, for several programs)."""
  if hlo_text is None:
    hlo_text = "\n".join(p.read_text() for p in sorted(Path(trace_dir).glob(f"*{HLO_FILE}")))
  events, path = _events(trace_dir)
  sources = op_sources(hlo_text)
  ops: collections.Counter = collections.Counter()
  cats: collections.Counter = collections.Counter()
  for e in events:
    op, src = _source(sources, e)
    kind = "dot" if op.startswith("ynn") else re.sub(r"\.\d+$", "", op)
    ops[f"{src} [{kind}]"] += e["self"] / 1e6
    cats[category(src, f"{op} [{kind}]")] += e["self"] / 1e6
  return {"ops": ops, "categories": cats, "total": sum(ops.values()), "trace": path, **_busy(events, sources)}


# What runs, in the order wall time is given to it when several kinds run at once (XLA runs
# independent ops side by side, and a dot's or a kernel's own worker threads are not traced).
WALL_KINDS = ("dots", "FFI kernels", "converts", "zero fills", "stack updates", "other ops")
_CONTAINERS = ("while", "call", "conditional")  # events that span the ops they run


def wall_kind(op: str) -> str:
  """The WALL_KINDS entry of an instruction, by its name."""
  if op.startswith(("ynn", "dot", "onednn")):
    return "dots"
  if op.startswith(("ffi_call", "custom-call", "custom_call")):
    return "FFI kernels"
  if "convert" in op:
    return "converts"
  if "broadcast" in op:
    return "zero fills"
  if "dynamic-update-slice" in op or "dynamic_update_slice" in op:
    return "stack updates"
  return "other ops"


def _busy(events: list[dict], sources: dict[str, str], resolution_us: float = 50.0) -> dict[str, Any]:
  """How many threads ran an op at each moment of the traced span: {"span": seconds,
  "busy": [share of the span with 0, 1, 2, ... threads busy], "alone": Counter(category ->
  seconds some op of it ran while no other thread did), "wall": Counter(WALL_KINDS entry or
  "nothing" -> seconds of the span, each moment given to the first kind running then)}."""
  import numpy as np

  if not events:
    return {"span": 0.0, "busy": [], "alone": collections.Counter(), "wall": collections.Counter()}
  t0 = min(e["ts"] for e in events)
  n = int((max(e["ts"] + e["dur"] for e in events) - t0) / resolution_us) + 1
  threads = sorted({e["tid"] for e in events})
  busy = np.zeros((len(threads), n), bool)
  kind = np.full((len(threads), n), -1, np.int16)
  first = np.full(n, len(WALL_KINDS))  # per moment: the first WALL_KINDS entry running
  names: list[str] = []
  for e in events:
    op, src = _source(sources, e)
    c = category(src, op)
    if c not in names:
      names.append(c)
    i, j = int((e["ts"] - t0) / resolution_us), int((e["ts"] + e["dur"] - t0) / resolution_us) + 1
    row = threads.index(e["tid"])
    busy[row, i:j] = True
    kind[row, i:j] = names.index(c)  # the innermost op last (events are sorted by start)
    if not op.startswith(_CONTAINERS):
      first[i:j] = np.minimum(first[i:j], WALL_KINDS.index(wall_kind(op)))
  count = busy.sum(0)
  wall = collections.Counter({(*WALL_KINDS, "nothing")[k]: m * resolution_us / 1e6
                              for k, m in zip(*np.unique(first, return_counts=True))})
  alone: collections.Counter = collections.Counter()
  for row in range(len(threads)):
    ks = kind[row][(count == 1) & busy[row]]
    for k, m in zip(*np.unique(ks, return_counts=True)):
      alone[names[k]] += m * resolution_us / 1e6
  return {"span": n * resolution_us / 1e6, "busy": [float((count == k).mean()) for k in range(len(threads) + 1)],
          "alone": alone, "wall": wall}


def report(trace_dir: str | Path, top: int = 30, hlo_text: str | None = None) -> str:
  """The op table as text: categories, then the `top` ops, largest first."""
  t = op_times(trace_dir, hlo_text)
  total = t["total"] or 1.0
  lines = [f"op self time in the trace: {t['total']:.2f} s (summed over threads; trace: {t['trace']})", "",
           "| kind | s | share |", "|---|---|---|"]
  lines += [f"| {k} | {s:.3f} | {100 * s / total:.1f}% |" for k, s in t["categories"].most_common()]
  lines += ["", f"traced span {t['span']:.2f} s; share of it with " + ", ".join(
      f"{k} threads busy {100 * b:.0f}%" for k, b in enumerate(t["busy"])),
      "one thread busy, by kind: " + ", ".join(f"{k} {v:.2f} s" for k, v in t["alone"].most_common()), "",
      "wall time of the traced span by what runs (each moment to the first of: " + ", ".join(WALL_KINDS) +
      "; \"nothing\" includes the host's time between programs):", "", "| running | s | share |", "|---|---|---|"]
  span = t["span"] or 1.0
  lines += [f"| {k} | {t['wall'][k]:.3f} | {100 * t['wall'][k] / span:.1f}% |" for k in (*WALL_KINDS, "nothing")
            if k in t["wall"]]
  lines += [""]
  lines += [f"{s:8.3f} s {100 * s / total:5.1f}%  {name}" for name, s in t["ops"].most_common(top)]
  return "\n".join(lines)
