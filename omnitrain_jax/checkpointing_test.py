"""Tests for checkpointing.py (in-process on one CPU device, plus subprocesses
for fake 8-device meshes, kills, SIGTERM and two JAX processes)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnitrain_jax import checkpointing

_SUBPROCESS_TIMEOUT_S = 180


def _state(scale=1.0):
  return {
      'params': {'w': jnp.arange(12.0).reshape(3, 4) * scale,
                 'b': jnp.ones(4) * scale},
      'opt_state': {'mu': jnp.zeros((3, 4))},
      'step': jnp.asarray(0, jnp.int32),
  }


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      state)


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())


def _run_child(code, *args, devices=1, env_extra=None):
  env = dict(os.environ)
  env['JAX_PLATFORMS'] = 'cpu'
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.update(env_extra or {})
  return subprocess.run(
      [sys.executable, '-c', textwrap.dedent(code), *map(str, args)],
      env=env, capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S,
      check=False)


def _last_json(stdout):
  lines = [l for l in stdout.splitlines() if l.startswith('{')]
  assert lines, stdout
  return json.loads(lines[-1])


def test_save_restore_roundtrip_with_iterator_and_meta(tmp_path):
  state, it = _state(2.0), _iterator()
  consumed = [next(it) for _ in range(5)]
  ckpt = checkpointing.Checkpointer(tmp_path, save_every_steps=5)
  assert ckpt.latest_step() is None
  assert not ckpt.maybe_save(4, state, it, {'config': {'lr': 1e-3}})
  assert ckpt.maybe_save(5, state, it, {'config': {'lr': 1e-3, 'mesh': (1, 2)},
                                        'metrics': {'loss': np.float32(0.5)}})
  expected_next = [next(it) for _ in range(3)]  # Saved state is the pre-read one.
  ckpt.close()

  ckpt = checkpointing.Checkpointer(tmp_path, save_every_steps=5)
  assert ckpt.latest_step() == 5
  fresh = _iterator()
  restored, meta = ckpt.restore(None, _abstract(state), fresh)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert [next(fresh) for _ in range(3)] == expected_next
  assert consumed != expected_next
  assert meta['step'] == 5
  assert meta['config'] == {'lr': 1e-3, 'mesh': [1, 2]}
  assert meta['metrics'] == {'loss': 0.5}
  assert meta['format_version'] == checkpointing.META_FORMAT_VERSION
  assert 'version' in meta


def test_cadence_keep_n_force_and_no_double_save(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(tmp_path, save_every_steps=2,
                                  max_to_keep=2) as ckpt:
    saved = [s for s in range(1, 8)
             if ckpt.maybe_save(s, state, force=(s == 7))]
    assert saved == [2, 4, 6, 7]
    assert not ckpt.maybe_save(7, state, force=True)  # Already saved.
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['6', '7']


def test_keep_every_steps_survives_max_to_keep(tmp_path):
  state = {'w': jnp.zeros(2)}
  with checkpointing.Checkpointer(tmp_path, save_every_steps=2, max_to_keep=1,
                                  keep_every_steps=4) as ckpt:
    for step in range(1, 11):
      ckpt.maybe_save(step, state)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 10]


def test_restore_without_iterator_item_asks_for_data_iter_none(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(1, state)
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    with pytest.raises(ValueError, match='data_iter=None'):
      ckpt.restore(1, _abstract(state), _iterator())
    restored, _ = ckpt.restore(1, _abstract(state))
  np.testing.assert_array_equal(restored['params']['w'], state['params']['w'])


def test_unfinished_rename_mode_checkpoints_are_skipped(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(2, state)
  root = tmp_path / 'checkpoints'
  assert (root / '2' / checkpointing.COMMIT_MARKER).exists()
  # What a process killed mid-save leaves in rename mode.
  tmp_dir = root / f'3{checkpointing.TMP_SUFFIX}-1234567'
  shutil.copytree(root / '2', tmp_dir)
  (tmp_dir / checkpointing.COMMIT_MARKER).unlink()
  # A final-named step without the marker (e.g. an interrupted copy).
  shutil.copytree(root / '2', root / '4')
  (root / '4' / checkpointing.COMMIT_MARKER).unlink()

  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [2]
    with pytest.raises(ValueError, match='not a finished checkpoint'):
      ckpt.restore(4, _abstract(state))
    restored = checkpointing.restore_or_init(ckpt, _abstract(state))
    assert restored.step == 2
    assert ckpt.maybe_save(5, state)  # Waits for the tmp-dir cleanup first.
  assert not tmp_dir.exists()


def test_commit_file_mode_skips_step_without_marker(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1,
                                  commit_mode='commit_file') as ckpt:
    ckpt.maybe_save(1, state)
    ckpt.maybe_save(2, state)
  step2 = tmp_path / 'checkpoints' / '2'
  (step2 / checkpointing.COMMIT_MARKER).unlink()  # A GCS save cut off.
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1,
                                  commit_mode='commit_file') as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.maybe_save(2, state)  # The broken step 2 is cleaned, redone.
    ckpt.wait()
    assert ckpt.latest_step() == 2


def test_restore_or_init_order(tmp_path):
  state, abstract = _state(3.0), _abstract(_state())
  other = tmp_path / 'pretrain'
  with checkpointing.Checkpointer(other, save_every_steps=1) as ckpt:
    ckpt.maybe_save(7, state, meta={'config': {'name': 'pretrain'}})

  run = tmp_path / 'finetune'
  ckpt = checkpointing.Checkpointer(run, save_every_steps=1)
  assert checkpointing.restore_or_init(ckpt, abstract) is None

  for init_from in (other, other / 'checkpoints', other / 'checkpoints' / '7'):
    got = checkpointing.restore_or_init(ckpt, abstract, init_from=init_from)
    assert (got.source, got.step) == ('init_from', 0)
    assert list(got.state) == ['params']
    assert got.meta['config'] == {'name': 'pretrain'}
    np.testing.assert_array_equal(got.state['params']['w'],
                                  state['params']['w'])
  fresh = checkpointing.replace_fields(_state(), got.state)
  np.testing.assert_array_equal(fresh['params']['b'], state['params']['b'])
  np.testing.assert_array_equal(fresh['opt_state']['mu'], np.zeros((3, 4)))

  ckpt.maybe_save(1, fresh)
  ckpt.wait()
  got = checkpointing.restore_or_init(ckpt, abstract, init_from=other)
  assert (got.source, got.step) == ('workdir', 1)
  ckpt.close()

  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match='no finished checkpoint'):
    checkpointing.restore_params_from(empty, abstract)


def test_restore_requires_target_shardings(tmp_path):
  state = _state()
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(1, state)
    no_sharding = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with pytest.raises(ValueError, match='no sharding'):
      ckpt.restore(1, no_sharding)


def test_argument_errors(tmp_path):
  with pytest.raises(ValueError, match='save_every_steps=0'):
    checkpointing.Checkpointer(tmp_path, save_every_steps=0)
  with pytest.raises(ValueError, match='commit_mode'):
    checkpointing.Checkpointer(tmp_path, save_every_steps=1, commit_mode='x')


def test_to_jsonable_and_replace_fields():
  class Cfg:

    def to_dict(self):
      return {'a': (1, 2), 'b': np.int64(3), 'c': jnp.float32(0.5),
              'd': object}

  got = checkpointing.to_jsonable({'cfg': Cfg(), 'x': None})
  assert got == {'cfg': {'a': [1, 2], 'b': 3, 'c': 0.5, 'd': str(object)},
                 'x': None}
  json.dumps(got)

  import flax.struct  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class TrainState:
    params: dict
    step: int

  new = checkpointing.replace_fields(TrainState({'w': 1}, 3), {'params': 2})
  assert (new.params, new.step) == (2, 3)


_RESHARD_CHILD = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from omnitrain_jax import checkpointing
workdir = sys.argv[1]
devices = np.array(jax.devices())
assert devices.size == 8, devices
save_mesh = Mesh(devices.reshape(8, 1), ('data', 'model'))
load_mesh = Mesh(devices.reshape(2, 4), ('data', 'model'))
w = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
state = {'params': {'w': jax.device_put(w, NamedSharding(save_mesh, P('data', None)))},
         'step': jax.device_put(jnp.int32(9), NamedSharding(save_mesh, P()))}
with checkpointing.Checkpointer(workdir, save_every_steps=1) as ckpt:
  ckpt.maybe_save(9, state)
target = {'params': {'w': jax.ShapeDtypeStruct(
              (16, 8), jnp.float32,
              sharding=NamedSharding(load_mesh, P('model', 'data')))},
          'step': jax.ShapeDtypeStruct((), jnp.int32,
                                       sharding=NamedSharding(load_mesh, P()))}
with checkpointing.Checkpointer(workdir, save_every_steps=1) as ckpt:
  restored, meta = ckpt.restore(None, target)
rw = restored['params']['w']
print(json.dumps({
    'equal': bool(np.array_equal(np.asarray(rw), w)),
    'spec': list(rw.sharding.spec),
    'mesh_shape': dict(rw.sharding.mesh.shape),
    'shard_shape': list(rw.addressable_shards[0].data.shape),
    'step': int(restored['step']), 'meta_step': meta['step']}))
"""


def test_restore_into_a_different_mesh_and_sharding(tmp_path):
  result = _run_child(_RESHARD_CHILD, tmp_path, devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  got = _last_json(result.stdout)
  assert got['equal']
  assert got['spec'] == ['model', 'data']
  assert got['mesh_shape'] == {'data': 2, 'model': 4}
  assert got['shard_shape'] == [4, 4]
  assert (got['step'], got['meta_step']) == (9, 9)


_KILL_CHILD = """
import os, signal, sys
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from omnitrain_jax import checkpointing
ckpt = checkpointing.Checkpointer(sys.argv[1], save_every_steps=1)
ckpt.maybe_save(1, {'w': jnp.ones(4)})
ckpt.wait()
async def die(self):  # Everything is written, nothing is committed yet.
  os.kill(os.getpid(), signal.SIGKILL)
atomicity.AtomicRenameTemporaryPath.finalize = die
ckpt.maybe_save(2, {'w': jnp.full(4, 2.0)})
ckpt.wait()
print('NOT KILLED')
"""


def test_process_killed_before_commit_is_never_restored(tmp_path):
  result = _run_child(_KILL_CHILD, tmp_path)
  assert result.returncode == -signal.SIGKILL, (result.stdout,
                                                result.stderr[-3000:])
  root = tmp_path / 'checkpoints'
  leftovers = [p.name for p in root.iterdir() if checkpointing.TMP_SUFFIX in
               p.name]
  assert leftovers and all(n.startswith('2.') for n in leftovers), leftovers
  assert not (root / '2').exists()
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    assert ckpt.latest_step() == 1
    target = {'w': _abstract({'w': jnp.zeros(4)})['w']}
    restored, _ = ckpt.restore(None, target)
    np.testing.assert_array_equal(restored['w'], np.ones(4))
    ckpt.maybe_save(2, {'w': jnp.full(4, 2.0)})  # Redoing the step works.
    ckpt.wait()
    assert ckpt.latest_step() == 2
  assert not any(checkpointing.TMP_SUFFIX in p.name for p in root.iterdir())


_SIGTERM_CHILD = """
import json, sys, time
import jax.numpy as jnp
from omnitrain_jax import checkpointing
ckpt = checkpointing.Checkpointer(sys.argv[1], save_every_steps=10_000)
guard = checkpointing.PreemptionGuard()
state = {'w': jnp.zeros(4)}
for step in range(1, 3001):
  state = {'w': state['w'] + 1}
  if step == 2:
    print('READY', flush=True)
  stop = guard.should_stop(step)
  ckpt.maybe_save(step, state, force=stop)
  if stop:
    break
  time.sleep(0.01)
ckpt.close()
print(json.dumps({'stopped_at': step, 'w': float(state['w'][0])}), flush=True)
"""


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_and_stop_cleanly(tmp_path, signum):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(_SIGTERM_CHILD), str(tmp_path)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stdout.readline()
    assert line.strip() == 'READY', (line, proc.stderr.read()[-3000:])
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=_SUBPROCESS_TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  got = _last_json(stdout)
  assert 2 <= got['stopped_at'] < 3000
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    assert ckpt.latest_step() == got['stopped_at']
    restored, _ = ckpt.restore(None, _abstract({'w': jnp.zeros(4)}))
  assert float(restored['w'][0]) == got['w'] == got['stopped_at']


_TWO_PROCESS_CHILD = """
import json, os, signal, sys, time
import jax
jax.config.update('jax_num_cpu_devices', 2)
process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2,
                           process_id=process_id)
import grain, numpy as np, jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from omnitrain_jax import checkpointing

def make_iter():
  ds = grain.MapDataset.range(1000).shuffle(seed=0)
  return iter(ds[process_id::2].to_iter_dataset())

devices = np.array(jax.devices())
save_mesh = Mesh(devices.reshape(4), ('data',))
w = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
w_sharded = jax.make_array_from_callback(
    w.shape, NamedSharding(save_mesh, P('data')), lambda idx: w[idx])
it = make_iter()
ckpt = checkpointing.Checkpointer(workdir, save_every_steps=100_000)
guard = checkpointing.PreemptionGuard()
for step in range(1, 2001):
  next(it)
  multihost_utils.process_allgather(np.int32(step))  # A step's collectives.
  if process_id == 1 and step == 3:
    os.kill(os.getpid(), signal.SIGTERM)  # Preemption notice on one host.
  stop = guard.should_stop(step)
  ckpt.maybe_save(step, {'w': w_sharded}, it, {'pid0': True}, force=stop)
  if stop:
    break
  time.sleep(0.005)
ckpt.close()
expected_next = next(it)

load_mesh = Mesh(devices.reshape(2, 2), ('data', 'model'))
target = {'w': jax.ShapeDtypeStruct(
    w.shape, jnp.float32, sharding=NamedSharding(load_mesh, P('model', 'data')))}
fresh = make_iter()
ckpt = checkpointing.Checkpointer(workdir, save_every_steps=100_000)
restored = checkpointing.restore_or_init(ckpt, target, fresh)
ckpt.close()
full = multihost_utils.process_allgather(restored.state['w'], tiled=True)
print(json.dumps({
    'process': process_id, 'stopped_at': step, 'restored_step': restored.step,
    'equal': bool(np.array_equal(np.asarray(full), w)),
    'iter_ok': next(fresh) == expected_next,
    'spec': list(restored.state['w'].sharding.spec)}), flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_stop_together_save_and_restore_resharded(tmp_path):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [
      subprocess.Popen(
          [sys.executable, '-c', textwrap.dedent(_TWO_PROCESS_CHILD), str(i),
           str(port), str(tmp_path)],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=_SUBPROCESS_TIMEOUT_S))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, (_, stderr) in zip(procs, outputs):
    assert proc.returncode == 0, stderr[-3000:]
  results = [_last_json(stdout) for stdout, _ in outputs]
  assert results[0]['stopped_at'] == results[1]['stopped_at'] > 3
  for got in results:
    assert got['restored_step'] == got['stopped_at']
    assert got['equal'] and got['iter_ok'], got
    assert got['spec'] == ['model', 'data']
  data_files = sorted(
      p.name for p in (tmp_path / 'checkpoints' / str(results[0]['stopped_at'])
                       / 'data_iter').iterdir() if p.suffix == '.json')
  assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']


_ALL_GATHER_CHILD = """
import json, os, signal, sys
import jax
jax.config.update('jax_num_cpu_devices', 1)
jax.config.update('jax_enable_preemption_service', False)
process_id, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2,
                           process_id=process_id)
from omnitrain_jax import checkpointing
guard = checkpointing.PreemptionGuard()
for step in range(1, 101):
  if process_id == 1 and step == 3:
    os.kill(os.getpid(), signal.SIGTERM)
  if guard.should_stop(step):
    break
print(json.dumps({'stopped_at': step}), flush=True)
"""


def test_two_processes_without_preemption_service_agree_by_all_gather():
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [
      subprocess.Popen(
          [sys.executable, '-c', textwrap.dedent(_ALL_GATHER_CHILD), str(i),
           str(port)],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  try:
    outputs = [proc.communicate(timeout=_SUBPROCESS_TIMEOUT_S)
               for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, (_, stderr) in zip(procs, outputs):
    assert proc.returncode == 0, stderr[-3000:]
  # Process 0 never got a signal; it stops because process 1 did.
  assert [_last_json(out)['stopped_at'] for out, _ in outputs] == [3, 3]


# ------------------------------------------------- integrity and fall-back


def _largest_state_file(step_dir):
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _damage(step_dir, how):
  """What disks, copies and users do to a finished step."""
  if how == 'bitflip':  # 64 bytes in the largest array file.
    path = _largest_state_file(step_dir)
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, min(start + 64, len(data))):
      data[i] ^= 0xFF
    path.write_bytes(bytes(data))
  elif how == 'truncate':
    path = _largest_state_file(step_dir)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif how == 'delete_file':
    _largest_state_file(step_dir).unlink()
  elif how == 'delete_metadata':
    (step_dir / 'state' / '_METADATA').unlink()
  else:
    raise ValueError(how)


def _big_state(scale):
  # Large enough that the arrays land in their own files.
  return {'params': {'w': jnp.arange(4096.0).reshape(64, 64) * scale},
          'step': jnp.asarray(int(scale), jnp.int32)}


@pytest.mark.parametrize(
    'how', ['bitflip', 'truncate', 'delete_file', 'delete_metadata'])
def test_damaged_latest_checkpoint_is_skipped_set_aside_and_redone(
    tmp_path, how, caplog):
  abstract = _abstract(_big_state(1.0))
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1,
                                  max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.maybe_save(step, _big_state(float(step)))
  root = tmp_path / 'checkpoints'
  assert checkpointing.verify_checkpoint(root / '3') == (True, [])
  _damage(root / '3', how)
  verified, problems = checkpointing.verify_checkpoint(root / '3')
  assert verified and problems, problems

  with checkpointing.Checkpointer(tmp_path, save_every_steps=1,
                                  max_to_keep=2) as ckpt:
    got = checkpointing.restore_or_init(ckpt, abstract)
    assert got.step == 2
    np.testing.assert_array_equal(got.state['params']['w'],
                                  _big_state(2.0)['params']['w'])
    # The damaged step is kept aside, out of the step list: rotation cannot
    # count it (and delete step 2 for it), and the run can save step 3 again.
    assert not (root / '3').exists() and (root / '3.damaged').is_dir()
    assert ckpt.all_steps() == [2]
    assert ckpt.maybe_save(3, _big_state(3.0))
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
  messages = [r.getMessage() for r in caplog.records
              if 'is damaged' in r.getMessage()]
  assert len(messages) == 1, messages
  assert str(root / '3') in messages[0]
  assert 'falling back to step 2' in messages[0]
  assert (root / '3.damaged').is_dir()  # Orbax's cleanup leaves it alone.
  # The redone step is good.
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    assert checkpointing.restore_or_init(ckpt, abstract).step == 3


def test_every_checkpoint_damaged_is_one_error_naming_each(tmp_path):
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(1, _big_state(1.0))
    ckpt.maybe_save(2, _big_state(2.0))
  root = tmp_path / 'checkpoints'
  _damage(root / '1', 'truncate')
  _damage(root / '2', 'bitflip')
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    with pytest.raises(checkpointing.CheckpointError) as e:
      checkpointing.restore_or_init(ckpt, _abstract(_big_state(1.0)))
  text = str(e.value)
  assert f'{root / "1"}' in text and f'{root / "2"}' in text
  assert 'truncated' in text and 'checksum mismatch' in text
  assert 'init_from' in text
  assert sorted(p.name for p in root.iterdir()) == ['1', '2']  # Untouched.


def test_restore_params_and_init_from_skip_damaged_steps(tmp_path):
  abstract = _abstract(_big_state(1.0))
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(1, _big_state(1.0))
    ckpt.maybe_save(2, _big_state(2.0))
  root = tmp_path / 'checkpoints'
  _damage(root / '2', 'bitflip')
  params, step = checkpointing.restore_params(str(tmp_path), abstract)
  assert step == 1
  np.testing.assert_array_equal(params['w'], _big_state(1.0)['params']['w'])
  with pytest.raises(checkpointing.CheckpointError, match='checksum mismatch'):
    checkpointing.restore_params(str(tmp_path), abstract, step=2)
  got = checkpointing.restore_params_from(tmp_path, abstract)
  assert got.path == str(root / '1')
  with pytest.raises(checkpointing.CheckpointError, match='is damaged'):
    checkpointing.restore_params_from(root / '2', abstract)
  assert (root / '2').is_dir()  # Readers never move steps.


def test_checkpoint_without_manifest_restores_unverified_or_falls_back(
    tmp_path, caplog):
  abstract = _abstract(_big_state(1.0))
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    ckpt.maybe_save(1, _big_state(1.0))
    ckpt.maybe_save(2, _big_state(2.0))
  root = tmp_path / 'checkpoints'
  # A step saved before manifests existed: restored, with a warning.
  (root / '2' / checkpointing.MANIFEST).unlink()
  assert checkpointing.verify_checkpoint(root / '2') == (False, [])
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    assert checkpointing.restore_or_init(ckpt, abstract).step == 2
  assert any('unverified' in r.getMessage() for r in caplog.records)
  # Unverified and unreadable: orbax's failure is one message, and the
  # previous step is used.
  _damage(root / '2', 'truncate')
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    got = checkpointing.restore_or_init(ckpt, abstract)
  assert got.step == 1
  assert (root / '2.damaged').is_dir()


def test_sync_saves_write_the_manifest_too(tmp_path):
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1,
                                  async_save=False) as ckpt:
    ckpt.maybe_save(1, _big_state(1.0))
  step_dir = tmp_path / 'checkpoints' / '1'
  assert (step_dir / checkpointing.MANIFEST).exists()
  assert checkpointing.verify_checkpoint(step_dir) == (True, [])


# ------------------------------------------------------------ disk full


@pytest.fixture
def small_disk(tmp_path):
  """A 600 KiB tmpfs (root only; skipped where mounting is not allowed)."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs',
                         str(mount)], capture_output=True, text=True,
                        check=False)
  if proc.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()}')
  try:
    yield mount
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


# Orbax's cancelled write coroutines are collected with a warning.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_disk_full_is_one_clear_error_and_the_torn_save_is_never_restored(
    small_disk):
  small = {'w': jnp.ones(16)}
  # Random values (incompressible): ~1.6 MB, more than the disk.
  big = {'w': jax.random.normal(jax.random.key(0), (400, 1000))}
  ckpt = checkpointing.Checkpointer(small_disk, save_every_steps=1)
  ckpt.maybe_save(1, small)
  ckpt.wait()
  ckpt.maybe_save(2, big)
  with pytest.raises(checkpointing.DiskFullError) as e:
    ckpt.wait()
  ckpt.close()  # Does not raise the same error twice.
  text = str(e.value)
  assert 'Disk full' in text
  assert str(small_disk / 'checkpoints') in text
  assert '1.5 MiB' in text  # 400 * 1000 float32.
  assert 'last finished checkpoint (1)' in text
  with checkpointing.Checkpointer(small_disk, save_every_steps=1) as ckpt:
    got = checkpointing.restore_or_init(ckpt, _abstract(small))
    assert got.step == 1
    np.testing.assert_array_equal(got.state['w'], small['w'])


def test_disk_full_is_recognised_in_tensorstore_and_os_errors():
  # The text tensorstore raises (captured on a full tmpfs).
  ts = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database'
                  ': Failed to write 889219 bytes to file 4: No space left on '
                  "device [os_error_code='28']")
  assert checkpointing._is_disk_full(ts)
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = OSError(28, 'No space left on device')
  assert checkpointing._is_disk_full(wrapped)
  assert not checkpointing._is_disk_full(ValueError('shape mismatch'))


def test_disk_full_without_a_tmpfs_simulated_in_the_save_thread(
    tmp_path, monkeypatch):
  # Where a tmpfs cannot be mounted (not root): ENOSPC raised by the last
  # write before orbax's commit (the manifest, on orbax's save thread).
  state = {'w': jnp.ones(16)}
  ckpt = checkpointing.Checkpointer(tmp_path, save_every_steps=1)
  ckpt.maybe_save(1, state)
  ckpt.wait()

  def full(step_dir):
    raise OSError(28, 'No space left on device', str(step_dir))

  monkeypatch.setattr(checkpointing, 'write_manifest', full)
  ckpt.maybe_save(2, state)
  with pytest.raises(checkpointing.DiskFullError, match='Disk full'):
    ckpt.wait()
  ckpt.close()
  monkeypatch.undo()
  with checkpointing.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
    assert ckpt.all_steps() == [1]  # The torn step 2 is not a step.
    assert checkpointing.restore_or_init(ckpt, _abstract(state)).step == 1
