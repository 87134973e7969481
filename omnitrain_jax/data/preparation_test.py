"""Tests of data preparation: the ShapesWorld cache and the vocabulary."""

import concurrent.futures
import os

import pytest

from omnitrain_jax.data import pipeline_test
from omnitrain_jax.data import preparation
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
