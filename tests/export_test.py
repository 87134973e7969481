"""Export and serving on a tiny trained run.

The exported detector (`omnitrain_jax.export` -> `omnitrain_jax.serving`)
must give `Predictor.predict`'s boxes and scores on the same images and
queries -- at the training size, at another size, grayscale, RGBA and
EXIF-rotated -- and serve without the training code (no flax, optax, orbax,
grain in `sys.modules`).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import binaries  # tests/binaries.py

REPO = pathlib.Path(__file__).resolve().parents[1]
QUERIES = ["red circle", "blue star", "zebra", "green square", "cross",
           "yellow triangle"]
TRAINING_CODE = ("flax", "optax", "orbax", "grain")


_env = binaries.subprocess_env


def _run(cmd, timeout=600):
  proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                        timeout=timeout, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def export_dir(tiny_run, tmp_path_factory):
  """The binary's export (symbolic batch, cpu + cuda + tpu lowerings)."""
  workdir, _ = tiny_run
  out = tmp_path_factory.mktemp("exported") / "detector"
  proc = _run([sys.executable, "-m", "omnitrain_jax.export",
               f"--workdir={workdir}", f"--out={out}"])
  assert f"Exported step {binaries.REFERENCE_STEPS}" in proc.stdout
  return out


@pytest.fixture(scope="module")
def images(tiny_run, tmp_path_factory):
  """name -> path: the training size, larger, gray, RGBA, EXIF-rotated."""
  _, data_root = tiny_run
  folder = tmp_path_factory.mktemp("images")
  shapes = data_root / "images" / "det_val" / "000000.jpg"
  paths = {"shapes": folder / "shapes.jpg",
           "large": folder / "large.png", "gray": folder / "gray.png",
           "rgba": folder / "rgba.png", "rotated": folder / "rotated.jpg"}
  paths["shapes"].write_bytes(shapes.read_bytes())
  # 64 x 64 training canvas vs a 200 x 130 image (shrunk with INTER_AREA).
  Image.open(shapes).resize((200, 130)).save(paths["large"])
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 120), np.uint8), "L").save(
      paths["gray"])
  Image.fromarray(rng.integers(0, 255, (90, 70, 4), np.uint8), "RGBA").save(
      paths["rgba"])
  exif = Image.Exif()
  exif[0x0112] = 6  # Stored 160 x 100, displayed 100 x 160.
  Image.fromarray(rng.integers(0, 255, (100, 160, 3), np.uint8)).save(
      paths["rotated"], exif=exif)
  return paths


@pytest.fixture(scope="module")
def predictor(tiny_run):
  from omnitrain_jax.evaluation import predictor as predictor_lib
  workdir, _ = tiny_run
  return predictor_lib.Predictor.from_workdir(workdir)


@pytest.fixture(scope="module")
def detector(export_dir):
  from omnitrain_jax import serving
  return serving.load(str(export_dir))


def _assert_same(got, want):
  """Detections of serving vs predict: same boxes, scores to tolerance."""
  assert (got["width"], got["height"]) == (want["width"], want["height"])
  assert got["queries"] == want["queries"]
  g, w = got["detections"], want["detections"]
  assert [(d["query"], d["query_index"]) for d in g] == [
      (d["query"], d["query_index"]) for d in w]
  np.testing.assert_allclose([d["score"] for d in g],
                             [d["score"] for d in w], atol=2e-5)
  for key in ("box_xyxy", "box_xywh"):
    np.testing.assert_allclose([d[key] for d in g], [d[key] for d in w],
                               atol=0.02)


def test_signature(export_dir, tiny_run):
  sig = json.loads((export_dir / "signature.json").read_text())
  assert sig["platforms"] == ["cpu", "cuda", "tpu"]
  assert sig["inputs"]["images"] == {"shape": ["b", 64, 64, 3],
                                     "dtype": "uint8"}
  assert sig["inputs"]["query_tokens"]["shape"] == [16, 8]
  assert sig["checkpoint_step"] == binaries.REFERENCE_STEPS
  assert sig["config"]["model"]["image_size"] == 64
  assert set(sig["outputs"]) == {"scores", "boxes", "box_index", "keep"}
  workdir, _ = tiny_run
  assert (export_dir / "vocab.txt").read_text() == (
      pathlib.Path(workdir) / "vocab.txt").read_text()


@pytest.mark.parametrize("nms_iou", [0.5, None])
def test_same_boxes_and_scores_as_predict(detector, predictor, images,
                                          nms_iou):
  names = list(images)
  # One batched call of 3 images (the last batch padded) against predict's
  # one image at a time.
  got = detector.detect([images[n] for n in names], QUERIES, top_k=5,
                        threshold=0.0, nms_iou=nms_iou, batch_size=3)
  queries = predictor.text_queries(QUERIES)
  for name, result in zip(names, got):
    want = predictor.predict(str(images[name]), queries, max_boxes=5,
                             threshold=0.0, nms_iou=nms_iou)
    assert result["image"] == want["image"], name
    assert result["detections"], name
    _assert_same(result, want)


def test_arrays_and_paths_agree(detector, images):
  gray = np.asarray(Image.open(images["gray"]))  # [H, W]
  rgba = np.asarray(Image.open(images["rgba"]))  # [H, W, 4]
  from_arrays = detector.detect([gray, rgba], QUERIES, threshold=0.0)
  from_paths = detector.detect([images["gray"], images["rgba"]], QUERIES,
                               threshold=0.0)
  for a, p in zip(from_arrays, from_paths):
    assert "image" not in a
    assert a["detections"] == p["detections"]
  with pytest.raises(ValueError, match="uint8"):
    detector.detect([gray.astype(np.float32)], QUERIES)


def test_threshold_and_top_k(detector, images):
  (loose,) = detector.detect([images["shapes"]], ["red circle", "giraffe"],
                             top_k=4, threshold=0.0, nms_iou=None)
  assert len(loose["detections"]) == 4  # "giraffe" finds nothing.
  top = max(d["score"] for d in loose["detections"])
  (strict,) = detector.detect(images["shapes"], "red circle", top_k=4,
                              threshold=top + 1e-4)
  assert strict["detections"] == []


def test_fixed_batch_and_more_queries_than_the_export(
    tiny_run, predictor, images, tmp_path):
  from omnitrain_jax import export
  from omnitrain_jax import serving
  workdir, _ = tiny_run
  out = tmp_path / "small"
  sig = export.export_run(workdir, str(out), batch=2, max_queries=2,
                          max_tokens=2, max_boxes=3, platforms=["cpu"])
  assert sig["inputs"]["images"]["shape"] == [2, 64, 64, 3]
  assert sig["platforms"] == ["cpu"]
  detector = serving.load(str(out))
  paths = [images["shapes"], images["large"], images["rotated"]]
  # 6 queries in 3 calls of 2; 3 images in 2 batches of 2 (one padded).
  got = detector.detect(paths, QUERIES, top_k=3, threshold=0.0)
  queries = predictor.text_queries(QUERIES)
  for path, result in zip(paths, got):
    _assert_same(result, predictor.predict(str(path), queries, max_boxes=3,
                                           threshold=0.0))
  with pytest.raises(ValueError, match="--max_tokens"):
    detector.detect(paths, ["red circle star"])
  with pytest.raises(ValueError, match="--max_boxes"):
    detector.detect(paths, ["red circle"], top_k=4)


def test_another_image_size(tiny_run, images, tmp_path):
  from omnitrain_jax import export
  from omnitrain_jax import serving
  workdir, _ = tiny_run
  sig = export.export_run(workdir, str(tmp_path / "96"), image_size=96,
                          platforms=["cpu"])
  assert (sig["image_size"], sig["trained_image_size"]) == (96, 64)
  assert sig["num_patches"] == 36  # (96 / 16) ** 2
  detector = serving.load(str(tmp_path / "96"))
  (result,) = detector.detect([images["large"]], QUERIES, threshold=0.0)
  assert result["detections"]
  for d in result["detections"]:
    x0, y0, x1, y1 = d["box_xyxy"]
    assert 0 <= x0 <= x1 <= 200 and 0 <= y0 <= y1 <= 130, d


def test_serving_imports_no_training_code(export_dir, images):
  code = f"""
import json, sys
from omnitrain_jax import serving
detector = serving.load({str(export_dir)!r})
(result,) = detector.detect([{str(images["rgba"])!r}], ["red circle"],
                            threshold=0.0)
assert result["detections"], result
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}}
                        & set({list(TRAINING_CODE)!r}))))
"""
  proc = _run([sys.executable, "-c", code])
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_export_with_another_vocabulary(tiny_run, predictor, tmp_path):
  # The run's vocabulary plus a new class name: the table gets the new row,
  # the shared tokens keep their trained rows (matched by token string, as
  # `predict --vocab` does), and the new vocabulary is the one exported.
  from omnitrain_jax import export
  from omnitrain_jax import vocab_transfer
  from omnitrain_jax.models import omnidet
  from omnitrain_jax.vocab import vocabulary as vocabulary_lib
  workdir, _ = tiny_run
  run_vocab = vocabulary_lib.Vocabulary.load(
      vocab_transfer.workdir_vocab_path(workdir))
  path = tmp_path / "vocab.txt"
  path.write_text(pathlib.Path(vocab_transfer.workdir_vocab_path(
      workdir)).read_text() + "lemon\t1\n")
  assert len(vocabulary_lib.Vocabulary.load(path)) == len(run_vocab) + 1
  out = tmp_path / "new_vocab"
  export.export_run(workdir, str(out), batch=1, max_queries=1, max_tokens=1,
                    max_boxes=1, platforms=["cpu"], vocab=str(path))
  table = np.load(out / export.PARAMS_FILE)[omnidet.TOKEN_TABLE]
  trained = np.asarray(predictor.params[omnidet.TOKEN_TABLE])
  assert table.shape == (len(run_vocab) + 1, trained.shape[1])
  np.testing.assert_array_equal(table[:len(run_vocab)], trained)
  assert (out / export.VOCAB_FILE).read_text() == path.read_text()
