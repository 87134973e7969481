"""Tests for the ShapesWorld generator.

The open-vocabulary rules are checked on the written files' text (what a
reader sees), and the referring expressions with an independent resolver that
reads the phrase words out of the caption and matches them against every
object of the re-rendered scene.
"""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from pycocotools.coco import COCO

from omnitrain_jax.data import shapes_world as sw

PARAMS = dict(num_images=24, num_val_images=12, image_size=80, seed=3)
S = PARAMS["image_size"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = tmp_path_factory.mktemp("shapes")
  info = sw.generate(str(out), num_workers=0, **PARAMS)
  return info


@pytest.fixture(scope="module")
def config():
  return sw.make_config(**PARAMS)


def _load(info, split):
  with open(info[split]) as f:
    return json.load(f)


def _words(text):
  return set(re.findall(r"[a-z]+", text.lower()))


def _index(file_name):
  return int(os.path.splitext(os.path.basename(file_name))[0])


def _xyxy(bbox):
  x, y, w, h = bbox
  return x, y, x + w, y + h


def _holds(obj, word):
  """Crisp meaning of a phrase word for a scene object (no margins)."""
  if word in sw.COLORS:
    return obj.color == word
  if word in sw.SHAPES:
    return obj.shape == word
  if word in sw.SIZES:
    return obj.size == word
  x0, y0, x1, y1 = _xyxy(obj.bbox)
  cx, cy = (x0 + x1) / 2 / S, (y0 + y1) / 2 / S
  return {
      "left": cx < 1 / 3, "right": cx > 2 / 3,
      "top": cy < 1 / 3, "bottom": cy > 2 / 3,
      "middle": 1 / 3 < cx < 2 / 3 and 1 / 3 < cy < 2 / 3,
  }[word]


def _phrases(image_entry, anns):
  """(annotation, words of its spans) per phrase of a grounding image."""
  caption = image_entry["caption"]
  out = []
  for a in anns:
    for start, end in a["tokens_positive"]:
      assert 0 <= start < end <= len(caption), (start, end, caption)
    words = [caption[s:e] for s, e in a["tokens_positive"]]
    out.append((a, words))
  return out


def test_writes_all_files_and_images(data, config):
  for key in (*sw.SPLITS, "splits", "meta"):
    assert os.path.isfile(data[key]), key
  for split in sw.SPLITS:
    images = _load(data, split)["images"]
    n = PARAMS["num_images" if split.endswith("train") else "num_val_images"]
    assert len(images) == n
    assert len({im["id"] for im in images}) == n
    for im in images[:3]:
      path = os.path.join(data["image_root"], im["file_name"])
      with Image.open(path) as img:
        assert img.format == "JPEG"
        assert img.size == (S, S) == (im["width"], im["height"])
  with open(data["meta"]) as f:
    meta = json.load(f)
  assert meta["fingerprint"] == sw.params_fingerprint(**PARAMS)
  assert meta["params"]["num_images"] == PARAMS["num_images"]


def test_pycocotools_loads_det_grd_and_captions(data):
  for split in ("det_train", "det_val", "grd_train", "grd_val"):
    coco = COCO(data[split])
    assert coco.getAnnIds(), split
    ann = coco.loadAnns(coco.getAnnIds()[:1])[0]
    assert ann["category_id"] in coco.getCatIds()
    assert ann["iscrowd"] == 0
  caps = COCO(data["img_train"])
  assert all(a["caption"] for a in caps.loadAnns(caps.getAnnIds()))


def test_deterministic_and_independent_of_workers(data, tmp_path):
  again = sw.generate(str(tmp_path), num_workers=2, **PARAMS)
  root_a, root_b = os.path.dirname(data["meta"]), os.path.dirname(again["meta"])
  files = sorted(os.path.relpath(os.path.join(d, f), root_a)
                 for d, _, fs in os.walk(root_a) for f in fs)
  files_b = sorted(os.path.relpath(os.path.join(d, f), root_b)
                   for d, _, fs in os.walk(root_b) for f in fs)
  assert files == files_b
  assert len(files) == 3 * (PARAMS["num_images"] + PARAMS["num_val_images"]) + 8
  for rel in files:
    with open(os.path.join(root_a, rel), "rb") as fa, \
         open(os.path.join(root_b, rel), "rb") as fb:
      assert fa.read() == fb.read(), rel


def test_other_seed_gives_other_data(config):
  other = sw.make_config(**{**PARAMS, "seed": PARAMS["seed"] + 1})
  a = sw.render_scene(config, "det_train", 0)
  b = sw.render_scene(other, "det_train", 0)
  assert a.objects != b.objects


def test_default_split(config):
  cats = sw.categories(sw.make_config())
  by_split = collections.Counter(c.split for c in cats)
  assert by_split == {"base": 48, "grd_novel": 15, "img_novel": 17}
  names = {c.name: c for c in cats}
  # img-novel wins over grd-novel; ids are stable, color-major from 1.
  assert names["purple hexagon"].split == "img_novel"
  assert names["pink star"].split == "img_novel"
  assert names["purple star"].split == "grd_novel"
  assert names["red circle"].split == "base"
  assert names["red circle"].id == 1 and names["red square"].id == 2
  assert names["green circle"].id == len(sw.SHAPES) + 1


def test_splits_json(data, config):
  with open(data["splits"]) as f:
    splits = json.load(f)
  assert splits["grd_novel_tokens"] == ["star", "purple"]
  assert splits["img_novel_tokens"] == ["hexagon", "pink"]
  novel = {"star", "purple", "hexagon", "pink"}
  assert not novel & set(splits["base_tokens"])
  assert {"red", "circle", "cross"} <= set(splits["base_tokens"])
  cats = {c.id: c for c in sw.categories(config)}
  groups = [splits[k] for k in
            ("base_categories", "grd_novel_categories", "img_novel_categories")]
  assert sorted(sum(groups, [])) == sorted(cats)
  for cid in splits["base_categories"]:
    assert not {cats[cid].color, cats[cid].shape} & novel
  for cid in splits["img_novel_categories"]:
    assert {cats[cid].color, cats[cid].shape} & {"hexagon", "pink"}
  for cid in splits["grd_novel_categories"]:
    words = {cats[cid].color, cats[cid].shape}
    assert words & {"star", "purple"} and not words & {"hexagon", "pink"}


def test_det_train_holds_no_novel_token(data, config):
  novel = set(config.grd_novel_tokens) | set(config.img_novel_tokens)
  with open(data["det_train"]) as f:
    text = f.read()
  assert not _words(text) & novel
  det = json.loads(text)
  base = {c.id for c in sw.categories(config) if c.split == "base"}
  assert {c["id"] for c in det["categories"]} == base
  assert {a["category_id"] for a in det["annotations"]} <= base
  # The images too: re-render and look at every object.
  for im in det["images"]:
    scene = sw.render_scene(config, "det_train", _index(im["file_name"]))
    assert {o.category_id for o in scene.objects} <= base


def test_grd_train_grounds_grd_novel_and_never_names_img_novel(data, config):
  with open(data["grd_train"]) as f:
    text = f.read()
  assert not _words(text) & set(config.img_novel_tokens)
  grd = json.loads(text)
  images = {im["id"]: im for im in grd["images"]}
  spanned = set()
  for a in grd["annotations"]:
    caption = images[a["image_id"]]["caption"]
    spanned |= {caption[s:e] for s, e in a["tokens_positive"]}
  # grd-novel tokens are taught with boxes.
  assert set(config.grd_novel_tokens) <= spanned


def test_img_novel_tokens_only_in_captions(data, config):
  img_novel = set(config.img_novel_tokens)
  captions = " ".join(a["caption"]
                      for a in _load(data, "img_train")["annotations"])
  assert img_novel <= _words(captions)
  for split in ("det_train", "grd_train"):
    with open(data[split]) as f:
      assert not _words(f.read()) & img_novel, split


def test_val_boxes_every_kind_of_category(data, config):
  split_of = {c.id: c.split for c in sw.categories(config)}
  det = _load(data, "det_val")
  assert len(det["categories"]) == len(split_of)
  kinds = {split_of[a["category_id"]] for a in det["annotations"]}
  assert kinds == {"base", "grd_novel", "img_novel"}
  # det_val is exhaustive: every drawn object has its box.
  n_objects = sum(
      len(sw.render_scene(config, "det_val", _index(im["file_name"])).objects)
      for im in det["images"])
  assert len(det["annotations"]) == n_objects
  grd = _load(data, "grd_val")
  kinds = {split_of[a["category_id"]] for a in grd["annotations"]}
  assert kinds == {"base", "grd_novel", "img_novel"}


def test_boxes_inside_image_with_positive_size(data):
  for split in ("det_train", "det_val", "grd_train", "grd_val"):
    anns = _load(data, split)["annotations"]
    assert anns
    for a in anns:
      x0, y0, x1, y1 = _xyxy(a["bbox"])
      assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S, (split, a)
      assert 0 < a["area"] <= a["bbox"][2] * a["bbox"][3] + 1e-6


def test_occlusion_is_present_but_bounded(data):
  by_image = collections.defaultdict(list)
  for a in _load(data, "det_train")["annotations"]:
    by_image[a["image_id"]].append(_xyxy(a["bbox"]))
  overlapping = 0
  for boxes in by_image.values():
    for i, a in enumerate(boxes):
      for b in boxes[i + 1:]:
        iw = min(a[2], b[2]) - max(a[0], b[0])
        ih = min(a[3], b[3]) - max(a[1], b[1])
        if iw > 0 and ih > 0:
          overlapping += 1
          union = ((a[2] - a[0]) * (a[3] - a[1]) +
                   (b[2] - b[0]) * (b[3] - b[1]) - iw * ih)
          assert iw * ih / union < 0.5
  assert overlapping > 0


def test_referring_expressions_are_unique_and_grounded(data, config):
  for split in ("grd_train", "grd_val"):
    grd = _load(data, split)
    anns = collections.defaultdict(list)
    for a in grd["annotations"]:
      anns[a["image_id"]].append(a)
    for im in grd["images"]:
      scene = sw.render_scene(config, split, _index(im["file_name"]))
      phrases = _phrases(im, anns[im["id"]])
      assert 1 <= len(phrases) <= 3
      assert sorted(a["phrase_ids"] for a, _ in phrases) == list(
          range(len(phrases)))
      needs_disambiguation = False
      for a, words in phrases:
        assert set(words) <= set(sw.COLORS) | set(sw.SHAPES) | set(
            sw.ATTRIBUTE_TOKENS), words
        matches = [o for o in scene.objects
                   if all(_holds(o, w) for w in words)]
        assert len(matches) == 1, (im["caption"], words)
        (ref,) = matches
        assert [round(v, 2) for v in ref.bbox] == a["bbox"]
        assert ref.category_id == a["category_id"]
        # The spans cover the referent's color and shape words.
        assert ref.color in words and ref.shape in words
        same = [o for o in scene.objects if o.category_id == ref.category_id]
        needs_disambiguation |= len(same) > 1
      assert needs_disambiguation, im["caption"]


def test_other_phrases_words_are_true_negatives(data, config):
  # The grounding loss uses another phrase's tokens as negatives for a box.
  grd = _load(data, "grd_train")
  anns = collections.defaultdict(list)
  for a in grd["annotations"]:
    anns[a["image_id"]].append(a)
  pairs = 0
  for im in grd["images"]:
    scene = sw.render_scene(config, "grd_train", _index(im["file_name"]))
    phrases = _phrases(im, anns[im["id"]])
    for a, words in phrases:
      (ref,) = [o for o in scene.objects
                if [round(v, 2) for v in o.bbox] == a["bbox"]]
      for b, other in phrases:
        if b is a:
          continue
        pairs += 1
        for w in set(other) - set(words):
          assert not _holds(ref, w), (im["caption"], words, w)
  assert pairs > 0


def test_captions_list_every_object(data, config):
  counts = {w: i for i, w in enumerate(sw._COUNT_WORDS)}
  counts.update(a=1, an=1)
  plural = {sw._plural(s): s for s in sw.SHAPES}
  item = re.compile(r"(\w+) (?:(small|medium|large) )?(\w+) (\w+)")
  for split in ("img_train", "img_val"):
    img = _load(data, split)
    files = {im["id"]: im["file_name"] for im in img["images"]}
    for a in img["annotations"]:
      scene = sw.render_scene(config, split, _index(files[a["image_id"]]))
      said = collections.Counter()
      for part in re.split(r", | and ", a["caption"]):
        m = item.fullmatch(part)
        assert m, (a["caption"], part)
        count, size, color, shape = m.groups()
        shape = plural.get(shape, shape)
        said[(color, shape)] += counts[count]
        if size:
          assert all(o.size == size for o in scene.objects
                     if (o.color, o.shape) == (color, shape))
      drawn = collections.Counter((o.color, o.shape) for o in scene.objects)
      assert said == drawn, a["caption"]


def test_word_state_margins():
  obj = sw.SceneObject(1, "red", "circle", "small", (10, 60, 10, 10), 80.0)
  # Center (15, 65) of 100: left (0.15), vertically borderline (0.65).
  assert sw.word_state(obj, "left", 100, 100, 0.04) is True
  assert sw.word_state(obj, "right", 100, 100, 0.04) is False
  assert sw.word_state(obj, "bottom", 100, 100, 0.04) is None
  assert sw.word_state(obj, "middle", 100, 100, 0.04) is False
  assert sw.word_state(obj, "small", 100, 100, 0.04) is True
  assert sw.word_state(obj, "blue", 100, 100, 0.04) is False


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match="num_imagez"):
    sw.params_fingerprint(num_imagez=3)
  with pytest.raises(ValueError, match="banana"):
    sw.make_config(grd_novel_tokens=("banana",))
  with pytest.raises(ValueError, match="both grd-novel and img-novel"):
    sw.make_config(grd_novel_tokens=("star",), img_novel_tokens=("star",))
  with pytest.raises(ValueError, match="image_format"):
    sw.make_config(image_format="gif")


def test_fingerprint_tracks_parameters():
  fp = sw.params_fingerprint(**PARAMS)
  assert fp == sw.params_fingerprint(**PARAMS)
  assert fp != sw.params_fingerprint(**{**PARAMS, "seed": 4})
  assert fp != sw.params_fingerprint(**{**PARAMS, "img_novel_tokens": ["pink"]})
  assert sw.params_fingerprint() == sw.params_fingerprint(num_images=1000)


def test_cli_then_ensure_generated(tmp_path):
  out = str(tmp_path / "cli")
  small = dict(num_images=3, num_val_images=2, image_size=48, seed=5)
  cmd = [sys.executable, "-m", "omnitrain_jax.data.shapes_world",
         f"--out={out}", "--num_images=3", "--num_val_images=2",
         "--image_size=48", "--seed=5"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["fingerprint"] == sw.params_fingerprint(
      **small)
  with open(os.path.join(out, "det_train.json"), "rb") as f:
    det_bytes = f.read()

  # Same parameters: nothing to do.
  info = sw.ensure_generated(out, **small)
  assert info["seconds"] == 0.0
  # Other parameters: regenerated, in PNG this time.
  info = sw.ensure_generated(out, **{**small, "image_format": "png"})
  assert info["seconds"] > 0.0
  with open(info["meta"]) as f:
    assert json.load(f)["params"]["image_format"] == "png"
  with open(info["det_train"], "rb") as f:
    png_det = json.loads(f.read())
  name = png_det["images"][0]["file_name"]
  assert name.endswith(".png")
  with Image.open(os.path.join(info["image_root"], name)) as img:
    assert img.format == "PNG"
  assert json.loads(det_bytes)["annotations"] == png_det["annotations"]


def _said(caption):
  """Counter of (color, shape) a ShapesWorld caption names."""
  counts = {w: i for i, w in enumerate(sw._COUNT_WORDS)}
  counts.update(a=1, an=1)
  plural = {sw._plural(s): s for s in sw.SHAPES}
  item = re.compile(r"(\w+) (?:(small|medium|large) )?(\w+) (\w+)")
  said = collections.Counter()
  for part in re.split(r", | and ", caption):
    m = item.fullmatch(part)
    assert m, (caption, part)
    count, _, color, shape = m.groups()
    said[(color, plural.get(shape, shape))] += counts[count]
  return said


def test_caption_drop_fraction_names_a_subset_and_defaults_to_old_files():
  # The default leaves fingerprint and captions as before the option: the
  # demo's cached dataset (this fingerprint) stays valid.
  assert sw.params_fingerprint(num_images=2000, num_val_images=200,
                               image_size=128, seed=0) == "aba7739f0e66d7c2"
  assert (sw.params_fingerprint(**PARAMS) ==
          sw.params_fingerprint(**PARAMS, caption_drop_fraction=0.0))
  assert (sw.params_fingerprint(**PARAMS) !=
          sw.params_fingerprint(**PARAMS, caption_drop_fraction=0.5))
  full = sw.make_config(**PARAMS)
  part = sw.make_config(**PARAMS, caption_drop_fraction=0.5)
  dropped = 0
  for i in range(PARAMS["num_images"]):
    a, b = (sw.render_scene(c, "img_train", i) for c in (full, part))
    assert (a.image == b.image).all() and a.objects == b.objects
    drawn = collections.Counter((o.color, o.shape) for o in a.objects)
    said = _said(b.caption)
    assert said and not said - drawn, (b.caption, drawn)  # A sub-multiset.
    dropped += sum((drawn - said).values())
    assert _said(a.caption) == drawn
  assert dropped > 0
  with pytest.raises(ValueError, match="caption_drop_fraction"):
    sw.make_config(caption_drop_fraction=1.0)


def test_paint_changes_only_the_painted_objects_pixels():
  assert (sw.params_fingerprint(**PARAMS) ==
          sw.params_fingerprint(**PARAMS, paint=()))
  assert (sw.params_fingerprint(**PARAMS) !=
          sw.params_fingerprint(**PARAMS, paint=["pink:red"]))
  plain = sw.make_config(**PARAMS)
  painted = sw.make_config(**PARAMS, paint=["pink:red"])
  assert painted.paint == ("pink:red",)
  red = np.array(sw.COLORS["red"], np.float32)
  pink = np.array(sw.COLORS["pink"], np.float32)
  changed_images = 0
  for i in range(PARAMS["num_val_images"]):
    a, b = (sw.render_scene(c, "img_val", i) for c in (plain, painted))
    assert a.objects == b.objects and a.caption == b.caption
    diff = (a.image != b.image).any(-1)  # [S, S]
    inside = np.zeros_like(diff)
    for o in a.objects:
      if o.color == "pink":
        x, y, w, h = o.bbox
        inside[int(y):int(np.ceil(y + h)) + 1,
               int(x):int(np.ceil(x + w)) + 1] = True
    assert not (diff & ~inside).any(), i  # Nothing outside pink objects.
    if diff.any():
      changed_images += 1
      # The changed pixels were pink and are red.
      mean_a = a.image[diff].astype(np.float32).mean(0)
      mean_b = b.image[diff].astype(np.float32).mean(0)
      dist = lambda x, y: float(np.linalg.norm(x - y))
      assert dist(mean_a, pink) < dist(mean_a, red), (i, mean_a)
      assert dist(mean_b, red) < dist(mean_b, pink), (i, mean_b)
    assert diff.any() == any(o.color == "pink" for o in a.objects), i
  assert changed_images > 0
  for bad in (["pink"], ["pink:mauve"], ["teal:red"]):
    with pytest.raises(ValueError, match="paint"):
      sw.make_config(paint=bad)
