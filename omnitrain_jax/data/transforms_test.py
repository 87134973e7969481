"""Tests of the per-stream example transforms, on hand-built records."""

import pickle
import re

import cv2
import numpy as np
import pytest

from omnitrain_jax.data import errors
from omnitrain_jax.data import schema
from omnitrain_jax.data import transforms

WORDS = ["red", "green", "circle", "square", "star", "left", "right", "small",
         "large", "dog", "cat"]
IDS = {w: i + 2 for i, w in enumerate(WORDS)}
V = len(WORDS) + 2


class WordEncoder:
  """Whitespace tokenizer over WORDS: (ids, spans), unknown words dropped."""

  def encode(self, text):
    ids, spans = [], []
    for m in re.finditer(r"\w+", text.lower()):
      if m.group() in IDS:
        ids.append(IDS[m.group()])
        spans.append(m.span())
    return np.array(ids, np.int32), np.array(spans, np.int32).reshape(-1, 2)


def mirror_map():
  m = np.arange(V, dtype=np.int32)
  m[IDS["left"]], m[IDS["right"]] = IDS["right"], IDS["left"]
  return m


def fake_decode(record, *, strict=True):
  if record.get("image_path") == "missing.jpg":
    raise errors.DataError("missing.jpg", "image_id 7", "missing image file",
                           "download it")
  out = dict(record)
  h, w = record["height"], record["width"]
  # A horizontal ramp so flips are visible in the pixels.
  out["image"] = np.broadcast_to(
      (np.arange(w) % 256).astype(np.uint8)[None, :, None], (h, w, 3)).copy()
  return out


def det_record(**kw):
  rec = {
      "stream": "det", "source": "toy_det", "image_id": 5,
      "image_path": "x.jpg", "image_bytes": None, "width": 200, "height": 100,
      "boxes": np.array([[10, 20, 50, 60], [100, 0, 200, 100]], np.float32),
      "box_texts": ["red circle", "green square"],
      "category_ids": np.array([1, 2], np.int32),
      "phrase_ids": np.array([0, 1], np.int32), "caption": "",
      "neg_texts": ["red square", "dog", "green circle"],
      "not_exhaustive_texts": ["cat"],
  }
  rec.update(kw)
  return rec


def grd_record(**kw):
  caption = "the small red circle on the left and a green star"
  rec = {
      "stream": "grd", "source": "toy_grd", "image_id": 9,
      "image_path": "y.jpg", "image_bytes": None, "width": 100, "height": 100,
      "boxes": np.array([[5, 5, 30, 30], [60, 60, 90, 95]], np.float32),
      "box_texts": ["small red circle left", "green star"],
      "category_ids": np.array([-1, -1], np.int32),
      "phrase_ids": np.array([0, 1], np.int32), "caption": caption,
      # "small red circle" and "left"; "green star".
      "box_spans": [[[4, 20], [28, 32]], [[39, 49]]],
      "neg_texts": [], "not_exhaustive_texts": [],
  }
  rec.update(kw)
  return rec


def chain(spec, augment=None, strict=True, decode=fake_decode,
          color_ids=None):
  return transforms.example_transforms(
      spec, encoder=WordEncoder(), decode=decode, augment=augment,
      mirror=mirror_map(), color_ids=color_ids, strict=strict)


def toks(row):
  inv = {i: w for w, i in IDS.items()}
  return [inv[int(t)] for t in row if t > 0]


def test_resize_pad_box_math_and_static_shapes():
  spec = schema.Spec(image_size=64)
  ex = transforms.apply_chain(chain(spec), det_record())
  shapes = schema.example_shapes(spec)
  for key, (shape, dtype) in shapes.items():
    assert ex[key].shape == shape, key
    assert ex[key].dtype == dtype, key
  # 200x100 -> scale 0.32: content 64x32, the rest is zero padding.
  assert ex["scale"] == pytest.approx(0.32)
  assert ex["image"][32:].max() == 0
  assert ex["image"][:32].max() > 0
  np.testing.assert_array_equal(ex["orig_size"], [100, 200])
  # Box [10, 20, 50, 60] -> canvas [3.2, 6.4, 16, 19.2] -> cxcywh / 64.
  np.testing.assert_allclose(
      ex["boxes"][0], np.array([9.6, 12.8, 12.8, 12.8]) / 64, rtol=1e-5)
  # Box mapped back to original pixels with the scale.
  cx, cy, w, h = ex["boxes"][0] * 64 / ex["scale"]
  np.testing.assert_allclose([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                             [10, 20, 50, 60], atol=1e-3)
  assert ex["box_mask"].tolist()[:3] == [True, True, False]
  assert toks(ex["box_tokens"][0]) == ["red", "circle"]
  assert toks(ex["box_tokens"][1]) == ["green", "square"]
  # Negatives: tokens of neg_texts minus the image's positives.
  assert toks(ex["neg_tokens"]) == ["dog"]
  assert toks(ex["no_bg_tokens"]) == ["cat"]
  assert ex["phrase_ids"].tolist()[:3] == [0, 1, -1]
  assert ex["stream"] == schema.STREAM_IDS["det"]
  assert ex["image_id"] == 5


def test_small_image_is_upscaled_longest_side_to_canvas():
  spec = schema.Spec(image_size=64)
  rec = det_record(width=20, height=32,
                   boxes=np.array([[0, 0, 20, 32]], np.float32),
                   box_texts=["red circle"])
  ex = transforms.apply_chain(chain(spec), rec)
  assert ex["scale"] == pytest.approx(2.0)
  np.testing.assert_allclose(ex["boxes"][0], [20 / 64, 0.5, 40 / 64, 1.0],
                             rtol=1e-5)


def test_grounding_box_tokens_come_from_spans():
  spec = schema.Spec(image_size=32)
  ex = transforms.apply_chain(chain(spec), grd_record())
  assert toks(ex["box_tokens"][0]) == ["small", "red", "circle", "left"]
  assert toks(ex["box_tokens"][1]) == ["green", "star"]
  assert toks(ex["caption_tokens"]) == ["small", "red", "circle", "left",
                                        "green", "star"]


def test_grounding_without_spans_tokenizes_box_texts():
  spec = schema.Spec(image_size=32)
  rec = grd_record(box_spans=None, box_texts=["red circle", "star"])
  ex = transforms.apply_chain(chain(spec), rec)
  assert toks(ex["box_tokens"][0]) == ["red", "circle"]
  assert toks(ex["box_tokens"][1]) == ["star"]


def test_bad_spans_are_a_data_error_naming_the_record():
  spec = schema.Spec(image_size=32)
  rec = grd_record(box_spans=[[[4, 200]], [[39, 49]]])
  with pytest.raises(errors.DataError, match="image_id 9.*outside the caption"):
    transforms.apply_chain(chain(spec), rec)


def test_boxes_without_tokens_are_dropped_and_counted():
  spec = schema.Spec(image_size=32)
  rec = det_record(box_texts=["red circle", "unicorn"])
  rec["_meta"] = transforms.new_meta("toy_det", "det", 0, 0)
  ex = transforms.apply_chain(chain(spec), rec)
  assert ex["box_mask"].sum() == 1
  assert ex["_meta"]["counts"]["boxes_without_tokens"] == 1


def test_flip_mirrors_boxes_pixels_and_swaps_left_right_tokens():
  spec = schema.Spec(image_size=100)
  flip = transforms.AugmentConfig(crop_prob=0.0, flip_prob=1.0)
  plain = transforms.apply_chain(chain(spec), grd_record())
  flipped = transforms.apply_chain(chain(spec, flip), grd_record())
  assert toks(plain["box_tokens"][0])[-1] == "left"
  assert toks(flipped["box_tokens"][0]) == ["small", "red", "circle", "right"]
  assert toks(flipped["caption_tokens"])[3] == "right"
  # cx -> 1 - cx, the rest unchanged.
  np.testing.assert_allclose(flipped["boxes"][:2, 0], 1 - plain["boxes"][:2, 0],
                             atol=1e-6)
  np.testing.assert_allclose(flipped["boxes"][:2, 1:], plain["boxes"][:2, 1:],
                             atol=1e-6)
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])


def test_crop_updates_and_filters_det_boxes():
  spec = schema.Spec(image_size=64)
  crop = transforms.AugmentConfig(crop_prob=1.0, crop_min_scale=0.3,
                                  flip_prob=0.0)
  rec = det_record(width=200, height=200, boxes=np.array(
      [[10, 10, 60, 60], [150, 150, 199, 199], [0, 0, 200, 200]], np.float32),
                   box_texts=["red circle", "green square", "star"],
                   phrase_ids=np.arange(3, dtype=np.int32))
  seen_partial = False
  for seed in range(20):
    rec["_meta"] = transforms.new_meta("toy_det", "det", 0, seed)
    ex = transforms.apply_chain(chain(spec, crop), dict(rec),
                                np.random.default_rng(seed))
    n = int(ex["box_mask"].sum())
    assert n >= 1  # The crop keeps at least one box whole.
    b = ex["boxes"][:n]
    assert (b >= 0).all() and (b <= 1).all()
    x0, x1 = b[:, 0] - b[:, 2] / 2, b[:, 0] + b[:, 2] / 2
    assert (x0 >= -1e-6).all() and (x1 <= 1 + 1e-6).all()
    assert (b[:, 2] * 64 >= 1 - 1e-4).all()  # No degenerate box survives.
    # The full-image box, clipped, fills the crop's canvas content.
    if n < 3:
      seen_partial = True
      assert ex["_meta"]["counts"]["boxes_degenerate"] == 3 - n
  assert seen_partial


def test_grounding_crop_keeps_every_referent_whole():
  spec = schema.Spec(image_size=50)
  crop = transforms.AugmentConfig(crop_prob=1.0, crop_min_scale=0.2,
                                  flip_prob=0.0)
  for seed in range(20):
    ex = transforms.apply_chain(chain(spec, crop), grd_record(),
                                np.random.default_rng(seed))
    assert ex["box_mask"].sum() == 2
    # Both boxes stay whole: their canvas size is their original size times
    # the scale (within the half pixel of rounding the content size).
    np.testing.assert_allclose(ex["boxes"][:2, 2:] * 50,
                               np.array([[25, 25], [30, 35]]) * ex["scale"],
                               atol=0.6)


def test_grd_crop_prob_overrides_crop_prob():
  spec = schema.Spec(image_size=100)
  no_grd_crop = transforms.AugmentConfig(crop_prob=1.0, crop_min_scale=0.2,
                                         flip_prob=0.0, grd_crop_prob=0.0)
  plain = transforms.apply_chain(chain(spec), grd_record())
  for seed in range(5):
    ex = transforms.apply_chain(chain(spec, no_grd_crop), grd_record(),
                                np.random.default_rng(seed))
    np.testing.assert_array_equal(ex["image"], plain["image"])
    det = transforms.apply_chain(chain(spec, no_grd_crop), det_record(),
                                 np.random.default_rng(seed))
    assert det["scale"] > 0.5  # det is still cropped (then magnified).


def test_padding_truncates_and_counts():
  spec = schema.Spec(image_size=32, max_boxes=2, max_box_tokens=1,
                     max_caption_tokens=2, max_neg_tokens=1)
  rec = grd_record(
      boxes=np.array([[5, 5, 30, 30], [60, 60, 90, 95], [1, 1, 9, 9]],
                     np.float32),
      box_spans=[[[4, 20]], [[39, 49]], [[10, 13]]],
      phrase_ids=np.array([0, 1, 2], np.int32), neg_texts=["dog", "cat"])
  rec["_meta"] = transforms.new_meta("toy_grd", "grd", 0, 0)
  ex = transforms.apply_chain(chain(spec), rec)
  counts = ex["_meta"]["counts"]
  assert counts["boxes_truncated"] == 1
  assert counts["box_tokens_truncated"] == (3 - 1) + (2 - 1)
  assert counts["caption_tokens_truncated"] == 6 - 2
  assert counts["neg_tokens_truncated"] == 1
  assert ex["box_tokens"].shape == (2, 1)
  assert toks(ex["box_tokens"][:, 0]) == ["small", "green"]


def test_lenient_decode_error_becomes_skip_marker_strict_raises():
  spec = schema.Spec(image_size=32)
  rec = det_record(image_path="missing.jpg")
  rec["_meta"] = transforms.new_meta("toy_det", "det", 0, 0)
  marker = transforms.apply_chain(chain(spec, strict=False), rec)
  assert transforms.is_skipped(marker)
  err = transforms.skip_error(pickle.loads(pickle.dumps(marker)))
  assert err.file == "missing.jpg" and "missing image" in err.problem
  with pytest.raises(errors.DataError, match="missing.jpg"):
    transforms.apply_chain(chain(spec, strict=True), rec)


def test_transforms_pickle_for_worker_processes():
  spec = schema.Spec(image_size=32)
  c = chain(spec, transforms.AugmentConfig())
  transforms.apply_chain(c, det_record())  # Fills the tokenizer's cache.
  c2 = pickle.loads(pickle.dumps(c))
  rng = np.random.default_rng(3)
  a = transforms.apply_chain(c, det_record(), np.random.default_rng(3))
  b = transforms.apply_chain(c2, det_record(), rng)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def img_record(**kw):
  rec = {
      "stream": "img", "source": "toy_img", "image_id": 11,
      "image_path": "z.jpg", "image_bytes": None, "width": 100,
      "height": 100, "boxes": np.zeros((0, 4), np.float32), "box_texts": [],
      "category_ids": np.zeros((0,), np.int32),
      "phrase_ids": np.zeros((0,), np.int32),
      # The toy encoder does not fold plurals: "circle" after "two".
      "caption": "two red circle, a large green star on the left and a dog",
      "neg_texts": [], "not_exhaustive_texts": [],
  }
  rec.update(kw)
  return rec


def test_img_examples_carry_their_caption_phrases_with_counts():
  spec = schema.Spec(image_size=32)
  rec = img_record()
  rec["_meta"] = transforms.new_meta("toy_img", "img", 0, 0)
  ex = transforms.apply_chain(chain(spec), rec)
  assert ex["phrase_tokens"].shape == (spec.max_phrases,
                                       spec.max_phrase_tokens)
  got = [(toks(row), int(c)) for row, c in
         zip(ex["phrase_tokens"], ex["phrase_counts"]) if c > 0]
  assert got == [(["red", "circle"], 2), (["large", "green", "star"], 1),
                 (["left"], 1), (["dog"], 1)]
  assert not np.any(ex["phrase_tokens"][4:]) and not np.any(
      ex["phrase_counts"][4:])
  # A phrase without a vocabulary token is dropped and counted.
  rec = img_record(caption="a red circle and a unicorn")
  rec["_meta"] = transforms.new_meta("toy_img", "img", 0, 0)
  ex = transforms.apply_chain(chain(spec), rec)
  assert ex["_meta"]["counts"]["phrases_without_tokens"] == 1
  assert list(ex["phrase_counts"][:2]) == [1, 0]
  # det and grd examples have no phrases; a flip mirrors phrase tokens.
  for record in (det_record(), grd_record()):
    ex = transforms.apply_chain(chain(spec), record)
    assert not np.any(ex["phrase_tokens"]) and not np.any(ex["phrase_counts"])
  flip = transforms.AugmentConfig(crop_prob=0.0, flip_prob=1.0)
  ex = transforms.apply_chain(chain(spec, flip), img_record())
  assert toks(ex["phrase_tokens"][2]) == ["right"]


def test_phrase_padding_truncates_and_counts():
  spec = schema.Spec(image_size=32, max_phrases=2, max_phrase_tokens=2)
  rec = img_record()
  rec["_meta"] = transforms.new_meta("toy_img", "img", 0, 0)
  ex = transforms.apply_chain(chain(spec), rec)
  counts = ex["_meta"]["counts"]
  assert counts["phrases_truncated"] == 2
  assert counts["phrase_tokens_truncated"] == 1  # "large green star".
  assert toks(ex["phrase_tokens"][1]) == ["large", "green"]
  assert list(ex["phrase_counts"]) == [2, 1]


COLOR_IDS = np.array([IDS["red"], IDS["green"]], np.int32)


def jitter_chain(spec, augment):
  return chain(spec, augment, decode=solid_decode, color_ids=COLOR_IDS)


def solid_decode(record, *, strict=True):
  """A grey image with one saturated red block: hue turns are measurable."""
  out = dict(record)
  h, w = record["height"], record["width"]
  image = np.full((h, w, 3), 128, np.uint8)
  image[: h // 2, : w // 2] = (215, 35, 35)
  out["image"] = image
  return out


def test_color_jitter_strips_colour_words_from_det_labels_only():
  spec = schema.Spec(image_size=100)
  off = transforms.AugmentConfig(crop_prob=0.0, flip_prob=0.0)
  on = transforms.AugmentConfig(crop_prob=0.0, flip_prob=0.0,
                                color_jitter_prob=1.0)
  rec = det_record()
  rec["_meta"] = transforms.new_meta("toy_det", "det", 0, 0)
  plain = transforms.apply_chain(jitter_chain(spec, off), dict(rec),
                                 np.random.default_rng(0))
  jit = transforms.apply_chain(jitter_chain(spec, on), dict(rec),
                               np.random.default_rng(0))
  assert toks(plain["box_tokens"][0]) == ["red", "circle"]
  # Both boxes stay (they still train the box head), without colour words.
  assert jit["box_mask"].sum() == plain["box_mask"].sum() == 2
  assert toks(jit["box_tokens"][0]) == ["circle"]
  assert toks(jit["box_tokens"][1]) == ["square"]
  np.testing.assert_array_equal(jit["boxes"], plain["boxes"])
  # Known negatives lose the colours too ("red square" -> square, "dog").
  assert set(toks(plain["neg_tokens"])) == {"dog"}  # The rest are positives.
  rec2 = det_record(box_texts=["red circle", "dog"],
                    neg_texts=["green square", "cat"])
  jit2 = transforms.apply_chain(jitter_chain(spec, on), rec2,
                                np.random.default_rng(0))
  assert set(toks(jit2["neg_tokens"])) == {"square", "cat"}
  # The colour words are unknown on it: listed first among the tokens no
  # prediction is a negative on (candidates.py keeps them unknown).
  assert toks(jit2["no_bg_tokens"]) == ["red", "green", "cat"]
  assert toks(plain["no_bg_tokens"]) == ["cat"]
  assert jit["_meta"]["counts"]["color_jittered"] == 1
  assert not np.array_equal(jit["image"], plain["image"])
  # Grounding (and captions) are never jittered: same pixels and tokens.
  for record in (grd_record(), img_record()):
    a = transforms.apply_chain(jitter_chain(spec, off), dict(record),
                               np.random.default_rng(0))
    b = transforms.apply_chain(jitter_chain(spec, on), dict(record),
                               np.random.default_rng(0))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_jitter_colors_turns_the_hue_and_scales_saturation_and_value():
  image = np.full((8, 8, 3), 128, np.uint8)
  image[:4] = (215, 35, 35)  # Red: hue 0.
  for seed in range(6):
    draws = np.random.default_rng(seed)
    turn, s_f, v_f = (draws.uniform(-0.5, 0.5), draws.uniform(0.4, 1.2),
                      draws.uniform(0.7, 1.3))
    out = transforms.jitter_colors(image, np.random.default_rng(seed),
                                   hue=0.5, saturation=(0.4, 1.2),
                                   value=(0.7, 1.3))
    hsv_in = cv2_hsv(image)
    hsv = cv2_hsv(out)
    dh = (int(hsv[0, 0, 0]) - int(hsv_in[0, 0, 0]) - round(turn * 256)) % 256
    assert min(dh, 256 - dh) <= 3, (seed, dh)
    assert abs(int(hsv[0, 0, 1]) - hsv_in[0, 0, 1] * s_f) <= 3
    assert abs(int(hsv[0, 0, 2]) - min(255, hsv_in[0, 0, 2] * v_f)) <= 3
    # Grey stays grey (no hue to turn); only its brightness scales.
    grey = out[-1, -1].astype(int)
    assert grey.max() - grey.min() <= 1
    assert abs(grey[0] - min(255, 128 * v_f)) <= 2
  # A half-circle limit of 0 and unit factors change nothing.
  same = transforms.jitter_colors(image, np.random.default_rng(0), hue=0.0,
                                  saturation=(1.0, 1.0), value=(1.0, 1.0))
  assert np.abs(same.astype(int) - image).max() <= 2


def cv2_hsv(image):
  return cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)


def test_augment_config_rejects_bad_color_jitter():
  with pytest.raises(ValueError, match="color_jitter_prob"):
    transforms.AugmentConfig(color_jitter_prob=1.5)
  with pytest.raises(ValueError, match="color_jitter_hue"):
    transforms.AugmentConfig(color_jitter_hue=0.7)
  with pytest.raises(ValueError, match="color_jitter_value"):
    transforms.AugmentConfig(color_jitter_value=(1.2, 0.8))
