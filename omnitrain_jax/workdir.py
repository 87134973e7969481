"""The workdir's guards: one trainer at a time, and a resume that fits.

* `WorkdirLock`: ``WORKDIR/train.lock``, an fcntl lock taken by process 0 of
  a training job; the kernel frees it when the holder dies, so a crashed run
  never leaves it stuck. A second trainer gets `WorkdirInUseError` naming
  the holder's pid and host.
* `check_resume` / `check_resume_vocab`: a resumed run's config and
  vocabulary against ``WORKDIR/config.json`` and ``vocab.txt``. Changes that
  fix the saved state's shapes (`changes_shapes`) raise `ResumeConfigError`,
  each field named, with the way out; other changes are logged.

No orbax here (`checkpointing` is the one module that calls it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
import jax

from omnitrain_jax import checkpointing

LOCK_FILE = 'train.lock'


class WorkdirInUseError(RuntimeError):
  """Another live trainer holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


class WorkdirLock:
  """`WORKDIR/train.lock`: refuses a second trainer on the same workdir.

  An fcntl (POSIX record) lock on the file, held for the whole run: the kernel
  drops it when the process dies, however it dies, so a crashed run never
  leaves it stuck; it is not inherited by forked data workers. The file
  names the holder (pid, host, start time) for the error message. Where the
  filesystem has no locks (ENOLCK, some network mounts), the recorded pid is
  checked instead when it is on this host. Not taken on `gs://` workdirs.

  Only process 0 of a multi-process job takes it (`enabled`).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._path = epath.Path(workdir) / LOCK_FILE
    self._enabled = enabled and '://' not in str(workdir)
    self._fd: int | None = None

  @property
  def path(self) -> epath.Path:
    return self._path

  def _holder(self) -> dict[str, Any]:
    try:
      return json.loads(self._path.read_text() or '{}')
    except (OSError, ValueError):
      return {}

  def _refuse(self, holder: Mapping[str, Any]) -> None:
    since = holder.get('started')
    since = (time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))
             if isinstance(since, (int, float)) else 'unknown')
    raise WorkdirInUseError(
        f'Workdir {self._path.parent} is in use by pid '
        f'{holder.get("pid", "?")} on host {holder.get("host", "?")} '
        f'(running since {since}; lock {self._path}). Two trainers on one '
        'workdir would write the same checkpoints and logs: wait for that run '
        'to finish, stop it, or use another --workdir.')

  def acquire(self) -> None:
    """Takes the lock or raises `WorkdirInUseError` naming the holder."""
    if not self._enabled or self._fd is not None:
      return
    fd = os.open(os.fspath(self._path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno == errno.ENOLCK:  # No locks here: trust a live local pid.
        holder = self._holder()
        if (holder.get('host') == socket.gethostname()
            and isinstance(holder.get('pid'), int)
            and holder['pid'] != os.getpid() and _pid_alive(holder['pid'])):
          os.close(fd)
          self._refuse(holder)
        logging.warning('%s: the filesystem has no locks; checked the pid '
                        'only.', self._path)
      else:
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
          raise
        self._refuse(self._holder())
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'started': time.time()}).encode())
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      fcntl.lockf(self._fd, fcntl.LOCK_UN)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


# ------------------------------------------ resuming with a changed config

# Fields that fix the shapes of the saved state (or what its rows mean, like
# the vocabulary): a run cannot resume across a change of them.
_SHAPE_PREFIXES = ('model.', 'data.spec.', 'data.vocab.')
# `model` fields that change computation, not shapes.
_MODEL_RUNTIME_FIELDS = ('model.dtype', 'model.remat', 'model.remat_policy',
                         'model.dropout', 'model.droppath')
# Fields that fix the structure of the optimizer state: the sparse token-table
# update keeps the table's moments apart (train_step.TrainState).
_STATE_FIELDS = ('optimizer.token_table_update',)
# What a saved config without the field meant: it is from before the field
# existed, when the table was updated densely. The caption-phrase fields of
# the batch (issue 12) shape no saved state: a run from before them resumes.
_SAVED_DEFAULTS = {'optimizer.token_table_update': 'dense',
                   'data.spec.max_phrases': 8,
                   'data.spec.max_phrase_tokens': 4,
                   'data.shapes_world.caption_drop_fraction': 0.0}


class ResumeConfigError(ValueError):
  """The new config changes the shapes of a checkpointed run."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, Mapping) and tree:
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def changes_shapes(field: str) -> bool:
  """Whether a (dotted) config field fixes shapes of the saved state."""
  return ((field.startswith(_SHAPE_PREFIXES)
           and field not in _MODEL_RUNTIME_FIELDS) or field in _STATE_FIELDS)


def config_changes(saved: Mapping[str, Any],
                   new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """[(dotted field, saved value, new value)] of the fields that differ."""
  absent = '(absent)'
  a, b = _flatten(checkpointing.to_jsonable(saved)), _flatten(checkpointing.to_jsonable(new))
  a = {**{k: v for k, v in _SAVED_DEFAULTS.items() if k in b}, **a}
  return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
          if a.get(k, absent) != b.get(k, absent)]


def check_resume_config(workdir: str, saved: Mapping[str, Any],
                        new: Mapping[str, Any]) -> list[str]:
  """Compares a workdir's saved config with the config resuming it.

  Args:
    workdir: the run's directory (for messages).
    saved: the saved config (``WORKDIR/config.json``) as a dict.
    new: the new config as a dict.

  Returns:
    The accepted changes, one 'field: old -> new' line each (empty when the
    configs are equal).

  Raises:
    ResumeConfigError: a field that fixes shapes changed; every such field is
      named, with the way out.
  """
  changes = config_changes(saved, new)
  refused = [f'{k}: {old!r} -> {new_value!r}' for k, old, new_value in changes
             if changes_shapes(k)]
  if refused:
    lines = '\n  '.join(refused)
    raise ResumeConfigError(
        f'{workdir} holds checkpoints of a run whose config differs in fields '
        f'that fix the shapes of the saved state:\n  {lines}\nResuming would '
        'not fit the checkpoint. Revert these fields to resume, or train the '
        'new config in a new --workdir (--config.init_from='
        f'{workdir} starts it from this run\'s parameters, if their shapes '
        'still fit the new model).')
  return [f'{k}: {old!r} -> {new_value!r}' for k, old, new_value in changes]


def _has_checkpoint(workdir: str) -> bool:
  return bool(checkpointing.committed_steps(epath.Path(workdir) / checkpointing.CHECKPOINT_SUBDIR))


def check_resume(workdir: str, config: Any) -> str | None:
  """Compares `WORKDIR/config.json` with the config starting in `workdir`.

  Every process may call it (it only reads). When the workdir has a
  checkpoint, a changed field that fixes shapes raises; any other change is
  logged, one field a line.

  Args:
    workdir: the run's directory.
    config: the new `ml_collections.ConfigDict`.

  Returns:
    The saved config's text when it differs (the caller keeps it beside the
    new one, as `config.STEP.json`), else None.

  Raises:
    ResumeConfigError: see `check_resume_config`.
  """
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    return None
  text = path.read_text()
  saved = json.loads(text)
  new = json.loads(config.to_json_best_effort())
  if _has_checkpoint(workdir):
    changed = check_resume_config(workdir, saved, new)
  else:  # Nothing to resume: any change is fine, still recorded.
    changed = [f'{k}: {a!r} -> {b!r}' for k, a, b in config_changes(saved, new)]
  if changed and jax.process_index() == 0:
    logging.warning('The config differs from the one saved in %s:\n  %s',
                    path, '\n  '.join(changed))
  return text if changed else None


def check_resume_vocab(workdir: str, vocab: Any) -> None:
  """Refuses to resume a run whose vocabulary (the token rows) changed.

  Args:
    workdir: the run's directory, with the `vocab.txt` it was trained with.
    vocab: the vocabulary of the new run (anything with `save(path)`).

  Raises:
    ResumeConfigError: the workdir has a checkpoint and its vocab.txt differs.
  """
  saved = epath.Path(workdir) / 'vocab.txt'
  if not saved.exists() or not _has_checkpoint(workdir):
    return
  with tempfile.TemporaryDirectory() as tmp:
    vocab.save(os.path.join(tmp, 'vocab.txt'))
    with open(os.path.join(tmp, 'vocab.txt'), encoding='utf-8') as f:
      new = f.read()
  if new != saved.read_text():
    raise ResumeConfigError(
        f'The vocabulary built from the data ({len(vocab)} entries) differs '
        f'from the one this run was trained with ({saved}): the token rows of '
        'the checkpoint would change meaning. Restore the training data (or '
        'set config.data.vocab.path to the saved vocab.txt) to resume, or use '
        'a new --workdir.')
