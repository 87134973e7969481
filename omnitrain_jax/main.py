r"""Entry point: ``python -m omnitrain_jax.main --config=CONFIG --workdir=DIR``.

Every host of a TPU pod (or every GPU process) runs this same command. It
parses flags, starts multi-host JAX when there is more than one process, and
calls `train.train_and_evaluate`. Config overrides use ml_collections syntax,
e.g. ``--config.total_steps=1000``; the config is locked, so a mistyped field
fails instead of being silently added.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from omnitrain_jax import runtime
from omnitrain_jax.data import errors as data_errors

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.quiet_library_logs()
  runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                 _PROCESS_ID.value, _DISTRIBUTED.value)
  logging.info("JAX process %d / %d, local devices %s", jax.process_index(),
               jax.process_count(), jax.local_devices())
  from omnitrain_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from omnitrain_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from omnitrain_jax import train  # pylint: disable=g-import-not-at-top
  # Each message names the path or setting, what is wrong and the fix; the
  # traceback (orbax's, for a failed save) only with --verbosity=1.
  with data_errors.exit_on_user_errors(
      (*runtime.USER_ERRORS, checkpointing.CheckpointError,
       workdir_lib.WorkdirInUseError, workdir_lib.ResumeConfigError,
       train.NonFiniteError),
      lenient="--config.data.strict=False"):
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)

if __name__ == "__main__":
  app.run(main)
