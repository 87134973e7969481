"""Tests for workdir.py: the workdir lock and the resume config check."""

import socket
import subprocess
import sys
import textwrap

import pytest

from omnitrain_jax import workdir

_LOCK_HOLDER = """
import sys, time
from omnitrain_jax import workdir
lock = workdir.WorkdirLock(sys.argv[1])
lock.acquire()
print('LOCKED', flush=True)
time.sleep(600)
"""


def test_workdir_lock_names_the_holder_and_dies_with_it(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(_LOCK_HOLDER), str(tmp_path)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'LOCKED', holder.stderr.read()
    with pytest.raises(workdir.WorkdirInUseError) as e:
      workdir.WorkdirLock(str(tmp_path)).acquire()
    assert f'in use by pid {holder.pid} on host {socket.gethostname()}' in str(
        e.value)
    # Only process 0 takes the lock.
    workdir.WorkdirLock(str(tmp_path), enabled=False).acquire()
  finally:
    holder.kill()  # A crash: nothing released by the holder itself.
    holder.communicate()
  with workdir.WorkdirLock(str(tmp_path)):
    pass  # Not left stuck.


def test_resume_config_refuses_shape_fields_and_lists_the_others():
  saved = {'model': {'width': 32, 'depth': 2, 'dtype': 'float32'},
           'data': {'spec': {'image_size': 64}, 'batch': {'det': 4}},
           'batch_size': 8, 'optimizer': {'learning_rate': 1e-3}}
  assert workdir.check_resume_config('W', saved, saved) == []
  accepted = dict(saved, batch_size=16,
                  optimizer={'learning_rate': 5e-4},
                  model=dict(saved['model'], dtype='bfloat16'))
  assert workdir.check_resume_config('W', saved, accepted) == [
      'batch_size: 8 -> 16', 'model.dtype: \'float32\' -> \'bfloat16\'',
      'optimizer.learning_rate: 0.001 -> 0.0005']
  refused = dict(saved, batch_size=16,
                 model=dict(saved['model'], width=48),
                 data={'spec': {'image_size': 96}, 'batch': {'det': 4}})
  with pytest.raises(workdir.ResumeConfigError) as e:
    workdir.check_resume_config('W', saved, refused)
  text = str(e.value)
  assert 'model.width: 32 -> 48' in text
  assert 'data.spec.image_size: 64 -> 96' in text
  assert 'batch_size' not in text  # Only the refused fields.
  assert '--workdir' in text and 'init_from' in text


def test_resume_config_refuses_a_changed_table_update():
  """The sparse table update keeps the table's moments apart: a run saved
  with the other rule (or before the field existed: dense) cannot resume."""
  saved = {'optimizer': {'learning_rate': 1e-3}}  # An older run: dense.
  new = {'optimizer': {'learning_rate': 1e-3, 'token_table_update': 'sparse'}}
  with pytest.raises(workdir.ResumeConfigError,
                     match="token_table_update: 'dense' -> 'sparse'"):
    workdir.check_resume_config('W', saved, new)
  dense = {'optimizer': {'learning_rate': 1e-3, 'token_table_update': 'dense'}}
  assert workdir.check_resume_config('W', saved, dense) == []


def test_a_run_from_before_the_phrase_fields_resumes():
  """The caption-phrase batch fields shape no saved state: a saved config
  without them is not a change (with other values it is refused as usual)."""
  saved = {'data': {'spec': {'image_size': 64}}}
  new = {'data': {'spec': {'image_size': 64, 'max_phrases': 8,
                           'max_phrase_tokens': 4},
                  'shapes_world': {'caption_drop_fraction': 0.0}}}
  assert workdir.check_resume_config('W', saved, new) == []
  more = {'data': {'spec': {'image_size': 64, 'max_phrases': 12,
                            'max_phrase_tokens': 4}}}
  with pytest.raises(workdir.ResumeConfigError, match='max_phrases: 8 -> 12'):
    workdir.check_resume_config('W', saved, more)
