"""Tests of data preparation: the ShapesWorld cache and the vocabulary."""

import concurrent.futures
import json
import os
import pickle

import pytest

from omnitrain_jax.data import errors
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import pipeline_test
from omnitrain_jax.data import preparation
from omnitrain_jax.data import readers_test
from omnitrain_jax.data import sources


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data = pipeline_test.tiny_config(tmp_path_factory.mktemp("cache"))
  return data, preparation.prepare_data(data)


def test_prepare_data_caches_and_builds_vocab(prepared):
  data, info = prepared
  assert os.path.exists(os.path.join(info.root, "shapes_world.json"))
  assert info.vocab.id("left") > 1 and info.vocab.id("circle") > 1
  assert info.splits["img_novel_tokens"] == ["hexagon", "pink"]
  # A second call reuses the data and the vocabulary.
  stamp = os.stat(os.path.join(info.root, "det_train.json")).st_mtime_ns
  again = preparation.prepare_data(data)
  assert again.root == info.root and again.vocab_path == info.vocab_path
  assert os.stat(os.path.join(info.root,
                              "det_train.json")).st_mtime_ns == stamp
  # Another generator parameter -> another dataset folder.
  data.shapes_world.seed = 1
  other = preparation.ensure_shapes_world(preparation._shapes_params(data),
                                          data.cache_dir)
  data.shapes_world.seed = 0
  assert other != info.root


def test_concurrent_generation_is_safe(tmp_path):
  params = dict(num_images=6, num_val_images=2, image_size=32, seed=3)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    roots = list(pool.map(
        lambda _: preparation.ensure_shapes_world(params, str(tmp_path)),
        range(2)))
  assert roots[0] == roots[1]
  assert os.path.exists(os.path.join(roots[0], "shapes_world.json"))
  # The loser's temporary folder is gone; only the dataset remains.
  assert os.listdir(tmp_path) == [os.path.basename(roots[0])]


def test_missing_annotation_file_error_says_how_to_prepare(prepared,
                                                            tmp_path):
  data, _ = prepared
  data = pipeline_test.tiny_config(data.cache_dir)
  pipeline_test._files_config(data, str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=r"det_train.json does not exist. Prepare it"):
    preparation.prepare_data(data)


def test_missing_vocabulary_file_names_the_command(tmp_path):
  data = pipeline_test.tiny_config(tmp_path)
  data.vocab.path = str(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError,
                     match=r"nope.txt does not exist.*omnitrain_jax.data."
                     "build_vocab"):
    preparation.prepare_data(data)


def test_tfds_source_needs_a_vocabulary_file(tmp_path):
  data = pipeline_test.tiny_config(tmp_path)
  data.dataset, data.root = "files", str(tmp_path)
  data.sources = {"det": {"lvis": dict(reader="tfds_lvis", train="train")}}
  data.batch = {"det": 2, "grd": 0, "img": 0}
  assert not sources.READERS["tfds_lvis"].files
  with pytest.raises(ValueError, match=r"data.sources.det.lvis is a TFDS "
                     r"source.*build_vocab.*data.vocab.path"):
    preparation.prepare_data(data)


def _leakage_files(root):
  """COCO train2017 + the refer release of RefCOCOg + an MDETR refcoco val
  file, shaped like the releases (COCO ids 9, 25, 30, 42, 77)."""
  os.makedirs(os.path.join(root, "train2017"))
  os.makedirs(os.path.join(root, "train2014"))

  def write(name, obj):
    with open(os.path.join(root, name), "w") as f:
      json.dump(obj, f)

  write("instances_train2017.json", {
      "info": {"year": 2017}, "licenses": [],
      "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64,
                  "height": 48, "license": 1, "coco_url": "http://images."
                  f"cocodataset.org/train2017/{i:012d}.jpg"}
                 for i in (9, 25, 30, 42, 77)],
      "annotations": [{"id": 100 + i, "image_id": i, "category_id": 18,
                       "bbox": [1.0, 2.0, 10.0, 8.0], "area": 80.0,
                       "iscrowd": 0, "segmentation": []}
                      for i in (9, 25, 30, 42, 77)],
      "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}]})
  # refcocog (umd): refs(umd).p (Python 2 pickle of plain data) and the
  # release's instances.json of COCO train2014 images.
  refs = [{"image_id": i, "split": split, "sentences": [
      {"tokens": ["the", "dog"], "raw": "The dog.", "sent_id": k,
       "sent": "the dog"}], "file_name": f"COCO_train2014_{i:012d}_{k}.jpg",
      "category_id": 18, "ann_id": 1000 + k, "sent_ids": [k], "ref_id": k}
          for k, (i, split) in enumerate([(9, "train"), (25, "val"),
                                          (30, "test"), (555, "val")])]
  os.makedirs(os.path.join(root, "refcocog"))
  with open(os.path.join(root, "refcocog", "refs(umd).p"), "wb") as f:
    pickle.dump(refs, f, protocol=2)
  write("refcocog/instances.json", {
      "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg",
                  "width": 64, "height": 48} for i in (9, 25, 30, 555)],
      "annotations": [{"id": 1000 + k, "image_id": r["image_id"],
                       "category_id": 18, "bbox": [1, 2, 10, 8],
                       "iscrowd": 0, "area": 80} for k, r in enumerate(refs)],
      "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}]})
  # MDETR's final_refcoco_val.json: per-expression entries; the COCO id is
  # in file_name and original_id.
  caption = "dog on the left"
  write("final_refcoco_val.json", {
      "images": [{"file_name": "COCO_train2014_000000000042.jpg",
                  "height": 48, "width": 64, "id": 0, "original_id": 42,
                  "caption": caption, "dataset_name": "refcoco",
                  "tokens_negative": [[0, 15]], "tokens_positive_eval":
                  [[[0, 3]]]}],
      "annotations": [{"area": 80.0, "iscrowd": 0, "image_id": 0,
                       "category_id": 18, "id": 0, "bbox": [1, 2, 10, 8],
                       "tokens_positive": [[0, 3]]}],
      "categories": [{"id": 18, "name": "dog"}]})


def _leakage_config(tmp_path, policy):
  data = pipeline_test.tiny_config(tmp_path / "cache")
  root = str(tmp_path / "data")
  _leakage_files(root)
  pipeline_test._files_config(data, root)
  data.sources = {
      "det": {"coco": dict(reader="coco_instances",
                           train="instances_train2017.json",
                           image_dir="train2017")},
      "grd": {"refcocog": dict(reader="refcoco", train="refcocog/refs(umd).p",
                               val="refcocog/refs(umd).p",
                               instances="refcocog/instances.json",
                               image_dir="train2014", val_split="val"),
              "refcoco": dict(reader="mdetr_grounding",
                              train="final_refcoco_val.json",
                              val="final_refcoco_val.json",
                              image_dir="train2014")}}
  data.batch = {"det": 2, "grd": 2, "img": 0}
  data.eval_overlap = policy
  return data


def test_refexp_eval_images_are_dropped_from_coco_det_train(tmp_path):
  data = _leakage_config(tmp_path, "drop")
  info = preparation.prepare_data(data)
  # refcocog val + test (25, 30, 555; not its train image 9) and the MDETR
  # refcoco val image 42.
  assert info.held_out["eval_images"] == 4
  assert info.held_out["policy"] == "drop"
  counter = errors.SkipCounter()
  src = sources.open_source(info.sources["det"]["coco"], "train",
                            strict=True, counter=counter)
  assert sorted(r["image_id"] for r in src) == [9, 77]
  assert src.num_held_out == 3
  assert counter.counts() == {"coco/held out": 3}
  # Only train is filtered; the grounding sources keep their images.
  refcocog = sources.open_source(info.sources["grd"]["refcocog"], "val",
                                 strict=True)
  assert len(refcocog) == 2


def test_refexp_eval_overlap_report_and_off(tmp_path):
  info = preparation.prepare_data(_leakage_config(tmp_path / "a", "report"))
  src = sources.open_source(info.sources["det"]["coco"], "train",
                            strict=True)
  assert len(src) == 5 and src.num_held_out == 3
  info = preparation.prepare_data(_leakage_config(tmp_path / "b", "off"))
  assert info.held_out["eval_images"] == 0
  assert len(sources.open_source(info.sources["det"]["coco"], "train",
                                 strict=True)) == 5
  with pytest.raises(ValueError, match="data.eval_overlap='keep'"):
    preparation.prepare_data(_leakage_config(tmp_path / "c", "keep"))


def test_custom_dataset_ids_never_match_coco_ids(tmp_path):
  data = _leakage_config(tmp_path, "drop")
  path = os.path.join(data.root, "instances_train2017.json")
  with open(path) as f:
    custom = json.load(f)
  for im in custom["images"]:  # Same ids, the user's own file names.
    im["file_name"] = f"shop_{im['id']}.jpg"
    del im["coco_url"]
  with open(path, "w") as f:
    json.dump(custom, f)
  info = preparation.prepare_data(data)
  src = sources.open_source(info.sources["det"]["coco"], "train",
                            strict=True)
  assert len(src) == 5 and src.num_held_out == 0


def test_webdataset_shards_as_a_config_caption_source(prepared, tmp_path):
  """img2dataset-style shards as the img stream of a config: the vocabulary
  reads their captions and the pipeline batches their images."""
  data, info = prepared
  shard_dir = tmp_path / "cc"
  shard_dir.mkdir()
  for s in range(2):
    readers_test.write_shard(shard_dir / f"{s:05d}.tar", [
        readers_test._good_sample(f"{s:05d}{k:04d}", f"a zeppelin over {k} "
                                  "red circles", 40, 30) for k in range(3)])
  data = pipeline_test.tiny_config(data.cache_dir)
  pipeline_test._files_config(data, info.root)
  data.sources.img = {"cc": dict(reader="webdataset",
                                 train=str(shard_dir / "{00000..00001}.tar"))}
  prepared_info = preparation.prepare_data(data)
  assert prepared_info.vocab.id("zeppelin") > 1
  assert prepared_info.sources["img"]["cc"].reader == "webdataset"
  ds = pipeline.make_train_dataset(data, prepared_info, process_index=0,
                                   process_count=1)
  batch = next(iter(ds))
  img = batch["stream"] == 2
  assert img.sum() == data.batch["img"]
  zeppelin = prepared_info.vocab.id("zeppelin")
  assert (batch["caption_tokens"][img] == zeppelin).any(axis=1).all()
