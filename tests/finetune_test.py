"""Fine-tuning: a vocabulary that grows, and the recipe on a foreign dataset.

One tiny ShapesWorld run (`tiny_run`, 8 steps) is the trained model. Then:

* it is fine-tuned with a hand-made vocabulary that adds and removes tokens,
  at learning rate 1e-30 (no float32 row moves), so that the fine-tuned
  table must equal the documented initialisation exactly (shared rows
  copied, new rows from their pieces);
* `configs/finetune.py:tiny` fine-tunes it on a small COCO dataset written
  here (category names ShapesWorld does not have, some of them new words),
  with ShapesWorld's grounding and caption streams as replay; the run
  evaluates the new val set and the original ones, the new names are
  queryable with `predict`, and unknown query words are reported.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw
import pytest

from omnitrain_jax import checkpointing
from omnitrain_jax import vocab_transfer
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

import binaries  # tests/binaries.py

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "shapes_demo.py") + ":tiny"
FINETUNE_CONFIG = str(REPO / "configs" / "finetune.py") + ":tiny"
# The foreign dataset: two new words and a phrase of a known word
# ("green", a ShapesWorld colour) and a new one. No ShapesWorld phrase
# contains "green leaf", so the replay data tokenizes as before.
CATEGORIES = {1: "lemon", 2: "brick", 3: "green leaf"}
NEW_TOKENS = ("lemon", "brick", "green leaf")


_env = binaries.subprocess_env


def _run(cmd, timeout=600):
  proc = subprocess.run(cmd, env=_env(),
                        capture_output=True, text=True, timeout=timeout,
                        cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _draw(category: int, box, draw: ImageDraw.ImageDraw) -> None:
  x, y, w, h = box
  xy = [x, y, x + w - 1, y + h - 1]
  if category == 1:  # A yellow ellipse.
    draw.ellipse(xy, fill=(235, 220, 40))
  elif category == 2:  # A dark orange rectangle with mortar lines.
    draw.rectangle(xy, fill=(170, 70, 30))
    draw.line([x, y + h // 2, x + w - 1, y + h // 2], fill=(200, 200, 200))
  else:  # A green diamond.
    draw.polygon([(x + w / 2, y), (x + w - 1, y + h / 2),
                  (x + w / 2, y + h - 1), (x, y + h / 2)], fill=(40, 160, 50))


def write_coco_dataset(root: pathlib.Path, split: str, num_images: int,
                       seed: int, size: int = 64) -> tuple[str, str]:
  """A small COCO instances file and its images; returns (json, folder)."""
  rng = np.random.default_rng(seed)
  folder = root / f"{split}_images"
  folder.mkdir(parents=True)
  images, annotations = [], []
  for i in range(num_images):
    pixels = np.full((size, size, 3), 120, np.uint8)
    pixels += rng.integers(0, 30, (size, size, 1), np.uint8)  # Texture.
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    # Two objects in separate halves, so boxes never overlap.
    for half in range(2):
      category = int(rng.integers(1, 4))
      w, h = (int(v) for v in rng.integers(14, 28, 2))
      x = int(rng.integers(0, size // 2 - w + 1)) + half * size // 2
      y = int(rng.integers(0, size - h + 1))
      _draw(category, (x, y, w, h), draw)
      annotations.append({
          "id": len(annotations) + 1, "image_id": i + 1,
          "category_id": category, "bbox": [x, y, w, h], "area": w * h,
          "iscrowd": 0})
    name = f"{i:04d}.jpg"
    image.save(folder / name, quality=95)
    images.append({"id": i + 1, "file_name": name, "width": size,
                   "height": size})
  path = root / f"{split}.json"
  path.write_text(json.dumps({
      "images": images, "annotations": annotations,
      "categories": [{"id": c, "name": n, "supercategory": "thing"}
                     for c, n in CATEGORIES.items()]}))
  return str(path), str(folder)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
  """(train json, train images, val json, val images) of the new dataset."""
  root = tmp_path_factory.mktemp("foreign")
  train = write_coco_dataset(root, "train", 24, seed=1)
  val = write_coco_dataset(root, "val", 8, seed=2)
  return train + val


def _table(workdir, vocab):
  """The token table of a run's latest checkpoint, as numpy [V, D]."""
  import jax  # pylint: disable=g-import-not-at-top
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  directory = pathlib.Path(workdir) / "checkpoints"
  step = checkpointing.committed_steps(directory)[-1]
  config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
  dim = config["model"]["class_embed_dim"] or config["model"]["width"]
  abstract = {"params": {checkpointing.TOKEN_TABLE: jax.ShapeDtypeStruct(
      (len(vocab), dim), np.float32, sharding=sharding)}}
  got = checkpointing.restore_params_from(directory / str(step), abstract)
  return np.asarray(got.state["params"][checkpointing.TOKEN_TABLE])


def test_init_from_maps_token_rows_of_a_grown_vocabulary(tiny_run, tmp_path):
  base, _ = tiny_run
  cache = str(pathlib.Path(base).parent / "cache")
  old = vocabulary_lib.Vocabulary.load(vocab_transfer.workdir_vocab_path(base))
  removed = ("middle", "medium")
  added = ("lemon", "red circle")
  assert all(t in old for t in removed) and not any(t in old for t in added)
  tokens = [t for t in old.tokens[2:] if t not in removed] + list(added)
  counts = [int(old.counts[old.id(t)]) if t in old else 1 for t in tokens]
  new = vocabulary_lib.Vocabulary(tokens, counts)
  new_path = tmp_path / "grown_vocab.txt"
  new.save(new_path)
  workdir = tmp_path / "grown"
  proc = _run([sys.executable, "-m", "omnitrain_jax.main",
               f"--config={TINY_CONFIG}", f"--workdir={workdir}",
               f"--config.data.cache_dir={cache}", f"--config.init_from={base}",
               f"--config.data.vocab.path={new_path}",
               "--config.optimizer.learning_rate=1e-30",
               "--config.total_steps=1"])
  # The report: counts and examples of new and dropped tokens.
  lines = [l for l in proc.stderr.splitlines() if "Token table from" in l]
  assert len(lines) == 1, proc.stderr[-3000:]
  line = lines[0]
  assert f"token rows {len(old)} -> {len(new)}" in line
  assert f"{len(old) - 4} kept" in line
  assert "2 new ('lemon', 'red circle')" in line
  assert "1 from their word pieces ('red circle')" in line
  assert "2 dropped ('medium', 'middle')" in line or (
      "2 dropped ('middle', 'medium')" in line)
  # The run keeps its own vocabulary for later runs, evaluate and predict.
  assert vocabulary_lib.Vocabulary.load(
      vocab_transfer.workdir_vocab_path(workdir)).tokens == new.tokens
  # Learning rate 1e-30 moves no float32 row: the fine-tuned table is
  # exactly the transferred one.
  old_table, new_table = _table(base, old), _table(workdir, new)
  expected, report = vocab_transfer.transfer_table(old_table, old, new)
  np.testing.assert_array_equal(new_table, expected)
  for token in ("<pad>", "<unk>", "red", "star", "hexagon"):
    np.testing.assert_array_equal(new_table[new.id(token)],
                                  old_table[old.id(token)])
  unit = old_table / np.linalg.norm(old_table, axis=1, keepdims=True)
  pieces = unit[old.id("red")] + unit[old.id("circle")]
  row = new_table[new.id("red circle")]
  np.testing.assert_allclose(row / np.linalg.norm(row),
                             pieces / np.linalg.norm(pieces), rtol=1e-5)
  assert report.dropped == ("medium", "middle") or set(report.dropped) == set(
      removed)


def test_finetune_recipe_on_a_foreign_coco_dataset(tiny_run, foreign,
                                                    tmp_path):
  base, _ = tiny_run
  cache = str(pathlib.Path(base).parent / "cache")
  train_json, train_dir, val_json, val_dir = foreign
  workdir = tmp_path / "ft"
  proc = _run([sys.executable, "-m", "omnitrain_jax.main",
               f"--config={FINETUNE_CONFIG}", f"--workdir={workdir}",
               f"--config.data.cache_dir={cache}", f"--config.init_from={base}",
               f"--config.data.sources.det.custom.train={train_json}",
               f"--config.data.sources.det.custom.val={val_json}",
               f"--config.data.sources.det.custom.image_dir={train_dir}",
               f"--config.data.sources.det.custom.val_image_dir={val_dir}"])
  # The new names got rows: every old token kept, the three names added.
  line = next(l for l in proc.stderr.splitlines() if "Token table from" in l)
  old = vocabulary_lib.Vocabulary.load(vocab_transfer.workdir_vocab_path(base))
  new = vocabulary_lib.Vocabulary.load(
      vocab_transfer.workdir_vocab_path(workdir))
  assert all(t in new for t in old.tokens) and all(t in new for t in NEW_TOKENS)
  assert f"{len(old) - 2} kept" in line and "0 dropped" in line
  assert f"{len(new) - len(old)} new" in line and "'lemon'" in line
  assert "'green leaf'" in line.split("word pieces")[1]
  # Evaluated on the new val set and the original ones.
  step = 4
  metrics = json.loads((workdir / "eval" / str(step) / "metrics.json"
                        ).read_text())
  for key in ("eval/custom/AP50", "eval/custom/AP", "eval/shapes_det/AP50",
              "eval/shapes_det/AP50_base", "eval/shapes_grd/acc@0.5"):
    assert key in metrics and np.isfinite(metrics[key]), (key, metrics)
  assert "eval/custom/AP50_base" not in metrics  # ShapesWorld groups only.
  assert metrics["eval/custom/num_images"] == 8
  assert metrics["eval/custom/unknown_query_words"] == 0
  # The new names are queryable; unknown query words are reported.
  out = tmp_path / "predict"
  image = pathlib.Path(val_dir) / "0000.jpg"
  _run([sys.executable, "-m", "omnitrain_jax.predict", f"--workdir={workdir}",
        f"--image={image}", f"--out={out}", "--queries=lemon,green leaf,zebra",
        "--threshold=0", "--max_boxes=3", "--nopng"])
  result = json.loads((out / "0000.json").read_text())
  queries = {q["query"]: q for q in result["queries"]}
  assert queries["lemon"]["tokens"] == ["lemon"]
  assert queries["green leaf"]["tokens"] == ["green leaf"]
  assert queries["zebra"]["unknown_words"] == ["zebra"]
  found = {d["query"] for d in result["detections"]}
  assert {"lemon", "green leaf"} <= found and "zebra" not in found
  # The base run on the new file, given the fine-tuned vocabulary: its
  # rows are matched by token (the new names start from their pieces), so
  # every name is scored and no word is unknown. (On a copy: `tiny_run` is
  # read-only.)
  base_copy = tmp_path / "base"
  shutil.copytree(base, base_copy, symlinks=True,
                  ignore=shutil.ignore_patterns("eval"))
  proc = _run([sys.executable, "-m", "omnitrain_jax.evaluate",
               f"--workdir={base_copy}", f"--dataset_json={val_json}",
               f"--image_dir={val_dir}", "--dataset_name=foreign",
               f"--vocab={vocab_transfer.workdir_vocab_path(workdir)}"])
  assert "Token table from" in proc.stderr and "3 new" in proc.stderr
  base_metrics = json.loads(
      (base_copy / "eval" / str(binaries.REFERENCE_STEPS) /
       "metrics.json").read_text())
  assert base_metrics["eval/foreign/unknown_query_words"] == 0
  assert np.isfinite(base_metrics["eval/foreign/AP50"])


if __name__ == "__main__":
  # A sample dataset for the README's "Train on your own data":
  #   python tests/finetune_test.py OUT_DIR
  out = pathlib.Path(sys.argv[1])
  print(write_coco_dataset(out, "train", 24, seed=1))
  print(write_coco_dataset(out, "val", 8, seed=2))
