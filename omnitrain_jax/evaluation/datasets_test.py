"""Tests for datasets.py: which datasets an evaluation scores."""

import json

import pytest

from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema
from omnitrain_jax.evaluation import datasets


def _info():
  return preparation.DataInfo(root="", sources={}, vocab_path="", vocab=None,
                              tokenizer=None, spec=schema.Spec())


def _write(path, **extra):
  data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 10,
                      "height": 10, **extra.pop("image", {})}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3,
                           "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
          "categories": [{"id": 3, "name": "cat", **extra.pop("category",
                                                                {})}]}
  path.write_text(json.dumps(data))
  return str(path)


def test_with_dataset_json_sniffs_coco_and_lvis(tmp_path):
  coco = _write(tmp_path / "coco.json")
  # LVIS by its images' federated fields, or by its categories' fields only.
  lvis_a = _write(tmp_path / "lvis_a.json",
                  image={"neg_category_ids": [], "not_exhaustive_category_ids":
                         []})
  lvis_b = _write(tmp_path / "lvis_b.json", category={"frequency": "r",
                                                      "synonyms": ["cat"]})
  for path, protocol, reader in ((coco, "coco", "coco_instances"),
                                 (lvis_a, "lvis", "lvis"),
                                 (lvis_b, "lvis", "lvis")):
    info, ds = datasets.with_dataset_json(_info(), path, str(tmp_path))
    assert ds.protocol == protocol, path
    assert info.sources["det"][ds.name].reader == reader
  # An explicit format wins over the sniff.
  _, ds = datasets.with_dataset_json(_info(), lvis_b, str(tmp_path),
                                     fmt="coco")
  assert ds.protocol == "coco"


def test_with_dataset_json_refuses_other_formats_by_name(tmp_path):
  captions = tmp_path / "captions.json"
  captions.write_text(json.dumps({
      "images": [{"id": 1, "file_name": "a.jpg"}],
      "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}]}))
  with pytest.raises(ValueError, match="not COCO or LVIS instances"):
    datasets.with_dataset_json(_info(), str(captions), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    datasets.with_dataset_json(_info(), str(tmp_path / "x.json"),
                               str(tmp_path))
