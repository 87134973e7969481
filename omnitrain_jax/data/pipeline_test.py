"""Tests of the grain pipeline on the tiny ShapesWorld config."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from omnitrain_jax.data import errors
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema
from omnitrain_jax.data import sources
from omnitrain_jax.data import stats as stats_lib

_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                       "shapes_demo.py")


def tiny_config(cache_dir):
  spec = importlib.util.spec_from_file_location("shapes_demo", _CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.unlock()
  config.data.cache_dir = str(cache_dir)
  return config.data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data = tiny_config(tmp_path_factory.mktemp("cache"))
  return data, preparation.prepare_data(data)


def take(ds_or_it, n):
  it = iter(ds_or_it)
  return [next(it) for _ in range(n)]


def test_every_batch_has_exact_composition_and_shapes(prepared):
  data, info = prepared
  ds = pipeline.make_train_dataset(data, info, process_index=0,
                                   process_count=1)
  want = schema.batch_shapes(info.spec, 8)
  # 12 batches = more than one epoch of the det source (40 / 4 = 10 batches).
  for batch in take(ds, 12):
    assert set(batch) == set(want)
    for k, (shape, dtype) in want.items():
      assert batch[k].shape == shape and batch[k].dtype == dtype, k
    assert batch["stream"].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert (batch["image_id"] > 0).all()
    assert batch["box_mask"][:6].any(axis=1).all()  # det/grd have boxes.
    assert not batch["box_mask"][6:].any()  # img has none.


def test_processes_get_disjoint_shares(prepared):
  data, info = prepared
  ids = []
  for pi in range(2):
    batches = take(pipeline.make_train_dataset(
        data, info, process_index=pi, process_count=2), 10)
    for b in batches:
      assert b["stream"].tolist() == [0, 0, 1, 2]  # Half of 4 + 2 + 2.
    ids.append(np.concatenate([b["image_id"][:2] for b in batches]))
  # 2 processes x 10 batches x 2 det = 40 = one epoch: disjoint, complete.
  assert not set(ids[0].tolist()) & set(ids[1].tolist())
  assert len(set(ids[0].tolist()) | set(ids[1].tolist())) == 40


def test_batch_counts_must_divide_by_processes(prepared):
  data, info = prepared
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    pipeline.make_train_dataset(data, info, process_index=0, process_count=3)


@pytest.mark.parametrize("threads,prefetch", [(0, 0), (2, 2)])
def test_iterator_state_restores_exactly(prepared, threads, prefetch):
  data, info = prepared
  data.num_threads, data.prefetch_batches = threads, prefetch
  try:
    it = iter(pipeline.make_train_dataset(data, info, process_index=0,
                                          process_count=1))
    take(it, 5)
    state = it.get_state()
    json.dumps(state)  # Checkpointable as JSON (grain.checkpoint).
    expected = take(it, 3)
    fresh = iter(pipeline.make_train_dataset(data, info, process_index=0,
                                             process_count=1))
    fresh.set_state(state)
    got = take(fresh, 3)
  finally:
    data.num_threads, data.prefetch_batches = 0, 0
  for a, b in zip(expected, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_worker_processes_cover_an_epoch_and_restore(prepared):
  data, info = prepared
  # det only: spawning workers costs seconds on 2 cores.
  data.batch.grd = data.batch.img = 0
  data.num_workers = 2
  stats = stats_lib.PipelineStats()
  try:
    ds = pipeline.make_train_dataset(data, info, process_index=0,
                                     process_count=1, stats=stats)
    it = iter(ds)
    first = take(it, 10)  # 10 x 4 = 40 det records = one epoch.
    state = it.get_state()
    want = take(it, 2)
    it.close()
    fresh = iter(ds)
    fresh.set_state(state)
    got = take(fresh, 2)
    fresh.close()
  finally:
    data.num_workers = 0
    data.batch.grd = data.batch.img = 2
  # Each worker runs the whole pipeline on its slice of the records: the
  # epoch is still covered exactly once, and the state resumes exactly.
  ids = np.concatenate([b["image_id"] for b in first]).tolist()
  assert len(ids) == len(set(ids)) == 40
  for b in first:
    assert b["stream"].tolist() == [0, 0, 0, 0]
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Counts made in the workers reach the main process's stats.
  assert any("shapes_det: epoch 0 done" in r for r in stats.epoch_reports)


def test_several_sources_mix_by_weight(prepared):
  data, info = prepared
  data.sources.det.second = dict(reader="coco_instances", train="det_val.json",
                                 image_dir="images", weight=1.0)
  data.sources.det.shapes_det.weight = 3.0
  try:
    info2 = preparation.DataInfo(**{**info.__dict__,
                                    "sources": sources.source_specs(
                                        data, info.root)})
    batches = take(pipeline.make_train_dataset(
        data, info2, process_index=0, process_count=1), 10)
  finally:
    del data.sources.det["second"]
    data.sources.det.shapes_det.weight = 1.0
  det_ids = np.concatenate([b["image_id"][:4] for b in batches])
  # ShapesWorld ids encode the split: det_train 1_000_000+, det_val 2_000_000+.
  from_val = int((det_ids // 1_000_000 == 2).sum())
  assert from_val == 10  # 1 in 4 of 40, exactly.


def _broken_copy(info, tmp_path):
  """The tiny dataset with one det_train image deleted."""
  root = tmp_path / "broken"
  shutil.copytree(info.root, root)
  with open(root / "det_train.json") as f:
    entry = json.load(f)["images"][3]
  os.remove(root / "images" / entry["file_name"])
  return str(root), entry


def _files_config(data, root):
  data.dataset = "files"
  data.root = root
  data.vocab.path = ""


def test_lenient_skips_are_counted_and_reported(prepared, tmp_path):
  data, info = prepared
  root, victim = _broken_copy(info, tmp_path)
  data = tiny_config(data.cache_dir)
  _files_config(data, root)
  data.strict = False
  info = preparation.prepare_data(data)
  stats = stats_lib.PipelineStats()
  ds = pipeline.make_train_dataset(data, info, process_index=0,
                                   process_count=1, stats=stats)
  # 39 good det records: batch 10 completes the first epoch's good ones; the
  # next epoch starts in batch 10 (index 39 of the second pass) -> report.
  batches = take(ds, 11)
  for b in batches:
    assert b["stream"].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
  assert stats.skips.total() >= 1
  assert any(k.startswith("skipped/shapes_det/missing image")
             for k in stats.counts()), stats.counts()
  assert any("shapes_det: epoch 0 done" in r and "skipped=1" in r
             for r in stats.epoch_reports), stats.epoch_reports
  seen = np.concatenate([b["image_id"] for b in batches])
  assert victim["id"] not in seen.tolist()


def test_strict_mode_names_the_missing_file(prepared, tmp_path):
  data, info = prepared
  root, victim = _broken_copy(info, tmp_path)
  data = tiny_config(data.cache_dir)
  _files_config(data, root)
  info = preparation.prepare_data(data)
  ds = pipeline.make_train_dataset(data, info, process_index=0,
                                   process_count=1)
  with pytest.raises(errors.DataError,
                     match=os.path.basename(victim["file_name"])):
    take(ds, 11)


def test_eval_is_ordered_sharded_and_padded(prepared):
  data, info = prepared
  per_process = []
  for pi in range(2):
    batches = list(pipeline.make_eval_dataset(
        data, info, stream="det", batch_size=8, process_index=pi,
        process_count=2))
    # 12 val images: 6 per process, batches of 4 -> 2 batches, 2 padded.
    assert len(batches) == 2
    for b in batches:
      assert b["image"].shape == (4, 64, 64, 3)
      assert b["image"].dtype == np.uint8
    ids = np.concatenate([b["image_id"] for b in batches])
    assert ids[-2:].tolist() == [-1, -1]
    assert not np.concatenate([b["box_mask"] for b in batches])[-2:].any()
    per_process.append(ids[:6])
    again = list(pipeline.make_eval_dataset(
        data, info, stream="det", batch_size=8, process_index=pi,
        process_count=2))
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in batches]),
        np.concatenate([b["image"] for b in again]))
  both = np.concatenate(per_process)
  assert len(set(both.tolist())) == 12
  # Eval images are not augmented: the scale maps the canvas back exactly.
  b = batches[0]
  np.testing.assert_allclose(b["scale"], 1.0)  # 64 px images on 64 px canvas.
  np.testing.assert_array_equal(b["orig_size"][0], [64, 64])


def test_color_jitter_strips_the_vocabularys_colour_words_in_training(
    prepared):
  data, info = prepared
  data = data.copy_and_resolve_references()
  ids = pipeline.color_word_ids(info.vocab, ["Red", "blue", "no-such-colour"])
  assert sorted(info.vocab.token(int(i)) for i in ids) == ["blue", "red"]
  colors = pipeline.color_word_ids(info.vocab, data.augment.color_words)
  assert "pink" in {info.vocab.token(int(i)) for i in colors}
  data.augment.color_jitter_prob = 1.0
  ds = pipeline.make_train_dataset(data, info, process_index=0,
                                   process_count=1)
  batch = take(ds, 1)[0]
  det = batch["stream"] == schema.STREAM_IDS["det"]
  grd = batch["stream"] == schema.STREAM_IDS["grd"]
  # Every det box lost its colour word and kept its shape word; grounding
  # phrases keep theirs.
  assert batch["box_mask"][det].any()
  assert not np.isin(batch["box_tokens"][det], colors).any()
  assert np.isin(batch["box_tokens"][grd], colors).any()
  kept = batch["box_tokens"][det][batch["box_mask"][det]]
  assert (kept > schema.UNK_ID).any(-1).all()
  # The colour words are unknown on a jittered image: listed in no_bg_tokens
  # (first), so no candidate of its makes them a known or background
  # negative, even with the batch's sampled negatives known.
  for row in batch["no_bg_tokens"][det]:
    assert set(colors.tolist()) <= set(row.tolist())
  assert not np.isin(batch["no_bg_tokens"][grd], colors).any()
  data.candidates.det_batch_negatives_known = True
  ds = pipeline.make_train_dataset(data, info, process_index=0,
                                   process_count=1)
  batch = take(ds, 1)[0]
  det = batch["stream"] == schema.STREAM_IDS["det"]
  cands = batch["candidates"][det]
  is_color = np.isin(cands, colors)
  assert is_color.any()  # Sampled: other streams' positives, the vocabulary.
  assert not (batch["cand_known"][det] & is_color).any()
  assert not (batch["cand_bg"][det] & is_color).any()
  # The other sampled negatives are known (the option's point).
  sampled = (cands > schema.UNK_ID) & ~is_color & ~np.isin(
      cands, batch["box_tokens"][det])
  assert sampled.any() and batch["cand_known"][det][sampled].all()
