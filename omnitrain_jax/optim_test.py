"""Tests for the optimizer: two learning rates, decay masks, clipping, schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from omnitrain_jax import optim


def _config(**kw):
  c = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, backbone_lr_multiplier=0.1, backbone_regex=r"^backbone/",
      warmup_steps=2, end_lr_factor=0.0, weight_decay=0.0, b1=0.9, b2=0.999,
      eps=1e-8, grad_clip_norm=0.0, no_decay_regex=r"(pos_embedding|cls|norm|bias)"))
  c.update(kw)
  return c


def _params():
  return {"backbone": {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
                       "pos_embedding": jnp.ones((1, 4, 2))},
          "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}


def _one_update(config, grads=None, steps=3):
  params = _params()
  tx, _ = optim.make_optimizer(config, total_steps=10, params=params)
  state = tx.init(params)
  grads = grads or jax.tree.map(jnp.ones_like, params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
  return updates


def test_backbone_gets_lower_learning_rate():
  upd = _one_update(_config())
  ratio = upd["backbone"]["dense"]["kernel"] / upd["head"]["kernel"][:1, :1]
  np.testing.assert_allclose(np.asarray(ratio), 0.1, rtol=1e-5)


def test_zero_multiplier_freezes_backbone():
  upd = _one_update(_config(backbone_lr_multiplier=0.0))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(upd["backbone"]))
  assert np.all(np.asarray(upd["head"]["kernel"]) != 0)


def test_weight_decay_only_on_matrices_outside_no_decay():
  # Zero gradients: the only update is decoupled weight decay.
  zeros = jax.tree.map(jnp.zeros_like, _params())
  upd = _one_update(_config(weight_decay=0.5, backbone_lr_multiplier=1.0), zeros)
  assert np.all(np.asarray(upd["head"]["kernel"]) < 0)
  assert np.all(np.asarray(upd["backbone"]["dense"]["kernel"]) < 0)
  assert np.all(np.asarray(upd["head"]["bias"]) == 0)
  assert np.all(np.asarray(upd["backbone"]["pos_embedding"]) == 0)


def test_global_norm_clipping_applies_before_adam():
  # With a large eps Adam is not scale invariant, so clipping is visible:
  # huge gradients must give exactly the update of the pre-clipped gradients.
  params = _params()
  config = _config(grad_clip_norm=1.0, eps=1.0, warmup_steps=0)
  tx, _ = optim.make_optimizer(config, 10, params)
  huge = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), params)
  pre = jax.tree.map(lambda g: g / optim.optax.global_norm(huge), huge)
  upd_huge, _ = tx.update(huge, tx.init(params), params)
  upd_pre, _ = tx.update(pre, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(upd_huge), jax.tree.leaves(upd_pre)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
  tx_noclip, _ = optim.make_optimizer(_config(eps=1.0, warmup_steps=0), 10, params)
  upd_noclip, _ = tx_noclip.update(huge, tx_noclip.init(params), params)
  assert not np.allclose(np.asarray(upd_noclip["head"]["kernel"]),
                         np.asarray(upd_pre["head"]["kernel"]))


def test_schedule_warmup_then_cosine_to_end():
  sched = optim.make_schedule(_config(end_lr_factor=0.1), total_steps=100)
  assert float(sched(0)) == 0.0
  assert abs(float(sched(2)) - 1e-2) < 1e-8
  assert abs(float(sched(100)) - 1e-3) < 1e-8
  assert float(sched(50)) < 1e-2


def test_regex_matching_nothing_is_a_clear_error():
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(_config(backbone_regex="^nope/"), 10, _params())
