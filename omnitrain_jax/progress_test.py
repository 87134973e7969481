"""Tests for progress.py."""

import logging

import jax
import jax.numpy as jnp
import pytest

from omnitrain_jax import progress


class _Clock:

  def __init__(self, now=100.0):
    self.now = now

  def __call__(self):
    return self.now


def test_rate_excludes_first_step_and_eta(caplog):
  clock = _Clock()
  report = progress.ReportProgress(21, every_steps=4, every_secs=None,
                                   time_fn=clock, is_lead=True)
  clock.now += 30.0  # Step 1 includes a 30 s compile.
  assert report(1) is None
  results = {}
  with caplog.at_level(logging.INFO):
    for step in range(2, 10):
      clock.now += 0.5
      results[step] = report(step)
  assert [s for s, r in results.items() if r] == [5, 9]
  first = results[5]
  assert first['steps_per_sec'] == pytest.approx(2.0)  # 4 steps in 2 s.
  assert first['eta_sec'] == pytest.approx((21 - 5) / 2.0)
  assert first['elapsed_sec'] == pytest.approx(32.0)
  assert report.steps_per_sec == pytest.approx(2.0)
  assert 'Step 5/21' in caplog.text and 'ETA 0:00:08' in caplog.text


def test_counts_other_units_with_a_name_and_a_mean_rate(caplog):
  clock = _Clock()
  report = progress.ReportProgress(100, every_secs=10.0, time_fn=clock,
                                   is_lead=True, name='coco_val',
                                   unit='images')
  clock.now += 20.0  # The first batch includes compilation.
  report(10)
  clock.now += 2.0
  assert report(30) is None  # 2 s: not due.
  clock.now += 8.0
  with caplog.at_level(logging.INFO):
    got = report(70)
  assert got['images_per_sec'] == pytest.approx(6.0)  # 60 images in 10 s.
  assert 'coco_val: 70/100 images (70%), 6 images/s' in caplog.text
  clock.now += 15.0
  assert report(100)['images_per_sec'] == pytest.approx(2.0)
  # Since the first call: 90 images in 25 s.
  assert report.mean_rate == pytest.approx(90 / 25)


def test_time_based_reports_and_last_step():
  clock = _Clock()
  report = progress.ReportProgress(10, every_secs=5.0, time_fn=clock,
                                   is_lead=True)
  report(0)
  reported = []
  for step in range(1, 11):
    clock.now += 2.0
    if report(step):
      reported.append(step)
  assert reported == [3, 6, 9, 10]  # Every >= 5 s, and at the last step.


def test_only_lead_reports():
  report = progress.ReportProgress(10, every_steps=1, time_fn=_Clock(),
                                   is_lead=False)
  assert report(1) is None and report(2) is None


def test_bad_arguments():
  with pytest.raises(ValueError, match='every_steps or every_secs'):
    progress.ReportProgress(10, every_steps=None, every_secs=None)
  with pytest.raises(ValueError, match=r'profile_steps=\(5, 5\)'):
    progress.Profiler('/tmp/unused', (5, 5))


def test_profiler_writes_xplane_without_tensorflow(tmp_path):
  profiler = progress.Profiler(str(tmp_path), (2, 4))
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64))
  active = []
  for step in range(6):
    profiler(step, block_on=x)
    active.append(profiler.active)
    x = step_fn(x)
  profiler.stop(block_on=x)
  assert active == [False, False, True, True, False, False]
  files = list(tmp_path.glob('plugins/profile/*/*.xplane.pb'))
  assert len(files) == 1 and files[0].stat().st_size > 0


def test_profiler_disabled():
  profiler = progress.Profiler('/nonexistent', None)
  profiler(0)
  assert not profiler.active
