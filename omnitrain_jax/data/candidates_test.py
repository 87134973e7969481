"""Tests of the per-example candidate tokens and their masks."""

import numpy as np
import pytest

from omnitrain_jax.data import candidates
from omnitrain_jax.data import schema

SPEC = schema.Spec(image_size=8, max_boxes=3, max_box_tokens=2,
                   max_caption_tokens=3, max_neg_tokens=3, num_candidates=10)


def make_batch():
  """det (pos 2,3 / 4; neg 5,6; no_bg 4), grd (pos 7,8), img (caption 9,10)."""
  exs = [schema.empty_example(SPEC, s) for s in ("det", "grd", "img")]
  det, grd, img = exs
  det["box_mask"][:2] = True
  det["box_tokens"][0] = [2, 3]
  det["box_tokens"][1] = [4, 0]
  det["neg_tokens"][:3] = [5, 6, 3]  # 3 is a positive: not a negative.
  det["no_bg_tokens"][:1] = [4]
  grd["box_mask"][:1] = True
  grd["box_tokens"][0] = [7, 8]
  grd["caption_tokens"][:2] = [7, 8]
  img["caption_tokens"][:2] = [9, 10]
  for i, ex in enumerate(exs):
    ex["image_id"] = np.int32(i)
  return {k: np.stack([ex[k] for ex in exs]) for k in exs[0]}


def sampler(vocab_size=40, counts=None, **kw):
  probs = candidates.sampling_probs(counts, vocab_size)
  return candidates.Candidates(SPEC.num_candidates, probs, **kw)


def test_order_uniqueness_and_masks():
  out = sampler(min_vocab_negatives=2).random_map(make_batch(),
                                                  np.random.default_rng(0))
  c, known, bg = out["candidates"], out["cand_known"], out["cand_bg"]
  assert c.shape == known.shape == bg.shape == (3, 10)
  for b in range(3):
    row = c[b][c[b] > 0]
    assert len(set(row.tolist())) == row.size  # No duplicates.
    assert (row >= 2).all()  # Never pad/unk.
  # det: positives, then its known negatives, then batch negatives (7..10).
  assert c[0, :5].tolist() == [2, 3, 4, 5, 6]
  assert set(c[0, 5:8].tolist()) <= {7, 8, 9, 10}
  assert known[0].tolist() == [True] * 5 + [False] * 5
  # bg = known minus no_bg (token 4 is LVIS-style not exhaustive).
  assert bg[0].tolist() == [True, True, False, True, True] + [False] * 5
  # grd: its positives are known; never background.
  assert c[1, :2].tolist() == [7, 8]
  assert known[1, :2].all() and not known[1, 2:].any() and not bg[1].any()
  # Other examples' positives are batch negatives for grd/img.
  assert {2, 3, 4, 9, 10} <= set(c[1].tolist())
  assert c[2, :2].tolist() == [9, 10] and not bg[2].any()
  # Q filled by vocabulary negatives (the vocabulary is large enough).
  assert (c > 0).all()


def test_det_batch_negatives_known_option():
  out = sampler(det_batch_negatives_known=True).random_map(
      make_batch(), np.random.default_rng(0))
  assert out["cand_known"][0].all()
  assert out["cand_bg"][0].sum() == 9  # All but no_bg token 4.


def test_vocabulary_negatives_follow_counts():
  counts = np.zeros(40, np.int64)
  counts[30:33] = [1000, 10, 1]  # Only these three can be drawn.
  out = sampler(counts=counts, min_vocab_negatives=5).random_map(
      make_batch(), np.random.default_rng(1))
  c = out["candidates"]
  drawn = set(c[c > 10].tolist())
  assert drawn <= {30, 31, 32}
  # Few drawable tokens: rows are 0-padded rather than duplicated.
  assert (c == 0).any()


def test_small_vocabulary_pads_without_duplicates():
  out = sampler(vocab_size=12).random_map(make_batch(),
                                          np.random.default_rng(0))
  for row in out["candidates"]:
    nz = row[row > 0]
    assert len(set(nz.tolist())) == nz.size
    assert set(nz.tolist()) <= set(range(2, 12))


def test_deterministic_given_rng_state():
  s = sampler()
  a = s.random_map(make_batch(), np.random.default_rng(7))
  b = s.random_map(make_batch(), np.random.default_rng(7))
  c = s.random_map(make_batch(), np.random.default_rng(8))
  np.testing.assert_array_equal(a["candidates"], b["candidates"])
  assert not np.array_equal(a["candidates"], c["candidates"])


def test_positive_overflow_counts_or_raises():
  batch = make_batch()
  q4 = candidates.Candidates(2, candidates.sampling_probs(None, 40),
                             stats=candidates.CandidateStats())
  out = q4.random_map(batch, np.random.default_rng(0))
  assert out["candidates"][0].tolist() == [2, 3]
  assert q4.stats.counts()["positives_dropped"] == 1
  strict = candidates.Candidates(2, candidates.sampling_probs(None, 40),
                                 overflow="error")
  with pytest.raises(ValueError, match="3 positive tokens but num_candidates=2"):
    strict.random_map(batch, np.random.default_rng(0))


def test_sampling_probs_power_and_uniform_fallback():
  p = candidates.sampling_probs(np.array([0, 0, 1, 16]), 4, alpha=0.5)
  np.testing.assert_allclose(p, [0, 0, 0.2, 0.8])
  np.testing.assert_allclose(candidates.sampling_probs(None, 4),
                             [0, 0, 0.5, 0.5])
