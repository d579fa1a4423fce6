"""Test setup: 8 fake CPU devices, set before JAX initialises a backend."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# One session folder, shared by this process and the `python -m jbt.train` subprocesses, for
# one persistent XLA compilation cache (the tiny model's steps compile once, not once a run) and
# jbt's own cache (a GGUF tokenizer is converted once); removed when the session ends.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JBT_TESTS_XLA_CACHE" not in os.environ:
  _session = tempfile.mkdtemp(prefix="jbt-tests-")
  atexit.register(shutil.rmtree, _session, True)
  os.environ["JBT_TESTS_XLA_CACHE"] = os.path.join(_session, "xla")
  os.environ["JBT_CACHE"] = os.path.join(_session, "jbt")
