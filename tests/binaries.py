"""What the whole-program tests share to run the binaries."""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
# The 8-step run (tests/conftest.py's `reference_run`, also `tiny_run`): the
# resume and fault tests compare their per-step losses with it; checkpoints at
# 2, 4, 6, 8 (the last 3 kept), a metrics line every step. Its last step is
# the step of what export, serve, predict and evaluate load.
REFERENCE_STEPS = 8
REFERENCE_FLAGS = (f"--config.total_steps={REFERENCE_STEPS}",
                   "--config.log_every_steps=1",
                   "--config.checkpoint_every_steps=2")


def subprocess_env(devices: int | None = None) -> dict[str, str]:
  """The environment of a binary run by a test: CPU, this checkout first.

  Args:
    devices: fake CPU devices (`XLA_FLAGS`); None keeps the caller's setting.

  Returns:
    A copy of `os.environ` (with the test run's compilation cache, see the
    root conftest.py) plus these.
  """
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env
