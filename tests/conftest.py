"""Test setup: 8 fake CPU devices, set before JAX initialises a backend."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# One persistent XLA compilation cache for every training run of the session, in this process and
# in the `python -m jbt.train` subprocesses: the tiny model's steps compile once, not once a run.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "JBT_TESTS_XLA_CACHE" not in os.environ:
  os.environ["JBT_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="jbt-tests-xla-")
  atexit.register(shutil.rmtree, os.environ["JBT_TESTS_XLA_CACHE"], True)
