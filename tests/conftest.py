"""Fixtures shared by the whole-program tests."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "shapes_demo.py") + ":tiny"


def subprocess_env() -> dict[str, str]:
  """The environment of a binary run by a test: CPU, this checkout first."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny run trained for 2 steps, one per test module: (workdir,
  ShapesWorld root)."""
  root = tmp_path_factory.mktemp("tiny_run")
  workdir, cache = str(root / "work"), str(root / "cache")
  proc = subprocess.run(
      [sys.executable, "-m", "omnitrain_jax.main", f"--config={TINY_CONFIG}",
       f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
       "--config.total_steps=2"], env=subprocess_env(), capture_output=True,
      text=True, timeout=600, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  (data_root,) = pathlib.Path(cache).glob("shapes_world-*")
  return workdir, data_root
