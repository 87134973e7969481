"""Tests for metric_writers.py.

TensorBoard is not installed (on purpose), so event files are read back with a
minimal TFRecord reader (length, masked CRC32C, payload, masked CRC32C) and the
`Event` protobuf that tensorboardX ships.
"""

import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2
from tensorboardX.record_writer import masked_crc32c

from omnitrain_jax import metric_writers


def _read_events(logdir):
  events = []
  for path in sorted(logdir.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      header = data[offset:offset + 8]
      (length,) = struct.unpack('<Q', header)
      (header_crc,) = struct.unpack('<I', data[offset + 8:offset + 12])
      assert header_crc == masked_crc32c(header)
      payload = data[offset + 12:offset + 12 + length]
      (payload_crc,) = struct.unpack(
          '<I', data[offset + 12 + length:offset + 16 + length])
      assert payload_crc == masked_crc32c(payload)
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
      offset += 16 + length
  return events


def _scalars(events):
  return {(v.tag, e.step): v.simple_value
          for e in events for v in e.summary.value if v.HasField('simple_value')}


def test_tensorboard_events_are_readable(tmp_path):
  writer = metric_writers.TensorBoardWriter(tmp_path)
  writer.write_scalars(1, {'loss': jnp.float32(2.5), 'det/loss': 1.25})
  writer.write_scalars(2, {'loss': np.array(1.5)})
  writer.write_images(2, {'pred': np.zeros((2, 8, 8, 3), np.uint8),
                          'one': np.ones((8, 8, 3), np.float32)})
  writer.write_texts(2, {'note': 'hello'})
  writer.write_hparams({'optim': {'lr': 1e-3, 'betas': (0.9, 0.99)},
                        'name': 'b16', 'fsdp': True, 'unused': None})
  writer.close()

  events = _read_events(tmp_path)
  assert events[0].file_version == 'brain.Event:2'
  assert _scalars(events) == {('loss', 1): 2.5, ('det/loss', 1): 1.25,
                              ('loss', 2): 1.5}
  tags = {v.tag for e in events for v in e.summary.value}
  assert {'pred', 'one', 'note/text_summary'} <= tags
  images = [v.image for e in events for v in e.summary.value
            if v.HasField('image')]
  assert {(i.height, i.width) for i in images} == {(8, 8), (8, 16)}
  hparams = [v for e in events for v in e.summary.value
             if v.tag == '_hparams_/session_start_info']
  assert len(hparams) == 1
  data = plugin_hparams_pb2.HParamsPluginData()
  data.ParseFromString(hparams[0].metadata.plugin_data.content)
  values = data.session_start_info.hparams
  assert values['optim.lr'].number_value == pytest.approx(1e-3)
  assert values['optim.betas'].string_value == '(0.9, 0.99)'
  assert values['fsdp'].bool_value
  assert 'unused' not in values


def test_jsonl_round_trip_and_resume_truncation(tmp_path):
  with metric_writers.JsonlWriter(tmp_path, start_step=0) as writer:
    for step in range(1, 6):
      writer.write_scalars(step, {'loss': 1.0 / step, 'steps_per_sec': 3,
                                  'learning_rate': jnp.float32(0.5)})
    writer.write_scalars(6, {'loss': float('nan')})
  path = tmp_path / metric_writers.METRICS_FILENAME
  records = metric_writers.read_jsonl(path)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[1] == {'step': 2, 'loss': 0.5, 'steps_per_sec': 3,
                        'learning_rate': 0.5}
  assert math.isnan(records[5]['loss'])

  # Lines reach the file without an explicit flush (a killed run keeps them).
  writer = metric_writers.JsonlWriter(tmp_path)
  writer.write_scalars(6, {'loss': 0.1})
  assert metric_writers.read_jsonl(path)[-1] == {'step': 6, 'loss': 0.1}
  writer.close()

  # The run crashed mid-write at step 7 and resumes from a step-3 checkpoint.
  with path.open('a') as f:
    f.write('{"step": 7, "lo')
  with metric_writers.JsonlWriter(tmp_path, start_step=3) as writer:
    writer.write_scalars(4, {'loss': 0.2})
  steps = [r['step'] for r in metric_writers.read_jsonl(path)]
  assert steps == [1, 2, 3, 4]
  assert all(json.loads(line) for line in path.read_text().splitlines())


def test_tensorboard_resume_writes_purge_event(tmp_path):
  with metric_writers.TensorBoardWriter(tmp_path, start_step=40) as writer:
    writer.write_scalars(41, {'loss': 1.0})
  starts = [e for e in _read_events(tmp_path)
            if e.HasField('session_log') and
            e.session_log.status == event_pb2.SessionLog.START]
  assert [e.step for e in starts] == [41]


def test_multi_writer_and_default_writer(tmp_path):
  writer = metric_writers.create_default_writer(tmp_path, start_step=0)
  assert isinstance(writer, metric_writers.MultiWriter)
  assert [type(w).__name__ for w in writer.writers] == [
      'LoggingWriter', 'TensorBoardWriter', 'JsonlWriter']
  writer.write_hparams({'model': {'variant': 'Ti/16'}})
  writer.write_scalars(10, {'loss': jnp.asarray(0.25)})
  writer.flush()
  assert metric_writers.read_jsonl(tmp_path / 'metrics.jsonl') == [
      {'step': 10, 'loss': 0.25}]
  writer.close()
  assert _scalars(_read_events(tmp_path)) == {('loss', 10): 0.25}
  assert json.loads((tmp_path / 'hparams.json').read_text()) == {
      'model.variant': 'Ti/16'}

  just_log = metric_writers.create_default_writer(tmp_path / 'x',
                                                  just_logging=True)
  assert isinstance(just_log, metric_writers.LoggingWriter)
  just_log.write_scalars(1, {'a': 1})
  assert not (tmp_path / 'x').exists()


def test_non_scalar_is_rejected_with_shape(tmp_path):
  writer = metric_writers.MultiWriter([metric_writers.NoOpWriter()])
  with pytest.raises(ValueError, match=r"'loss' has shape \(3,\)"):
    writer.write_scalars(1, {'loss': np.zeros(3)})


def test_flatten_hparams():
  class Config:

    def to_dict(self):
      return {'a': {'b': 1, 'c': [1, 2]}, 'd': np.float32(0.5), 'e': None}

  assert metric_writers.flatten_hparams(Config()) == {
      'a.b': 1, 'a.c': '[1, 2]', 'd': 0.5}
