"""Tests for the TFDS readers on real ArrayRecord files, without TensorFlow.

`tfds.testing.mock_data` is not used (tfds 4.9.10, no TF): its data source
bypasses deserialization, returns already-decoded numpy images, and draws each
sequence field's length independently (one LVIS example had 49 areas, 45
boxes, 25 ids, 44 labels); with ``decoders`` it fails to encode such an
example. Instead each test prepares a tiny dataset with the real builder's
features (its `_split_generators` replaced by known examples) and reads it back
through `builder.as_data_source`, the path real data takes.
"""

import io
import pickle
import sys

import grain
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.features import feature as feature_lib

from omnitrain_jax.data import images
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import pipeline_test
from omnitrain_jax.data import preparation
from omnitrain_jax.data import readers_test
from omnitrain_jax.data import schema
from omnitrain_jax.data import tfds_readers
from omnitrain_jax.data.errors import DataError, SkipCounter
from omnitrain_jax.vocab.vocabulary import Vocabulary

BBox = tfds.features.BBox


def _encode(im, fmt):
  b = io.BytesIO()
  im.save(b, fmt)
  return b.getvalue()


def _jpeg(w, h):
  return _encode(PIL.Image.new("RGB", (w, h), (200, 20, 20)), "JPEG")


def _mask(w, h):
  return _encode(PIL.Image.fromarray(np.zeros((h, w), np.uint8)), "PNG")


def _prepare(data_dir, dataset, examples):
  """Writes `examples` as the train split of `dataset` (ArrayRecord)."""
  builder = tfds.builder(dataset, data_dir=data_dir)
  cls = type(builder)
  # tfds 4.9.10 resolves download checksums through importlib_resources,
  # which is not installed; nothing is downloaded here. (Set directly: the
  # inherited class property raises when monkeypatch reads it to restore it.)
  assert "url_infos" not in cls.__dict__
  cls.url_infos = None
  try:
    _prepare_builder(builder, examples)
  finally:
    del cls.url_infos


def _prepare_builder(builder, examples):
  with pytest.MonkeyPatch.context() as mp:
    # Serializing nested sequences (RefCOCO refexps) reads TensorInfo.dtype,
    # which imports TensorFlow; the numpy dtype is all it needs. Reading does
    # not go through this.
    mp.setattr(feature_lib.TensorInfo, "dtype",
               property(lambda self: self.np_dtype))
    mp.setattr(builder, "_split_generators", lambda dl_manager: {
        "train": iter(list(enumerate(examples)))})
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig())


def lvis_examples(bad_box=False):
  obj = lambda i, box, label: {  # noqa: E731
      "id": i, "area": 10, "bbox": box, "label": label,
      "segmentation": _mask(40, 30)}
  return [
      {"image": _jpeg(40, 30), "image/id": 11, "neg_category_ids": [1, 2],
       "not_exhaustive_category_ids": [3],
       "objects": [obj(100, BBox(0.1, 0.2, 0.5, 0.6), 0),
                   obj(101, (BBox(0.3, 0.3, 0.3, 0.9) if bad_box else
                             BBox(0.0, 0.0, 1.0, 1.0)), 4)]},
      {"image": _jpeg(20, 10), "image/id": 12, "neg_category_ids": [],
       "not_exhaustive_category_ids": [], "objects": []},
  ]


@pytest.fixture(scope="module")
def lvis_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds_lvis")
  _prepare(d, "lvis", lvis_examples())
  return d


def test_lvis_every_field(lvis_dir):
  src = tfds_readers.load_tfds_lvis("train", data_dir=lvis_dir)
  assert (src.name, src.stream, len(src)) == ("lvis", "det", 2)
  assert src.category_names[1] == "aerosol can"
  assert len(src.category_names) == 1203
  rec = src[0]
  readers_test.check_schema(dict(rec, image_path="/x", image_bytes=None))
  assert rec["image_path"] is None and isinstance(rec["image_bytes"], bytes)
  assert rec["image_id"] == 11 and (rec["width"], rec["height"]) == (40, 30)
  np.testing.assert_allclose(rec["boxes"], [[8, 3, 24, 15], [0, 0, 40, 30]],
                             atol=1e-4)
  assert rec["category_ids"].tolist() == [1, 5]
  assert rec["box_texts"] == ["aerosol can", "alcohol"]
  assert rec["phrase_ids"].tolist() == [0, 1]
  assert rec["neg_texts"] == ["air conditioner", "airplane"]
  assert rec["not_exhaustive_texts"] == ["alarm clock"]
  assert rec["caption"] == "" and rec["box_spans"] == [[], []]
  assert images.load_image(rec).shape == (30, 40, 3)
  empty = src[1]
  assert empty["boxes"].shape == (0, 4) and empty["box_texts"] == []
  assert (empty["width"], empty["height"]) == (20, 10)
  assert "tensorflow" not in sys.modules


def test_lvis_pickles_and_feeds_grain(lvis_dir):
  src = tfds_readers.load_tfds("lvis", "train", data_dir=lvis_dir)
  again = pickle.loads(pickle.dumps(src))
  assert again[0]["box_texts"] == src[0]["box_texts"]
  ds = grain.MapDataset.source(src).map(lambda r: r["image_id"])
  assert list(ds) == [11, 12]


def test_lvis_bad_box_both_modes(tmp_path):
  _prepare(tmp_path, "lvis", lvis_examples(bad_box=True))
  src = tfds_readers.load_tfds_lvis("train", data_dir=tmp_path)
  with pytest.raises(DataError, match="empty box") as e:
    src[0]
  assert "annotation id 101" in e.value.record and "tfds:lvis" in str(e.value)
  counter = SkipCounter()
  src = tfds_readers.load_tfds_lvis("train", data_dir=tmp_path, strict=False,
                                    counter=counter)
  assert src[0]["box_texts"] == ["aerosol can"]
  assert counter.counts() == {"lvis/empty box": 1}


def test_legacy_unprepared_and_unsupported(tmp_path):
  for name in ("coco/2017", "coco_captions"):
    with pytest.raises(ValueError, match="TensorFlow.*load_coco"):
      tfds_readers.load_tfds(name, "train", data_dir=tmp_path)
  with pytest.raises(ValueError, match="not prepared.*array_record"):
    tfds_readers.load_tfds_lvis("train", data_dir=tmp_path)
  with pytest.raises(ValueError, match="supported builders"):
    tfds_readers.load_tfds("mnist", "train", data_dir=tmp_path)


def refcoco_examples(empty_refexp=False):
  def obj(i, box, raws):
    return {"id": i, "area": 10, "bbox": box, "label": 1, "gt_box_index": 0,
            "mask": _mask(40, 30),
            "refexp": [{"refexp_id": 10 * i + k, "raw": r}
                       for k, r in enumerate(raws)]}
  ann = lambda i, box: {"id": i, "area": 10, "bbox": box, "label": 1}  # noqa
  b1, b2 = BBox(0.1, 0.2, 0.5, 0.6), BBox(0.0, 0.5, 1.0, 1.0)
  return [
      {"image": _jpeg(40, 30), "image/id": 7,
       "objects": [obj(1, b1, ["the red car", " left car " if not empty_refexp
                               else "  "]),
                   obj(2, b2, ["the man on the right"])],
       "coco_annotations": [ann(1, b1), ann(2, b2)]},
      {"image": _jpeg(20, 20), "image/id": 8,
       "objects": [obj(3, b2, ["a dog"])], "coco_annotations": [ann(3, b2)]},
  ]


@pytest.fixture(scope="module")
def refcoco_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds_refcoco")
  _prepare(d, "ref_coco/refcocog_umd", refcoco_examples())
  return d


def test_ref_coco_one_record_per_expression(refcoco_dir):
  src = tfds_readers.load_tfds("ref_coco/refcocog_umd", "train",
                               data_dir=refcoco_dir)
  assert (src.name, src.stream, len(src)) == ("refcocog", "grd", 4)
  assert [r["caption"] for r in src] == [
      "the red car", "left car", "the man on the right", "a dog"]
  rec = src[1]
  readers_test.check_schema(dict(rec, image_path="/x", image_bytes=None))
  assert rec["image_id"] == 7 and (rec["width"], rec["height"]) == (40, 30)
  np.testing.assert_allclose(rec["boxes"], [[8, 3, 24, 15]], atol=1e-4)
  assert rec["box_texts"] == ["left car"]
  assert rec["box_spans"] == [[[0, 8]]]
  assert rec["category_ids"].tolist() == [-1]
  assert rec["phrase_ids"].tolist() == [0]
  assert rec["neg_texts"] == [] and rec["not_exhaustive_texts"] == []
  np.testing.assert_allclose(src[3]["boxes"], [[10, 0, 20, 20]], atol=1e-4)
  assert images.load_image(src[3]).shape == (20, 20, 3)
  again = pickle.loads(pickle.dumps(src))
  assert again[2]["caption"] == "the man on the right"
  assert "tensorflow" not in sys.modules


def test_ref_coco_empty_expression_both_modes(tmp_path):
  _prepare(tmp_path, "ref_coco/refcocog_umd",
           refcoco_examples(empty_refexp=True))
  with pytest.raises(DataError, match="empty referring expression") as e:
    tfds_readers.load_tfds_ref_coco("train", data_dir=tmp_path)
  assert "object id 1 refexp 1" in e.value.record
  src = tfds_readers.load_tfds_ref_coco("train", data_dir=tmp_path,
                                        strict=False)
  assert len(src) == 3 and src.num_skipped == 1
  assert src[1]["caption"] == "the man on the right"


def test_config_sources_train_and_evaluate_on_tfds(lvis_dir, refcoco_dir,
                                                   tmp_path):
  """The reader table's TFDS entries, from a config's data.sources."""
  data = pipeline_test.tiny_config(tmp_path / "cache")
  vocab_path = str(tmp_path / "vocab.txt")
  Vocabulary(["aerosol can", "alcohol", "car", "man", "dog", "red",
              "left", "right"]).save(vocab_path)
  data.dataset, data.root, data.vocab.path = "files", str(tmp_path), vocab_path
  data.sources = {
      "det": {"lvis": dict(reader="tfds_lvis", data_dir=str(lvis_dir),
                           train="train", val="train")},
      "grd": {"refcocog": dict(reader="tfds_ref_coco",
                               data_dir=str(refcoco_dir),
                               dataset="ref_coco/refcocog_umd",
                               train="train", val="train")},
  }
  data.batch = {"det": 2, "grd": 2, "img": 0}
  info = preparation.prepare_data(data)
  assert info.sources["det"]["lvis"].train == "train"
  assert info.sources["grd"]["refcocog"].data_dir == str(refcoco_dir)
  it = iter(pipeline.make_train_dataset(data, info, process_index=0,
                                        process_count=1))
  want = schema.batch_shapes(info.spec, 4)
  for _ in range(3):
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want
    assert batch["stream"].tolist() == [0, 0, 1, 1]
    assert set(batch["image_id"][:2].tolist()) == {11, 12}
    assert set(batch["image_id"][2:].tolist()) <= {7, 8}
  tokens = info.vocab.ids(["aerosol can", "alcohol"])
  det = list(pipeline.make_eval_dataset(data, info, stream="det",
                                        batch_size=4, process_index=0,
                                        process_count=1))
  assert len(det) == 1 and det[0]["image_id"].tolist() == [11, 12, -1, -1]
  np.testing.assert_array_equal(det[0]["box_tokens"][0, :2, 0], tokens)
  grd = list(pipeline.make_eval_dataset(data, info, stream="grd",
                                        batch_size=4, process_index=0,
                                        process_count=1))
  assert [b["image_id"].tolist() for b in grd] == [[7, 7, 7, 8]]
  assert "tensorflow" not in sys.modules
