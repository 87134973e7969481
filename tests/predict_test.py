"""Whole-program tests of prediction on a tiny trained run.

Images of every kind a user may bring -- a generated ShapesWorld JPEG, a
grayscale PNG, an RGBA PNG, an EXIF-rotated JPEG -- go through the binary
once; the library (`Predictor`) is checked in this process.
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


_env = binaries.subprocess_env


def _run(cmd, timeout=600):
  proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                        timeout=timeout, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.fixture(scope="module")
def images(tiny_run, tmp_path_factory):
  """name -> path of the test images, and their sizes as displayed."""
  _, data_root = tiny_run
  folder = tmp_path_factory.mktemp("images")
  shapes = data_root / "images" / "det_val" / "000000.jpg"
  paths = {"shapes": folder / "shapes.jpg"}
  paths["shapes"].write_bytes(shapes.read_bytes())
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (50, 120), np.uint8), "L").save(
      folder / "gray.png")
  Image.fromarray(rng.integers(0, 255, (90, 70, 4), np.uint8), "RGBA").save(
      folder / "rgba.png")
  # Stored 160 x 100 (w x h); EXIF orientation 6 displays it 100 x 160.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(rng.integers(0, 255, (100, 160, 3), np.uint8)).save(
      folder / "rotated.jpg", exif=exif)
  paths.update(gray=folder / "gray.png", rgba=folder / "rgba.png",
               rotated=folder / "rotated.jpg")
  sizes = {"shapes": (64, 64), "gray": (120, 50), "rgba": (70, 90),
           "rotated": (100, 160)}  # (width, height) as displayed
  return folder, paths, sizes


def _check_boxes_inside(result):
  w, h = result["width"], result["height"]
  for d in result["detections"]:
    x0, y0, x1, y1 = d["box_xyxy"]
    assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, (d, w, h)
    x, y, bw, bh = d["box_xywh"]
    np.testing.assert_allclose([x, y, x + bw, y + bh], d["box_xyxy"],
                               atol=0.02)


def test_binary_on_a_folder_of_all_kinds_of_images(tiny_run, images,
                                                    tmp_path):
  workdir, data_root = tiny_run
  folder, paths, sizes = images
  out = tmp_path / "out"
  query_image = data_root / "images" / "det_val" / "000001.jpg"
  _run([sys.executable, "-m", "omnitrain_jax.predict",
        f"--workdir={workdir}", f"--image={folder}", f"--out={out}",
        "--queries=red circle,blue star,zebra", "--threshold=0",
        "--max_boxes=3", f"--query_image={query_image}",
        "--query_box=10,10,20,20", "--describe=2"])
  for name, (w, h) in sizes.items():
    result = json.loads((out / f"{name}.json").read_text())
    assert (result["width"], result["height"]) == (w, h), name
    # Images under 512 px are drawn enlarged by an integer factor (boxes in
    # the JSON stay in original pixels).
    f = -(-512 // max(w, h)) if max(w, h) < 512 else 1
    assert Image.open(out / f"{name}.png").size == (w * f, h * f), name
    _check_boxes_inside(result)
    labels = {d["query"] for d in result["detections"]}
    # "zebra" has no known token: reported, and finds nothing.
    assert labels == {"red circle", "blue star", "image:000001.jpg"}, name
    queries = {q["query"]: q for q in result["queries"]}
    assert queries["zebra"]["unknown_words"] == ["zebra"]
    assert queries["zebra"]["tokens"] == []
    assert queries["red circle"]["tokens"] == ["red", "circle"]
    assert "matched_box_xywh" in queries["image:000001.jpg"]
    assert all(len(d["top_tokens"]) == 2 for d in result["detections"])
    scores = [d["score"] for d in result["detections"]]
    assert scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def predictor(tiny_run):
  from omnitrain_jax.evaluation import predictor as predictor_lib
  workdir, _ = tiny_run
  return predictor_lib.Predictor.from_workdir(workdir)


def test_images_are_resized_like_evaluation(predictor, images):
  _, paths, sizes = images
  s = predictor.model.image_size
  for name, path in paths.items():
    image = predictor.load_image(str(path))
    w, h = sizes[name]
    assert image.pixels.shape == (h, w, 3)
    assert image.canvas.shape == (s, s, 3)
    assert image.scale == pytest.approx(s / max(w, h))
  # The rotated image is displayed upright: its content is the stored pixels
  # turned 90 degrees clockwise.
  stored = np.asarray(Image.open(paths["rotated"]).convert("RGB"))
  rotated = predictor.load_image(str(paths["rotated"])).pixels
  np.testing.assert_array_equal(rotated, np.rot90(stored, k=-1))


def test_threshold_max_boxes_and_empty_queries(predictor, images):
  _, paths, _ = images
  qs = predictor.text_queries(["red circle", "giraffe"])
  assert qs[1].empty
  loose = predictor.predict(str(paths["shapes"]), qs, max_boxes=4,
                            threshold=0.0, nms_iou=None)
  assert len(loose["detections"]) == 4  # giraffe finds nothing
  _check_boxes_inside(loose)
  top = max(d["score"] for d in loose["detections"])
  strict = predictor.predict(str(paths["shapes"]), qs, max_boxes=4,
                             threshold=top + 1e-4)
  assert strict["detections"] == []
  with pytest.raises(ValueError, match="No queries"):
    predictor.predict(str(paths["shapes"]))


def test_image_query_uses_the_matched_box_embedding(predictor, images):
  """The example box matches itself; it scores sigmoid(scale + shift)."""
  _, paths, _ = images
  path = str(paths["shapes"])
  image = predictor.load_image(path)
  enc = {k: np.asarray(v) for k, v in predictor.encode(image).items()}
  boxes = predictor._to_pixels(image, enc["pred_boxes"][0])
  x0, y0, x1, y1 = boxes[5]
  q = predictor.image_query(path, [x0, y0, x1 - x0, y1 - y0])
  assert q.info["matched_iou"] == pytest.approx(1.0, abs=1e-3)
  np.testing.assert_allclose(q.embedding, enc["class_embeddings"][0, 5])
  n = predictor.model.num_patches
  result = predictor.predict(image, image_queries=[q], max_boxes=n,
                             threshold=0.0, nms_iou=None)
  assert len(result["detections"]) == n
  (own,) = [d for d in result["detections"]
            if np.allclose(d["box_xyxy"], boxes[5], atol=0.01)]
  want = 1 / (1 + np.exp(-(enc["logit_scale"][0, 5]
                           + enc["logit_shift"][0, 5])))
  assert own["score"] == pytest.approx(want, abs=1e-4)


def test_batches_equal_one_image_at_a_time_and_bad_files_are_skipped(
    predictor, images, tmp_path):
  from omnitrain_jax.evaluation import predictor as predictor_lib
  folder, paths, _ = images
  listed = tmp_path / "list"
  listed.mkdir()
  for name, path in paths.items():
    (listed / path.name).write_bytes(path.read_bytes())
  (listed / "broken.jpg").write_bytes(b"not a jpeg")
  files = predictor_lib.list_images(str(listed))
  assert len(files) == 5
  categories = ({"red circle": 7, "blue star": 9},
                {"shapes.jpg": 123})  # One image known by file name.
  texts = list(categories[0])
  batched = predictor_lib.predict_files(
      predictor, files, str(tmp_path / "out"), texts, batch_size=3,
      categories=categories, threshold=0.0, max_boxes=4)
  assert len(batched) == 4  # The broken file is skipped, not fatal.
  skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
  assert [pathlib.Path(s["image"]).name for s in skipped] == ["broken.jpg"]
  queries = predictor.text_queries(texts)
  coco = json.loads((tmp_path / "out" / "detections.json").read_text())
  for result in batched:
    single = predictor.predict(result["image"], queries, threshold=0.0,
                               max_boxes=4)
    assert [d["query"] for d in result["detections"]] == [
        d["query"] for d in single["detections"]]
    np.testing.assert_allclose(
        [d["score"] for d in result["detections"]],
        [d["score"] for d in single["detections"]], atol=2e-5)
    np.testing.assert_allclose(
        [d["box_xywh"] for d in result["detections"]],
        [d["box_xywh"] for d in single["detections"]], atol=0.02)
    name = pathlib.Path(result["image"]).name
    image_id = 123 if name == "shapes.jpg" else files.index(result["image"])
    mine = [c for c in coco if c["image_id"] == image_id]
    assert len(mine) == len(result["detections"]) > 0
    assert {c["category_id"] for c in mine} <= {7, 9}
  # A .txt list of files, relative to the list's folder.
  (tmp_path / "list.txt").write_text("list/gray.png\n# a comment\n\n"
                                     "list/rgba.png\n")
  assert predictor_lib.list_images(str(tmp_path / "list.txt")) == [
      str(tmp_path / "list" / "gray.png"), str(tmp_path / "list" / "rgba.png")]
