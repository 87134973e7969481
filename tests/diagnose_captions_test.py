"""experiments/diagnose_captions.py on a tiny run: structure and invariants."""

import json
import math
import pathlib
import runpy
import subprocess
import sys

import numpy as np
import pytest

import binaries  # tests/binaries.py

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "experiments" / "diagnose_captions.py"
STREAMS = ("det", "grd", "img")
NUM_BATCHES, GRAD_BATCHES = 6, 2
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4,
           "five": 5, "six": 6}


def _caption_objects(caption: str) -> list[tuple[int, set[str]]]:
  """"two red circles and a blue star" -> [(2, {red, circle}), (1, ...)].

  Independent of the generator's objects: ShapesWorld captions list every
  object as ``<count> [size] <colour> <shape>``.
  """
  items = []
  for part in caption.replace(" and ", ", ").split(", "):
    words = part.split()
    shape = words[-1]
    shape = shape[:-2] if shape == "crosses" else (
        shape[:-1] if words[0] not in ("a", "an", "one") else shape)
    items.append((_COUNTS[words[0]], {words[-2], shape}))
  return items


_env = binaries.subprocess_env


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
  workdir, data_root = tiny_run
  out = tmp_path_factory.mktemp("diag") / "diag.json"
  proc = subprocess.run(
      [sys.executable, str(TOOL), f"--workdir={workdir}", f"--out={out}",
       f"--num_batches={NUM_BATCHES}", f"--grad_batches={GRAD_BATCHES}",
       "--recolor=pink:red"],
      env=_env(), capture_output=True, text=True, timeout=600,
      cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert json.loads(proc.stdout) == result  # Printed and written alike.
  return result, pathlib.Path(data_root)


def test_token_groups_come_from_the_split(report):
  result, root = report
  splits = json.loads((root / "splits.json").read_text())
  tokens = result["tokens"]
  assert tokens["caption_only"] == splits["img_novel_tokens"]
  assert tokens["caption_only"]  # hexagon, pink
  assert not set(tokens["caption_only"]) & set(tokens["det_category_tokens"])
  assert not set(tokens["grounding_only"]) & set(
      tokens["det_category_tokens"])
  assert set(tokens["det_category_tokens"]) == set(tokens["base"])
  assert tokens["not_in_vocab"] == []


def test_pointing_pairs_match_the_captions_and_aggregate(report):
  result, root = report
  p = result["pointing"]
  captions = {a["image_id"]: a["caption"] for a in json.loads(
      (root / "img_val.json").read_text())["annotations"]}
  assert p["images_scored"] == len(captions)
  assert p["scene_mismatches"] == 0
  pairs = []
  for image in p["images"]:
    items = _caption_objects(captions[image["image_id"]])
    assert image["objects"] == sum(n for n, _ in items)
    for pair in image["tokens"]:
      # Chance is the share of the image's objects that carry the token,
      # counted here from the caption text alone.
      carriers = sum(n for n, words in items if pair["token"] in words)
      assert pair["carriers"] == carriers >= 1
      assert math.isclose(pair["chance"], carriers / image["objects"])
      assert 0.0 <= pair["patch_chance"] <= 1.0
      assert 0.0 <= pair["prob"] <= 1.0
      assert pair["on_object"] or not pair["box_hit"]
      assert pair["centre_on_object"] or not pair["centre_hit"]
      pairs.append(pair)
  assert pairs
  for group, agg in p["per_group"].items():
    sel = [q for q in pairs if q["group"] == group]
    assert agg["pairs"] == len(sel)
    if not sel:
      continue
    assert math.isclose(agg["chance"], np.mean([q["chance"] for q in sel]))
    for key in ("box_hit", "on_object", "centre_hit", "centre_on_object"):
      rate = agg[f"{key}_rate"]
      assert 0.0 <= rate <= 1.0
      assert math.isclose(rate, np.mean([q[key] for q in sel]))
  assert p["per_group"]["caption_only"]["pairs"] > 0
  assert sum(t["pairs"] for t in p["per_token"].values()) == len(pairs)
  for token in result["tokens"]["caption_only"]:
    assert p["per_token"][token]["group"] == "caption_only"


def test_candidate_roles_partition_the_candidates(report):
  result, _ = report
  roles = result["candidate_roles"]
  assert roles["batches"] == NUM_BATCHES
  batch = result["batch"]
  assert roles["examples"] == {s: NUM_BATCHES * batch[s] for s in STREAMS}
  for token, per_stream in roles["per_token"].items():
    for s, c in per_stream.items():
      assert c["examples"] == roles["examples"][s]
      assert c["candidate"] <= c["examples"]  # Once per example at most.
      assert (c["positive"] + c["known_negative"] + c["sampled_negative"]
              == c["candidate"]), (token, s, c)
      assert (c["sampled_batch_pool"] + c["sampled_vocab"]
              == c["sampled_negative"])
      assert 0 <= c["bg_negative"] <= c["known_negative"]
  for token in result["tokens"]["caption_only"]:
    c = roles["per_token"][token]
    # No det box and no grounding phrase names a caption-only token, and
    # det never lists it as a known (or background) negative.
    assert c["det"]["positive"] == c["grd"]["positive"] == 0
    assert c["det"]["known_negative"] == c["det"]["bg_negative"] == 0
  for group, per_stream in roles["per_group"].items():
    members = [t for t in roles["per_token"]
               if t in result["tokens"][group]]
    for s, c in per_stream.items():
      for role in ("candidate", "positive", "known_negative",
                   "sampled_negative"):
        assert c[role] == sum(roles["per_token"][t][s][role]
                              for t in members)
  assert set(roles["loss_roles"]) == set(STREAMS)


def test_gradients_are_finite_and_split_the_loss(report):
  result, _ = report
  g = result["gradients"]
  assert g["batches"] == GRAD_BATCHES
  total = np.mean([b["total_loss"] for b in g["per_batch"]])
  assert g["loss_sum_error"] <= 1e-4 * max(1.0, abs(total))
  for b in g["per_batch"]:
    for s, st in b["streams"].items():
      for key in ("norm_backbone", "norm_head", "norm_shared",
                  "norm_token_table"):
        assert math.isfinite(st[key]) and st[key] >= 0, (s, key)
      assert math.isclose(st["norm_shared"] ** 2,
                          st["norm_backbone"] ** 2 + st["norm_head"] ** 2,
                          rel_tol=1e-3)
    assert b["streams"]["det"]["norm_shared"] > 0  # The det boxes train.
    for cos in b["cosine"].values():
      for v in cos.values():
        assert v is None or -1.0 - 1e-6 <= v <= 1.0 + 1e-6
  for s in STREAMS:
    assert math.isfinite(g["streams"][s]["norm_shared_summed"])
  # The det loss never touches a caption-only row: not a known or
  # background negative of any det example (the tiny config keeps
  # det_batch_negatives_known off), and the matching is stop_gradient.
  for token in result["tokens"]["caption_only"]:
    assert g["token_rows"]["det"][token] == 0.0
    for role in g["logit_push"]["per_token"]["det"][token].values():
      assert all(v == 0.0 for v in role.values())
  for per_token in g["token_rows"].values():
    assert all(math.isfinite(v) for v in per_token.values())


def test_grad_batches_zero_skips_the_gradients_only(tiny_run, tmp_path):
  workdir, _ = tiny_run
  out = tmp_path / "diag.json"
  proc = subprocess.run(
      [sys.executable, str(TOOL), f"--workdir={workdir}", f"--out={out}",
       "--num_batches=1", "--grad_batches=0", "--max_images=2"],
      env=_env(), capture_output=True, text=True, timeout=600,
      cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert result["gradients"] is None
  assert result["candidate_roles"]["batches"] == 1
  assert result["pointing"]  # The other sections still ran.
  assert result["seconds"]["gradients"] < result["seconds"]["total"]


def test_count_roles_on_a_hand_built_batch():
  tool = runpy.run_path(str(TOOL), run_name="diagnose_captions")
  # Ids: 5 = hexagon (caption-only), 6 = red (base), 7 = circle (base).
  tracked = {5: ("hexagon", "caption_only"), 6: ("red", "base"),
             7: ("circle", "base")}
  batch = {
      "stream": np.array([0, 2]),
      "box_mask": np.array([[True], [False]]),
      "box_tokens": np.array([[[6, 7]], [[0, 0]]]),
      "caption_tokens": np.array([[0, 0], [5, 6]]),
      # det: red, circle positives; hexagon sampled from the batch's pool.
      # img: hexagon, red positives; circle a batch negative.
      "candidates": np.array([[6, 7, 5, 0], [5, 6, 7, 0]]),
      "cand_known": np.array([[True, True, False, False],
                              [True, True, False, False]]),
      "cand_bg": np.array([[True, True, False, False],
                           [False, False, False, False]]),
  }
  out = tool["count_roles"]([batch], tracked)
  hexagon = out["per_token"]["hexagon"]
  assert hexagon["det"] == {"examples": 1, "candidate": 1, "positive": 0,
                            "known_negative": 0, "bg_negative": 0,
                            "sampled_negative": 1, "sampled_batch_pool": 1,
                            "sampled_vocab": 0}
  assert hexagon["img"]["positive"] == 1
  assert out["per_token"]["circle"]["img"]["sampled_batch_pool"] == 1
  assert out["per_group"]["base"]["det"]["positive"] == 2
  assert out["examples"] == {"det": 1, "grd": 0, "img": 1}


def test_phrase_matching_and_box_recall_count_every_caption_object(report):
  result, root = report
  p = result["pointing"]
  captions = {a["image_id"]: a["caption"] for a in json.loads(
      (root / "img_val.json").read_text())["annotations"]}
  assert p["images_scored"] == len(captions)
  caption_only = set(result["tokens"]["caption_only"])
  grounding_only = set(result["tokens"]["grounding_only"])
  # Expected from the caption text alone: each phrase's instances (its
  # count, laid out in caption order and capped at K columns per image),
  # grouped by the phrase's caption-only token, else grd, else base; a
  # phrase with no trusted (non caption-only) word gets no instance.
  kk = 8  # The tiny config: img_phrase_max_instances 8, max_boxes 8.
  matched, chance, untrusted, objects = {}, {}, 0, {}
  for caption in captions.values():
    items = _caption_objects(caption)
    assert len(items) <= 8  # max_phrases: no phrase dropped here.
    total = sum(n for n, _ in items)
    used = 0
    for n, words in items:
      for w in words:
        objects[w] = objects.get(w, 0) + n
      if words <= caption_only:
        untrusted += 1
        continue
      novel = sorted(words & caption_only)
      group = "+".join(novel) if novel else (
          "grounding_only" if words & grounding_only else "base")
      take = max(0, min(n, kk - used))
      used += take
      carriers = sum(m for m, w2 in items if words <= w2)
      matched[group] = matched.get(group, 0) + take
      chance[group] = chance.get(group, 0.0) + take * carriers / total
  pm = p["phrase_matching"]
  assert pm["unmatched_phrases"] == untrusted
  assert {g: v["matched"] for g, v in pm["per_group"].items()} == matched
  for g, v in pm["per_group"].items():
    assert math.isclose(v["chance"], chance[g] / matched[g])
    assert 0 <= v["kept"] <= v["matched"]
    assert 0.0 <= v["hit_rate"] <= v["on_object_rate"] <= 1.0
  assert sum(matched.values()) > 0
  boxes = p["boxes"]["per_token"]
  assert {t: v["objects"] for t, v in boxes.items()} == objects
  for t, v in boxes.items():
    assert 0.0 <= v["mean_best_iou"] <= 1.0 and 0.0 <= v["recall"] <= 1.0
    # recall = share with IoU >= 0.5; mean >= 0.5 * recall.
    assert v["mean_best_iou"] >= 0.5 * v["recall"] - 1e-9
  for t in caption_only:
    assert boxes[t]["group"] == "caption_only"


def test_recolored_boxes_score_the_same_scenes(report):
  result, root = report
  p = result["pointing"]
  painted = p["boxes_recolored"]
  assert painted["recolor"] == {"pink": "red"}
  assert painted["iou_threshold"] == p["boxes"]["iou_threshold"]
  # The same objects (scenes regenerated with pink drawn red) ...
  assert ({t: v["objects"] for t, v in painted["per_token"].items()} ==
          {t: v["objects"] for t, v in p["boxes"]["per_token"].items()})
  # ... and only some pixels changed (those of the pink objects).
  assert 0.0 < painted["changed_pixels"] < 0.5
