"""experiments/self_train.py (pseudo-boxes) and configs/shapes_selftrain.py."""

import collections
import json
import os
import pathlib
import runpy
import shutil
import subprocess
import sys

import pytest

import binaries  # tests/binaries.py
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "experiments" / "self_train.py"
ST = runpy.run_path(str(TOOL), run_name="self_train")


def _det(query, score, box):
  return {"query": query, "score": score, "box_xywh": box}


def test_select_keeps_counts_threshold_and_no_overlap():
  dets = [
      _det("red hexagon", 0.9, [0, 0, 10, 10]),
      _det("red hexagon", 0.8, [1, 0, 10, 10]),  # Overlaps the first.
      _det("red hexagon", 0.7, [40, 40, 10, 10]),
      _det("red hexagon", 0.6, [80, 80, 10, 10]),  # Count (2) used up.
      _det("blue circle", 0.85, [0, 1, 10, 10]),  # On the kept hexagon.
      _det("blue circle", 0.5, [60, 0, 10, 10]),
      _det("blue circle", 0.2, [90, 0, 5, 5]),  # Below the threshold.
      _det("pink ring", 0.95, [20, 20, 5, 5]),  # Not in the caption.
  ]
  kept = ST["select"](dets, {"red hexagon": 2, "blue circle": 2}, 0.3)
  assert [(d["query"], d["score"]) for d in kept] == [
      ("red hexagon", 0.9), ("red hexagon", 0.7), ("blue circle", 0.5)]
  assert ST["select"](dets, {}, 0.0) == []


def test_captions_from_instances_and_the_check_by_hand():
  gt = {"images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 1, "name": "red hexagon"},
                       {"id": 2, "name": "blue circle"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 0, 10, 10]},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 50, 10, 10]},
            {"id": 4, "image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20]},
        ]}
  caps = ST["captions_from_instances"](gt)["annotations"]
  assert [c["caption"] for c in caps] == [
      "a blue circle and two red hexagons", "a blue circle"]
  pseudo = {"categories": [{"id": 7, "name": "red hexagon"},
                           {"id": 8, "name": "blue circle"}],
            "annotations": [
                {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10]},
                {"image_id": 1, "category_id": 7, "bbox": [0, 50, 10, 10]},
                {"image_id": 2, "category_id": 8, "bbox": [1, 1, 20, 20]}]}
  check = ST["check_against"](gt, pseudo)
  # One of the two hexagon boxes is on a red hexagon (the other on the
  # circle); the circle box of image 2 has IoU 0.82; image 1's circle and
  # one hexagon are not found.
  assert check["hexagon"] == {"boxes": 2, "precision": 0.5, "objects": 2,
                              "recall": 0.5}
  assert check["circle"] == {"boxes": 1, "precision": 1.0, "objects": 2,
                             "recall": 0.5}
  assert check["red"]["precision"] == 0.5


def test_phrase_names_keep_name_words_and_counts(tiny_run):
  workdir, _ = tiny_run
  vocab = vocabulary_lib.Vocabulary.load(os.path.join(workdir, "vocab.txt"))
  tok = tokenizer_lib.Tokenizer(vocab)
  words = {"red", "blue", "pink", "hexagon", "circle", "square"}
  got = ST["phrase_names"](
      tok, "two large red hexagons on the left, a blue circle and a dog",
      words)
  # Size and place words are dropped; "the left" and "a dog" have no name.
  assert got == [("red hexagon", 2), ("blue circle", 1)]


def test_command_line_writes_a_det_source_the_student_config_reads(
    tiny_run, tmp_path):
  workdir, data_root = tiny_run
  out = tmp_path / "pseudo.json"
  captions = data_root / "img_train.json"
  proc = subprocess.run(
      [sys.executable, str(TOOL), f"--teacher={workdir}",
       f"--captions={captions}", f"--image_dir={data_root / 'images'}",
       f"--out={out}", "--max_images=6", "--threshold=0.0"],
      env=binaries.subprocess_env(), capture_output=True, text=True,
      timeout=300, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout[proc.stdout.index("{"):])
  pseudo = json.loads(out.read_text())
  assert summary["images"] == 6
  assert summary["boxes"] == len(pseudo["annotations"]) > 0
  assert summary["images_with_boxes"] == len(pseudo["images"])
  # Every box is a name of its own image's caption, within its count.
  vocab = vocabulary_lib.Vocabulary.load(os.path.join(workdir, "vocab.txt"))
  tok = tokenizer_lib.Tokenizer(vocab)
  words = set(ST["_DEFAULT_NAME_WORDS"])
  caps = collections.defaultdict(list)
  for a in json.loads(captions.read_text())["annotations"]:
    caps[a["image_id"]].append(a["caption"])
  names = {c["id"]: c["name"] for c in pseudo["categories"]}
  per_image = collections.defaultdict(collections.Counter)
  for a in pseudo["annotations"]:
    per_image[a["image_id"]][names[a["category_id"]]] += 1
    assert len(a["bbox"]) == 4 and a["bbox"][2] > 0 and a["bbox"][3] > 0
  for image_id, counts in per_image.items():
    (caption,) = caps[image_id]
    wanted = collections.Counter()
    for name, count in ST["phrase_names"](tok, caption, words):
      wanted[name] += count
    for name, n in counts.items():
      assert n <= wanted[name], (caption, name, n)
  # File names resolve in the dataset's image folder, as for the captions.
  for im in pseudo["images"]:
    assert (data_root / "images" / im["file_name"]).exists()
  # The student config adds the file as a det source.
  get_config = runpy.run_path(str(REPO / "configs" /
                                  "shapes_selftrain.py"))["get_config"]
  config = get_config(str(out))
  assert config.data.sources.det.pseudo.train == str(out)
  assert config.data.sources.det.shapes_det.weight == 1.0
  with pytest.raises(ValueError, match="pseudo-box file"):
    get_config(None)


# ------------------------------------------------ self-training in the run

ST_FLAGS = ("--config.total_steps=8", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=3",
            "--config.self_train.steps=(4,)",
            "--config.self_train.threshold=0.0")


def _main(workdir, cache, *flags):
  cmd = [sys.executable, "-m", "omnitrain_jax.main",
         f"--config={REPO / 'configs' / 'shapes_demo.py'}:tiny",
         f"--workdir={workdir}", f"--config.data.cache_dir={cache}", *flags]
  proc = subprocess.run(cmd, env=binaries.subprocess_env(),
                        capture_output=True, text=True, timeout=600,
                        cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _train_rows(workdir):
  rows = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row:
      rows[row["step"]] = row
  return rows


def test_in_run_labels_and_resumes_exactly_around_them(reference_run,
                                                       tmp_path):
  """A run that labels at step 4 (OWL-ST in the run): the same batches and
  losses as the plain run before the labels, the pseudo-box file read as a
  det source after them, and a resume from a checkpoint before the labels
  (relabels) or after them (the labels' pipeline, at its position) repeats
  the uninterrupted run step for step."""
  reference, cache = reference_run
  full = tmp_path / "full"
  proc = _main(full, cache, *ST_FLAGS)
  labels = full / "pseudo" / "4.json"
  pseudo = json.loads(labels.read_text())
  summary = json.loads((full / "pseudo" / "4.summary.json").read_text())
  assert summary["step"] == 4 and summary["boxes"] == len(
      pseudo["annotations"]) > 0
  assert f"pseudo: loaded {len(pseudo['images'])} det records from {labels}" \
      in proc.stderr
  a, plain = _train_rows(full), _train_rows(reference)
  assert sorted(a) == list(range(1, 9))
  for step in range(1, 5):  # The reference: the same run without labels.
    assert a[step]["loss"] == plain[step]["loss"], step
    assert a[step]["data/fingerprint"] == plain[step]["data/fingerprint"]
  assert [a[s]["data/fingerprint"] for s in range(5, 9)] != [
      plain[s]["data/fingerprint"] for s in range(5, 9)]
  # Every box is one of its image's caption names (the tiny run's names).
  names = {c["id"]: c["name"] for c in pseudo["categories"]}
  words = set(ST["_DEFAULT_NAME_WORDS"])
  for ann in pseudo["annotations"]:
    assert set(names[ann["category_id"]].split()) <= words

  for keep, first in ((3, 4), (6, 7)):
    cut = tmp_path / f"from{keep}"
    shutil.copytree(full, cut)
    for step_dir in (cut / "checkpoints").iterdir():
      if step_dir.name.isdigit() and int(step_dir.name) > keep:
        shutil.rmtree(step_dir)
    (cut / "metrics.jsonl").unlink()
    if keep < 4:  # Labelled again, from the same parameters.
      for f in (cut / "pseudo").iterdir():
        f.unlink()
    _main(cut, cache, *ST_FLAGS)
    b = _train_rows(cut)
    assert sorted(b) == list(range(first, 9)), keep
    for step in b:
      assert b[step]["loss"] == a[step]["loss"], (keep, step)
      assert b[step]["data/fingerprint"] == a[step]["data/fingerprint"]
    assert json.loads((cut / "pseudo" / "4.json").read_text()) == pseudo


def test_in_run_labels_need_a_valid_step(reference_run, tmp_path):
  _, cache = reference_run
  cmd = [sys.executable, "-m", "omnitrain_jax.main",
         f"--config={REPO / 'configs' / 'shapes_demo.py'}:tiny",
         f"--workdir={tmp_path / 'w'}", f"--config.data.cache_dir={cache}",
         "--config.total_steps=4", "--config.self_train.steps=(4,)"]
  proc = subprocess.run(cmd, env=binaries.subprocess_env(),
                        capture_output=True, text=True, timeout=300,
                        cwd=str(REPO))
  assert proc.returncode != 0
  assert ("config.self_train.steps=(4,): 4 is step 4, not between 1 and "
          "config.total_steps - 1 = 3") in proc.stderr
