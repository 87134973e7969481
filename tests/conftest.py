"""Fixtures shared by the whole-program tests."""

import pathlib
import shutil
import subprocess
import sys

import filelock
import pytest

from binaries import subprocess_env  # tests/binaries.py

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "shapes_demo.py") + ":tiny"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
  """A tiny run trained for 2 steps, once per test run: (workdir, ShapesWorld
  root). Read-only for the tests (they copy it or train elsewhere).

  The pytest-xdist workers share it: the first to get here trains it under a
  file lock, the others wait for it and reuse it.
  """
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent  # The run's folder, above the workers' own.
  shared = root / "tiny_run"
  with filelock.FileLock(str(root / "tiny_run.lock")):
    if not (shared / "DONE").exists():
      if shared.exists():  # A worker that failed here left it half made.
        shutil.rmtree(shared)
      shared.mkdir()
      workdir, cache = str(shared / "work"), str(shared / "cache")
      proc = subprocess.run(
          [sys.executable, "-m", "omnitrain_jax.main",
           f"--config={TINY_CONFIG}", f"--workdir={workdir}",
           f"--config.data.cache_dir={cache}", "--config.total_steps=2"],
          env=subprocess_env(), capture_output=True, text=True, timeout=600,
          cwd=str(REPO))
      assert proc.returncode == 0, proc.stderr[-4000:]
      (shared / "DONE").write_text("")
  (data_root,) = (shared / "cache").glob("shapes_world-*")
  return str(shared / "work"), data_root
