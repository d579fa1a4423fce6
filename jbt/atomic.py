"""Writing files and directories so that a kill at any moment leaves the old version or the new
one, never a half-written one, with the permissions the user's umask gives.

Every output jbt writes goes through here: exported model directories, label feedback, plots,
generated data. The parent directory is created; a parent that cannot be (a file in the way, no
permission) is one JbtError naming it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from jbt.errors import JbtError


def cache_dir() -> Path:
  """jbt's own cache (converted GGUF tokenizers and configs, measured CPU choices): $JBT_CACHE, else
  $XDG_CACHE_HOME/jbt (~/.cache/jbt)."""
  root = os.environ.get("JBT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jbt"
  return Path(root)


def umask() -> int:
  """The process's umask (read without changing it for longer than one call)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def make_parent(path: Path) -> None:
  """Creates path's parent directory, or raises a JbtError saying why it cannot be."""
  parent = Path(path).absolute().parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    blocker = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), parent)
    raise JbtError(f"{path}: cannot create its directory {parent}: {blocker} is a file, not a directory") from None
  except OSError as e:
    raise JbtError(f"{path}: cannot create its directory {parent} ({e.strerror or e})") from None


def _apply_umask(root: Path) -> None:
  """mkdtemp makes 0700 directories and some writers (safetensors) 0600 files: give everything
  under root the modes a plain mkdir / open would have had."""
  mask = umask()
  os.chmod(root, 0o777 & ~mask)
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
    for f in filenames:
      p = os.path.join(dirpath, f)
      if not os.path.islink(p):
        os.chmod(p, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary sibling of `out`; on success it is renamed to `out`, on failure removed."""
  out = Path(out).absolute()
  nonempty = out.is_file() or (out.is_dir() and any(out.iterdir()))
  if nonempty and not overwrite:
    raise JbtError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
  make_parent(out)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    yield tmp
    _apply_umask(tmp)
    if out.exists():
      trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
      os.replace(out, trash / "old")
      os.replace(tmp, out)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(out: str | Path, mode: str = "w") -> Iterator[IO]:
  """Yields a file object ("w" or "wb") on a fresh temporary sibling of `out`, renamed to `out`
  when the block ends without an error. Opened with "x" (not mkstemp) so it gets the umask's mode."""
  out = Path(out)
  if out.is_dir():
    raise JbtError(f"{out}: is a directory; give the output file's path")
  make_parent(out)
  tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  try:
    with open(tmp, mode.replace("w", "x")) as f:
      yield f
    os.replace(tmp, out)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
