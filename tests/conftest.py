"""Fixtures shared by the whole-program tests."""

import pathlib
import shutil
import subprocess
import sys

import filelock
import pytest

from binaries import REFERENCE_FLAGS, subprocess_env  # tests/binaries.py

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "shapes_demo.py") + ":tiny"


def _shared_run(tmp_path_factory, worker_id, name, flags, devices=None):
  """A tiny run trained once per test run: (workdir, data cache dir).

  The pytest-xdist workers share it: the first to get here trains it under a
  file lock, the others wait for it and reuse it. Read-only for the tests
  (they copy it or train elsewhere).
  """
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent  # The run's folder, above the workers' own.
  shared = root / name
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not (shared / "DONE").exists():
      if shared.exists():  # A worker that failed here left it half made.
        shutil.rmtree(shared)
      shared.mkdir()
      workdir, cache = str(shared / "work"), str(shared / "cache")
      proc = subprocess.run(
          [sys.executable, "-m", "omnitrain_jax.main",
           f"--config={TINY_CONFIG}", f"--workdir={workdir}",
           f"--config.data.cache_dir={cache}", *flags],
          env=subprocess_env(devices), capture_output=True, text=True,
          timeout=600, cwd=str(REPO))
      assert proc.returncode == 0, proc.stderr[-4000:]
      (shared / "DONE").write_text("")
  return shared / "work", shared / "cache"


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, worker_id):
  """The uninterrupted 8-step run (`REFERENCE_FLAGS`, 1 device), once per test
  run: (workdir, data cache dir), both `pathlib.Path`. Read-only: tests that
  resume or damage it work on a copy. tests/train_test.py's resume tests and
  tests/faults_test.py compare their per-step losses with its."""
  return _shared_run(tmp_path_factory, worker_id, "reference_run",
                     REFERENCE_FLAGS, devices=1)


@pytest.fixture(scope="session")
def tiny_run(reference_run):
  """The trained model of export, serve, predict, evaluate, finetune and
  diagnose tests: `reference_run` (one training less per test run, and its
  train step is the one the fault tests compile, so the compilation cache
  serves them), as (workdir, ShapesWorld root). Read-only for the tests
  (they copy it or train elsewhere)."""
  workdir, cache = reference_run
  (data_root,) = cache.glob("shapes_world-*")
  return str(workdir), data_root
