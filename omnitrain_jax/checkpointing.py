"""Checkpointing: the one module in omnitrain_jax that calls orbax.

orbax's API moves quickly (the legacy `save(step, pytree)` already fails in
0.12.8), so the rest of the project sees only this small surface:

* `Checkpointer(workdir, ...)`: an `ocp.CheckpointManager` over
  `WORKDIR/checkpoints/STEP/` with three named items:
    - `state`: any pytree of `jax.Array`s (a flax `TrainState`-like dataclass or
      a dict: params, opt_state, step), saved asynchronously;
    - `data_iter`: the grain iterator's state, one JSON file per JAX process
      (`grain.checkpoint.CheckpointSave/CheckpointRestore`), so a resumed run
      continues the same example sequence;
    - `meta`: JSON with the config as a dict, the step, metrics so far, the
      package version and the format version.
  Restores go into an *abstract* state whose leaves carry the target sharding,
  so a checkpoint saved on one mesh restores onto another.
* `restore_or_init(...)`: resume-first logic. Latest checkpoint in the workdir
  > `init_from` (another run's checkpoint: params only, for fine-tuning)
  > scratch (returns None; the caller runs its jitted init). Given the new
  run's vocabulary, `init_from`'s token table is matched to it by token
  string (the source run's ``WORKDIR/vocab.txt``; `vocab_transfer`), as are
  the params `restore_params` reads for evaluation / prediction with another
  vocabulary.
* `PreemptionGuard`: turns SIGTERM (the preemption notice on Cloud TPU, GKE and
  SLURM) into a stop at a step every process agrees on; in the sections the
  trainer marks (start-up, the wait for a batch, evaluation) a signal that
  cannot wait for a step raises `runtime.StopRequested`.
* Integrity: every save carries `STEP/checksums.json` (size and crc32 of each
  file), written by process 0 before orbax commits the step. Restores verify
  it first: a damaged step (flipped bytes, truncated or deleted files) is
  reported by path, renamed `STEP.damaged` and the previous good step is
  used; `CheckpointError` names every step only when none is good. Steps
  without a manifest (older versions) restore unverified, with a warning, and
  fall back the same way if orbax cannot read them. Readers (`restore_params`,
  `restore_params_from`) verify too but never rename.
* `DiskFullError`: a save that fails for lack of space says so, with the
  directory, the checkpoint's size and the free space.
* `WorkdirLock`: one trainer per workdir (fcntl lock, released by the kernel
  when the holder dies). `check_resume`/`check_resume_vocab`: a resumed run
  may change the batch size, steps, learning rate... (logged, the old config
  kept as `config.STEP.json`) but not the fields that fix shapes.

Typical loop (every process runs it; orbax coordinates multi-host writes)::

  ckpt = checkpointing.Checkpointer(workdir, save_every_steps=1000)
  restored = checkpointing.restore_or_init(
      ckpt, abstract_state, train_iter, init_from=config.get('init_from'))
  if restored is not None and restored.source == 'workdir':
    state, step = restored.state, restored.step
  else:
    state, step = jit_init(rng), 0
    if restored is not None:  # init_from: another run's params.
      state = checkpointing.replace_fields(state, restored.state)
  guard = checkpointing.PreemptionGuard()
  while step < num_steps:
    state, metrics = train_step(state, next(train_iter))
    step += 1
    stop = guard.should_stop(step)
    ckpt.maybe_save(step, state, train_iter, meta, force=stop or step == num_steps)
    if stop:
      break
  ckpt.close()  # Waits for the last async save.

The iterator must be saved right after the step that consumed its last batch:
`maybe_save` reads its state synchronously, so batch `step + 1` is the first
one a resumed run sees.

How orbax 0.12.8 marks a finished checkpoint (read from
`orbax/checkpoint/_src/path/atomicity.py`, `temporary_paths.py`, `step.py`):

* Local/POSIX paths (`AtomicityMode.AUTO` -> `AtomicRenameTemporaryPath`): a
  step is written to `STEP.orbax-checkpoint-tmp-<timestamp>/`; on finalize
  orbax writes `commit_success.txt` into it and renames it to `STEP/`. A step is
  "finalized" iff its name has no `.orbax-checkpoint-tmp` suffix. A process
  killed mid-save leaves only the tmp directory.
* `gs://` paths (`CommitFileTemporaryPath`, also selectable here with
  `commit_mode='commit_file'`, e.g. for GCSFuse): the step is written in place
  to `STEP/` and is finalized iff `STEP/commit_success.txt` exists.

Both modes leave `commit_success.txt` in every finished step, so
`Checkpointer.latest_step()` additionally requires it: a step directory that
lacks it (a partial `gsutil cp`/`rsync` of a checkpoint, a killed GCS save) is
never restored, even where orbax's rename mode alone would accept it.
Unfinished tmp directories are deleted when the next `Checkpointer` opens the
directory (`cleanup_tmp_directories=True`).

Preemption: JAX's distributed runtime installs its own C++ SIGTERM handler when
`jax.distributed.initialize()` runs (with `jax_enable_preemption_service`, on
by default) and agrees on a stop step across hosts through
`multihost_utils.reached_preemption_sync_point` (present in jax 0.10.2). A
Python `signal.signal` handler would replace that C++ handler, and hosts that
stopped at different steps would deadlock in the collective save, so in
multi-process runs `PreemptionGuard` only consults the sync point; in
single-process runs (where the sync point always returns False) it installs a
Python handler that sets a flag.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.metadata
import json
import os
import shutil
import signal
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import grain
import grain.checkpoint  # pylint: disable=unused-import  # Registers CheckpointSave/Restore with orbax.
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from omnitrain_jax import vocab_transfer
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

CHECKPOINT_SUBDIR = 'checkpoints'
STATE = 'state'
DATA_ITER = 'data_iter'
META = 'meta'
# orbax's atomicity_types.COMMIT_SUCCESS_FILE (not public API): written into
# every finished step directory in both atomicity modes.
COMMIT_MARKER = 'commit_success.txt'
# orbax's TMP_DIR_SUFFIX: unfinished steps in rename mode.
TMP_SUFFIX = '.orbax-checkpoint-tmp'
# Bump when the layout of `meta` or the item names change.
META_FORMAT_VERSION = 1
# The checksum manifest of a step: {relative path: [size, crc32]} of every file
# of the step directory, written before orbax commits the step (see
# `Checkpointer._write_manifest`), so a finished step always has one; steps of
# older versions have none and restore "unverified", with a warning.
MANIFEST = 'checksums.json'
MANIFEST_FORMAT_VERSION = 1
# Written or updated by orbax's commit, after the manifest: checked for
# presence only.
_UNHASHED = ('_CHECKPOINT_METADATA', COMMIT_MARKER)
# A damaged step is renamed `STEP.damaged` (kept for inspection, out of orbax's
# step list, so keep-N rotation never counts it and the step can be redone).
DAMAGED_SUFFIX = '.damaged'
# The token table in the params (`models.omnidet.TOKEN_TABLE`): restored by
# token string when the vocabularies differ (`restore_params_from`).
TOKEN_TABLE = 'token_embedding'

_COMMIT_MODES = {
    'auto': ocp.options.AtomicityMode.AUTO,
    'rename': ocp.options.AtomicityMode.ATOMIC_RENAME,
    'commit_file': ocp.options.AtomicityMode.COMMIT_FILE,
}


def _package_version() -> str:
  try:
    return importlib.metadata.version('omnitrain_jax')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def to_jsonable(value: Any) -> Any:
  """Converts a config/metrics tree to plain JSON types.

  `ml_collections.ConfigDict` (anything with `to_dict()`), mappings, sequences,
  numpy/JAX scalars and arrays are converted; anything else becomes `str(x)`
  so a save never fails late in a run on an odd config value.

  Args:
    value: The tree to convert.

  Returns:
    A tree of dicts, lists, str, int, float, bool and None.
  """
  if hasattr(value, 'to_dict') and callable(value.to_dict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    return value
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  return str(value)


def _to_abstract(abstract_state: Any) -> Any:
  """Checks that every leaf carries a sharding; jax.Arrays become abstract."""
  missing = []

  def convert(path, leaf):
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      missing.append(jax.tree_util.keystr(path))
    return leaf

  abstract = jax.tree_util.tree_map_with_path(convert, abstract_state)
  if missing:
    raise ValueError(
        f'abstract_state leaves {missing[:5]} (of {len(missing)}) have no '
        'sharding, so orbax cannot place them on this mesh. Build the target '
        'as jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, '
        'spec)) for every leaf, e.g. jax.tree.map(lambda s, sh: '
        'jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), '
        'jax.eval_shape(init_fn, rng), shardings).')
  return abstract


def _get_field(tree: Any, key: str) -> Any:
  if isinstance(tree, Mapping):
    if key not in tree:
      raise ValueError(
          f'init_from_keys has {key!r} but the state has keys '
          f'{sorted(tree)}; pass keys that exist in the state.')
    return tree[key]
  if not hasattr(tree, key):
    raise ValueError(
        f'init_from_keys has {key!r} but {type(tree).__name__} has no such '
        'field; pass field names of the state.')
  return getattr(tree, key)


def replace_fields(state: Any, fields: Mapping[str, Any]) -> Any:
  """Returns `state` with top-level fields replaced (dict or dataclass).

  Used to put the params restored by `restore_or_init` from `init_from` into a
  freshly initialized state.

  Args:
    state: A dict-like, a flax struct (has `.replace`) or a dataclass.
    fields: Field name to new value.

  Returns:
    A new state of the same type.
  """
  if isinstance(state, Mapping):
    updated = dict(state)
    updated.update(fields)
    try:
      return type(state)(updated)
    except TypeError:
      return updated
  if hasattr(state, 'replace') and callable(state.replace):
    return state.replace(**fields)
  if dataclasses.is_dataclass(state):
    return dataclasses.replace(state, **fields)
  raise ValueError(
      f'Cannot replace fields of a {type(state).__name__}; use a dict, a flax '
      'struct dataclass or a dataclass as the train state.')


class CheckpointError(RuntimeError):
  """A checkpoint cannot be saved or restored; the message names it and the fix."""


class DiskFullError(CheckpointError):
  """A save failed for lack of space."""


def _walk_files(directory: epath.Path, prefix: str = '') -> dict[str, epath.Path]:
  """Relative path -> file, for every file under `directory` (local or gs://)."""
  files = {}
  for child in directory.iterdir():
    rel = f'{prefix}{child.name}'
    if child.is_dir():
      files.update(_walk_files(child, rel + '/'))
    else:
      files[rel] = child
  return files


def _file_checksum(path: epath.Path) -> tuple[int, int]:
  """(size, crc32) of a file, read in 4 MiB blocks."""
  crc, size = 0, 0
  with path.open('rb') as f:
    while block := f.read(1 << 22):
      crc = zlib.crc32(block, crc)
      size += len(block)
  return size, crc


def write_manifest(step_dir: epath.PathLike) -> None:
  """Writes `STEP/checksums.json` over the files of a step directory.

  crc32 (several GB/s, enough to catch flipped, truncated or missing bytes; not
  a defence against deliberate tampering) and the size of every file, except
  the files orbax writes or updates when it commits (`_UNHASHED`), which are
  only required to exist.
  """
  step_dir = epath.Path(step_dir)
  files = {}
  for rel, path in sorted(_walk_files(step_dir).items()):
    if rel == MANIFEST or rel in _UNHASHED:
      continue
    files[rel] = list(_file_checksum(path))
  manifest = {'format_version': MANIFEST_FORMAT_VERSION, 'algorithm': 'crc32',
              'files': files, 'present': list(_UNHASHED)}
  (step_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify_checkpoint(step_dir: epath.PathLike) -> tuple[bool, list[str]]:
  """Checks a finished step directory against its checksum manifest.

  Args:
    step_dir: `checkpoints/STEP`.

  Returns:
    (verified, problems): problems is empty when the step is usable; verified
    is False for a step without a manifest (saved by an older version, or
    copied without it), which is usable but unchecked.
  """
  step_dir = epath.Path(step_dir)
  manifest_path = step_dir / MANIFEST
  if not manifest_path.exists():
    problems = [f'{step_dir / name}: missing' for name in ('_CHECKPOINT_METADATA',
                                                           STATE)
                if not (step_dir / name).exists()]
    return False, problems
  try:
    manifest = json.loads(manifest_path.read_text())
    expected = manifest['files']
  except (ValueError, KeyError, TypeError) as e:
    return True, [f'{manifest_path}: unreadable manifest ({e})']
  problems = []
  for name in manifest.get('present', ()):
    if not (step_dir / name).exists():
      problems.append(f'{step_dir / name}: missing')
  for rel, (size, crc) in expected.items():
    path = step_dir / rel
    if not path.exists():
      problems.append(f'{path}: missing')
      continue
    got_size, got_crc = _file_checksum(path)
    if got_size != size:
      problems.append(f'{path}: {got_size} bytes, {size} when saved (truncated '
                      'or overwritten)')
    elif got_crc != crc:
      problems.append(f'{path}: checksum mismatch (the bytes changed since the '
                      'save: disk or copy corruption)')
  return True, problems


def _problems_text(problems: Sequence[str], limit: int = 5) -> str:
  more = f' (and {len(problems) - limit} more)' if len(problems) > limit else ''
  return '; '.join(problems[:limit]) + more


def _is_disk_full(error: BaseException) -> bool:
  """Whether `error` or its causes is ENOSPC (OSError, or tensorstore's text)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                      errno.EDQUOT):
      return True
    text = str(error)
    if ('No space left on device' in text or "os_error_code='28'" in text
        or 'Disk quota exceeded' in text):
      return True
    error = error.__cause__ or error.__context__
  return False


def _human_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n} B'


def _tree_nbytes(tree: Any) -> int:
  return int(sum(getattr(leaf, 'nbytes', 0) for leaf in jax.tree.leaves(tree)))


def _quarantine(step_dir: epath.Path) -> epath.Path:
  """Renames a damaged step out of orbax's step list; returns the new path."""
  target = step_dir.parent / f'{step_dir.name}{DAMAGED_SUFFIX}'
  n = 1
  while target.exists():
    n += 1
    target = step_dir.parent / f'{step_dir.name}{DAMAGED_SUFFIX}-{n}'
  step_dir.rename(target)
  return target


def _none_good_error(directory: epath.Path,
                     bad: Sequence[tuple[epath.Path, str]]) -> CheckpointError:
  lines = '\n'.join(f'  {path}: {why}' for path, why in bad)
  return CheckpointError(
      f'No usable checkpoint in {directory}: every finished step is damaged:\n'
      f'{lines}\nRestore the files from a copy, or move the damaged steps '
      'away to start this workdir from scratch (or use a new --workdir, with '
      '--config.init_from=DIR to start from another run\'s parameters).')


class Checkpointer:
  """Async, keep-N, atomic checkpoints of state + data iterator + meta.

  All JAX processes must construct it and call `maybe_save`/`restore` at the
  same steps (orbax synchronizes them and writes each array shard from the
  process that owns it; `meta` is written by process 0 only, the iterator
  state once per process).
  """

  def __init__(self,
               workdir: epath.PathLike,
               *,
               save_every_steps: int,
               max_to_keep: int | None = 3,
               keep_every_steps: int | None = None,
               async_save: bool = True,
               commit_mode: str = 'auto'):
    """Opens (creating if needed) `workdir/checkpoints`.

    Args:
      workdir: The run's directory (local or `gs://`).
      save_every_steps: `maybe_save` saves when `step % save_every_steps == 0`
        (and when forced or at a preemption sync point).
      max_to_keep: How many recent checkpoints to keep; None keeps all.
      keep_every_steps: If set, checkpoints at multiples of it are never
        deleted (e.g. for later evaluation).
      async_save: Write in a background thread after copying arrays to host.
      commit_mode: 'auto' (orbax: rename on POSIX, commit file on GCS),
        'rename' or 'commit_file' (in-place + commit_success.txt, e.g. for
        GCSFuse).
    """
    if save_every_steps < 1:
      raise ValueError(
          f'save_every_steps={save_every_steps} must be >= 1; use a large '
          'value to save only when forced.')
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(
          f'max_to_keep={max_to_keep} must be >= 1, or None to keep all.')
    if commit_mode not in _COMMIT_MODES:
      raise ValueError(
          f'commit_mode={commit_mode!r} is not one of {sorted(_COMMIT_MODES)}.')
    self._directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # orbax's default policy also saves the first step of a run without
        # checkpoints (InitialSavePolicy); callers force that save if they
        # want it, so "every N steps" means exactly that.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        max_to_keep=max_to_keep,
        keep_period=keep_every_steps,
        enable_async_checkpointing=async_save,
        # Deletes unfinished saves of a killed run before the next save.
        cleanup_tmp_directories=True,
        atomicity_options=ocp.options.AtomicityOptions(
            mode=_COMMIT_MODES[commit_mode]),
        # Runs on the save thread after every file is written and before the
        # commit (rename / commit_success.txt): the manifest is part of what
        # makes a step finished.
        async_options=(ocp.options.AsyncOptions(
            post_finalization_callback=self._write_manifest)
                       if async_save else None),
        create=True,
    )
    self._async = async_save
    self._failed = False  # A save error was raised already.
    # (step, bytes of arrays) of the last save started, for error messages.
    self._saving: tuple[int, int] | None = None
    self._manager = ocp.CheckpointManager(
        self._directory, item_names=(STATE, DATA_ITER, META), options=options)

  @property
  def directory(self) -> epath.Path:
    """`workdir/checkpoints`."""
    return self._directory

  def _step_dir(self, step: int) -> epath.Path:
    return self._directory / str(step)

  def _is_committed(self, step: int) -> bool:
    return (self._step_dir(step) / COMMIT_MARKER).exists()

  def _write_manifest(self) -> None:
    """Writes the manifest of the step being committed (orbax's save thread).

    Every file is written and orbax has not committed yet, so the step is the
    newest unfinished one: `STEP.orbax-checkpoint-tmp*` (rename mode) or a
    `STEP/` without the commit marker (commit-file mode). Process 0 only; it
    runs after orbax's barrier, when every process's files are in place.
    """
    if jax.process_index() != 0:
      return
    tmp, in_place = [], []
    for path in self._directory.iterdir():
      head = path.name.split('.', 1)[0]
      if not head.isdigit() or not path.is_dir():
        continue
      if TMP_SUFFIX in path.name:
        tmp.append((int(head), path))
      elif path.name.isdigit() and not (path / COMMIT_MARKER).exists():
        in_place.append((int(head), path))
    candidates = tmp or in_place
    if not candidates:
      logging.warning('No unfinished step in %s to write %s into; the step '
                      'will restore unverified.', self._directory, MANIFEST)
      return
    write_manifest(max(candidates, key=lambda c: c[0])[1])

  def _save_failed(self, error: BaseException) -> None:
    """Re-raises a save error, as a `DiskFullError` when the disk is full."""
    self._failed = True
    if not _is_disk_full(error):
      raise error
    step, nbytes = self._saving or (-1, 0)
    try:
      free = _human_bytes(shutil.disk_usage(os.fspath(self._directory)).free)
    except (OSError, TypeError, ValueError):  # gs:// and the like.
      free = 'unknown'
    latest = committed_steps(self._directory)
    need = f'{_human_bytes(nbytes)} of arrays'
    if latest:
      try:
        size = sum(p.stat().length for p in _walk_files(
            self._step_dir(latest[-1])).values())
        need += f'; step {latest[-1]} takes {_human_bytes(size)} on disk'
      except Exception:  # pylint: disable=broad-except  # Only a message.
        pass
    raise DiskFullError(
        f'Disk full: saving checkpoint step {step} to {self._directory} failed '
        f'(No space left on device). A checkpoint of this state needs about '
        f'{need}, and {free} is free there now (keep-N needs room for one '
        'more checkpoint than it keeps). Free space (older runs, '
        f'{self._directory}/*{DAMAGED_SUFFIX}) or move the workdir to a larger '
        'disk, then run the same command again: it resumes from the last '
        f'finished checkpoint ({latest[-1] if latest else "none: from scratch"}'
        '); the torn save is never restored.') from error

  def all_steps(self) -> list[int]:
    """Finished, restorable steps, ascending."""
    return committed_steps(self._directory)

  def latest_step(self) -> int | None:
    """The latest finished step, or None if there is none.

    A step still being written (async) or left unfinished by a killed process is
    skipped: it has a tmp name (rename mode) or no commit marker.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    saving = bool(steps) and self._manager.is_saving_in_progress()
    in_flight = steps[0] if saving else None
    for step in steps:
      if self._is_committed(step):
        return step
      if step != in_flight and jax.process_index() == 0:
        logging.warning(
            'Skipping checkpoint %s: no %s (unfinished save or partial copy). '
            'Delete the directory if no process is writing it.',
            self._step_dir(step), COMMIT_MARKER)
    return None

  def latest_good_step(self) -> int | None:
    """The latest finished step that passes its checksums (process 0 only).

    Damaged newer steps are reported by path and renamed `STEP.damaged`, so
    that they are never restored, keep-N rotation does not count them (it
    could otherwise delete the good step restored here) and the resumed run
    can save those steps again.

    Returns:
      The step, or None if the directory holds no finished step.

    Raises:
      CheckpointError: there are finished steps and every one is damaged
        (nothing is renamed then).
    """
    self._manager.wait_until_finished()
    bad = []
    for step in reversed(committed_steps(self._directory)):
      step_dir = self._step_dir(step)
      verified, problems = verify_checkpoint(step_dir)
      if problems:
        bad.append((step_dir, _problems_text(problems)))
        continue
      if not verified:
        logging.warning('Checkpoint %s has no %s (saved by an older version or '
                        'copied without it): restoring it unverified.',
                        step_dir, MANIFEST)
      self._set_aside(bad, f'falling back to step {step} ({step_dir})')
      return step
    if bad:
      raise _none_good_error(self._directory, bad)
    return None

  def _set_aside(self, bad: Sequence[tuple[epath.Path, str]],
                 fallback: str) -> None:
    """Reports damaged steps in one message each and renames them."""
    for step_dir, why in bad:
      moved = _quarantine(step_dir)
      logging.error('Checkpoint %s is damaged (%s): %s; it is kept as %s.',
                    step_dir, why, fallback, moved)
    if bad:
      self._manager.reload()

  def maybe_save(self,
                 step: int,
                 state: Any,
                 data_iter: Any = None,
                 meta: Mapping[str, Any] | None = None,
                 *,
                 force: bool = False) -> bool:
    """Starts an async save if `step` is due, forced or a preemption step.

    Cheap when no save is due (no host transfer, no JSON). The arrays are
    copied to host before this returns, so `state` may be donated afterwards;
    files are written in the background.

    Args:
      step: The number of completed train steps.
      state: Pytree of jax.Arrays.
      data_iter: A grain `DatasetIterator`/`DataLoaderIterator` positioned after
        the last batch of `step`, or None.
      meta: JSON-able extras, e.g. `{'config': config, 'metrics': {...}}`;
        `step`, `version`, `format_version` and `time` are added.
      force: Save even if `step` is not a multiple of `save_every_steps`.

    Returns:
      Whether a save was started. A step that is already saved is skipped.
    """
    step = int(step)
    if not force and not self._manager.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False
    full_meta = to_jsonable(dict(meta or {}))
    full_meta.update(step=step, version=_package_version(),
                     format_version=META_FORMAT_VERSION, time=time.time())
    items = {
        STATE: ocp.args.StandardSave(state),
        META: ocp.args.JsonSave(full_meta),
    }
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      # Waits for the previous save first: its error surfaces here.
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(e)
    self._saving = (step, _tree_nbytes(state))
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items),
                                 force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(e)
    if saved and not self._async and jax.process_index() == 0:
      # Synchronous saves have no pre-commit hook: the step is committed
      # already, and a crash right here leaves it unverified.
      write_manifest(self._step_dir(step))
    if saved and jax.process_index() == 0:
      logging.info('Saving checkpoint for step %d to %s.', step,
                   self._step_dir(step))
    return saved

  def restore(self,
              step: int | None,
              abstract_state: Any,
              data_iter: Any = None,
              *,
              verified_steps: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores `state` (and `data_iter` in place) from a finished step.

    Args:
      step: The step to restore, or None for `latest_step()`.
      abstract_state: The target: a pytree of `jax.ShapeDtypeStruct` (or
        jax.Array) whose leaves carry the target sharding; it may differ from
        the sharding the checkpoint was saved with.
      data_iter: A fresh grain iterator of the same pipeline to set to the saved
        position, or None to leave the data alone.
      verified_steps: the caller has checked `step` (`latest_good_step`).

    Returns:
      (state, meta): the restored state with the target shardings and the
      saved meta dict.

    Raises:
      CheckpointError: the step fails its checksums, or orbax cannot read it
        (one message naming the step; orbax's error is the cause).
    """
    abstract_state = _to_abstract(abstract_state)
    # A step of this run may still be in flight (async): finish it first.
    self._manager.wait_until_finished()
    explicit = step is not None
    if step is None:
      step = self.latest_good_step()
      if step is None:
        raise ValueError(
            f'No finished checkpoint in {self._directory}; use '
            'restore_or_init to fall back to init_from or scratch.')
    step = int(step)
    if step not in self._manager.all_steps() or not self._is_committed(step):
      raise ValueError(
          f'Step {step} is not a finished checkpoint in {self._directory}; '
          f'finished steps: {self.all_steps()}.')
    if explicit and not verified_steps:
      _, problems = verify_checkpoint(self._step_dir(step))
      if problems:
        raise CheckpointError(
            f'Checkpoint {self._step_dir(step)} is damaged: '
            f'{_problems_text(problems)}. Restore another step (finished: '
            f'{self.all_steps()}) or pass step=None for the latest good one.')
    items = {
        STATE: ocp.args.StandardRestore(abstract_state),
        META: ocp.args.JsonRestore(),
    }
    if data_iter is not None:
      if not (self._step_dir(step) / DATA_ITER).exists():
        raise ValueError(
            f'Checkpoint {self._step_dir(step)} has no {DATA_ITER!r} item '
            '(it was saved without an iterator); pass data_iter=None to '
            'restore only the state and start the data from the beginning.')
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'Restoring checkpoint {self._step_dir(step)} failed: '
          f'{_first_line(e)}. If the files are damaged, move the step away to '
          'fall back to the previous one; if the config changed shapes since '
          'the save, use a new --workdir (with --config.init_from to keep the '
          'parameters).') from e
    if jax.process_index() == 0:
      logging.info('Restored checkpoint %s.', self._step_dir(step))
    return restored[STATE], dict(restored[META] or {})

  def wait(self) -> None:
    """Blocks until the in-flight async save (if any) is finished.

    Raises:
      DiskFullError: the save failed for lack of space (other save errors are
        re-raised as they are).
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(e)

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads.

    A save error already raised to the caller is not raised again.
    """
    raised_before = self._failed
    try:
      self.wait()
    except Exception:  # pylint: disable=broad-except
      if not raised_before:
        raise
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore_or_init` found.

  Attributes:
    source: 'workdir' (resume: `state` is the full state) or 'init_from'
      (`state` is a dict {key: restored subtree} of `init_from_keys`, to merge
      into a fresh state with `replace_fields`).
    step: The step to continue from: the checkpoint's step when resuming, 0
      for init_from.
    state: See `source`.
    meta: The checkpoint's meta dict (config, metrics, version, ...).
    path: The step directory it came from.
    vocab_report: How the token rows were mapped to another vocabulary
      (`vocab_transfer.TransferReport`), None when the table was restored as
      saved.
  """
  source: str
  step: int
  state: Any
  meta: dict[str, Any]
  path: str
  vocab_report: vocab_transfer.TransferReport | None = None


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  line = text[0] if text else type(error).__name__
  return f'{type(error).__name__}: {line[:500]}'


def committed_steps(directory: epath.PathLike) -> list[int]:
  """The finished steps of a checkpoints directory, ascending (read-only).

  A step is finished when its directory is named by the step number and holds
  the commit marker: a save still in flight (tmp name) or left unfinished by a
  killed process (no marker) is not listed.
  """
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / COMMIT_MARKER).exists())


def _check_or_raise(step_dir: epath.Path) -> None:
  """Raises CheckpointError if `step_dir` fails its checksums."""
  verified, problems = verify_checkpoint(step_dir)
  if problems:
    raise CheckpointError(
        f'Checkpoint {step_dir} is damaged: {_problems_text(problems)}. '
        f'Use another step (finished: {committed_steps(step_dir.parent)}).')
  if not verified and jax.process_index() == 0:
    logging.warning('Checkpoint %s has no %s: reading it unverified.',
                    step_dir, MANIFEST)


def _latest_good_readonly(directory: epath.Path) -> int | None:
  """The newest step of `directory` that passes its checksums; renames none.

  For readers (evaluation, prediction, init_from) that must not touch a
  directory a trainer may be using. Damaged newer steps are logged.

  Raises:
    CheckpointError: every finished step is damaged.
  """
  bad = []
  for step in reversed(committed_steps(directory)):
    step_dir = directory / str(step)
    verified, problems = verify_checkpoint(step_dir)
    if problems:
      bad.append((step_dir, _problems_text(problems)))
      continue
    if jax.process_index() == 0:
      for bad_dir, why in bad:
        logging.error('Checkpoint %s is damaged (%s): using step %d (%s) '
                      'instead.', bad_dir, why, step, step_dir)
      if not verified:
        logging.warning('Checkpoint %s has no %s: reading it unverified.',
                        step_dir, MANIFEST)
    return step
  if bad:
    raise _none_good_error(directory, bad)
  return None


def _resolve_init_from(path: epath.PathLike,
                       verify: bool = True) -> tuple[epath.Path, int]:
  """Returns (checkpoints dir, step) for a step dir, checkpoints dir or workdir."""
  if '://' not in str(path):  # Orbax reads only absolute paths.
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  path = epath.Path(path)
  if (path / STATE).is_dir():
    if TMP_SUFFIX in path.name or not path.name.isdigit():
      raise ValueError(
          f'init_from={path} looks like an unfinished or unnamed step '
          'directory; point it at a finished STEP directory, a checkpoints '
          'directory or a workdir.')
    if not (path / COMMIT_MARKER).exists():
      raise ValueError(f'init_from={path} has no {COMMIT_MARKER}: the save did '
                       'not finish. Use another step.')
    if verify:
      _check_or_raise(path)
    return path.parent, int(path.name)
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  if not path.is_dir():
    raise ValueError(f'init_from={path} does not exist.')
  step = _latest_good_readonly(path)
  if step is None:
    raise ValueError(
        f'init_from={path} holds no finished checkpoint (no STEP/{COMMIT_MARKER}'
        '); point it at a run workdir, its checkpoints/ or a STEP directory.')
  return path, step


def source_vocab(init_from: epath.PathLike
                 ) -> vocabulary_lib.Vocabulary | None:
  """The vocabulary another run trained with: its ``WORKDIR/vocab.txt``.

  Args:
    init_from: the run's workdir, its ``checkpoints/`` or a ``STEP`` directory
      (as `restore_params_from` takes).

  Returns:
    The vocabulary, or None when the workdir keeps none (runs older than the
    copy the trainer writes at every start).
  """
  path = epath.Path(init_from)
  if (path / STATE).is_dir():  # checkpoints/STEP
    path = path.parent
  if path.name == CHECKPOINT_SUBDIR:
    path = path.parent
  vocab_path = epath.Path(vocab_transfer.workdir_vocab_path(path))
  if not vocab_path.exists():
    return None
  return vocabulary_lib.Vocabulary.load(vocab_path)


def _replicated_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """A fully replicated sharding on the devices of `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec())
  return sharding  # Single-device.


def _token_table_key(target: Any) -> str | None:
  """The key of the token table in a params tree, None if it has none."""
  if isinstance(target, Mapping) and TOKEN_TABLE in target:
    return TOKEN_TABLE
  return None


def restore_params_from(init_from: epath.PathLike,
                        abstract_state: Any,
                        keys: Sequence[str] = ('params',),
                        *,
                        verify: bool = True,
                        vocab: vocabulary_lib.Vocabulary | None = None
                        ) -> Restored:
  """Restores only `keys` of another run's `state` (e.g. for fine-tuning).

  With `vocab` (the new run's vocabulary) the token table
  (``params["token_embedding"]``) is matched **by token string** to the
  vocabulary the other run trained with (its ``WORKDIR/vocab.txt``):
  shared tokens keep their trained rows, new ones start from their word
  pieces, dropped ones are reported (`vocab_transfer.transfer_table`; one
  log line with counts and examples). The source table is read replicated,
  mapped on the host and placed on the target's sharding.

  Args:
    init_from: A run workdir, its `checkpoints/` directory (latest finished step
      is used) or one `checkpoints/STEP` directory.
    abstract_state: The *new* run's abstract state; `keys` are taken from it
      (with their target shardings). The checkpoint may hold more (optimizer
      state, other heads): only these keys are read.
    keys: Top-level fields of the state to restore.
    verify: check the step's checksums (False: the caller did).
    vocab: the new run's vocabulary; None restores the table as saved (it
      must then have the target's shape).

  Returns:
    `Restored(source='init_from', step=0, state={key: subtree}, ...)`, with
    `vocab_report` set when the token rows were mapped.

  Raises:
    CheckpointError: the step is damaged or orbax cannot read it (for a
      workdir or checkpoints directory, damaged newer steps are skipped).
  """
  directory, step = _resolve_init_from(init_from, verify=verify)
  target = {k: _get_field(abstract_state, k) for k in keys}
  target = _to_abstract(target)
  old_vocab = source_vocab(directory) if vocab is not None else None
  table_key = (_token_table_key(target.get('params'))
               if 'params' in target else None)
  remap = (old_vocab is not None and table_key is not None
           and old_vocab.tokens != vocab.tokens)
  if remap:
    # The saved table has the source's rows; read it whole, map on the host.
    new_table = target['params'][table_key]
    target['params'] = dict(target['params'])
    target['params'][table_key] = jax.ShapeDtypeStruct(
        (len(old_vocab),) + tuple(new_table.shape[1:]), new_table.dtype,
        sharding=_replicated_like(new_table.sharding))
  hint = ''
  if vocab is not None and old_vocab is None:
    hint = (f' {directory.parent} keeps no {vocab_transfer.VOCAB_FILE}, so '
            'its token rows cannot be matched to this vocabulary by token: '
            'copy the vocabulary file that run trained with to '
            f'{vocab_transfer.workdir_vocab_path(directory.parent)}.')
  manager = ocp.CheckpointManager(
      directory, item_names=(STATE, META),
      options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                STATE:
                    ocp.args.PyTreeRestore(
                        target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(
                            target),
                        partial_restore=True),
                META:
                    ocp.args.JsonRestore(),
            }))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'Restoring {list(keys)} from checkpoint {directory / str(step)} '
        f'failed: {_first_line(e)}. If the config changed shapes since that '
        f'save, the parameters do not fit this model.{hint}') from e
  finally:
    manager.close()
  path = str(directory / str(step))
  state = dict(restored[STATE])
  report = None
  if remap:
    state['params'] = dict(state['params'])
    old = state['params'][table_key]
    # Replicated: every process holds the whole source table.
    table, report = vocab_transfer.transfer_table(
        np.asarray(old.addressable_data(0)), old_vocab, vocab)
    state['params'][table_key] = jax.make_array_from_callback(
        table.shape, new_table.sharding, lambda index: table[index])
    if jax.process_index() == 0:
      logging.info('Token table from %s: %s.', path, report.summary())
  if jax.process_index() == 0:
    logging.info('Initialized %s from %s.', list(keys), path)
  return Restored(source='init_from', step=0, state=state,
                  meta=dict(restored[META] or {}), path=path,
                  vocab_report=report)


def restore_params(workdir: str, abstract_state: Any,
                   step: int | None = None, *,
                   vocab: vocabulary_lib.Vocabulary | None = None
                   ) -> tuple[Any, int]:
  """Restores only the params of a finished checkpoint onto their shardings.

  For evaluation and prediction. Opens no `Checkpointer` (which would clean
  up the in-flight saves of a trainer running in the same workdir).

  Args:
    workdir: the training run's directory.
    abstract_state: the abstract train state (`model_setup`), whose params
      carry the target shardings.
    step: the step, or None for the latest finished one.
    vocab: the vocabulary the model is built for; when it differs from the
      run's ``WORKDIR/vocab.txt``, the token rows are matched by token
      string (see `restore_params_from`).

  Returns:
    (params, step).
  """
  if '://' not in workdir:  # Orbax reads only absolute paths.
    workdir = os.path.abspath(os.path.expanduser(workdir))
  directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
  steps = committed_steps(directory)
  if not steps:
    raise ValueError(f'No finished checkpoint in {directory}; train first or '
                     'fix --workdir.')
  verify = step is not None
  if step is None:
    step = _latest_good_readonly(directory)  # Verified.
  if step not in steps:
    raise ValueError(f'--checkpoint_step={step} is not a finished checkpoint '
                     f'in {workdir}; finished steps: {steps}.')
  restored = restore_params_from(directory / str(step), abstract_state,
                                 keys=('params',), verify=verify, vocab=vocab)
  return restored.state['params'], int(step)


def restore_or_init(checkpointer: Checkpointer,
                    abstract_state: Any,
                    data_iter: Any = None,
                    *,
                    init_from: epath.PathLike | None = None,
                    init_from_keys: Sequence[str] = ('params',),
                    vocab: vocabulary_lib.Vocabulary | None = None
                   ) -> Restored | None:
  """Resume-first: workdir checkpoint > `init_from` params > scratch (None).

  Every process must call it (restores are collective).

  Args:
    checkpointer: The run's `Checkpointer`.
    abstract_state: Target pytree of ShapeDtypeStructs with shardings.
    data_iter: The training iterator, restored in place when resuming (not for
      init_from: a fine-tuning run starts its data from the beginning).
    init_from: Optional checkpoint of another run (see `restore_params_from`).
      Ignored once this run has its own checkpoint, so a preempted fine-tuning
      run resumes instead of starting over.
    init_from_keys: The state fields taken from `init_from`.
    vocab: This run's vocabulary: `init_from`'s token rows are matched to it
      by token string (`restore_params_from`), so a fine-tuning run with new
      class names keeps the trained rows of the shared tokens.

  Returns:
    A `Restored`, or None when the caller should initialize from scratch.
  """
  while True:
    step = _agreed_good_step(checkpointer)
    if step is None:
      break
    step_dir = checkpointer.directory / str(step)
    try:
      state, meta = checkpointer.restore(step, abstract_state, data_iter,
                                         verified_steps=True)
    except CheckpointError as e:
      # A verified step that orbax cannot read does not match the target
      # (e.g. changed shapes): no fall-back, that would set aside good steps.
      # An unverified one (no manifest) may be damaged: set it aside, try the
      # previous one. One process only: processes must fall back together.
      if (jax.process_count() > 1 or (step_dir / MANIFEST).exists()
          or not (step_dir / COMMIT_MARKER).exists()):
        raise
      checkpointer._set_aside(  # pylint: disable=protected-access
          [(step_dir, str(e.__cause__ or e)[:300])],
          'falling back to the previous step')
      continue
    return Restored(source='workdir', step=step, state=state, meta=meta,
                    path=str(step_dir))
  if init_from:
    return restore_params_from(init_from, abstract_state, init_from_keys,
                               vocab=vocab)
  if jax.process_index() == 0:
    logging.info('No checkpoint in %s and no init_from: starting from scratch.',
                 checkpointer.directory)
  return None


def _agreed_good_step(checkpointer: Checkpointer) -> int | None:
  """Process 0's `latest_good_step()`, on every process."""
  if jax.process_count() == 1:
    return checkpointer.latest_good_step()
  error, step = None, None
  if jax.process_index() == 0:
    try:
      step = checkpointer.latest_good_step()
    except CheckpointError as e:
      error = e
  # Process 0 verifies (and sets damaged steps aside); its answer is taken, so
  # an inconsistent listing cannot send processes to different steps.
  code = -2 if error else (-1 if step is None else step)
  code = int(multihost_utils.broadcast_one_to_all(np.int64(code)))
  if error is not None:
    raise error
  if code == -2:
    raise CheckpointError(
        f'Process 0 found no usable checkpoint in {checkpointer.directory}; '
        'its log names the damaged steps.')
  checkpointer._manager.reload()  # pylint: disable=protected-access
  return None if code == -1 else code


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f'signal {signum}'


class PreemptionGuard:
  """Says when to save and stop after a preemption notice (SIGTERM) or Ctrl-C.

  SIGINT (Ctrl-C) is handled like SIGTERM by default: the first saves at the
  end of the step and stops, a second stops at once. In sync-point mode
  (below) only SIGTERM goes through JAX's preemption service; Ctrl-C there
  stays Python's KeyboardInterrupt (no save), since one host cannot stop the
  others at a common step.

  * Multi-process with JAX's preemption service (the default after
    `jax.distributed.initialize()`): `should_stop(step)` is
    `multihost_utils.reached_preemption_sync_point(step)`, True on every process
    at the same step. No Python handler is installed (it would replace JAX's),
    so stops take effect at step ends only.
  * Single process: a Python SIGTERM handler sets a flag that `should_stop`
    returns.
  * Multi-process with the preemption service disabled: the Python handler,
    and `should_stop` all-gathers the flags (a small host collective each call)
    so every process stops at the same step.

  A stop must also work where no step ends (a stalled input pipeline, a long
  evaluation), so with the Python handler the trainer marks such sections:
  inside ``interruptible(where)`` a signal raises `runtime.StopRequested`
  at once; inside ``interruptible(where, grace_s=G)`` (the wait for a batch)
  the flag is set and the batch gets `G` seconds to arrive (a healthy
  pipeline then ends the step and saves as usual) before the handler raises.
  A second signal raises anywhere.

  `should_stop` must be called by every process at every step (the sync point
  protocol counts steps). Construct it from the main thread (signal handlers
  can only be installed there).
  """

  def __init__(self,
               signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._flag = threading.Event()
    multi_process = jax.process_count() > 1
    self._use_sync_point = (
        multi_process and jax.config.jax_enable_preemption_service)
    self._all_gather = multi_process and not self._use_sync_point
    self._previous = {}
    self._signals = 0  # Received so far.
    self._where = None  # The interruptible section the main thread is in.
    self._grace_s = None  # Its grace period (None: raise at once).
    self._detail = ''  # Its sentence for the error.
    self._timer = None  # Fires when a grace period has run out.
    self._grace_over = False
    self._resent = False  # The timer's signal is not a second one.
    self._signum = signal.SIGTERM  # Of the first signal.
    for signum in signals:
      if self._use_sync_point:
        continue  # JAX's own handler; see the class docstring.
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    from omnitrain_jax import runtime  # pylint: disable=g-import-not-at-top
    if self._resent:  # Our own, at the end of a grace period.
      self._resent = False
    else:
      self._signals += 1
      self._signum = signum
    self._flag.set()
    where = self._where
    if self._signals > 1:
      raise runtime.StopRequested(
          signum, where or 'finishing a step',
          f'A second signal: stopping at once. {self._detail}'.strip())
    if where is not None and (self._grace_s is None or self._grace_over):
      raise runtime.StopRequested(signum, where, self._detail)
    if where is not None:
      self._start_grace()
      return
    logging.warning('Received %s: will save and stop at the next step '
                    '(a second signal stops at once).', _signal_name(signum))

  def _start_grace(self) -> None:
    """Gives the current section `_grace_s` seconds before it is stopped."""
    if self._timer is not None:
      return
    logging.warning('Stop requested (%s) while %s: stopping if it does '
                    'not end within %.0f s, else at the end of the step.',
                    _signal_name(self._signum), self._where, self._grace_s)
    # Handlers run in the main thread: a timer thread re-sends the signal to
    # it when the grace period is over, which also interrupts a blocked wait.
    main = threading.main_thread().ident

    def expire():
      self._grace_over = True
      self._resent = True
      signal.pthread_kill(main, self._signum)

    self._timer = threading.Timer(self._grace_s, expire)
    self._timer.daemon = True
    self._timer.start()

  def interruptible(self, where: str, grace_s: float | None = None,
                    detail: str = ''):
    """A section where a signal stops the run (`runtime.StopRequested`).

    Args:
      where: what the main thread is doing ("waiting for the input
        pipeline"), for the message.
      grace_s: None: raise at the signal. Else the section may end normally
        for this many seconds after the signal (a stop then happens at the
        step's end, with a save).
      detail: a sentence for the error (what was saved, what to do).

    Returns:
      A context manager. Entering it after a signal already arrived raises
      at once when `grace_s` is None.
    """
    return _Interruptible(self, where, grace_s, detail)

  def set_section(self, where: str | None, detail: str = '') -> None:
    """Enters (or, with None, leaves) a section where a signal raises at
    once, without a context manager (the trainer's start-up)."""
    self._where, self._grace_s, self._detail = where, None, detail

  def request_stop(self) -> None:
    """Asks for a stop as if a signal had arrived.

    Not consulted in sync-point mode, where only JAX's own SIGTERM handling
    can start the cross-host agreement.
    """
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """Whether to save and exit after `step` (same answer on all processes)."""
    if self._use_sync_point:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except RuntimeError:  # Service shut down; nothing to synchronize with.
        return False
    if self._all_gather:
      flags = multihost_utils.process_allgather(
          np.asarray(self._flag.is_set()))
      return bool(np.any(flags))
    return self._flag.is_set()

  def close(self) -> None:
    """Restores the signal handlers that were installed before."""
    if self._timer is not None:
      self._timer.cancel()
    for signum, handler in self._previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def __enter__(self) -> PreemptionGuard:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class _Interruptible:
  """`PreemptionGuard.interruptible`'s section (not reentrant)."""

  def __init__(self, guard: PreemptionGuard, where: str,
               grace_s: float | None, detail: str):
    self.guard, self.where, self.grace_s = guard, where, grace_s
    self.detail = detail

  def __enter__(self) -> None:
    g = self.guard
    if not g._previous:  # No Python handler here (sync-point mode): no-op.
      return
    if g._flag.is_set() and (self.grace_s is None or g._grace_over):
      from omnitrain_jax import runtime  # pylint: disable=g-import-not-at-top
      raise runtime.StopRequested(g._signum, self.where, self.detail)
    g._where, g._grace_s, g._detail = self.where, self.grace_s, self.detail
    if g._flag.is_set():  # A stop is pending: this section has the grace.
      g._start_grace()

  def __exit__(self, *exc_info) -> None:
    g = self.guard
    g._where = g._grace_s = None
    g._detail = ''
    if g._timer is not None:  # The batch came in time: stop at the step end.
      g._timer.cancel()
      g._timer = None
