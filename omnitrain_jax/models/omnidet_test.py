"""Tests for omnidet.py (tiny models; full size only through jax.eval_shape)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from omnitrain_jax.models import box_bias
from omnitrain_jax.models import omnidet
from omnitrain_jax.models import vit

TINY = dict(variant="Ti/16", image_size=64, vocab_size=50, width=32, depth=2,
            num_heads=2, mlp_dim=64)


def _inputs(batch=2, size=64, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  candidates = np.array([[3, 4, 0, 7, 0], [5, 0, 9, 2, 0]], np.int32)[:batch]
  return jnp.asarray(images), jnp.asarray(candidates)


@functools.lru_cache(maxsize=None)
def _tiny(**overrides):
  model = omnidet.OmniDet(**{**TINY, **overrides})
  images, candidates = _inputs()
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(jax.random.key(0), images, candidates)
  return model, nn.unbox(variables)


def _forward(model, variables, images, candidates, train=False, rngs=None):
  fn = jax.jit(functools.partial(model.apply, train=train))
  return fn(variables, images, candidates, rngs=rngs)


@functools.lru_cache(maxsize=None)
def _tiny_out():
  model, variables = _tiny()
  return _forward(model, variables, *_inputs())


def _vit_backbone_params(width, depth, mlp, patch, grid):
  """Analytic parameter count of the ViT backbone (no classifier head)."""
  block = (2 * 2 * width  # two LayerNorms
           + 4 * (width * width + width)  # q, k, v, out
           + (width * mlp + mlp) + (mlp * width + width))  # MLP
  return (patch * patch * 3 * width + width  # patch embedding
          + width  # cls
          + grid * grid * width  # position embeddings
          + depth * block
          + 2 * width)  # encoder_norm


def test_forward_shapes_masks_and_ranges():
  model, variables = _tiny()
  images, candidates = _inputs()
  out = _tiny_out()
  b, q, n, d = 2, candidates.shape[1], 16, 32
  assert model.num_patches == n and model.grid == 4
  expected = {
      "pred_boxes": (b, n, 4), "pred_logits": (b, n, q),
      "image_logits": (b, q), "class_embeddings": (b, n, d),
      "logit_scale": (b, n), "logit_shift": (b, n), "image_embedding": (b, d),
      "image_scale": (b,), "image_shift": (b,), "candidate_mask": (b, q),
  }
  assert {k: v.shape for k, v in out.items()} == expected
  for k, v in out.items():
    if k != "candidate_mask":
      assert v.dtype == jnp.float32, k
  pad = np.asarray(candidates) == 0
  np.testing.assert_array_equal(out["candidate_mask"], ~pad)
  logits = np.asarray(out["pred_logits"])
  assert np.all(logits[np.broadcast_to(pad[:, None], logits.shape)]
                == omnidet.PAD_LOGIT)
  assert np.all(np.asarray(out["image_logits"])[pad] == omnidet.PAD_LOGIT)
  # Shift starts at the focal prior logit and scale at init_logit_scale.
  np.testing.assert_allclose(out["logit_shift"], np.log(0.01 / 0.99), atol=0.5)
  np.testing.assert_allclose(out["logit_scale"], 10.0, atol=1.0)
  boxes = np.asarray(out["pred_boxes"])
  assert boxes.min() >= 0.0 and boxes.max() <= 1.0
  np.testing.assert_allclose(
      np.linalg.norm(out["class_embeddings"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(
      np.linalg.norm(out["image_embedding"], axis=-1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(out["logit_scale"]) > 0)


def test_initial_boxes_are_the_patch_prior():
  # The box head's last layer is zero at init, so boxes equal the prior; this
  # also pins the patch order (row-major: n = row * grid + col).
  model, _ = _tiny()
  out = _tiny_out()
  g = model.grid
  n = np.arange(g * g)
  expected = np.stack([(n % g + 0.5) / g, (n // g + 0.5) / g,
                       np.full(g * g, 1 / g), np.full(g * g, 1 / g)], -1)
  np.testing.assert_allclose(out["pred_boxes"][1], expected, atol=1e-4)
  np.testing.assert_allclose(
      jax.nn.sigmoid(box_bias.box_bias(g)), expected, atol=1e-4)


def test_logits_equal_token_logits_on_gathered_rows():
  model, variables = _tiny()
  images, candidates = _inputs()
  out = _tiny_out()
  enc = jax.jit(functools.partial(
      model.apply, train=False, method=omnidet.OmniDet.encode))(
          variables, images)
  for k, v in enc.items():
    np.testing.assert_allclose(v, out[k], rtol=1e-6, atol=1e-6, err_msg=k)
  table = variables["params"]["token_embedding"]
  rows = table[candidates]
  rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)  # [B, Q, D]
  emb = model.apply(variables, candidates,
                    method=omnidet.OmniDet.token_embeddings)
  np.testing.assert_allclose(emb, rows, rtol=1e-5, atol=1e-6)
  z, s, t = enc["class_embeddings"], enc["logit_scale"], enc["logit_shift"]
  manual = s[..., None] * np.einsum("bnd,bqd->bnq", z, rows) + t[..., None]
  mask = np.asarray(out["candidate_mask"])[:, None, :]
  np.testing.assert_allclose(np.where(mask, out["pred_logits"], 0),
                             np.where(mask, manual, 0), rtol=1e-5, atol=1e-5)
  # A shared [Q, D] table (chunked full-vocabulary scoring) gives the same.
  shared = omnidet.token_logits(z, s, t, emb[0])
  np.testing.assert_allclose(shared[0][:, mask[0, 0]],
                             out["pred_logits"][0][:, mask[0, 0]], rtol=1e-5)
  image_manual = (enc["image_scale"][:, None]
                  * np.einsum("bd,bqd->bq", enc["image_embedding"], rows)
                  + enc["image_shift"][:, None])
  np.testing.assert_allclose(np.where(mask[:, 0], out["image_logits"], 0),
                             np.where(mask[:, 0], image_manual, 0), rtol=1e-5)


def test_permuting_candidates_permutes_logits():
  model, variables = _tiny()
  images, candidates = _inputs()
  perm = np.array([3, 0, 4, 1, 2])
  out = _tiny_out()
  out_p = _forward(model, variables, images, candidates[:, perm])
  np.testing.assert_allclose(out_p["pred_logits"], out["pred_logits"][..., perm],
                             rtol=1e-6)
  np.testing.assert_allclose(out_p["image_logits"],
                             out["image_logits"][:, perm], rtol=1e-6)
  np.testing.assert_array_equal(out_p["pred_boxes"], out["pred_boxes"])


def test_bfloat16_forward_is_close_to_float32():
  model, variables = _tiny()
  images, candidates = _inputs()
  model_bf16 = omnidet.OmniDet(**TINY, dtype=jnp.bfloat16)
  out32 = _tiny_out()
  out16 = _forward(model_bf16, variables, images, candidates)
  for k in ("pred_boxes", "pred_logits", "image_logits"):
    assert out16[k].dtype == jnp.float32
    assert np.all(np.isfinite(out16[k]))
    np.testing.assert_allclose(out16[k], out32[k], atol=0.1, err_msg=k)
  assert not np.array_equal(out16["pred_logits"], out32["pred_logits"])


def test_remat_gradients_equal_plain_gradients():
  model, variables = _tiny()
  images, candidates = _inputs()

  def loss(m, params):
    out = m.apply({"params": params}, images, candidates, train=False)
    mask = out["candidate_mask"][:, None, :]
    return (jnp.sum(jnp.where(mask, jax.nn.sigmoid(out["pred_logits"]), 0.0))
            + jnp.sum(out["pred_boxes"] ** 2))

  plain = jax.jit(jax.grad(functools.partial(loss, model)))(
      variables["params"])
  for policy in ("dots_with_no_batch_dims_saveable",):
    remat = omnidet.OmniDet(**TINY, remat=True, remat_policy=policy)
    grads = jax.jit(jax.grad(functools.partial(loss, remat)))(
        variables["params"])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        grads, plain)
  # Gradients reach the backbone, the head and the gathered token rows only.
  table_grad = np.asarray(plain["token_embedding"])
  used = np.unique(np.asarray(candidates)[np.asarray(candidates) != 0])
  assert np.all(np.abs(table_grad[used]).sum(-1) > 0)
  unused = np.setdiff1d(np.arange(TINY["vocab_size"]), used)
  assert np.all(table_grad[unused] == 0)  # includes the pad row 0
  assert np.abs(plain["backbone"]["embedding"]["kernel"]).sum() > 0


def test_dropout_and_droppath_need_rng_only_in_train():
  model = omnidet.OmniDet(**TINY, dropout=0.1, droppath=0.2)
  _, variables = _tiny()
  images, candidates = _inputs()
  eval_out = _forward(model, variables, images, candidates)
  np.testing.assert_allclose(eval_out["pred_logits"],
                             _tiny_out()["pred_logits"])
  train_out = _forward(model, variables, images, candidates, train=True,
                       rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(train_out["pred_logits"], eval_out["pred_logits"])


def test_from_config_and_errors():
  cfg = ml_collections.ConfigDict({**TINY, "dtype": "bfloat16"})
  model = omnidet.OmniDet.from_config(cfg)
  assert model.dtype == jnp.bfloat16 and model.width == 32
  with pytest.raises(ValueError, match="widht"):
    omnidet.OmniDet.from_config({**TINY, "widht": 3})
  _, variables = _tiny()
  images, candidates = _inputs()
  with pytest.raises(ValueError, match="image_size=64"):
    omnidet.OmniDet(**TINY).apply(variables, images[:, :32, :32], candidates,
                                  train=False)
  with pytest.raises(ValueError, match="uint8"):
    omnidet.OmniDet(**TINY).apply(variables, images.astype(jnp.float32),
                                  candidates, train=False)
  with pytest.raises(ValueError, match="vocab_size"):
    omnidet.OmniDet(**{**TINY, "vocab_size": 0}).init(
        jax.random.key(0), images, candidates, train=False)
  with pytest.raises(ValueError, match="Unknown attention_impl"):
    omnidet.OmniDet(**TINY, attention_impl="flash").apply(
        variables, images, candidates, train=False)
  with pytest.raises(ValueError, match="Unknown remat_policy"):
    omnidet.OmniDet(**TINY, remat=True, remat_policy="all").apply(
        variables, images, candidates, train=False)
  with pytest.raises(ValueError, match="multiple of the patch"):
    _ = omnidet.OmniDet(**{**TINY, "image_size": 70}).grid


@functools.lru_cache(maxsize=None)
def _abstract_variables(variant, image_size, vocab_size=1000, batch=1, q=8,
                        with_outputs=False):
  model = omnidet.OmniDet(variant=variant, image_size=image_size,
                          vocab_size=vocab_size)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
  candidates = jax.ShapeDtypeStruct((batch, q), jnp.int32)
  init = functools.partial(model.init, train=False)
  variables = jax.eval_shape(init, jax.random.key(0), images, candidates)
  out = None
  if with_outputs:
    out = jax.eval_shape(functools.partial(model.apply, train=False),
                         variables, images, candidates)
  return model, variables, out


def test_eval_shape_b16_at_768():
  model, variables, out = _abstract_variables("B/16", 768, vocab_size=32_000,
                                              batch=2, q=64, with_outputs=True)
  assert model.num_patches == 2304
  assert out["pred_boxes"].shape == (2, 2304, 4)
  assert out["pred_logits"].shape == (2, 2304, 64)
  assert out["class_embeddings"].shape == (2, 2304, 768)
  counts = omnidet.param_counts(variables)
  print("OmniDet B/16 @768, V=32000:", counts)
  assert counts["backbone"] == _vit_backbone_params(768, 12, 3072, 16, 48)
  # The ViT-B/16 of the literature (86M) is the same backbone at 224 px.
  assert counts["backbone"] - (48 ** 2 - 14 ** 2) * 768 == 85_797_888
  assert counts["token_table"] == 32_000 * 768
  # Head: merge LN, box MLP, class projection, scale/shift, image scalars.
  d = 768
  head = 2 * d + (d * d + d) * 2 + (d * 4 + 4) + (d * d + d) + 2 * (d + 1) + 2
  assert counts["head"] == head


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", "B/16", "L/16"])
def test_param_counts_of_variants(variant):
  _, variables, _ = _abstract_variables(variant, 224)
  counts = omnidet.param_counts(variables)
  width, depth, _ = {"Ti/16": (192, 12, 3), "S/16": (384, 12, 6),
                     "B/16": (768, 12, 12), "L/16": (1024, 24, 16)}[variant]
  print(f"OmniDet {variant} @224:", counts)
  assert counts["backbone"] == _vit_backbone_params(width, depth, 4 * width,
                                                    16, 14)


def test_every_parameter_has_logical_axis_names():
  _, variables, _ = _abstract_variables("B/16", 768, vocab_size=32_000,
                                        batch=2, q=64, with_outputs=True)
  specs = nn.get_partition_spec(variables)
  shapes = nn.unbox(variables)
  flat_specs = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = dict(jax.tree_util.tree_leaves_with_path(shapes))
  unnamed = []
  for path, spec in flat_specs:
    shape = flat_shapes[path].shape
    if len(spec) != len(shape) or any(
        size > 1 and name is None for size, name in zip(shape, spec)):
      unnamed.append((jax.tree_util.keystr(path), shape, spec))
  assert not unnamed, unnamed
  # And they are boxed at all (an unboxed leaf would give an empty spec).
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in
             jax.tree_util.tree_leaves(
                 variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))


def test_conv_stem_keeps_the_token_grid_and_is_named_for_sharding():
  model, variables = _tiny(stem="conv")
  out = _forward(model, variables, *_inputs())
  ref = _tiny_out()
  for key in ("pred_boxes", "pred_logits", "image_logits"):
    assert out[key].shape == ref[key].shape, key
    assert np.all(np.isfinite(out[key])), key
  stem = variables["params"]["backbone"]["conv_stem"]
  # Patch 16: four stride-2 convolutions, width 32 -> 4, 8, 16, 32 channels
  # (at least 8), then the 1x1 projection to the width.
  assert [stem[f"conv_{i}"]["kernel"].shape for i in range(4)] == [
      (3, 3, 3, 8), (3, 3, 8, 8), (3, 3, 8, 16), (3, 3, 16, 32)]
  assert stem["embedding"]["kernel"].shape == (1, 1, 32, 32)
  assert "embedding" not in variables["params"]["backbone"]
  # Every stem parameter has a logical axis per dimension.
  boxed = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      *_inputs())
  specs = nn.get_partition_spec(boxed)["params"]["backbone"]["conv_stem"]
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    assert all(name is not None for name in spec), (path, spec)
  with pytest.raises(ValueError, match="power-of-two"):
    vit.ConvStem(32, 14).init(jax.random.key(0), jnp.zeros((1, 56, 56, 3)))
  with pytest.raises(ValueError, match="stem="):
    _tiny(stem="pixels")
