"""Tests pinning the semantics of omni_loss on small hand-built batches."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from omnitrain_jax.data import schema
from omnitrain_jax.losses import omni_loss as omni_loss_lib

SPEC = schema.Spec(image_size=8, max_boxes=4, max_box_tokens=3,
                   max_caption_tokens=6, max_neg_tokens=4, num_candidates=8)
N = 6  # Predictions per image.
Q = SPEC.num_candidates

# Token ids used below (0 is padding).
MAN, LEFT, RIGHT, RED, CIRCLE, STAR, DOG, CAT, SKY, BLUE = range(10, 20)

# Every test batch has B = 3 (padded with empty examples) and every call goes
# through one jitted value-and-grad, so each config compiles once per session.
B = 3


def _loss_and_aux(outputs, batch, config):
  return omni_loss_lib.omni_loss(outputs, batch, config)


_value_and_grad = jax.jit(jax.value_and_grad(_loss_and_aux, has_aux=True),
                          static_argnames="config")


def run(outputs, batch, config):
  """(loss, metrics, d loss / d outputs) of one jitted call."""
  (loss, metrics), grads = _value_and_grad(outputs, batch, config=config)
  return loss, metrics, grads


CFG = omni_loss_lib.LossConfig()
# The non-default options in one config (one compile): the phrase-only
# grounding softmax only changes grd terms, max pooling only img terms.
ALT = omni_loss_lib.LossConfig(grd_softmax="phrases", img_region_pool="max",
                               img_region_neg_weight=0.3)


MAXSIZE = omni_loss_lib.LossConfig(img_maxsize_weight=1.0, img_image_weight=0.0,
                                   img_region_weight=0.0,
                                   img_maxsize_min_objectness=0.5,
                                   img_maxsize_warmup_steps=100)


def maxsize_scene(batch):
  """`scene_outputs`, with box sizes: the background patch 0 (huge STAR,
  an untrusted token: no objectness) is the largest box, then the blue
  circle 3 (CIRCLE high), the red circle 1, the red star 2."""
  out, col = scene_outputs(batch)
  wh = {0: 0.6, 1: 0.2, 2: 0.1, 3: 0.3, 4: 0.05, 5: 0.05}
  for n, side in wh.items():
    out["pred_boxes"][1, n] = [0.5, 0.5, side, side]
  return out, col


def test_maxsize_gives_the_caption_to_the_largest_proposal():
  batch = phrase_batch()  # caption RED STAR CIRCLE; trusted RED CIRCLE DOG
  out, col = maxsize_scene(batch)
  _, m, grads = run_at(out, batch, MAXSIZE)
  assert m["img/maxsize_chosen"] == 1
  g = np.asarray(grads["pred_logits"][1])
  # Patch 3 (the largest with a trusted token >= 0.5): every caption token
  # up, the other candidates (DOG, BLUE) down; nothing elsewhere.
  assert np.all(g[3, [col[RED], col[STAR], col[CIRCLE]]] < 0)
  assert np.all(g[3, [col[DOG], col[BLUE]]] > 0)
  assert np.all(np.delete(g, 3, axis=0) == 0)
  assert np.all(np.asarray(grads["pred_boxes"][1]) == 0)  # no box loss
  # By hand: the focal loss of patch 3 / 1 chosen example.
  valid = batch["candidates"][1] > 0
  lg = np.where(valid, out["pred_logits"][1, 3], 0.0)
  t = np.isin(batch["candidates"][1], [RED, STAR, CIRCLE]).astype(float)
  p = 1 / (1 + np.exp(-lg))
  ce = t * np.logaddexp(0, -lg) + (1 - t) * np.logaddexp(0, lg)
  pt = t * p + (1 - t) * (1 - p)
  focal = (t * 0.25 + (1 - t) * 0.75) * (1 - pt)**2 * ce
  np.testing.assert_allclose(m["img/maxsize"], focal[valid].sum(), rtol=1e-5)
  # Shrink the blue circle: the red circle (patch 1) is now the largest.
  out["pred_boxes"][1, 3, 2:] = 0.15
  g = np.asarray(run_at(out, batch, MAXSIZE)[2]["pred_logits"][1])
  assert g[1, col[STAR]] < 0 and np.all(np.delete(g, 1, axis=0) == 0)


def test_maxsize_gates_warmup_and_no_proposal_and_leaves_det_alone():
  batch = phrase_batch()
  out, _ = maxsize_scene(batch)
  _, m, g = run_at(out, batch, MAXSIZE, step=99)  # before the warm-up
  assert m["img/maxsize_chosen"] == 0 and m["img/maxsize"] == 0
  assert np.all(np.asarray(g["pred_logits"][1]) == 0)
  strict = dataclasses.replace(MAXSIZE, img_maxsize_min_objectness=0.99)
  _, m, g = run_at(out, batch, strict)  # no prediction is a proposal
  assert m["img/maxsize_chosen"] == 0 and m["img/maxsize"] == 0
  assert np.all(np.asarray(g["pred_logits"][1]) == 0)
  off = dataclasses.replace(MAXSIZE, img_maxsize_weight=0.0)
  _, m_on, g_on = run_at(out, batch, MAXSIZE)
  _, m_off, g_off = run_at(out, batch, off)
  assert "img/maxsize" not in m_off
  for k in m_off:
    if k != "loss":
      np.testing.assert_allclose(m_on[k], m_off[k], rtol=1e-6, err_msg=k)
  for key in g_on:  # the det example's gradients are the same
    np.testing.assert_array_equal(np.asarray(g_on[key])[0],
                                  np.asarray(g_off[key])[0])


def test_maxsize_is_permutation_invariant_and_finite_when_empty():
  batch = phrase_batch()
  out = random_outputs(batch, seed=15, scale=1.0)
  _, m1, _ = run_at(out, batch, MAXSIZE)
  assert m1["img/maxsize_chosen"] == 1
  perm = np.random.default_rng(2).permutation(N)
  permuted = {k: v[:, perm] if v.ndim == 3 else v for k, v in out.items()}
  _, m2, _ = run_at(permuted, batch, MAXSIZE)
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)
  empty = make_batch(make_example("det"), make_example("img"),
                     make_example("img", caption=[DOG], candidates=[DOG]))
  loss, m, grads = run_at(random_outputs(empty, seed=16), empty, MAXSIZE)
  assert np.isfinite(loss) and m["img/maxsize_chosen"] == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(grads))
  for bad in (dict(img_maxsize_weight=-1.0),
              dict(img_maxsize_min_objectness=2.0)):
    with pytest.raises(ValueError, match="img_maxsize"):
      omni_loss_lib.LossConfig(**bad)


def make_example(stream, boxes=(), box_tokens=(), phrase_ids=None,
                 caption=(), candidates=(), known=(), bg=()):
  """One example following schema.py, padded to SPEC.

  Args:
    stream: "det" | "grd" | "img".
    boxes: cxcywh boxes.
    box_tokens: one list of token ids per box.
    phrase_ids: one id per box (default 0..n-1).
    caption: caption token ids.
    candidates: candidate token ids (padded with 0 to Q).
    known: candidate ids in cand_known.
    bg: candidate ids in cand_bg.

  Returns:
    dict of numpy arrays, the example and its candidate fields.
  """
  ex = schema.empty_example(SPEC, stream)
  n = len(boxes)
  ex["boxes"][:n] = np.asarray(boxes, np.float32).reshape(n, 4)
  ex["box_mask"][:n] = True
  for i, toks in enumerate(box_tokens):
    ex["box_tokens"][i, :len(toks)] = toks
  ex["phrase_ids"][:n] = np.arange(n) if phrase_ids is None else phrase_ids
  ex["caption_tokens"][:len(caption)] = caption
  cand = np.zeros(Q, np.int32)
  cand[:len(candidates)] = candidates
  ex["candidates"] = cand
  ex["cand_known"] = np.isin(cand, list(known)) & (cand > 0)
  ex["cand_bg"] = np.isin(cand, list(bg)) & (cand > 0)
  return ex


def make_batch(*examples):
  """Stacks examples, padded to B with empty (all-padding) img examples."""
  examples = list(examples) + [make_example("img")] * (B - len(examples))
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def random_outputs(batch, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  b = batch["stream"].shape[0]
  cxcy = rng.uniform(0.2, 0.8, (b, N, 2))
  wh = rng.uniform(0.05, 0.4, (b, N, 2))
  logits = scale * rng.normal(size=(b, N, Q))
  image_logits = scale * rng.normal(size=(b, Q))
  pad = batch["candidates"] == 0
  # As the model does: pad candidates get a large negative logit.
  logits = np.where(pad[:, None, :], -1e9, logits)
  image_logits = np.where(pad, -1e9, image_logits)
  return {
      "pred_boxes": np.concatenate([cxcy, wh], -1).astype(np.float32),
      "pred_logits": logits.astype(np.float32),
      "image_logits": image_logits.astype(np.float32),
  }


def det_example():
  return make_example(
      "det",
      boxes=[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]],
      box_tokens=[[DOG], [RED, CIRCLE]],
      candidates=[DOG, RED, CIRCLE, CAT, SKY, BLUE, STAR],
      known=[DOG, RED, CIRCLE, CAT, SKY],  # STAR, BLUE: unknown to matched
      bg=[DOG, RED, CIRCLE, CAT, BLUE])  # SKY: not exhaustive


def grd_example():
  return make_example(
      "grd",
      boxes=[[0.25, 0.5, 0.2, 0.4], [0.75, 0.5, 0.2, 0.4]],
      box_tokens=[[MAN, LEFT], [MAN, RIGHT]],
      phrase_ids=[0, 1],
      caption=[MAN, LEFT, MAN, RIGHT],
      candidates=[MAN, LEFT, RIGHT, DOG, SKY])


def img_example():
  return make_example("img", caption=[RED, STAR, BLUE],
                      candidates=[RED, STAR, BLUE, DOG, CAT, SKY])


def mixed_batch():
  return make_batch(det_example(), grd_example(), img_example())


def perfect_outputs(batch, seed=0):
  """Random logits; the first k boxes equal the k targets, the rest far."""
  out = random_outputs(batch, seed)
  for b in range(batch["stream"].shape[0]):
    k = int(batch["box_mask"][b].sum())
    out["pred_boxes"][b, :k] = batch["boxes"][b, :k]
    # Other predictions are far away (tiny boxes in a corner).
    out["pred_boxes"][b, k:] = [0.02, 0.02, 0.01, 0.01]
  return out


def test_perfect_prediction_has_zero_box_loss():
  batch = mixed_batch()
  _, metrics, _ = run(perfect_outputs(batch), batch, CFG)
  for key in ("det/l1", "det/giou", "grd/l1", "grd/giou"):
    assert abs(float(metrics[key])) < 1e-5, (key, metrics[key])
  assert metrics["det/num_targets"] == 2
  assert metrics["grd/num_targets"] == 2
  assert metrics["img/num_targets"] == 1
  # A wrong box is not free.
  out = perfect_outputs(batch)
  out["pred_boxes"][0, 0] = [0.5, 0.5, 0.1, 0.1]
  _, metrics, _ = run(out, batch, CFG)
  assert metrics["det/l1"] > 0.1 and metrics["det/giou"] > 0.1


def test_permuting_predictions_leaves_loss_unchanged():
  batch = mixed_batch()
  out = random_outputs(batch, seed=1)
  perm = np.random.default_rng(0).permutation(N)
  permuted = {k: v[:, perm] if v.ndim == 3 else v for k, v in out.items()}
  _, m1, _ = run(out, batch, CFG)
  _, m2, _ = run(permuted, batch, CFG)
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_unmatched_grounding_predictions_get_no_token_loss():
  batch = make_batch(grd_example())
  out = perfect_outputs(batch)
  loss, metrics, grads = run(out, batch, CFG)
  assert metrics["grd/token"] > 0
  # Predictions 2.. are unmatched (far boxes): their logits do not matter.
  changed = {k: v.copy() for k, v in out.items()}
  changed["pred_logits"][0, 2:, :5] = np.random.default_rng(3).normal(
      0, 10, (N - 2, 5))
  loss2, _, _ = run(changed, batch, CFG)
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)
  assert np.all(grads["pred_logits"][0, 2:] == 0)
  assert np.any(grads["pred_logits"][0, :2] != 0)


def test_grounding_softmax_candidates():
  batch = make_batch(grd_example())
  out = perfect_outputs(batch)
  cand = list(batch["candidates"][0])
  valid = batch["candidates"][0] > 0
  # "phrases": only the image's phrase tokens (man, left, right) compete.
  grads = run(out, batch, ALT)[2]["pred_logits"][0]
  in_phrases = np.isin(cand, [MAN, LEFT, RIGHT])
  assert np.all(grads[:2, ~in_phrases] == 0)
  assert np.all(grads[:2, in_phrases] != 0)
  # The disambiguation signal: the left box is pushed down on `right`.
  assert grads[0, cand.index(RIGHT)] > 0
  assert grads[0, cand.index(LEFT)] < 0
  # "candidates" (default): every valid candidate competes, pads never.
  grads = run(out, batch, CFG)[2]["pred_logits"][0]
  assert np.all(grads[:2, valid] != 0)
  assert np.all(grads[:, ~valid] == 0)
  assert grads[0, cand.index(DOG)] > 0


def test_grounding_token_loss_by_hand():
  batch = make_batch(grd_example())
  out = perfect_outputs(batch)
  _, metrics, _ = run(out, batch, CFG)
  logits = out["pred_logits"][0, :2, :5].astype(np.float64)  # 5 valid cands
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  # Box 0 = {man, left} (cands 0, 1), box 1 = {man, right} (cands 0, 2).
  expected = -(0.5 * (logp[0, 0] + logp[0, 1]) + 0.5 *
               (logp[1, 0] + logp[1, 2])) / 2
  np.testing.assert_allclose(metrics["grd/token"], expected, rtol=1e-5)


@pytest.mark.parametrize("form", ["per_positive", "focal"])
def test_grounding_token_loss_forms(form):
  """The other grd token losses: only grd terms change, the disambiguation
  signal stays, every positive is pulled up, permutations and empty batches
  are safe."""
  config = omni_loss_lib.LossConfig(grd_token_loss=form)
  mixed = mixed_batch()
  out = random_outputs(mixed, seed=6)
  _, m_default, _ = run(out, mixed, CFG)
  _, m_form, _ = run(out, mixed, config)
  for k in m_default:
    if k.startswith(("det/", "img/")) or k == "grd/num_targets":
      np.testing.assert_allclose(m_form[k], m_default[k], rtol=1e-6,
                                 err_msg=k)
  assert m_form["grd/token"] != m_default["grd/token"]
  perm = np.random.default_rng(0).permutation(N)
  permuted = {k: v[:, perm] if v.ndim == 3 else v for k, v in out.items()}
  _, m_perm, _ = run(permuted, mixed, config)
  for k in m_form:
    np.testing.assert_allclose(m_perm[k], m_form[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)
  # Box 0 = {man, left}, box 1 = {man, right}: box 0's prediction goes up
  # on man and left, down on right and on the other candidates.
  batch = make_batch(grd_example())
  grads = run(perfect_outputs(batch), batch, config)[2]["pred_logits"][0]
  cand = list(batch["candidates"][0])
  valid = batch["candidates"][0] > 0
  assert grads[0, cand.index(MAN)] < 0 and grads[0, cand.index(LEFT)] < 0
  assert grads[0, cand.index(RIGHT)] > 0 and grads[0, cand.index(DOG)] > 0
  assert np.all(grads[:, ~valid] == 0) and np.all(grads[2:] == 0)
  empty = make_batch(make_example("det"), make_example("grd"),
                     make_example("img"))
  loss, metrics, g = run(random_outputs(empty, seed=8), empty, config)
  assert loss == 0 and all(np.isfinite(v) for v in metrics.values())
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))


def test_det_negatives_follow_cand_known_and_cand_bg():
  batch = make_batch(det_example())
  out = perfect_outputs(batch)
  grads = run(out, batch, CFG)[2]["pred_logits"][0]  # [N, Q]
  cand = list(batch["candidates"][0])
  idx = {t: cand.index(t) for t in (DOG, RED, CIRCLE, CAT, SKY, BLUE, STAR)}
  # Matched prediction 0 (dog box): positive on dog, negative on known others.
  assert grads[0, idx[DOG]] < 0
  for t in (RED, CIRCLE, CAT, SKY):
    assert grads[0, idx[t]] > 0, t
  for t in (BLUE, STAR):  # Not in cand_known: no signal for a matched box.
    assert grads[0, idx[t]] == 0, t
  # Matched prediction 1 (red circle box): positive on both of its tokens.
  assert grads[1, idx[RED]] < 0 and grads[1, idx[CIRCLE]] < 0
  # Unmatched predictions: negative on cand_bg only (not on SKY, STAR).
  for t in (DOG, RED, CIRCLE, CAT, BLUE):
    assert np.all(grads[2:, idx[t]] > 0), t
  for t in (SKY, STAR):
    assert np.all(grads[2:, idx[t]] == 0), t
  assert np.all(grads[:, 7] == 0)  # Padding candidate.


def test_det_token_loss_by_hand():
  batch = make_batch(det_example())
  out = perfect_outputs(batch)
  _, metrics, _ = run(out, batch, CFG)
  x = out["pred_logits"][0, :, :7].astype(np.float64)  # [N, 7 valid]
  p = 1 / (1 + np.exp(-x))
  a, g = CFG.focal_alpha, CFG.focal_gamma
  pos_loss = -a * (1 - p)**g * np.log(p)
  neg_loss = -(1 - a) * p**g * np.log(1 - p)
  known = batch["cand_known"][0, :7]
  bg = batch["cand_bg"][0, :7]
  target = np.zeros((N, 7), bool)
  target[0, 0] = True  # dog
  target[1, 1:3] = True  # red, circle
  weight = np.zeros((N, 7), bool)
  weight[:2] = known | target[:2]
  weight[2:] = bg
  expected = np.where(weight, np.where(target, pos_loss, neg_loss), 0).sum()
  np.testing.assert_allclose(metrics["det/token"], expected / 2, rtol=1e-5)


def _np_log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _np_softplus(v):
  return np.logaddexp(0.0, v)


def test_img_loss_equals_numpy_cross_entropy():
  batch = make_batch(img_example())
  out = random_outputs(batch, seed=4)
  loss, metrics, _ = run(out, batch, CFG)
  logp = _np_log_softmax(out["image_logits"][0, :6].astype(np.float64))
  expected = -logp[:3].mean()  # Caption {red, star, blue} = candidates 0..2.
  np.testing.assert_allclose(metrics["img/image"], expected, rtol=1e-5)
  # Default region term: tau * logsumexp over patches, tau = 1.
  s = out["pred_logits"][0, :, :6].astype(np.float64)  # [N, 6 valid]
  pooled = np.log(np.exp(s).sum(0))
  region = _np_softplus(-pooled[:3]).mean() + _np_softplus(pooled[3:]).mean()
  np.testing.assert_allclose(metrics["img/region"], region, rtol=1e-5)
  np.testing.assert_allclose(loss, expected + region, rtol=1e-5)


def test_img_region_max_pooling_by_hand():
  batch = make_batch(img_example())
  out = random_outputs(batch, seed=5)
  _, metrics, grads = run(out, batch, ALT)
  s = out["pred_logits"][0, :, :6].astype(np.float64)  # [N, 6 valid]
  pooled = s.max(0)
  expected = (_np_softplus(-pooled[:3]).mean() +
              0.3 * _np_softplus(pooled[3:]).mean())
  np.testing.assert_allclose(metrics["img/region"], expected, rtol=1e-5)
  # The term reaches the patches: only the best patch per token moves.
  g = grads["pred_logits"][0, :, :6]
  best = s.argmax(0)
  assert np.all(g[best[:3], np.arange(3)] < 0)  # Caption tokens pulled up.
  assert np.all(g[best[3:], np.arange(3, 6)] > 0)  # Absent tokens pushed down.
  assert np.count_nonzero(g) == 6


def mixed_batch_example(i):
  return (det_example, grd_example, img_example)[i]()


def test_streams_do_not_interact():
  mixed = mixed_batch()
  out = random_outputs(mixed, seed=6)
  _, m_mixed, _ = run(out, mixed, CFG)
  for i, stream in enumerate(schema.STREAMS):
    # The same example alone (other slots padding) gives the same terms;
    # absent streams give exactly 0.
    alone = make_batch(*[mixed_batch_example(i) if j == i else
                         make_example(schema.STREAMS[j]) for j in range(B)])
    _, m_alone, _ = run(out, alone, CFG)
    for k in m_mixed:
      if k.startswith(stream + "/"):
        np.testing.assert_allclose(m_alone[k], m_mixed[k], rtol=1e-5,
                                   err_msg=k)
      elif k != "loss":
        assert m_alone[k] == 0, (stream, k, m_alone[k])


def test_changing_one_stream_leaves_others_unchanged():
  batch = mixed_batch()
  out = random_outputs(batch, seed=7)
  _, m1, _ = run(out, batch, CFG)
  changed = {k: v.copy() for k, v in out.items()}
  changed["pred_logits"][2, :, :6] += 3.0  # The img example's predictions.
  changed["pred_boxes"][2] = 0.5
  changed["image_logits"][2, :6] *= -1
  _, m2, _ = run(changed, batch, CFG)
  for k in m1:
    if k.startswith(("det/", "grd/")):
      np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6, err_msg=k)
  assert m1["img/image"] != m2["img/image"]


def test_finite_gradients_with_empty_targets_and_padding_candidates():
  empty = make_batch(make_example("det"), make_example("grd"),
                     make_example("img"))
  out = random_outputs(empty, seed=8)  # All candidates pad: logits all -1e9.
  loss, metrics, grads = run(out, empty, CFG)
  assert loss == 0
  assert all(np.isfinite(v) for v in metrics.values())
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # Boxes and captions but no candidates at all; pad logits even -inf and
  # zero-size predicted boxes.
  boxes_only = make_batch(
      make_example("det", boxes=[[0.5, 0.5, 0.2, 0.2]], box_tokens=[[DOG]]),
      make_example("grd", boxes=[[0.5, 0.5, 0.2, 0.2]], box_tokens=[[DOG]]),
      make_example("img", caption=[DOG]))
  out = random_outputs(boxes_only, seed=9)
  out["pred_logits"][:] = -np.inf
  out["image_logits"][:] = -np.inf
  out["pred_boxes"][:, :, 2:] = 0.0
  loss, metrics, grads = run(out, boxes_only, CFG)
  assert np.isfinite(loss) and loss > 0  # The box terms remain.
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_jax_and_scipy_matchers_give_the_same_loss():
  # Every test runs the loss under jit; this one also checks the host-callback
  # matcher against the in-graph one, on random (tie-free) costs.
  batch = mixed_batch()
  out = random_outputs(batch, seed=10)
  jax_loss, m_jax, g_jax = run(out, batch, CFG)
  scipy_loss, m_scipy, g_scipy = run(
      out, batch, dataclasses.replace(CFG, matcher="scipy"))
  for k in m_jax:
    np.testing.assert_allclose(m_jax[k], m_scipy[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(jax_loss, scipy_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_jax), jax.tree.leaves(g_scipy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


_SHARDED_SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from omnitrain_jax.losses import omni_loss_test as t
    from omnitrain_jax.matching import hungarian

    # B = 16 on a data = 8 mesh: 2 examples per device.
    examples = [t.det_example(), t.grd_example(), t.img_example(),
                t.make_example("det"), t.make_example("grd")]
    batch = {k: np.stack([examples[i % 5][k] for i in range(16)])
             for k in examples[0]}
    outputs = t.random_outputs(batch, seed=11)

    seen = []
    host = hungarian._scipy_host
    def spy(cost, num_valid):
      seen.append(np.asarray(cost).shape[0])
      return host(cost, num_valid)
    hungarian._scipy_host = spy

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sh = NamedSharding(mesh, P("data"))
    # matches_per_target > 1 per shard: matching/assignment_test.py.
    cfg = dataclasses.replace(t.CFG, matcher="scipy")
    # Blocking first: the callbacks run when the computation does.
    (loss, metrics), grads = jax.block_until_ready(
        t._value_and_grad(outputs, batch, config=cfg))
    assert seen == [16], seen  # No mesh: today's single callback.
    seen.clear()
    # As the trainer traces its step: inside the mesh, the batch sharded.
    with jax.set_mesh(mesh):
      (s_loss, s_metrics), s_grads = jax.block_until_ready(
          t._value_and_grad(jax.device_put(outputs, sh),
                            jax.device_put(batch, sh), config=cfg))
    assert seen == [2] * 8, seen  # One host call per shard, its own 2.
    assert s_grads["pred_logits"].sharding.spec == P("data")
    # Close, not equal: the batch sums run as all-reduces on the mesh.
    np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
    for key in metrics:
      np.testing.assert_allclose(s_metrics[key], metrics[key], rtol=1e-6,
                                 err_msg=key)
    for key in grads:
      np.testing.assert_allclose(s_grads[key], grads[key], rtol=1e-5,
                                 atol=1e-7, err_msg=key)
    print("OK")
""")


def test_scipy_matcher_under_a_data_mesh_matches_per_shard():
  # Fake devices must be configured before jax starts: own process.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


K2 = dataclasses.replace(CFG, matches_per_target=2)


def test_matches_per_target_matches_k_predictions_per_target():
  batch = make_batch(det_example(), grd_example())
  out = perfect_outputs(batch)
  # Predictions 2, 3 duplicate the two targets exactly; 4, 5 stay far away.
  out["pred_boxes"][:, 2:4] = batch["boxes"][:, :2]
  for cfg in (CFG, K2):
    _, metrics, _ = run(out, batch, cfg)
    for key in ("det/l1", "det/giou", "grd/l1", "grd/giou"):
      assert abs(float(metrics[key])) < 1e-5, (cfg, key, metrics[key])
  # Move duplicate 3 off its target: one-to-one matching ignores it (it is
  # unmatched), two-per-target matching takes it as target 1's second match.
  out["pred_boxes"][:, 3, :2] += 0.05
  _, m1, g1 = run(out, batch, CFG)
  _, m2, g2 = run(out, batch, K2)
  assert abs(float(m1["det/l1"])) < 1e-5
  # Normalized per match: 0.1 of L1 on one of 2 targets x 2 matches.
  np.testing.assert_allclose(m2["det/l1"], 0.1 / 4, rtol=1e-4)
  np.testing.assert_allclose(m2["grd/l1"], 0.1 / 4, rtol=1e-4)
  assert np.all(g1["pred_boxes"][:2, 3] == 0)
  assert np.all(np.any(g2["pred_boxes"][:2, 3] != 0, axis=-1))
  # The far predictions stay unmatched: no box gradient.
  assert np.all(g2["pred_boxes"][:2, 4:] == 0)


def test_matches_per_target_beyond_the_predictions_matches_every_target():
  # 4 targets x 2 > N = 6 predictions: all 6 are matched, every target once.
  boxes = [[0.2, 0.2, 0.1, 0.1], [0.8, 0.2, 0.1, 0.1], [0.2, 0.8, 0.1, 0.1],
           [0.8, 0.8, 0.1, 0.1]]
  ex = make_example("det", boxes=boxes, box_tokens=[[DOG]] * 4,
                    candidates=[DOG, CAT], known=[DOG, CAT], bg=[DOG, CAT])
  batch = make_batch(ex)
  out = random_outputs(batch, seed=4)
  _, metrics, grads = run(out, batch, K2)
  assert np.isfinite(metrics["loss"])
  assert np.all(np.any(grads["pred_boxes"][0] != 0, axis=-1))  # 6 matched
  # Every target is matched once; the N - count spare predictions go to the
  # second copies of the first targets (0 and 1). A perfect prediction of
  # each target plus two near targets 0 and 1: L1 only from those two.
  out["pred_boxes"][0, :4] = boxes
  out["pred_boxes"][0, 4:] = [[0.21, 0.2, 0.1, 0.1], [0.8, 0.21, 0.1, 0.1]]
  _, metrics, _ = run(out, batch, K2)
  np.testing.assert_allclose(metrics["det/l1"], 0.02 / 8, rtol=1e-3)


def test_config_from_config_dict_and_errors():
  cfg = omni_loss_lib.LossConfig.from_config(ml_collections.ConfigDict(
      {"focal_alpha": 0.3, "matcher": "scipy"}))
  assert cfg.focal_alpha == 0.3 and cfg.matcher == "scipy"
  assert cfg.cost_l1 == 5.0
  assert omni_loss_lib.LossConfig.from_config(None) == CFG
  with pytest.raises(ValueError, match="focal_alpah"):
    omni_loss_lib.LossConfig.from_config({"focal_alpah": 0.3})
  with pytest.raises(ValueError, match="matcher"):
    omni_loss_lib.LossConfig(matcher="hungarian")
  with pytest.raises(ValueError, match="img_region_pool"):
    omni_loss_lib.LossConfig(img_region_pool="mean")
  with pytest.raises(ValueError, match="grd_token_loss.*per_positive"):
    omni_loss_lib.LossConfig(grd_token_loss="sigmoid")
  with pytest.raises(ValueError, match="matches_per_target"):
    omni_loss_lib.LossConfig(matches_per_target=0)


def test_shape_mismatch_raises():
  batch = make_batch(det_example())
  out = random_outputs(batch)
  out["pred_logits"] = out["pred_logits"][:, :, :5]
  with pytest.raises(ValueError, match="candidates"):
    omni_loss_lib.omni_loss(out, batch, CFG)


# ---- img phrase matching (LossConfig.img_phrase_weight > 0). ----

# Only the phrase term reaches img predictions (image and region terms off),
# so an img logit's gradient shows exactly which patch was matched.
PHRASE = omni_loss_lib.LossConfig(img_phrase_weight=1.0, img_image_weight=0.0,
                                  img_region_weight=0.0,
                                  img_phrase_min_trusted_prob=0.3,
                                  img_phrase_warmup_steps=100)
NO_PHRASE = dataclasses.replace(PHRASE, img_phrase_weight=0.0)
UNMATCHED = dataclasses.replace(PHRASE, img_phrase_unmatched_weight=0.5)

_value_and_grad_at = jax.jit(
    jax.value_and_grad(
        lambda o, b, config, step: omni_loss_lib.omni_loss(o, b, config, step),
        has_aux=True),
    static_argnames="config")


def run_at(outputs, batch, config, step=1000):
  (loss, metrics), grads = _value_and_grad_at(outputs, batch, config=config,
                                              step=jnp.int32(step))
  return loss, metrics, grads


def with_phrases(ex, phrases):
  """Sets an example's phrase fields from [(token ids, count), ...]."""
  ex = dict(ex)
  ex["phrase_tokens"] = np.zeros_like(ex["phrase_tokens"])
  ex["phrase_counts"] = np.zeros_like(ex["phrase_counts"])
  for i, (toks, count) in enumerate(phrases):
    ex["phrase_tokens"][i, :len(toks)] = toks
    ex["phrase_counts"][i] = count
  return ex


def phrase_batch(phrases=(([RED, STAR], 1), ([RED, CIRCLE], 1))):
  """det boxes RED CIRCLE and DOG (trusted: RED, CIRCLE, DOG); an img caption
  "a red star and a red circle" whose STAR no box ever carried."""
  det = make_example("det", boxes=[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]],
                     box_tokens=[[RED, CIRCLE], [DOG]],
                     candidates=[RED, CIRCLE, DOG, STAR, BLUE],
                     known=[RED, CIRCLE, DOG], bg=[RED, CIRCLE, DOG])
  img = with_phrases(
      make_example("img", caption=[RED, STAR, CIRCLE],
                   candidates=[RED, STAR, CIRCLE, DOG, BLUE]), phrases)
  return make_batch(det, img)


def scene_outputs(batch):
  """img patches: 0 background with a huge STAR logit (an untrained token
  that must not steer its match), 1 a red circle, 2 a red star (RED high,
  no known shape), 3 a blue circle; 4, 5 background."""
  out = random_outputs(batch, seed=11, scale=0.1)
  lo, hi = -4.0, 3.0
  cand = list(batch["candidates"][1])
  col = {t: cand.index(t) for t in (RED, STAR, CIRCLE, DOG, BLUE)}
  logits = out["pred_logits"]
  logits[1, :, [col[t] for t in col]] = lo
  logits[1, 0, col[STAR]] = 8.0
  logits[1, 1, [col[RED], col[CIRCLE]]] = hi
  logits[1, 1, col[RED]] = hi + 0.5  # The reddest patch is the circle.
  logits[1, 2, col[RED]] = hi
  logits[1, 3, [col[BLUE], col[CIRCLE]]] = hi
  return out, col


@pytest.mark.parametrize("form", ["sum", "product"])
def test_phrase_matching_picks_the_unexplained_object(form):
  config = dataclasses.replace(PHRASE, img_phrase_cost=form)
  batch = phrase_batch()
  out, col = scene_outputs(batch)
  _, m, grads = run_at(out, batch, config)
  assert m["img/phrase_instances"] == 2 and m["img/phrase_matches"] == 2
  g = np.asarray(grads["pred_logits"][1])  # [N, Q]
  # "a red star" -> patch 2 (not 0, whose STAR is untrusted; not 1, which
  # CIRCLE explains): STAR pushed up there only.
  assert g[2, col[STAR]] < 0
  assert np.all(g[[0, 3, 4, 5], col[STAR]] == 0)
  # "a red circle" -> patch 1: CIRCLE up on 1, down on 2 (the caption's
  # other token at the star); STAR down on 1. Nothing on 0, 3, 4, 5.
  assert g[1, col[CIRCLE]] < 0 and g[2, col[CIRCLE]] > 0
  assert g[1, col[STAR]] > 0
  assert np.all(g[[0, 3, 4, 5]] == 0)
  # Negatives are the caption's tokens only (DOG, BLUE: not in the caption).
  assert np.all(g[:, [col[DOG], col[BLUE]]] == 0)
  # The term by hand: focal loss of the two matched patches / 2 matches.
  cand_valid = batch["candidates"][1] > 0
  def focal(x, t):
    p = 1 / (1 + np.exp(-x))
    ce = t * np.logaddexp(0, -x) + (1 - t) * np.logaddexp(0, x)
    pt = t * p + (1 - t) * (1 - p)
    return (t * 0.25 + (1 - t) * 0.75) * (1 - pt)**2 * ce
  lg = np.where(cand_valid, out["pred_logits"][1], 0.0)
  want = (focal(lg[2, col[RED]], 1) + focal(lg[2, col[STAR]], 1) +
          focal(lg[2, col[CIRCLE]], 0) + focal(lg[1, col[RED]], 1) +
          focal(lg[1, col[CIRCLE]], 1) + focal(lg[1, col[STAR]], 0)) / 2
  np.testing.assert_allclose(m["img/phrase"], want, rtol=1e-5)
  # "a red star" alone: the reddest patch is the red circle, but CIRCLE (a
  # det token outside the phrase) explains it; the star patch wins.
  _, m, grads = run_at(out, phrase_batch((([RED, STAR], 1),)), config)
  g = np.asarray(grads["pred_logits"][1])
  assert m["img/phrase_matches"] == 1
  assert g[2, col[STAR]] < 0 and np.all(np.delete(g, 2, axis=0) == 0)


def test_phrase_negatives_caption_plus_det_adds_the_batch_det_tokens():
  batch = phrase_batch()
  out, col = scene_outputs(batch)
  _, m0, grads0 = run_at(out, batch, PHRASE)
  config = dataclasses.replace(PHRASE, img_phrase_negatives="caption+det")
  _, m1, grads1 = run_at(out, batch, config)
  g0 = np.asarray(grads0["pred_logits"][1])
  g1 = np.asarray(grads1["pred_logits"][1])
  # Same matches; DOG (a det box token of the batch, not in the caption)
  # becomes a negative of both matched patches, BLUE (no box's) does not.
  assert m1["img/phrase_matches"] == m0["img/phrase_matches"] == 2
  assert np.all(g0[:, col[DOG]] == 0)
  assert g1[1, col[DOG]] > 0 and g1[2, col[DOG]] > 0
  assert np.all(g1[[0, 3, 4, 5]] == 0) and np.all(g1[:, col[BLUE]] == 0)
  # The phrase's own tokens keep their sign (RED is a det token too).
  for patch, toks in ((2, (RED, STAR)), (1, (RED, CIRCLE))):
    for t in toks:
      assert g1[patch, col[t]] < 0
  # The caption's tokens get the same gradient as without the option.
  caption_cols = [col[RED], col[STAR], col[CIRCLE]]
  np.testing.assert_allclose(g1[:, caption_cols], g0[:, caption_cols],
                             rtol=1e-5)
  # The det example is untouched.
  np.testing.assert_array_equal(np.asarray(grads0["pred_logits"][0]),
                                np.asarray(grads1["pred_logits"][0]))


def test_unmatched_negatives_on_a_fully_explained_caption():
  batch = phrase_batch()
  out, col = scene_outputs(batch)
  _, m0, grads0 = run_at(out, batch, PHRASE)
  loss1, m1, grads1 = run_at(out, batch, UNMATCHED)
  assert m1["img/phrase_matches"] == 2 and m1["img/phrase_explained"] == 1
  g0 = np.asarray(grads0["pred_logits"][1])
  g1 = np.asarray(grads1["pred_logits"][1])
  caption_cols = [col[RED], col[STAR], col[CIRCLE]]
  other = [0, 3, 4, 5]  # The unmatched patches.
  # Matched patches keep their phrase gradients; every unmatched one is
  # pushed down on each caption token (the background STAR spike, and
  # CIRCLE on the blue circle the caption does not name), on nothing else.
  np.testing.assert_allclose(g1[[1, 2]], g0[[1, 2]], rtol=1e-5)
  assert np.all(g0[other] == 0)
  assert np.all(g1[np.ix_(other, caption_cols)] > 0)
  assert np.all(g1[:, [col[DOG], col[BLUE]]] == 0)
  # By hand: focal(x, 0) over unmatched patches and caption tokens / 2
  # matches; in the loss x img_phrase_weight x the unmatched weight.
  cand_valid = batch["candidates"][1] > 0
  lg = np.where(cand_valid, out["pred_logits"][1], 0.0)
  x = lg[np.ix_(other, caption_cols)]
  p = 1 / (1 + np.exp(-x))
  want = np.sum(0.75 * p**2 * np.logaddexp(0, x)) / 2
  np.testing.assert_allclose(m1["img/phrase_unmatched"], want, rtol=1e-5)
  loss0, _, _ = run_at(out, batch, PHRASE)
  np.testing.assert_allclose(loss1 - loss0, 0.5 * want, rtol=1e-4)
  # The det example is untouched.
  np.testing.assert_array_equal(np.asarray(grads0["pred_logits"][0]),
                                np.asarray(grads1["pred_logits"][0]))


def test_unmatched_negatives_need_every_named_instance_matched():
  batch = phrase_batch()
  out, col = scene_outputs(batch)
  cases = (
      # Before the warm-up nothing is matched.
      (batch, out, 99),
      # "a star" has no trusted token, so no instance: the star object is
      # unaccounted for.
      (phrase_batch((([STAR], 1), ([RED, CIRCLE], 1))), out, 1000),
      # Two red circles named, one kept match (the second is gated).
      (phrase_batch((([RED, CIRCLE], 2),)), out, 1000),
  )
  for b, o, step in cases:
    _, m0, g0 = run_at(o, b, PHRASE, step=step)
    _, m1, g1 = run_at(o, b, UNMATCHED, step=step)
    assert m1["img/phrase_explained"] == 0
    assert m1["img/phrase_unmatched"] == 0
    np.testing.assert_array_equal(np.asarray(g1["pred_logits"]),
                                  np.asarray(g0["pred_logits"]))
  # A count above the instance cap cannot be fully explained either.
  capped = dataclasses.replace(UNMATCHED, img_phrase_max_instances=1)
  _, m, _ = run_at(out, phrase_batch((([RED, CIRCLE], 2),)), capped)
  assert m["img/phrase_matches"] == 1 and m["img/phrase_explained"] == 0
  # The same caption with one red circle is explained.
  _, m, _ = run_at(out, phrase_batch((([RED, CIRCLE], 1),)), UNMATCHED)
  assert m["img/phrase_explained"] == 1 and m["img/phrase_unmatched"] > 0


def test_phrase_matching_gates_warmup_untrusted_and_low_probability():
  batch = phrase_batch()
  out, col = scene_outputs(batch)
  _, m, g = run_at(out, batch, PHRASE, step=99)  # Before the warm-up.
  assert m["img/phrase_instances"] == 0 and m["img/phrase"] == 0
  assert np.all(np.asarray(g["pred_logits"][1]) == 0)
  # A phrase without a trusted token ("a star") gets no instance; a count
  # lays a phrase out that many times.
  _, m, _ = run_at(out, phrase_batch((([STAR], 1), ([RED, CIRCLE], 2))),
                   PHRASE)
  assert m["img/phrase_instances"] == 2
  # Matches whose trusted tokens are improbable are dropped: the second red
  # circle can only go to a patch where RED or CIRCLE is low.
  assert m["img/phrase_matches"] == 1
  # The red star loses its RED: only the red circle stays matched.
  out["pred_logits"][1, 2, col[RED]] = -4.0
  _, m, g = run_at(out, batch, PHRASE)
  assert m["img/phrase_matches"] == 1
  g = np.asarray(g["pred_logits"][1])
  assert g[1, col[CIRCLE]] < 0 and np.all(g[:, col[STAR]] >= 0)


@pytest.mark.parametrize("config", [PHRASE, UNMATCHED])
def test_phrase_matching_is_permutation_invariant(config):
  batch = phrase_batch(((([RED, STAR], 1), ([RED, CIRCLE], 2),
                         ([BLUE, CIRCLE], 1))))
  out = random_outputs(batch, seed=12, scale=0.5)  # Close costs.
  config = dataclasses.replace(config, img_phrase_min_trusted_prob=0.0)
  _, m1, _ = run_at(out, batch, config)
  assert m1["img/phrase_matches"] == 4
  if config.img_phrase_unmatched_weight:
    assert m1["img/phrase_explained"] == 1 and m1["img/phrase_unmatched"] > 0
  perm = np.random.default_rng(1).permutation(N)
  permuted = {k: v[:, perm] if v.ndim == 3 else v for k, v in out.items()}
  order = [2, 0, 1]
  shuffled = dict(batch)
  for key in ("phrase_tokens", "phrase_counts"):
    shuffled[key] = batch[key].copy()
    shuffled[key][1, :3] = batch[key][1, order]
  _, m2, _ = run_at(permuted, shuffled, config)
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("config", [PHRASE, UNMATCHED])
def test_phrase_matching_leaves_det_and_grd_unchanged(config):
  batch = make_batch(det_example(), grd_example(),
                     with_phrases(img_example(), [([RED, STAR], 1)]))
  out = random_outputs(batch, seed=13)
  _, m_on, g_on = run_at(out, batch, config)
  _, m_off, g_off = run_at(out, batch, NO_PHRASE)
  assert m_on["img/phrase_instances"] == 1  # RED is a det box token here.
  for k in m_off:
    if k == "loss":
      continue
    np.testing.assert_allclose(m_on[k], m_off[k], rtol=1e-6, err_msg=k)
  for key in g_on:  # det and grd examples' gradients are the same (to
    # float rounding: the jitted graphs differ, so may XLA's fusions).
    np.testing.assert_allclose(np.asarray(g_on[key])[:2],
                               np.asarray(g_off[key])[:2], rtol=1e-6,
                               atol=1e-9, err_msg=key)
  # Phrases on det/grd examples (the pipeline leaves them empty) are ignored.
  odd = dict(batch)
  odd["phrase_tokens"] = np.broadcast_to(batch["phrase_tokens"][2],
                                         batch["phrase_tokens"].shape).copy()
  odd["phrase_counts"] = np.broadcast_to(batch["phrase_counts"][2],
                                         batch["phrase_counts"].shape).copy()
  _, m_odd, _ = run_at(out, odd, config)
  for k in m_on:
    np.testing.assert_allclose(m_odd[k], m_on[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("config", [PHRASE, UNMATCHED])
def test_phrase_matching_finite_with_empty_captions_and_no_phrases(config):
  empty = make_batch(make_example("det"), make_example("img"),
                     make_example("img", caption=[DOG], candidates=[DOG]))
  for batch in (empty, phrase_batch(()), phrase_batch((([STAR], 3),))):
    out = random_outputs(batch, seed=14)
    loss, m, grads = run_at(out, batch, config)
    assert np.isfinite(loss)
    assert m["img/phrase"] == 0 and m["img/phrase_matches"] == 0
    assert all(np.isfinite(v) for v in m.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # Default config: no phrase metrics, the loss as before the option.
  _, m, _ = run(random_outputs(empty), empty, CFG)
  assert not any(k.startswith("img/phrase") for k in m)


def test_phrase_config_errors():
  for bad in (dict(img_phrase_weight=-1.0),
              dict(img_phrase_min_trusted_prob=1.5),
              dict(img_phrase_max_instances=0),
              dict(img_phrase_cost="mean"),
              dict(img_phrase_negatives="batch"),
              dict(img_phrase_unmatched_weight=-1.0)):
    with pytest.raises(ValueError, match="img_phrase"):
      omni_loss_lib.LossConfig(**bad)
