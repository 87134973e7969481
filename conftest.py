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
* With -n, how the tests are split between the workers (see below): each
  module is one unit of work, except the long whole-program tests, each a
  unit of its own; the units go out longest first.
"""

import os
import pathlib
import shutil
import tempfile

from absl import flags
import pytest

# grain's multiprocessing reads absl flags; tests don't go through app.run.
flags.FLAGS.mark_as_parsed()

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_MIN_COMPILE_SECS = 0.5
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
  # Cache the executables that take 0.5 s or more to compile (the binaries'
  # train, eval and init programs), not the many quick ones of op-by-op
  # code: writing those cost more than compiling them (measured, 2 cores
  # under load: box_ops/terms/token_ops tests 60 s with every executable
  # cached, 39-46 s with this limit or without a cache; a warm tiny run
  # 9.8 s user with it, 10.1 s caching everything).
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
      _MIN_COMPILE_SECS)
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  # A size limit turns on JAX's file lock around reads and writes.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
  import sys  # pylint: disable=g-import-not-at-top
  if "jax" in sys.modules:  # Imported by a plugin: tell the live config too.
    jax = sys.modules["jax"]
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      _MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)


def pytest_unconfigure(config):
  """Removes the cache the controller made."""
  del config
  if _created_cache and pathlib.Path(_created_cache).is_dir():
    shutil.rmtree(_created_cache, ignore_errors=True)


# --- How pytest-xdist splits the tests ------------------------------------
#
# With -n, a worker gets a whole "unit" at a time (`_Units`, a loadscope
# scheduler). Each test module is one unit (its module-scoped fixtures, e.g. a
# trained or exported model, and the functions it jits are then built once,
# not once on each worker), except the long whole-program tests below: they
# share no module fixture (only the session ones of tests/conftest.py, which
# the workers share anyway) and each is a unit of its own, so the workers can
# split them.
_OWN_UNITS = (
    "tests/train_test.py::",
    "tests/faults_test.py::",
    "tests/finetune_test.py::",
    "tests/demo_test.py::",
    "tests/ablation_test.py::test_two_mixes_end_to_end_two_at_a_time",
    "omnitrain_jax/train_step_test.py::"
    "test_sharded_table_step_equals_single_device",
)

# Rough seconds of the longest units (2 idle cores, 2 workers, the run's
# compilation cache warm where it can be). They start first, longest first,
# so that no long unit starts late and keeps one worker busy alone at the end
# (the others keep their order, after these). A unit's cost is the largest of
# its tests'; a test's, that of its first matching prefix. Only the order
# matters: a test missing here still runs, only later.
_UNIT_SECONDS = (
    ("tests/train_test.py::test_same_losses_on_every_layout", 110),
    ("tests/ablation_test.py::test_two_mixes_end_to_end_two_at_a_time", 110),
    ("tests/train_test.py::test_two_processes_draw_the_candidates", 105),
    # The first unit that needs tests/conftest.py's `reference_run` (also
    # `tiny_run`) trains it; the units either side of it do not need it, so
    # the other worker does not wait for it.
    ("tests/diagnose_captions_test.py", 100),
    ("omnitrain_jax/train_step_test.py::test_sharded_table_step", 85),
    ("omnitrain_jax/train_step_test.py", 90),
    ("tests/finetune_test.py::test_finetune_recipe", 90),
    ("tests/export_test.py", 85),
    ("tests/evaluate_test.py", 80),
    ("tests/train_test.py::test_interrupted_run_resumes_exactly[9]", 75),
    ("tests/predict_test.py", 60),
    ("tests/serve_test.py", 60),
    ("omnitrain_jax/models/omnidet_test.py", 60),
    ("tests/train_test.py::test_interrupted_run_resumes_exactly", 58),
    ("tests/faults_test.py::test_second_trainer", 57),
    ("tests/faults_test.py::test_disk_full", 55),
    ("tests/faults_test.py::test_lenient_vocabulary", 55),
    ("tests/demo_test.py", 50),
    ("omnitrain_jax/losses/omni_loss_test.py", 45),
    ("tests/faults_test.py::test_sigterm_during_evaluation", 45),
    ("tests/finetune_test.py", 40),
    ("tests/faults_test.py::test_bit_flipped", 40),
    ("tests/faults_test.py::test_changed_config", 35),
    ("tests/train_test.py::test_nonfinite", 35),
    ("omnitrain_jax/models/pretrained_test.py", 30),
    ("omnitrain_jax/evaluation/inference_test.py", 30),
    ("tests/faults_test.py::test_bad_images", 30),
    ("omnitrain_jax/sharding_test.py", 25),
    ("omnitrain_jax/matching/assignment_test.py", 20),
    ("omnitrain_jax/data/pipeline_test.py", 20),
    ("tests/faults_test.py", 15),
)


def _unit(nodeid: str) -> str:
  """The unit of a test: its module, or the test itself (`_OWN_UNITS`)."""
  if nodeid.startswith(_OWN_UNITS):
    return nodeid
  return nodeid.split("::", 1)[0]


def _seconds(nodeid: str) -> int:
  for prefix, seconds in _UNIT_SECONDS:
    if nodeid.startswith(prefix):
      return seconds
  return 0


def pytest_collection_modifyitems(config, items):
  """Orders the units longest first (a unit's tests stay together, in order).

  Deterministic: every xdist worker must collect the same order. The
  scheduler (`_Units`, with pytest.ini's --no-loadscope-reorder) hands the
  units out in this order.
  """
  del config
  first, cost = {}, {}
  for i, item in enumerate(items):
    unit = _unit(item.nodeid)
    first.setdefault(unit, i)
    cost[unit] = max(cost.get(unit, 0), _seconds(item.nodeid))
  def order(indexed):
    i, item = indexed
    unit = _unit(item.nodeid)
    return (-cost[unit], first[unit], i)
  items[:] = [item for _, item in sorted(enumerate(items), key=order)]


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """`_Units` for -n's default distribution (an explicit --dist is kept).

  (Not xdist's "loadgroup" with xdist_group marks: pytest-xdist 3.8 renames
  the grouped tests through an attribute pytest 9 no longer reads, so the
  marks group nothing.)
  """
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class _Units(LoadScopeScheduling):
    """Load-scope scheduling with `_unit` as the scope."""

    def _split_scope(self, nodeid: str) -> str:
      return _unit(nodeid)

  return _Units(config, log)
