"""Tests for pretrained.py: AugReg and big_vision layouts, resizing, errors."""

import functools

import flax
from flax.core import meta
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnitrain_jax.models import pretrained
from omnitrain_jax.models import omnidet
from omnitrain_jax.models import vit

TINY = dict(variant="Ti/16", vocab_size=20, width=32, depth=2, num_heads=2,
            mlp_dim=64)


@functools.lru_cache(maxsize=None)
def _init_fn(image_size, depth):
  model = omnidet.OmniDet(**{**TINY, "depth": depth}, image_size=image_size)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
  candidates = jnp.ones((1, 4), jnp.int32)
  init = jax.jit(functools.partial(model.init, train=False))
  return lambda key: init(key, images, candidates)


@functools.lru_cache(maxsize=None)
def _boxed_variables(image_size, seed, depth=2):
  return _init_fn(image_size, depth)(jax.random.key(seed))


def _params(image_size, seed, depth=2):
  return nn.unbox(_boxed_variables(image_size, seed, depth))["params"]


def _flat_backbone(params):
  flat = flax.traverse_util.flatten_dict(params["backbone"], sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def _to_augreg(backbone, cls_pe):
  """Our layout -> AugReg npz keys, with a CLS row in the posemb."""
  out = {}
  for k, v in backbone.items():
    k = (k.replace("/MultiHeadDotProductAttention_0/",
                   "/MultiHeadDotProductAttention_1/")
         .replace("/LayerNorm_1/", "/LayerNorm_2/")
         .replace("/MlpBlock_0/", "/MlpBlock_3/"))
    out[k] = v
  pe = out.pop("pos_embedding")
  out["Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [cls_pe, pe], axis=1)
  # AugReg adds the CLS row to cls; the loader must fold it back.
  out["cls"] = backbone["cls"] - cls_pe
  out["head/kernel"] = np.zeros((32, 10), np.float32)
  out["head/bias"] = np.zeros((10,), np.float32)
  out["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
  return out


def _to_big_vision_scanned(backbone, prefix):
  """Our layout -> big_vision keys with scanned (stacked) layers."""
  out, stacked = {}, {}
  for k, v in backbone.items():
    if k.startswith("Transformer/encoderblock_"):
      layer, rest = k[len("Transformer/encoderblock_"):].split("/", 1)
      stacked.setdefault(rest, {})[int(layer)] = v
    else:
      out[prefix + k] = v
  for rest, layers in stacked.items():
    out[f"{prefix}Transformer/encoderblock/{rest}"] = np.stack(
        [layers[i] for i in sorted(layers)])
  return out


def _assert_backbone_equal(loaded, expected, skip=()):
  got = _flat_backbone(loaded)
  assert set(got) == set(expected)
  for k in expected:
    if k not in skip:
      np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-6,
                                 err_msg=k)


def test_augreg_npz_round_trip(tmp_path):
  src = _flat_backbone(_params(64, seed=0))
  cls_pe = np.random.default_rng(0).normal(size=(1, 1, 32)).astype(np.float32)
  path = tmp_path / "augreg.npz"
  np.savez(path, **_to_augreg(src, cls_pe))

  target = _params(64, seed=1)
  loaded = pretrained.load_backbone(target, path)
  _assert_backbone_equal(loaded, src)
  # The head and token table are untouched.
  for k in ("box_head", "class_embed", "token_embedding"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[k], target[k])
  # And the loaded model computes the source model's features.
  model = omnidet.OmniDet(**TINY, image_size=64)
  images = jnp.asarray(np.random.default_rng(1).integers(
      0, 256, (1, 64, 64, 3), dtype=np.uint8))
  enc = jax.jit(functools.partial(model.apply, train=False,
                                  method=omnidet.OmniDet.encode))
  want = enc({"params": {**target, "backbone": _params(64, 0)["backbone"]}},
             images)
  got = enc({"params": loaded}, images)
  np.testing.assert_allclose(got["class_embeddings"], want["class_embeddings"],
                             atol=1e-5)


def test_augreg_posemb_is_resized_for_a_larger_image(tmp_path):
  src = _flat_backbone(_params(64, seed=0))  # 4 x 4 grid
  cls_pe = np.zeros((1, 1, 32), np.float32)
  path = tmp_path / "augreg.npz"
  np.savez(path, **_to_augreg(src, cls_pe))
  loaded = pretrained.load_backbone(_params(128, seed=1), path)  # 8 x 8
  _assert_backbone_equal(loaded, src, skip=("pos_embedding",))
  pe = np.asarray(loaded["backbone"]["pos_embedding"])
  assert pe.shape == (1, 64, 32)
  np.testing.assert_allclose(pe, vit.resize_posemb(src["pos_embedding"], 8),
                             rtol=1e-6)
  assert not np.allclose(pe, np.asarray(_params(128, 1)["backbone"][
      "pos_embedding"]))


def test_big_vision_scanned_two_tower_bf16_and_boxed_variables():
  src = _flat_backbone(_params(64, seed=0))
  flat = _to_big_vision_scanned(src, "params/img/")
  # bfloat16 stored as 2-byte void, as big_vision writes it.
  kernel = "params/img/embedding/kernel"
  bf16 = flat[kernel].astype(jnp.bfloat16)
  flat[kernel] = bf16.view(np.dtype("V2"))
  flat["params/txt/Embed_0/embedding"] = np.zeros((5, 3), np.float32)
  flat["params/t"] = np.zeros((1,), np.float32)
  flat = {k: pretrained._recover_dtype(v) for k, v in flat.items()}

  boxed = _boxed_variables(64, seed=1)
  loaded = pretrained.load_backbone(boxed, flat)
  # Structure preserved: variables in, variables out, boxes kept.
  kernel_box = loaded["params"]["backbone"]["embedding"]["kernel"]
  assert isinstance(kernel_box, meta.AxisMetadata)
  assert kernel_box.names == ("conv_h", "conv_w", "conv_in", "embed")
  assert kernel_box.value.dtype == jnp.float32
  src["embedding/kernel"] = np.asarray(bf16.astype(np.float32))
  _assert_backbone_equal(nn.unbox(loaded)["params"], src)


def test_sharded_leaves_keep_their_sharding():
  src = _flat_backbone(_params(64, seed=0))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ("data", "model"))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, "model"))
  target = _params(64, seed=1)
  target = jax.tree_util.tree_map(lambda x: x, target)  # copy
  dense = target["backbone"]["Transformer"]["encoderblock_0"]["MlpBlock_0"][
      "Dense_0"]
  dense["kernel"] = jax.device_put(dense["kernel"], sharding)
  loaded = pretrained.load_backbone(target, _to_big_vision_scanned(src, ""))
  kernel = loaded["backbone"]["Transformer"]["encoderblock_0"]["MlpBlock_0"][
      "Dense_0"]["kernel"]
  assert kernel.sharding == sharding
  _assert_backbone_equal(loaded, src)


def test_mismatches_are_all_listed(tmp_path):
  src = _flat_backbone(_params(64, seed=0, depth=3))  # one block too many
  flat = _to_augreg(src, np.zeros((1, 1, 32), np.float32))
  del flat["Transformer/encoder_norm/scale"]
  del flat["embedding/bias"]
  flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros(
      (32, 48), np.float32)
  path = tmp_path / "bad.npz"
  np.savez(path, **flat)
  with pytest.raises(ValueError) as err:
    pretrained.load_backbone(_params(64, seed=1), path)
  msg = str(err.value)
  assert "Missing from the checkpoint (2)" in msg
  assert "Transformer/encoder_norm/scale" in msg and "embedding/bias" in msg
  assert "Unexpected in the checkpoint (16)" in msg
  assert "Transformer/encoderblock_2/MlpBlock_0/Dense_1/bias" in msg
  assert ("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: checkpoint "
          "(32, 48) vs model (32, 64)") in msg
  assert "seems to be ViT-custom/16 (width 32, depth 3, heads 2, mlp 48)" in msg
  assert "the model is ViT-custom/16 (width 32, depth 2" in msg


def test_no_vit_in_checkpoint():
  with pytest.raises(ValueError, match="holds no ViT"):
    pretrained.load_backbone(_params(64, 1), {"foo/bar": np.zeros(3)})
  with pytest.raises(ValueError, match="prefix 'nope/'"):
    pretrained.load_backbone(_params(64, 1), {"embedding/kernel": np.zeros(3)},
                              prefix="nope")


def test_describe_vit_names_standard_variants():
  arrays = {"embedding/kernel": np.zeros((16, 16, 3, 768))}
  for i in range(12):
    arrays[f"Transformer/encoderblock_{i}/LayerNorm_0/scale"] = np.zeros(768)
  arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/"
         "kernel"] = np.zeros((768, 12, 64))
  arrays["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] = np.zeros(
      (768, 3072))
  arrays["pos_embedding"] = np.zeros((1, 196, 768))
  assert pretrained.describe_vit(arrays) == (
      "ViT-B/16 (width 768, depth 12, heads 12, mlp 3072) trained at 224 px "
      "(14x14 patches)")
