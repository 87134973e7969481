"""Processes: start-up shared by the binaries, and the lead process's role.

`initialize_distributed` starts multi-host JAX (main, evaluate, predict);
`is_lead` is process 0, the one that writes files and logs;
`share_from_lead` sends process 0's small JSON-able result to every process.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


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
  """Drops INFO lines of orbax and grain (dozens per checkpoint); keeps warnings."""

  def filter(self, record):
    return record.levelno > pylogging.INFO or not any(
        f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


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
