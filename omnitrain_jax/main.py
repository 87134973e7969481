r"""Entry point: ``python -m omnitrain_jax.main --config=CONFIG --workdir=DIR``.

Every host of a TPU pod (or every GPU process) runs this same command. It
parses flags, starts multi-host JAX when there is more than one process, and
calls `train.train_and_evaluate`. Config overrides use ml_collections syntax,
e.g. ``--config.total_steps=1000``; the config is locked, so a mistyped field
fails instead of being silently added.
"""

import logging as pylogging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/shapes_demo.py[:tiny].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for multi-process runs outside TPU pods/SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_DISTRIBUTED = flags.DEFINE_enum(
    "jax_distributed", "auto", ["auto", "on", "off"],
    "auto: initialize multi-host JAX when a coordinator is given or a TPU pod / "
    "SLURM job with several tasks is detected.")
flags.mark_flags_as_required(["config", "workdir"])


def _is_multihost_env() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize_distributed() -> None:
  mode = _DISTRIBUTED.value
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif mode == "on" or (mode == "auto" and _is_multihost_env()):
    jax.distributed.initialize()


class _QuietLibraries(pylogging.Filter):
  """Drops INFO lines of orbax and grain (dozens per checkpoint); keeps warnings."""

  def filter(self, record):
    return record.levelno > pylogging.INFO or not any(
        f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed()
  logging.info("JAX process %d / %d, local devices %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  from omnitrain_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
