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
  > scratch (returns None; the caller runs its jitted init).
* `PreemptionGuard`: turns SIGTERM (the preemption notice on Cloud TPU, GKE and
  SLURM) into a stop at a step every process agrees on.

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
import importlib.metadata
import os
import signal
import threading
import time
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
        create=True,
    )
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
    saved = self._manager.save(step, args=ocp.args.Composite(**items),
                               force=force)
    if saved and jax.process_index() == 0:
      logging.info('Saving checkpoint for step %d to %s.', step,
                   self._step_dir(step))
    return saved

  def restore(self,
              step: int | None,
              abstract_state: Any,
              data_iter: Any = None) -> tuple[Any, dict[str, Any]]:
    """Restores `state` (and `data_iter` in place) from a finished step.

    Args:
      step: The step to restore, or None for `latest_step()`.
      abstract_state: The target: a pytree of `jax.ShapeDtypeStruct` (or
        jax.Array) whose leaves carry the target sharding; it may differ from
        the sharding the checkpoint was saved with.
      data_iter: A fresh grain iterator of the same pipeline to set to the saved
        position, or None to leave the data alone.

    Returns:
      (state, meta): the restored state with the target shardings and the
      saved meta dict.
    """
    abstract_state = _to_abstract(abstract_state)
    # A step of this run may still be in flight (async): finish it first.
    self._manager.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise ValueError(
            f'No finished checkpoint in {self._directory}; use '
            'restore_or_init to fall back to init_from or scratch.')
    step = int(step)
    if step not in self._manager.all_steps() or not self._is_committed(step):
      raise ValueError(
          f'Step {step} is not a finished checkpoint in {self._directory}; '
          f'finished steps: {self.all_steps()}.')
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
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if jax.process_index() == 0:
      logging.info('Restored checkpoint %s.', self._step_dir(step))
    return restored[STATE], dict(restored[META] or {})

  def wait(self) -> None:
    """Blocks until the in-flight async save (if any) is finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

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
  """
  source: str
  step: int
  state: Any
  meta: dict[str, Any]
  path: str


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


def _resolve_init_from(path: epath.PathLike) -> tuple[epath.Path, int]:
  """Returns (checkpoints dir, step) for a step dir, checkpoints dir or workdir."""
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
    return path.parent, int(path.name)
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  if not path.is_dir():
    raise ValueError(f'init_from={path} does not exist.')
  steps = committed_steps(path)
  if not steps:
    raise ValueError(
        f'init_from={path} holds no finished checkpoint (no STEP/{COMMIT_MARKER}'
        '); point it at a run workdir, its checkpoints/ or a STEP directory.')
  return path, max(steps)


def restore_params_from(init_from: epath.PathLike,
                        abstract_state: Any,
                        keys: Sequence[str] = ('params',)) -> Restored:
  """Restores only `keys` of another run's `state` (e.g. for fine-tuning).

  Args:
    init_from: A run workdir, its `checkpoints/` directory (latest finished step
      is used) or one `checkpoints/STEP` directory.
    abstract_state: The *new* run's abstract state; `keys` are taken from it
      (with their target shardings). The checkpoint may hold more (optimizer
      state, other heads): only these keys are read.
    keys: Top-level fields of the state to restore.

  Returns:
    `Restored(source='init_from', step=0, state={key: subtree}, ...)`.
  """
  directory, step = _resolve_init_from(init_from)
  target = {k: _get_field(abstract_state, k) for k in keys}
  target = _to_abstract(target)
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
  finally:
    manager.close()
  path = str(directory / str(step))
  if jax.process_index() == 0:
    logging.info('Initialized %s from %s.', list(keys), path)
  return Restored(source='init_from', step=0, state=dict(restored[STATE]),
                  meta=dict(restored[META] or {}), path=path)


def restore_params(workdir: str, abstract_state: Any,
                   step: int | None = None) -> tuple[Any, int]:
  """Restores only the params of a finished checkpoint onto their shardings.

  For evaluation and prediction. Opens no `Checkpointer` (which would clean
  up the in-flight saves of a trainer running in the same workdir).

  Args:
    workdir: the training run's directory.
    abstract_state: the abstract train state (`model_setup`), whose params
      carry the target shardings.
    step: the step, or None for the latest finished one.

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
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise ValueError(f'--checkpoint_step={step} is not a finished checkpoint '
                     f'in {workdir}; finished steps: {steps}.')
  restored = restore_params_from(directory / str(step), abstract_state,
                                 keys=('params',))
  return restored.state['params'], int(step)


def restore_or_init(checkpointer: Checkpointer,
                    abstract_state: Any,
                    data_iter: Any = None,
                    *,
                    init_from: epath.PathLike | None = None,
                    init_from_keys: Sequence[str] = ('params',)
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

  Returns:
    A `Restored`, or None when the caller should initialize from scratch.
  """
  step = checkpointer.latest_step()
  if jax.process_count() > 1:
    # Every process lists the directory itself; take process 0's answer so an
    # inconsistent listing cannot send processes to different steps.
    step = int(multihost_utils.broadcast_one_to_all(
        np.int64(-1 if step is None else step)))
    step = None if step < 0 else step
  if step is not None:
    state, meta = checkpointer.restore(step, abstract_state, data_iter)
    return Restored(source='workdir', step=step, state=state, meta=meta,
                    path=str(checkpointer.directory / str(step)))
  if init_from:
    return restore_params_from(init_from, abstract_state, init_from_keys)
  if jax.process_index() == 0:
    logging.info('No checkpoint in %s and no init_from: starting from scratch.',
                 checkpointer.directory)
  return None


class PreemptionGuard:
  """Says when to save and stop after a preemption notice (SIGTERM).

  * Multi-process with JAX's preemption service (the default after
    `jax.distributed.initialize()`): `should_stop(step)` is
    `multihost_utils.reached_preemption_sync_point(step)`, True on every process
    at the same step. No Python handler is installed (it would replace JAX's).
  * Single process: a Python SIGTERM handler sets a flag that `should_stop`
    returns.
  * Multi-process with the preemption service disabled: the Python handler,
    and `should_stop` all-gathers the flags (a small host collective each call)
    so every process stops at the same step.

  `should_stop` must be called by every process at every step (the sync point
  protocol counts steps). Construct it from the main thread (signal handlers
  can only be installed there).
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    self._flag = threading.Event()
    multi_process = jax.process_count() > 1
    self._use_sync_point = (
        multi_process and jax.config.jax_enable_preemption_service)
    self._all_gather = multi_process and not self._use_sync_point
    self._previous = {}
    if not self._use_sync_point:
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning('Received signal %d: will save and stop at the next step.',
                    signum)
    self._flag.set()

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
    for signum, handler in self._previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def __enter__(self) -> PreemptionGuard:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
