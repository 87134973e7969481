"""Tests of the reader table: config entries -> opened record sources.

The TFDS readers' path through a config is tested in `tfds_readers_test.py`,
beside the ArrayRecord datasets it writes.
"""

import json

import ml_collections
import pytest

from omnitrain_jax.data import formats
from omnitrain_jax.data import readers_test
from omnitrain_jax.data import sources


def _config(**streams):
  return ml_collections.ConfigDict({"sources": streams})


def test_every_file_format_with_a_reader_is_in_the_table():
  file_readers = {n for n, r in sources.READERS.items() if r.files}
  # caption_json_list is read by the vocabulary only.
  assert file_readers == set(formats.FORMATS) - {"caption_json_list"}
  assert {n for n, r in sources.READERS.items() if not r.files} == {
      "tfds_lvis", "tfds_ref_coco"}


def test_config_errors_name_the_entry_and_the_choices(tmp_path):
  with pytest.raises(ValueError, match=r"data.sources.det.x.reader='nope'; "
                     r"use one of \[.*'tfds_lvis'"):
    sources.source_specs(_config(det={"x": {"reader": "nope"}}), "/r")
  with pytest.raises(ValueError, match=r"data.sources.det.x: reader "
                     r"'refcoco' gives 'grd' records, not 'det'"):
    sources.source_specs(_config(det={"x": {"reader": "refcoco"}}), "/r")
  with pytest.raises(ValueError, match="stream 'vid'"):
    sources.source_specs(_config(vid={}), "/r")


def test_paths_resolve_against_root_but_tfds_splits_do_not(tmp_path):
  specs = sources.source_specs(_config(
      det={"coco": {"reader": "coco_instances", "train": "a.json",
                    "image_dir": "/abs/images"},
           "lvis": {"reader": "tfds_lvis", "train": "train",
                    "val": "validation", "data_dir": "tfds"}}), "/root")
  coco, lvis = specs["det"]["coco"], specs["det"]["lvis"]
  assert (coco.train, coco.image_dir) == ("/root/a.json", "/abs/images")
  assert (lvis.train, lvis.val, lvis.data_dir) == (
      "train", "validation", "/root/tfds")
  assert specs["grd"] == specs["img"] == {}
  assert sources.loader_keywords(lvis, "train") == {"data_dir": "/root/tfds"}
  other = sources.SourceSpec("r", "grd", "tfds_ref_coco", "train",
                             dataset="ref_coco/refcoco_unc")
  assert sources.loader_keywords(other, "val") == {
      "data_dir": None, "dataset": "ref_coco/refcoco_unc"}


def test_refcoco_entry_passes_instances_and_the_split(tmp_path):
  refs_path, inst_path = readers_test.refcoco_files(tmp_path)
  specs = sources.source_specs(_config(grd={"refcocog": {
      "reader": "refcoco", "train": refs_path.name, "val": refs_path.name,
      "instances": "instances.json", "image_dir": "train2014",
      "val_split": "val"}}), str(tmp_path))
  spec = specs["grd"]["refcocog"]
  assert spec.instances == inst_path
  train = sources.open_source(spec, "train", strict=True)
  val = sources.open_source(spec, "val", strict=True)
  assert [r["caption"] for r in train] == ["The man on the left", "left guy"]
  assert [r["caption"] for r in val] == ["right man"]
  assert train[0]["image_path"] == str(tmp_path / "train2014" /
                                       "COCO_train2014_100.jpg")


def test_caption_entry_without_image_dir_is_relative_to_the_file(tmp_path):
  path = tmp_path / "caps.jsonl"
  path.write_text(json.dumps({"image": "a.jpg", "caption": "a cat"}) + "\n")
  spec = sources.source_specs(_config(img={"caps": {
      "reader": "caption_jsonl", "train": "caps.jsonl"}}),
                              str(tmp_path))["img"]["caps"]
  src = sources.open_source(spec, "train", strict=True)
  assert src.name == "caps" and src[0]["image_path"] == str(tmp_path / "a.jpg")
  with pytest.raises(ValueError, match=r"has no val file; set "
                     r"data.sources.img.caps.val"):
    sources.open_source(spec, "val", strict=True)


def test_check_files_says_how_to_prepare(tmp_path):
  specs = sources.source_specs(_config(
      det={"lvis": {"reader": "tfds_lvis", "train": "train",
                    "data_dir": "missing"}}), str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"data.sources.det.lvis."
                     r"data_dir: .*missing is not a folder. Prepare the "
                     r"dataset there \(prepare it as ArrayRecord with `tfds "
                     r"build lvis"):
    sources.check_files(specs, {"det": 2})
  # Split names are not files: nothing to check without a data_dir.
  specs = sources.source_specs(_config(
      det={"lvis": {"reader": "tfds_lvis", "train": "train"}}), str(tmp_path))
  sources.check_files(specs, {"det": 2})


def test_webdataset_shard_patterns_resolve_check_and_open(tmp_path):
  (tmp_path / "cc").mkdir()
  for s in range(2):
    readers_test.write_shard(tmp_path / "cc" / f"{s:05d}.tar", [
        readers_test._good_sample(f"{s:05d}0000", f"kite {s}")])
  config = _config(img={"cc": {
      "reader": "webdataset", "train": "cc/{00000..00001}.tar::cc/none.tar",
      "val": "cc/00001.tar"}})
  spec = sources.source_specs(config, str(tmp_path))["img"]["cc"]
  assert spec.train == (f"{tmp_path}/cc/{{00000..00001}}.tar::"
                        f"{tmp_path}/cc/none.tar")
  sources.check_files({"img": {"cc": spec}}, {"img": 2})
  src = sources.open_source(spec, "train", strict=False)
  assert [r["caption"] for r in src] == ["kite 0", "kite 1"]
  assert src.num_skipped == 1  # cc/none.tar is missing.
  assert len(sources.open_source(spec, "val", strict=True)) == 1
  config.sources.img.cc.train = "cc/{00005..00009}.tar"
  spec = sources.source_specs(config, str(tmp_path))["img"]["cc"]
  with pytest.raises(FileNotFoundError, match=r"no shard of .*00005\.\.00009"
                     r".* exists. Prepare them: write WebDataset tar shards"):
    sources.check_files({"img": {"cc": spec}}, {"img": 2})


def test_val_image_dir_serves_the_val_split_only(tmp_path):
  (tmp_path / "train2017").mkdir()
  (tmp_path / "val2017").mkdir()
  for name in ("train.json", "val.json"):
    (tmp_path / name).write_text("{}")
  entry = {"reader": "coco_instances", "train": "train.json",
           "val": "val.json", "image_dir": "train2017",
           "val_image_dir": "val2017"}
  specs = sources.source_specs(_config(det={"mine": entry}), str(tmp_path))
  spec = specs["det"]["mine"]
  assert sources.loader_keywords(spec, "train") == {
      "image_dir": str(tmp_path / "train2017")}
  assert sources.loader_keywords(spec, "val") == {
      "image_dir": str(tmp_path / "val2017")}
  sources.check_files(specs, {"det": 1})
  no_val_dir = dict(entry, val_image_dir="")
  spec = sources.source_specs(_config(det={"mine": no_val_dir}),
                              str(tmp_path))["det"]["mine"]
  assert sources.loader_keywords(spec, "val") == {
      "image_dir": str(tmp_path / "train2017")}  # image_dir serves both.
  missing = dict(entry, val_image_dir="nope")
  specs = sources.source_specs(_config(det={"mine": missing}), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="val_image_dir"):
    sources.check_files(specs, {"det": 1})
