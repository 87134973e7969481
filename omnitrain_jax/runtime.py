"""Processes: start-up shared by the binaries, and the lead process's role.

`initialize_distributed` starts multi-host JAX (main, evaluate, predict);
`is_lead` is process 0, the one that writes files and logs;
`share_from_lead` sends process 0's small JSON-able result to every process;
`StopRequested` is a stop request (SIGTERM, Ctrl-C) that could not wait for the end
of a step (see `checkpointing.PreemptionGuard`); `USER_ERRORS` are what the
binaries print as one line (`data.errors.exit_on_user_errors`).
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import signal
import sys
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from omnitrain_jax.data import errors as data_errors


def is_multihost_env() -> bool:
  """A SLURM job with several tasks or a multi-host TPU slice."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           mode: str = "auto") -> None:
  """Starts multi-host JAX when there is more than one process.

  Args:
    coordinator_address: host:port of process 0 (explicit mode).
    num_processes: with `coordinator_address`.
    process_id: with `coordinator_address`.
    mode: "auto" (a coordinator given, or a TPU pod / SLURM job detected),
      "on" (always; JAX auto-detects the cluster) or "off".
  """
  if mode == "off":
    return
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif mode == "on" or is_multihost_env():
    jax.distributed.initialize()


class _QuietLibraries(pylogging.Filter):
  """Drops INFO lines of orbax and grain (dozens per checkpoint); keeps
  warnings, and orbax's errors as one line each: a failed save (a full disk)
  logs a traceback per writer thread, while the error the trainer raises says
  what failed and what to do (the tracebacks with ``--verbosity=1``)."""

  def filter(self, record):
    if not any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain")):
      return True
    if record.levelno >= pylogging.ERROR and record.exc_info and (
        logging.get_verbosity() < logging.DEBUG):
      record.exc_info, record.exc_text = None, None
    return record.levelno > pylogging.INFO


def _is_closed_loop(exc: BaseException | None) -> bool:
  return (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
          and logging.get_verbosity() < logging.DEBUG)


def _quiet_unraisablehook(previous):
  """`sys.unraisablehook` without tensorstore's "Event loop is closed".

  When an async orbax save fails, tensorstore's callbacks still call into
  the event loop orbax has closed; each reports its error as unraisable,
  pages of tracebacks on a full disk. Other reports go to `previous`.
  """

  def hook(args):
    if not _is_closed_loop(args.exc_value):
      previous(args)

  hook.quiet = True
  return hook


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  if not getattr(sys.unraisablehook, "quiet", False):
    sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)


def is_lead() -> bool:
  """Process 0: the one that writes files and logs."""
  return jax.process_index() == 0


def share_from_lead(obj: Any) -> Any:
  """Process 0's JSON-able `obj` on every process (a broadcast of bytes)."""
  if jax.process_count() == 1:
    return obj
  data = json.dumps(obj).encode() if is_lead() else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buf = np.zeros((size,), np.uint8)
  if is_lead():
    buf[:] = np.frombuffer(data, np.uint8)
  buf = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(bytes(np.asarray(buf)).decode())


class StopRequested(Exception):
  """A stop request that could not wait for the end of a training step.

  Raised by `checkpointing.PreemptionGuard`'s signal handler inside the
  input pipeline (after a grace period), during evaluation or start-up, or
  at a second signal. `exit_code` is ``128 + signum`` (143 for SIGTERM, 130 for SIGINT), as
  for a process the signal ended.
  """

  def __init__(self, signum: int, where: str, detail: str = ""):
    self.signum, self.where, self.detail = int(signum), where, detail
    self.exit_code = 128 + self.signum
    try:
      name = signal.Signals(self.signum).name
    except ValueError:
      name = f"signal {self.signum}"
    super().__init__(f"Stopped by {name} while {where}."
                     + (f" {detail}" if detail else ""))


# What every binary reports as one line: bad data, missing files, bad input
# or settings (ValueError, the style's type for user input; a config check's
# message names the field and the fix), a stop request.
USER_ERRORS = (data_errors.DataError, FileNotFoundError, ValueError,
               StopRequested)
