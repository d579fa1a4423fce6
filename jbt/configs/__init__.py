"""Run configs (ml_collections, one get_config() per file), shipped inside the package.

`--config configs/NAME.py` (from a checkout, where configs/ links here), `--config NAME` or any
config file path all work; default.py lists every field jbt.train reads.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_CONFIGS = ("__init__", "flags")


def names() -> list[str]:
  """The packaged configs' names."""
  return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_CONFIGS)


def packaged_path(value: str) -> Path | None:
  """The packaged config file a --config value names ("tiny", "configs/tiny.py", "tiny.py"), or None."""
  name = Path(value).stem if value.endswith(".py") else value
  if "/" in name or name not in names():
    return None
  return HERE / f"{name}.py"
