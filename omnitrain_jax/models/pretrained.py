"""Loads big_vision / AugReg ViT `.npz` checkpoints into OmniDet's backbone.

Supported layouts (flat `np.savez` keys joined with "/"):

* AugReg / google-research/vision_transformer ("How to train your ViT")::

    embedding/{kernel,bias}  cls  Transformer/posembed_input/pos_embedding
    Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
                                  LayerNorm_2, MlpBlock_3/Dense_{0,1}}
    Transformer/encoder_norm  [pre_logits]  head

  Its position embeddings have a leading CLS row (CLS is prepended *before*
  they are added); that row is folded into ``cls`` (``cls + pe[0]``), which is
  exactly equivalent for our model, where CLS gets no position embedding.
* big_vision `models/vit.py`::

    embedding  pos_embedding  cls  Transformer/encoderblock_{i}/{LayerNorm_0,
    MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}  ...  head

  optionally under ``params/`` (optax-era checkpoints), ``opt/target/`` (old
  flax optimizer) or ``params/img/`` (the image tower of a two-tower /
  SigLIP / LiT checkpoint; pass `prefix` for other towers), and optionally
  with scanned layers (``Transformer/encoderblock/...`` stacked over depth).
  bfloat16 arrays stored as 2-byte void (big_vision's `recover_dtype`) are
  restored.

Classifier/pooling parameters (``head``, ``pre_logits``, ``MAPHead_0``) are
ignored; the detection head and token table are left as initialised.
Position embeddings are resized (bilinear, `vit.resize_posemb`) to the model's
grid. Any other difference -- missing or unexpected names, shape mismatches --
raises one ValueError that lists all of them and names the variant the file
appears to hold.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Mapping

import flax
from flax.core import meta
import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax.models import omnidet
from omnitrain_jax.models import vit

# Prefixes tried in order when none is given; the first under which an
# `embedding/kernel` exists wins.
_PREFIXES = ("", "params/img/", "params/", "opt/target/img/", "opt/target/",
             "img/", "params/backbone/", "backbone/")
# Top-level checkpoint entries that are not part of the backbone.
_IGNORED = ("head/", "pre_logits/", "MAPHead_0/")
# AugReg block module names -> big_vision's (ours).
_AUGREG_RENAMES = (
    ("/MultiHeadDotProductAttention_1/", "/MultiHeadDotProductAttention_0/"),
    ("/LayerNorm_2/", "/LayerNorm_1/"),
    ("/MlpBlock_3/", "/MlpBlock_0/"),
)
_POSEMB = "pos_embedding"
_OLD_POSEMB_KEYS = ("Transformer/posembed_input/pos_embedding",
                    "Transformer/pos_embedding")


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads an `np.savez` checkpoint into a flat ``{key: array}`` dict."""
  with open(path, "rb") as f:
    with np.load(f, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  return {k: _recover_dtype(v) for k, v in flat.items()}


def _recover_dtype(x: np.ndarray) -> np.ndarray:
  # numpy cannot store bfloat16; big_vision writes it as 2-byte void.
  if x.dtype.kind == "V" and x.dtype.itemsize == 2:
    return x.view(jnp.bfloat16)
  return x


def _find_prefix(flat: Mapping[str, np.ndarray], prefix: str | None) -> str:
  if prefix is not None:
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    if f"{prefix}embedding/kernel" not in flat:
      raise ValueError(
          f"No '{prefix}embedding/kernel' in the checkpoint: prefix "
          f"{prefix!r} does not hold a ViT. Keys look like: "
          f"{sorted(flat)[:8]}.")
    return prefix
  for p in _PREFIXES:
    if f"{p}embedding/kernel" in flat:
      return p
  raise ValueError(
      "The checkpoint holds no ViT: no key '<prefix>embedding/kernel' for any "
      f"prefix in {list(_PREFIXES)}. Keys look like: {sorted(flat)[:8]}. Pass "
      "prefix='<path/to/vit>' if it lives elsewhere.")


def to_model_layout(flat: Mapping[str, np.ndarray], prefix: str | None = None
                    ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames a ViT checkpoint's flat arrays into this package's ViT layout.

  Args:
    flat: ``{key: array}`` as from `load_npz`.
    prefix: where the ViT lives in the checkpoint; found automatically if
      None (see module docstring).

  Returns:
    ``(arrays, notes)``: flat arrays keyed like `vit.VisionTransformer`'s
    params (position embeddings not resized yet, CLS row folded into
    ``cls``), and human-readable notes on what was converted or ignored.
  """
  prefix = _find_prefix(flat, prefix)
  notes = []
  arrays = {k[len(prefix):]: np.asarray(v) for k, v in flat.items()
            if k.startswith(prefix)}
  outside = len(flat) - len(arrays)
  if outside:
    notes.append(f"ignored {outside} arrays outside prefix {prefix!r}")
  if prefix:
    notes.append(f"ViT found under prefix {prefix!r}")

  ignored = sorted(k for k in arrays if k.startswith(_IGNORED))
  for k in ignored:
    del arrays[k]
  if ignored:
    notes.append(f"ignored classifier/pooling arrays: {ignored}")

  # Scanned layers: one stacked entry per parameter, depth on axis 0.
  scanned = [k for k in arrays if k.startswith("Transformer/encoderblock/")]
  for k in scanned:
    stacked = arrays.pop(k)
    rest = k[len("Transformer/encoderblock/"):]
    for i, layer in enumerate(stacked):
      arrays[f"Transformer/encoderblock_{i}/{rest}"] = layer
  if scanned:
    notes.append("unstacked scanned encoder layers")

  if any("/MlpBlock_3/" in k for k in arrays):
    renamed = {}
    for k, v in arrays.items():
      for old, new in _AUGREG_RENAMES:
        k = k.replace(old, new)
      renamed[k] = v
    arrays = renamed
    notes.append("AugReg block names mapped to big_vision names")

  for old in _OLD_POSEMB_KEYS:
    if old in arrays:
      arrays[_POSEMB] = arrays.pop(old)
      notes.append(f"'{old}' -> '{_POSEMB}'")

  if _POSEMB in arrays:
    pe = arrays[_POSEMB]
    rows = pe.shape[1] if pe.ndim == 3 else -1
    side = math.isqrt(rows - 1) if rows > 1 else -1
    if rows > 1 and side * side == rows - 1 and math.isqrt(rows) ** 2 != rows:
      arrays[_POSEMB] = pe[:, 1:]
      if "cls" in arrays:
        # Same function: our CLS gets no position embedding of its own.
        arrays["cls"] = (arrays["cls"].astype(np.float32)
                         + pe[:, :1].astype(np.float32)).astype(
                             arrays["cls"].dtype)
        notes.append("CLS position embedding folded into 'cls'")
      else:
        notes.append("dropped the CLS row of the position embeddings "
                     "(checkpoint has no 'cls')")
  return arrays, notes


def describe_vit(arrays: Mapping[str, np.ndarray]) -> str:
  """Names the ViT variant that model-layout `arrays` seem to hold."""
  try:
    kernel = arrays["embedding/kernel"]
    patch, width = kernel.shape[0], kernel.shape[-1]
  except (KeyError, IndexError):
    return "an unrecognisable ViT (no usable 'embedding/kernel')"
  blocks = {int(m.group(1)) for k in arrays
            if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
  depth = len(blocks)
  q = arrays.get(
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
  heads = q.shape[1] if q is not None and q.ndim == 3 else None
  mlp = arrays.get("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")
  mlp = mlp.shape[-1] if mlp is not None else None
  name = "custom"
  for size, dims in vit.VARIANTS.items():
    if dims == (width, depth, heads) and mlp == 4 * width:
      name = size
  desc = (f"ViT-{name}/{patch} (width {width}, depth {depth}, heads {heads}, "
          f"mlp {mlp})")
  pe = arrays.get(_POSEMB)
  if pe is not None and pe.ndim == 3:
    side = math.isqrt(pe.shape[1])
    if side * side == pe.shape[1]:
      desc += f" trained at {side * patch} px ({side}x{side} patches)"
  return desc


def _describe_target(target: Mapping[str, Any]) -> str:
  return describe_vit({k: _ShapeOnly(v.shape) for k, v in target.items()})


class _ShapeOnly:
  """Stands in for an array where only `.shape`/`.ndim` are needed."""

  def __init__(self, shape):
    self.shape = tuple(shape)
    self.ndim = len(self.shape)


def _place(value: np.ndarray, like: Any) -> Any:
  """`value` with `like`'s dtype, and on `like`'s sharding if it has one."""
  value = np.asarray(value).astype(like.dtype)
  sharding = getattr(like, "sharding", None)
  if isinstance(like, jax.Array) and sharding is not None:
    # Works for shardings spanning other processes' devices too: each
    # process supplies only its addressable shards.
    return jax.make_array_from_callback(value.shape, sharding,
                                        lambda idx: value[idx])
  if isinstance(like, jax.ShapeDtypeStruct):
    return jnp.asarray(value)
  return value if isinstance(like, np.ndarray) else jnp.asarray(value)


def load_backbone(params: Any, checkpoint: str | os.PathLike | Mapping[
    str, np.ndarray], *, prefix: str | None = None) -> Any:
  """Returns `params` with the ViT backbone replaced by a checkpoint's.

  Args:
    params: an OmniDet's params (``{"backbone": ..., ...}``) or variables
      (``{"params": {...}}``); leaves may be arrays (sharded or not) or
      `nn.LogicallyPartitioned` boxes. Loaded values take each leaf's dtype
      and sharding.
    checkpoint: path of a `.npz`, or its flat ``{key: array}`` dict.
    prefix: location of the ViT inside the checkpoint (auto-detected if None).

  Returns:
    The same structure with ``backbone`` loaded; everything else (head, token
    table) untouched.

  Raises:
    ValueError: listing every missing / unexpected name and every shape
      mismatch, and which variant the checkpoint seems to hold.
  """
  if not isinstance(checkpoint, Mapping):
    flat = load_npz(checkpoint)
    source = os.fspath(checkpoint)
  else:
    flat, source = dict(checkpoint), "the checkpoint dict"
  arrays, notes = to_model_layout(flat, prefix)

  has_params = "params" in params and omnidet.BACKBONE not in params
  model_params = params["params"] if has_params else params
  if omnidet.BACKBONE not in model_params:
    raise ValueError(
        f"params have no '{omnidet.BACKBONE}' entry (top-level keys: "
        f"{sorted(model_params)}); pass an OmniDet's params or variables.")
  is_box = lambda x: isinstance(x, meta.AxisMetadata)  # pylint: disable=unnecessary-lambda-assignment
  target = flax.traverse_util.flatten_dict(
      model_params[omnidet.BACKBONE], sep="/", is_leaf=lambda _, x: is_box(x))
  target_values = {k: (v.value if is_box(v) else v) for k, v in target.items()}

  allowed_missing = set()
  if "cls" not in arrays and "cls" in target_values:
    allowed_missing.add("cls")
    notes.append("checkpoint has no 'cls' (GAP-pooled); 'cls' keeps its init")
  missing = sorted(set(target_values) - set(arrays) - allowed_missing)
  unexpected = sorted(set(arrays) - set(target_values))
  mismatched = []
  for k in sorted(set(arrays) & set(target_values)):
    got, want = arrays[k].shape, tuple(target_values[k].shape)
    if k == _POSEMB and len(got) == 3 and got[0] == 1 and got[2] == want[2]:
      continue  # Resized below.
    if got != want:
      mismatched.append(f"{k}: checkpoint {got} vs model {want}")
  if missing or unexpected or mismatched:
    lines = [f"Cannot load {source} into the OmniDet backbone."]
    if missing:
      lines.append(f"Missing from the checkpoint ({len(missing)}): {missing}")
    if unexpected:
      lines.append(
          f"Unexpected in the checkpoint ({len(unexpected)}): {unexpected}")
    if mismatched:
      lines.append(f"Shape mismatches ({len(mismatched)}): {mismatched}")
    lines.append(f"The checkpoint seems to be {describe_vit(arrays)}; the "
                 f"model is {_describe_target(target_values)}. Set the "
                 "model's variant (and image_size) to match the checkpoint.")
    raise ValueError("\n".join(lines))

  if _POSEMB in arrays:
    want_rows = target_values[_POSEMB].shape[1]
    side = math.isqrt(want_rows)
    if arrays[_POSEMB].shape[1] != want_rows:
      notes.append(f"resized {_POSEMB} {arrays[_POSEMB].shape} -> "
                   f"(1, {want_rows}, ...)")
      arrays[_POSEMB] = vit.resize_posemb(arrays[_POSEMB], (side, side))

  new = {}
  for k, leaf in target.items():
    if k not in arrays:
      new[k] = leaf
      continue
    like = leaf.value if is_box(leaf) else leaf
    value = _place(arrays[k], like)
    new[k] = leaf.replace_boxed(value) if is_box(leaf) else value
  backbone = flax.traverse_util.unflatten_dict(new, sep="/")
  logging.info("Loaded ViT backbone from %s: %s; %s", source,
               describe_vit(arrays), "; ".join(notes))

  model_params = {**model_params, omnidet.BACKBONE: backbone}
  return {**params, "params": model_params} if has_params else model_params
