"""pytest set-up shared by all tests.

* absl flags are marked parsed (grain's multiprocessing reads them; tests do
  not go through `app.run`).
* One persistent JAX compilation cache per test run, shared by the pytest-xdist
  workers and every binary a test starts (through the environment): most
  whole-program tests compile the same tiny model, and on 2 CPU cores a tiny
  run spends ~40 of its ~55 s compiling (measured: 54.7 s cold, 14.5 s with
  the cache warm). What the tests check is unchanged: a cache hit loads the
  executable XLA compiled for the same program. The cache starts empty each
  run and is removed at its end; ``OMNITRAIN_TEST_JAX_CACHE=0`` turns it off.
  With a size limit JAX takes a file lock (``filelock``) around each read and
  write, so two workers never read a half-written entry.
"""

import os
import pathlib
import shutil
import tempfile

from absl import flags

# grain's multiprocessing reads absl flags; tests don't go through app.run.
flags.FLAGS.mark_as_parsed()

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_created_cache = None


def pytest_configure(config):
  """Sets up the run's compilation cache (controller; workers inherit it)."""
  global _created_cache
  del config
  if os.environ.get("OMNITRAIN_TEST_JAX_CACHE", "1") == "0":
    return
  if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_CACHE_ENV):
    return  # A worker: the controller's cache is in the environment.
  path = tempfile.mkdtemp(prefix="omnitrain_jax_test_jax_cache_")
  _created_cache = path
  os.environ[_CACHE_ENV] = path
  # Cache every executable, however small or quick to compile.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  # A size limit turns on JAX's file lock around reads and writes.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
  import sys  # pylint: disable=g-import-not-at-top
  if "jax" in sys.modules:  # Imported by a plugin: tell the live config too.
    jax = sys.modules["jax"]
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)


def pytest_unconfigure(config):
  """Removes the cache the controller made."""
  del config
  if _created_cache and pathlib.Path(_created_cache).is_dir():
    shutil.rmtree(_created_cache, ignore_errors=True)
