"""Tests of the skip counting and of lenient mode's end on sources that yield
nothing, on the tiny ShapesWorld config."""

import importlib.util
import json
import os
import shutil
import threading

import pytest

from omnitrain_jax.data import errors
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import preparation
from omnitrain_jax.data import stats as stats_lib

_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                       "shapes_demo.py")


def _tiny_data(cache_dir):
  spec = importlib.util.spec_from_file_location("shapes_demo", _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.unlock()
  config.data.cache_dir = str(cache_dir)
  return config.data


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  preparation.prepare_data(_tiny_data(cache))  # Generates ShapesWorld once.
  return cache


def _lenient_copy(cache_dir, tmp_path, num_removed):
  """config.data of a copy of the tiny data with the first `num_removed`
  det_train images deleted (all of them when -1), lenient mode."""
  data = _tiny_data(cache_dir)
  info = preparation.prepare_data(data)
  root = tmp_path / "data"
  shutil.copytree(info.root, root)
  with open(root / "det_train.json") as f:
    images = json.load(f)["images"]
  for entry in images[:num_removed] if num_removed >= 0 else images:
    os.remove(root / "images" / entry["file_name"])
  data.dataset, data.root, data.vocab.path = "files", str(root), ""
  data.strict = False
  return data, images


def _take(data, n, stats):
  info = preparation.prepare_data(data)
  it = iter(pipeline.make_train_dataset(data, info, process_index=0,
                                        process_count=1, stats=stats))
  return [next(it) for _ in range(n)]


def _raised_within(seconds, fn):
  """What `fn()` raised, run in a daemon thread given `seconds` to end (a
  hang fails the test instead of hanging it)."""
  out = []

  def run():
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      out.append(e)
    else:
      out.append(None)

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert out, f"still running after {seconds} s (a hang)"
  return out[0]


def test_a_source_without_readable_records_is_an_error_not_a_hang(
    cache_dir, tmp_path):
  data, images = _lenient_copy(cache_dir, tmp_path, -1)
  stats = stats_lib.PipelineStats()
  # Before: the repeated det source was filtered forever (no batch, no end).
  error = _raised_within(60, lambda: _take(data, 1, stats))
  assert isinstance(error, errors.DataError), error
  message = str(error)
  assert "det_train.json" in message and "data source det/shapes_det" in message
  n = 2 * len(images) - 1  # The cap: a whole pass over the 40 records.
  assert f"the last {n} records read were all skipped" in message
  assert f"{n} of them for 'missing image file'" in message
  assert "data.max_consecutive_skips" in message


def test_the_cap_is_configurable(cache_dir, tmp_path):
  data, _ = _lenient_copy(cache_dir, tmp_path, -1)
  data.max_consecutive_skips = 5
  with pytest.raises(errors.DataError, match="the last 5 records read"):
    _take(data, 1, stats_lib.PipelineStats())


def test_skips_count_distinct_records_and_visits_apart(cache_dir, tmp_path):
  data, images = _lenient_copy(cache_dir, tmp_path, 1)
  stats = stats_lib.PipelineStats()
  # 30 batches of 4 det examples: 120 of 39 good records, i.e. the bad one
  # is met in each of the 4 epochs begun.
  _take(data, 30, stats)
  key = "shapes_det/missing image file"
  assert stats.skips.counts() == {key: 1}
  assert stats.skips.visits()[key] >= 3
  assert stats.skips.total() == 1
  counts = stats.counts()
  assert counts[f"skipped/{key}"] == 1 and counts[f"skip_visits/{key}"] >= 3
  report = stats.skips.report()
  assert report.startswith("skipped 1 bad record (") and "visits" in report
  assert images[0]["file_name"] in report


def test_skip_counter_pickles_with_its_records():
  import pickle  # pylint: disable=g-import-not-at-top
  counter = errors.SkipCounter()
  err = errors.DataError("a.json", "images[0]", "bad caption: 7", "fix it")
  for _ in range(3):
    counter.add("cc", err)
  again = pickle.loads(pickle.dumps(counter))
  assert again.counts() == {"cc/bad caption": 1}
  assert again.visits() == {"cc/bad caption": 3}
  error = pickle.loads(pickle.dumps(err))
  assert isinstance(error, errors.DataError) and str(error) == str(err)


@pytest.mark.parametrize("option,want", [
    ("--config.data.strict=False",
     "check the folder, or pass --config.data.strict=False to skip such "
     "records"),
    (None, "check the folder. Use readable images."),
])
def test_lenient_advice_fits_the_binary(option, want):
  message = ("x.json: images[3]: missing image file. Fix: check the folder, or"
             " set strict=False to skip such records")
  got = errors.lenient_advice(message, option, "Use readable images.")
  assert got == "x.json: images[3]: missing image file. Fix: " + want
  rescaled = "a (or set strict=False to accept uniformly rescaled copies)."
  assert errors.lenient_advice(rescaled, None) == "a."
  readers = "fix it, or set strict=False (config data.strict) to skip it"
  assert errors.lenient_advice(readers, "--nostrict") == (
      "fix it, or pass --nostrict to skip it")
