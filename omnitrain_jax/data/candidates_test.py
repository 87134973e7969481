"""Tests of the per-example candidate tokens and their masks."""

import numpy as np
import pytest

from omnitrain_jax.data import candidates
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema
from omnitrain_jax.data.pipeline_test import tiny_config

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
    ex[candidates.KEY] = candidates.example_key("train", schema.STREAMS[i],
                                                "toy", i)
  return {k: np.stack([ex[k] for ex in exs]) for k in exs[0]}


def sampler(vocab_size=40, counts=None, **kw):
  probs = candidates.sampling_probs(counts, vocab_size)
  return candidates.Candidates(SPEC.num_candidates, probs, **kw)


def rekey(batch, index0):
  """The batch with keys index0, index0 + 1, ... (other examples)."""
  out = dict(batch)
  out[candidates.KEY] = np.stack([
      candidates.example_key("train", "det", "toy", index0 + i)
      for i in range(len(batch["stream"]))])
  return out


def test_order_uniqueness_and_masks():
  out = sampler(min_vocab_negatives=2).build(make_batch())
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
  out = sampler(det_batch_negatives_known=True).build(make_batch())
  assert out["cand_known"][0].all()
  assert out["cand_bg"][0].sum() == 9  # All but no_bg token 4.


def test_det_batch_negatives_known_spares_unknown_tokens():
  """A sampled token the image's no_bg_tokens lists (a jittered image's
  colour words) is neither a known nor a background negative."""
  batch = make_batch()
  batch["no_bg_tokens"][0, 1:3] = [7, 9]  # Positives of grd / img.
  out = sampler(det_batch_negatives_known=True).build(batch)
  c, known, bg = out["candidates"][0], out["cand_known"][0], out["cand_bg"][0]
  assert {7, 9} <= set(c.tolist())  # Batch negatives (the pool is small).
  for t, k, g in zip(c.tolist(), known.tolist(), bg.tolist()):
    if t in (7, 9):
      assert not k and not g
    elif t == 4:  # Listed (a positive): known, but never background.
      assert k and not g
    else:
      assert k and g
  # Without the option the sampled ones are unknown anyway.
  out = sampler().build(batch)
  assert out["cand_known"][0].sum() == 5


def test_vocabulary_negatives_follow_counts():
  counts = np.zeros(40, np.int64)
  counts[30:33] = [1000, 10, 1]  # Only these three can be drawn.
  out = sampler(counts=counts, min_vocab_negatives=5).build(make_batch())
  c = out["candidates"]
  drawn = set(c[c > 10].tolist())
  assert drawn <= {30, 31, 32}
  # Few drawable tokens: rows are 0-padded rather than duplicated.
  assert (c == 0).any()


def test_small_vocabulary_pads_without_duplicates():
  out = sampler(vocab_size=12).build(make_batch())
  for row in out["candidates"]:
    nz = row[row > 0]
    assert len(set(nz.tolist())) == nz.size
    assert set(nz.tolist()) <= set(range(2, 12))


def test_deterministic_given_seed_and_keys():
  a = sampler(seed=7).build(make_batch())
  b = sampler(seed=7).build(make_batch())
  c = sampler(seed=8).build(make_batch())
  d = sampler(seed=7).build(rekey(make_batch(), 100))
  np.testing.assert_array_equal(a["candidates"], b["candidates"])
  assert candidates.KEY not in a  # The keys are consumed.
  # Another seed, or other examples with the same contents, draw otherwise.
  assert not np.array_equal(a["candidates"], c["candidates"])
  assert not np.array_equal(a["candidates"], d["candidates"])


def test_positive_overflow_counts_or_raises():
  batch = make_batch()
  q4 = candidates.Candidates(2, candidates.sampling_probs(None, 40),
                             stats=candidates.CandidateStats())
  out = q4.build(batch)
  assert out["candidates"][0].tolist() == [2, 3]
  assert q4.stats.counts()["positives_dropped"] == 1
  strict = candidates.Candidates(2, candidates.sampling_probs(None, 40),
                                 overflow="error")
  with pytest.raises(ValueError, match="3 positive tokens but num_candidates=2"):
    strict.build(batch)


def test_sampling_probs_power_and_uniform_fallback():
  p = candidates.sampling_probs(np.array([0, 0, 1, 16]), 4, alpha=0.5)
  np.testing.assert_allclose(p, [0, 0, 0.2, 0.8])
  np.testing.assert_allclose(candidates.sampling_probs(None, 4),
                             [0, 0, 0.5, 0.5])


def random_batch(rng, size=8, vocab_size=200):
  """`size` examples (det, grd, img in turn) with random tokens and keys."""
  spec = schema.Spec(image_size=8, max_boxes=3, max_box_tokens=2,
                     max_caption_tokens=3, max_neg_tokens=3,
                     num_candidates=10)
  exs = []
  for i in range(size):
    stream = schema.STREAMS[i % 3]
    ex = schema.empty_example(spec, stream)
    if stream != "img":
      ex["box_mask"][:2] = True
      ex["box_tokens"][:2] = rng.integers(2, 40, size=(2, 2))
    if stream != "det":
      ex["caption_tokens"][:] = rng.integers(2, 40, size=3)
    else:
      ex["neg_tokens"][:2] = rng.integers(2, 40, size=2)
      ex["no_bg_tokens"][:1] = ex["box_tokens"][0, :1]
    ex["image_id"] = np.int32(i)
    ex[candidates.KEY] = candidates.example_key("train", stream, "toy",
                                                1000 + i)
    exs.append(ex)
  return {k: np.stack([ex[k] for ex in exs]) for k in exs[0]}


def take(batch, rows):
  return {k: v[rows] for k, v in batch.items()}


def by_key(out, batch):
  """key -> (candidates, cand_known, cand_bg) of each example of `out`."""
  return {tuple(k.tolist()): (out["candidates"][i].tolist(),
                              out["cand_known"][i].tolist(),
                              out["cand_bg"][i].tolist())
          for i, k in enumerate(batch[candidates.KEY])}


@pytest.mark.parametrize("seed", [0, 1])
def test_same_candidates_for_any_split_and_order(seed):
  rng = np.random.default_rng(seed)
  batch = random_batch(rng)
  counts = np.zeros(200, np.int64)
  counts[40:] = np.arange(160) + 1  # Vocabulary negatives: ids 40..199.
  s = sampler(vocab_size=200, counts=counts, min_vocab_negatives=2, seed=3)
  whole = by_key(s.build(batch), batch)
  # Two processes as `ds[p::2]` shards them, each share in a shuffled order:
  # each builds its share over the gathered ids of both shares.
  shares = [rng.permutation(np.arange(p, 8, 2)) for p in range(2)]
  gathered = np.stack([candidates.positive_ids(take(batch, r))
                       for r in shares])  # [2, 4, M * T + C]
  split = {}
  for rows in shares:
    part = take(batch, rows)
    split.update(by_key(s.build(part, pool=gathered), part))
  assert split == whole
  # The draws really sample: every example has batch negatives (tokens of
  # other examples only) and vocabulary negatives (tokens of no example).
  ids = candidates.positive_ids(batch)
  for i, (row, _, _) in enumerate(whole.values()):
    own = set(ids[i].tolist()) | set(batch["neg_tokens"][i].tolist())
    others = set(np.delete(ids, i, axis=0).ravel().tolist())
    assert any(t in others and t not in own for t in row), row
    assert any(t >= 40 for t in row), row
  # The pool matters: with only its own share as the pool (the old,
  # per-process batch negatives) some example's candidates change.
  part = take(batch, shares[0])
  local = by_key(s.build(part), part)
  assert any(local[k] != whole[k] for k in local)


def test_batch_negatives_come_from_a_large_pool_without_duplicates():
  batch = random_batch(np.random.default_rng(0))
  pool = np.arange(2, 1000)  # A pod's global batch: many distinct positives.
  s = candidates.Candidates(40, candidates.sampling_probs(None, 5000))
  out = s.build(batch, pool=pool)
  ids = candidates.positive_ids(batch)
  for i, row in enumerate(out["candidates"]):
    row = row[row > 0].tolist()
    assert len(row) == 40 and len(set(row)) == 40
    own = set(ids[i].tolist()) | set(batch["neg_tokens"][i].tolist())
    picked = [t for t in row if t not in own]
    # min_vocab_negatives=0: the batch fills Q, from the pool only.
    assert picked and all(2 <= t < 1000 for t in picked)


def test_build_needs_example_keys():
  batch = make_batch()
  del batch[candidates.KEY]
  with pytest.raises(ValueError, match="no example keys"):
    sampler().build(batch)


@pytest.fixture(scope="module")
def tiny_small_q(tmp_path_factory):
  """The tiny ShapesWorld data with Q = 12 < the 26 drawable tokens."""
  data = tiny_config(tmp_path_factory.mktemp("cache"))
  data.spec.num_candidates = 12
  return data, preparation.prepare_data(data)


def test_pipeline_candidates_do_not_depend_on_the_process_count(tiny_small_q):
  data, info = tiny_small_q
  assert len(info.vocab) - info.vocab.num_reserved > 2 * 12
  one = iter(pipeline.make_train_dataset(data, info, process_index=0,
                                         process_count=1))
  two = [iter(pipeline.make_train_dataset(data, info, process_index=p,
                                          process_count=2,
                                          with_candidates=False))
         for p in range(2)]
  builder = candidates.candidates_from_config(data, info.vocab)

  def rows(out):  # (stream, image_id): unique within a tiny batch.
    return {(int(out["stream"][i]), int(out["image_id"][i])):
            [out[k][i].tolist() for k in ("candidates", "cand_known",
                                          "cand_bg")]
            for i in range(len(out["stream"]))}

  for _ in range(3):
    want = rows(next(one))
    shares = [next(it) for it in two]
    gathered = np.stack([candidates.positive_ids(s) for s in shares])
    got = {}
    for share in shares:
      got.update(rows(builder.build(share, pool=gathered)))
    assert got == want


def test_eval_candidates_are_keyed_by_record(tiny_small_q):
  data, info = tiny_small_q

  def passes(pc):
    out = {}
    for pi in range(pc):
      for b in pipeline.make_eval_dataset(
          data, info, stream="det", batch_size=8, process_index=pi,
          process_count=pc, with_candidates=True):
        assert candidates.KEY not in b
        assert b["candidates"].shape == (4 if pc == 2 else 8, 12)
        for i, image_id in enumerate(b["image_id"].tolist()):
          if image_id >= 0:
            out[image_id] = (b["candidates"][i].tolist(),
                             b["cand_known"][i].tolist())
    return out

  one, two = passes(1), passes(2)
  assert len(one) == len(two) == 12
  assert passes(1) == one  # Deterministic.
  # Positives and known negatives (the labelled part) never depend on the
  # split; the sampled rest may (eval pools are per process).
  for image_id, (row, known) in one.items():
    n = sum(known)
    assert two[image_id][0][:n] == row[:n]
