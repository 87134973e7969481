"""Metric writers: TensorBoard event files and `metrics.jsonl`, no TensorFlow.

The interface follows `clu.metric_writers` (`write_scalars(step, dict)`,
`write_images`, `write_texts`, `write_hparams`, `flush`, `close`), but clu's
writers import TensorFlow and TensorBoard (about 1.5 GB and 3 s of import time
with tensorflow-cpu 2.21), which the default install must not need. Event files
are written with tensorboardX (650 KB, numpy + protobuf only) and read by any
TensorBoard; `metrics.jsonl` holds one JSON object per `write_scalars` call,
`{"step": 100, "loss": 0.52, "learning_rate": 0.001, ...}`, for plotting
without TensorBoard.

Only JAX process 0 writes: `create_default_writer` hands every other process a
`NoOpWriter`.

Resuming: pass `start_step` (the restored step, 0 for a fresh run) to
`create_default_writer`. Entries of `metrics.jsonl` with `step > start_step`
(logged after the checkpoint by the run that died) are dropped before
appending, and the TensorBoard writer emits a `purge_step = start_step + 1`
session-start event so TensorBoard hides the old run's points past the
checkpoint instead of drawing two curves.

`gs://` logdirs: `metrics.jsonl` is rewritten whole on `flush()` (object stores
cannot append); tensorboardX needs `google-cloud-storage` and etils' `epath`
needs `gcsfs` for them.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import tensorboardX
from tensorboardX import summary as tbx_summary

METRICS_FILENAME = 'metrics.jsonl'
HPARAMS_FILENAME = 'hparams.json'

Scalar = int | float | np.number | np.ndarray | jax.Array


def _to_python_scalars(scalars: Mapping[str, Any]) -> dict[str, int | float]:
  """One device->host transfer, then plain Python numbers."""
  host = jax.device_get(dict(scalars))
  out = {}
  for key, value in host.items():
    array = np.asarray(value)
    if array.size != 1:
      raise ValueError(
          f'Scalar {key!r} has shape {array.shape}; write_scalars takes one '
          'number per key (reduce it, e.g. with .mean(), or use write_images).')
    item = array.reshape(()).item()
    if isinstance(item, bool):
      item = int(item)
    out[str(key)] = item if isinstance(item, int) else float(item)
  return out


def _is_remote(path: epath.Path) -> bool:
  return '://' in os.fspath(path)


def flatten_hparams(hparams: Mapping[str, Any],
                    prefix: str = '') -> dict[str, bool | int | float | str]:
  """Flattens a nested config to `{'a.b': value}` with TensorBoard types.

  `ml_collections.ConfigDict` (anything with `to_dict()`) and mappings are
  flattened; None is dropped; sequences and other objects become strings.

  Args:
    hparams: The (nested) hyperparameters.
    prefix: Key prefix, used for recursion.

  Returns:
    A flat dict of bool, int, float or str values.
  """
  if hasattr(hparams, 'to_dict') and callable(hparams.to_dict):
    hparams = hparams.to_dict()
  flat = {}
  for key, value in hparams.items():
    name = f'{prefix}{key}'
    if hasattr(value, 'to_dict') and callable(value.to_dict):
      value = value.to_dict()
    if isinstance(value, Mapping):
      flat.update(flatten_hparams(value, prefix=f'{name}.'))
    elif value is None:
      continue
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    elif isinstance(value, (np.generic, np.ndarray)) and np.size(value) == 1:
      flat[name] = np.asarray(value).item()
    else:
      flat[name] = str(value)
  return flat


class MetricWriter(abc.ABC):
  """clu-style writer interface."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    """Writes one number per key at `step`."""

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Writes images: [H, W], [H, W, C] or [N, H, W, C]; uint8 or float [0, 1]."""
    del step, images

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Writes text (markdown in TensorBoard)."""
    del step, texts

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes the run's hyperparameters (a nested dict or ConfigDict)."""
    del hparams

  def flush(self) -> None:
    """Makes everything written so far visible to readers."""

  def close(self) -> None:
    """Flushes and releases files."""
    self.flush()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class NoOpWriter(MetricWriter):
  """Writes nothing (processes other than 0)."""

  def write_scalars(self, step, scalars):
    del step, scalars


class LoggingWriter(MetricWriter):
  """Logs scalars and hparams to the console (absl logging)."""

  def write_scalars(self, step, scalars):
    values = _to_python_scalars(scalars)
    logging.info('[%d] %s', step,
                 ', '.join(f'{k}={v:.6g}' for k, v in sorted(values.items())))

  def write_texts(self, step, texts):
    for key, text in texts.items():
      logging.info('[%d] %s: %s', step, key, text)

  def write_hparams(self, hparams):
    logging.info('Hyperparameters: %s', flatten_hparams(hparams))


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files via tensorboardX (no TensorFlow needed)."""

  def __init__(self, logdir: epath.PathLike, *, start_step: int | None = None,
               flush_secs: int = 30):
    """Opens a new event file in `logdir`.

    Args:
      logdir: Directory of the run (TensorBoard's run directory).
      start_step: On resume, the restored step; events of earlier files at
        steps > start_step are hidden by TensorBoard (purge_step).
      flush_secs: Background flush period.
    """
    purge_step = None if start_step is None else int(start_step) + 1
    self._writer = tensorboardX.SummaryWriter(
        logdir=os.fspath(logdir), purge_step=purge_step, flush_secs=flush_secs)

  def write_scalars(self, step, scalars):
    for key, value in _to_python_scalars(scalars).items():
      self._writer.add_scalar(key, value, global_step=int(step))

  def write_images(self, step, images):
    for key, image in jax.device_get(dict(images)).items():
      image = np.asarray(image)
      if image.ndim == 4:
        self._writer.add_images(key, image, int(step), dataformats='NHWC')
      elif image.ndim in (2, 3):
        self._writer.add_image(key, image, int(step),
                               dataformats='HWC' if image.ndim == 3 else 'HW')
      else:
        raise ValueError(
            f'Image {key!r} has shape {image.shape}; expected [H, W], '
            '[H, W, C] or [N, H, W, C].')

  def write_texts(self, step, texts):
    for key, text in texts.items():
      self._writer.add_text(key, str(text), int(step))

  def write_hparams(self, hparams):
    # Into this run's own event file (tensorboardX's add_hparams would open a
    # new sub-run per call).
    experiment, start, end = tbx_summary.hparams(flatten_hparams(hparams), {})
    file_writer = self._writer.file_writer
    for proto in (experiment, start, end):
      file_writer.add_summary(proto)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def read_jsonl(path: epath.PathLike) -> list[dict[str, Any]]:
  """Reads `metrics.jsonl`; a torn last line (crash mid-write) is skipped."""
  path = epath.Path(path)
  if not path.exists():
    return []
  records = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      logging.warning('Skipping unreadable line %d of %s: %r', number, path,
                      line[:200])
  return records


def truncate_jsonl(path: epath.PathLike, max_step: int) -> int:
  """Drops entries with `step > max_step` (and torn lines); returns how many.

  The file is replaced atomically (write + rename) on local disks.

  Args:
    path: The metrics.jsonl file.
    max_step: The last step to keep, e.g. the step a run resumed from.

  Returns:
    The number of records removed.
  """
  path = epath.Path(path)
  if not path.exists():
    return 0
  lines = path.read_text().splitlines()
  records = read_jsonl(path)
  kept = [r for r in records if int(r.get('step', -1)) <= max_step]
  removed = sum(1 for l in lines if l.strip()) - len(kept)
  if removed:
    text = ''.join(json.dumps(r) + '\n' for r in kept)
    if _is_remote(path):
      path.write_text(text)
    else:
      tmp = path.with_name(path.name + '.tmp')
      tmp.write_text(text)
      os.replace(tmp, path)
    logging.info('Removed %d entries past step %d from %s.', removed, max_step,
                 path)
  return removed


class JsonlWriter(MetricWriter):
  """Appends `{"step": s, **scalars}` lines to `logdir/metrics.jsonl`."""

  def __init__(self, logdir: epath.PathLike, *, start_step: int | None = None,
               filename: str = METRICS_FILENAME):
    """Opens (creating) the file for appending.

    Args:
      logdir: Directory of the run.
      start_step: If set, entries with `step > start_step` are removed first
        (resume after a crash: the steps after the checkpoint are redone).
      filename: File name inside logdir.
    """
    self._logdir = epath.Path(logdir)
    self._logdir.mkdir(parents=True, exist_ok=True)
    self._path = self._logdir / filename
    if start_step is not None:
      truncate_jsonl(self._path, int(start_step))
    self._remote = _is_remote(self._path)
    if self._remote:
      self._lines = ([] if not self._path.exists() else
                     self._path.read_text().splitlines(keepends=True))
      self._file = None
    else:
      # Line-buffered: every record reaches the file at once, so a killed
      # run loses nothing that `truncate_jsonl` would later have to reconcile.
      self._file = open(os.fspath(self._path), 'a', encoding='utf-8',
                        buffering=1)

  @property
  def path(self) -> epath.Path:
    return self._path

  def write_scalars(self, step, scalars):
    record = {'step': int(step)}
    record.update(_to_python_scalars(scalars))
    # NaN/Infinity are written as Python's json does (`NaN`), readable by
    # Python and pandas; a diverged loss should stay visible.
    line = json.dumps(record, allow_nan=True) + '\n'
    if self._remote:
      self._lines.append(line)
    else:
      self._file.write(line)

  def write_hparams(self, hparams):
    (self._logdir / HPARAMS_FILENAME).write_text(
        json.dumps(flatten_hparams(hparams), indent=2, sort_keys=True))

  def flush(self):
    if self._remote:
      self._path.write_text(''.join(self._lines))
    elif self._file is not None:
      self._file.flush()

  def close(self):
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None


class MultiWriter(MetricWriter):
  """Forwards every call to several writers."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = tuple(writers)

  @property
  def writers(self) -> tuple[MetricWriter, ...]:
    return self._writers

  def write_scalars(self, step, scalars):
    scalars = _to_python_scalars(scalars)  # One host transfer for all.
    for writer in self._writers:
      writer.write_scalars(step, scalars)

  def write_images(self, step, images):
    images = jax.device_get(dict(images))
    for writer in self._writers:
      writer.write_images(step, images)

  def write_texts(self, step, texts):
    for writer in self._writers:
      writer.write_texts(step, texts)

  def write_hparams(self, hparams):
    for writer in self._writers:
      writer.write_hparams(hparams)

  def flush(self):
    for writer in self._writers:
      writer.flush()

  def close(self):
    for writer in self._writers:
      writer.close()


def create_default_writer(logdir: epath.PathLike,
                          *,
                          just_logging: bool = False,
                          start_step: int | None = None) -> MetricWriter:
  """Console + TensorBoard + metrics.jsonl on process 0, no-op elsewhere.

  Args:
    logdir: The run's directory (usually the workdir).
    just_logging: Only log to the console, write no files. Processes other
      than 0 always get a `NoOpWriter` (one process writes the logs).
    start_step: The step the run starts from (restored step, or 0 for a fresh
      run): later entries of a previous attempt are dropped/hidden.

  Returns:
    A `MetricWriter`.
  """
  if jax.process_index() > 0:
    return NoOpWriter()
  if just_logging:
    return LoggingWriter()
  return MultiWriter([
      LoggingWriter(),
      TensorBoardWriter(logdir, start_step=start_step),
      JsonlWriter(logdir, start_step=start_step),
  ])
