"""Progress reports (steps/s, ETA, elapsed) and an on-request profiler window.

Like `clu.periodic_actions.ReportProgress` / `Profile`, without the TensorFlow
import that clu's periodic actions pull in.

`jax.profiler.start_trace(logdir)` in jax 0.10.2 works with neither TensorFlow
nor `tensorboard-plugin-profile`/`xprof` installed: it writes
`logdir/plugins/profile/<YYYY_MM_DD_HH_MM_SS>/<host>.xplane.pb` plus
`<host>.trace.json.gz` (checked on CPU). Viewing the xplane needs TensorBoard
with the profile plugin (or xprof) on any machine; the `.trace.json.gz` opens
in Perfetto (ui.perfetto.dev) as is.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import jax


def _format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class ReportProgress:
  """Logs steps/s, elapsed time and ETA every N steps or T seconds.

  The rate is measured over the wall time between two reports, so it reflects
  the recent speed; the first call only sets the reference point, keeping the
  first step (which includes compilation) out of every rate. JAX dispatch is
  asynchronous: call it after something that waits for the step (e.g. fetching
  the step's metrics), or the rate measures dispatch, not compute.

  Only process 0 reports; elsewhere `__call__` returns None.
  """

  def __init__(self,
               num_train_steps: int,
               *,
               every_steps: int | None = None,
               every_secs: float | None = 60.0,
               time_fn: Callable[[], float] = time.monotonic,
               is_lead: bool | None = None,
               name: str | None = None,
               unit: str = 'steps'):
    """Starts the clock (elapsed time counts from here).

    Args:
      num_train_steps: The last step of the run (for ETA and percent).
      every_steps: Report when this many steps passed since the last report.
      every_secs: Report when this many seconds passed since the last report.
      time_fn: Clock, injectable for tests.
      is_lead: Whether this process reports; defaults to process 0.
      name: Prefix of the log line (e.g. an evaluation dataset).
      unit: What is counted (``steps``; evaluation counts ``images``).
    """
    if every_steps is None and every_secs is None:
      raise ValueError('Set every_steps or every_secs (or both) so that '
                       'ReportProgress knows when to report.')
    if every_steps is not None and every_steps < 1:
      raise ValueError(f'every_steps={every_steps} must be >= 1.')
    self._num_train_steps = int(num_train_steps)
    self._every_steps = every_steps
    self._every_secs = every_secs
    self._time_fn = time_fn
    self._is_lead = (jax.process_index() == 0) if is_lead is None else is_lead
    self._start_time = time_fn()
    self._last_time: float | None = None
    self._last_step: int | None = None
    self._first: tuple[float, int] | None = None
    self._name, self._unit = name, unit
    self.steps_per_sec: float | None = None
    # Since the first call (compilation excluded), for summaries.
    self.mean_rate: float | None = None

  def __call__(self, step: int) -> dict[str, float] | None:
    """Call after each completed step; logs when a report is due.

    Args:
      step: The number of completed steps.

    Returns:
      None, or on a report `{'steps_per_sec', 'elapsed_sec', 'eta_sec'}` to
      merge into the step's scalars for the metric writer.
    """
    if not self._is_lead:
      return None
    now, step = self._time_fn(), int(step)
    if self._last_step is None:  # First step after (re)start: compile time.
      self._last_time, self._last_step = now, step
      self._first = (now, step)
      return None
    if now > self._first[0] and step > self._first[1]:
      self.mean_rate = (step - self._first[1]) / (now - self._first[0])
    steps = step - self._last_step
    secs = now - self._last_time
    due = step >= self._num_train_steps or (
        self._every_steps is not None and steps >= self._every_steps) or (
            self._every_secs is not None and secs >= self._every_secs)
    if not due or steps <= 0 or secs <= 0:
      return None
    rate = steps / secs
    self.steps_per_sec = rate
    elapsed = now - self._start_time
    eta = max(self._num_train_steps - step, 0) / rate
    percent = 100.0 * step / max(self._num_train_steps, 1)
    if self._unit == 'steps' and self._name is None:
      logging.info(
          'Step %d/%d (%.1f%%): %.3g steps/s, elapsed %s, ETA %s', step,
          self._num_train_steps, percent, rate, _format_duration(elapsed),
          _format_duration(eta))
    else:
      logging.info('%s: %d/%d %s (%.0f%%), %.3g %s/s, elapsed %s, ETA %s',
                   self._name, step, self._num_train_steps, self._unit,
                   percent, rate, self._unit, _format_duration(elapsed),
                   _format_duration(eta))
    self._last_time, self._last_step = now, step
    return {f'{self._unit}_per_sec': rate, 'elapsed_sec': elapsed,
            'eta_sec': eta}


class Profiler:
  """Traces steps [start, stop) with `jax.profiler` when asked to.

  Call it with the number of the step *about to run*; it starts a trace before
  step `start` and stops it before step `stop`, after waiting for `block_on`
  (the previous step's outputs) so the traced device work is complete. The
  trace goes to `logdir/plugins/profile/...` where TensorBoard's profile plugin
  looks for it.
  """

  def __init__(self,
               logdir: str,
               profile_steps: Sequence[int] | None,
               *,
               all_processes: bool = False):
    """Sets the window.

    Args:
      logdir: Usually the workdir.
      profile_steps: `(start, stop)` (e.g. `config.profile_steps`), or None /
        empty to disable.
      all_processes: Trace on every host (each writes its own `<host>` file);
        by default only process 0 traces.
    """
    self._logdir = str(logdir)
    self._window = None
    if profile_steps:
      if len(profile_steps) != 2 or not 0 <= profile_steps[0] < profile_steps[1]:
        raise ValueError(
            f'profile_steps={tuple(profile_steps)} must be (start, stop) with '
            '0 <= start < stop, e.g. (10, 15) to trace five steps after '
            'warm-up.')
      self._window = (int(profile_steps[0]), int(profile_steps[1]))
    self._enabled = self._window is not None and (
        all_processes or jax.process_index() == 0)
    self.active = False

  def __call__(self, step: int, *, block_on: Any = None) -> None:
    """Starts/stops the trace at the window's edges.

    Args:
      step: The step about to run.
      block_on: Arrays of the previous step to wait for before stopping.
    """
    if not self._enabled:
      return
    start, stop = self._window
    if not self.active and start <= step < stop:
      logging.info('Starting profiler trace at step %d into %s.', step,
                   self._logdir)
      jax.profiler.start_trace(self._logdir)
      self.active = True
    elif self.active and step >= stop:
      self.stop(block_on=block_on)

  def stop(self, *, block_on: Any = None) -> None:
    """Stops an active trace (also call at the end of training)."""
    if not self.active:
      return
    if block_on is not None:
      jax.block_until_ready(block_on)
    jax.profiler.stop_trace()
    self.active = False
    logging.info('Wrote profiler trace to %s/plugins/profile.', self._logdir)
