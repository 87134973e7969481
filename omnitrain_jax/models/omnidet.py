"""OmniDet: a ViT and one shared head scoring every patch over a token table.

Written in Flax Linen on purpose: the trainer needs pure `init`/`apply`
functions that work under `jax.eval_shape` (abstract state) ->
logical-axis shardings (`nn.with_logical_partitioning` on every parameter,
`nn.with_logical_constraint` on the main activations; axis names in
`axes.py`, rules in `omnitrain_jax/sharding.py`) -> `jax.jit(init,
out_shardings=...)`; and the backbone's parameter names match big_vision /
AugReg ViT checkpoints (`pretrained.py`).

Model (DESIGN.md section 3)::

  image uint8 [B,S,S,3] -> x/127.5 - 1 (on device) -> ViT -> CLS c, patches p_i
  t_i = LN(p_i * c)                       # OWL-ViT's "mul-ln" class-token merge
  box_i = sigmoid(MLP(t_i) + bias_i)      # bias_i: logit of the patch's centre
                                          #   and a one-patch size (box_bias.py)
  z_i = normalize(W t_i)                  # class embedding, [D]
  scale_i = elu(a . t_i + a0) + 1 > 0,  shift_i = b . t_i + b0
  s_{i,t} = scale_i * <z_i, e_t> + shift_i,   e_t = normalize(E[t]), E [V, D]
  image:  z = normalize(W c), s_t = image_scale * <z, e_t> + image_shift

Decisions (the loss and trainer rely on them):

* Inputs are ``images`` uint8 ``[B, S, S, 3]`` and ``candidates`` int32
  ``[B, Q]``; outputs are float32 whatever the compute dtype. Normalisation is
  ``x / 127.5 - 1`` ("inception" style, [-1, 1]) -- what big_vision/AugReg ViT
  checkpoints expect; it runs on the device.
* Candidate id 0 (`schema.PAD_ID`) is padding: its ``pred_logits`` and
  ``image_logits`` are set to `PAD_LOGIT` (-1e9; sigmoid -> 0, softmax weight
  0, zero gradient) *and* ``candidate_mask`` (bool ``[B, Q]``, True = real)
  is returned. Losses should still mask with ``candidate_mask`` (a positive
  target on a -1e9 logit would explode a cross-entropy).
* Initialisation: ``shift`` starts at ``log(p / (1 - p))`` with ``prior_prob``
  p = 0.01 (-4.6, the RetinaNet/focal-loss prior) so every token starts with
  a small sigmoid probability and the many negatives do not swamp the first
  steps; ``scale`` starts at ``init_logit_scale`` (10: a cosine difference of
  0.1 is one logit) instead of 1, so the cosine term is not drowned by the
  shift. Their Dense kernels start small (normal 0.01), so the start is the
  same for every patch. The box head's last layer starts at zero: initial boxes
  are exactly the per-patch prior.
* Image-level scale/shift are two learned *scalars* (one temperature for the
  whole model, CLIP/SigLIP style), not per-image predictions: the image loss is
  a softmax over candidates, where a per-image temperature would only let the
  model hedge its confidence per image, and the shift cancels. The scale is
  ``exp(log_scale)`` clipped at 100 (CLIP). They are returned broadcast to
  ``[B]`` so per-patch and image logits go through the same `token_logits`.
* Token rows are gathered with `jnp.take`: ids must lie in ``[0, vocab_size)``
  (an out-of-range id yields NaN rows rather than a silently wrong token).
  Since rows are L2-normalised, weight decay on the table only changes the
  effective learning rate of its direction; consider excluding it from decay.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax.data import schema
from omnitrain_jax.models import box_bias as box_bias_lib
from omnitrain_jax.models import vit

Dtype = Any

# Logit given to padding candidates (float32; -1e9 is also finite in bf16).
PAD_LOGIT = -1e9
# Upper bound of the image-level temperature (as CLIP's logit scale).
MAX_IMAGE_LOGIT_SCALE = 100.0

_wlp = nn.with_logical_partitioning

# Top-level parameter groups of an OmniDet, for `param_counts` and for
# per-group optimizer settings (a lower learning rate for the backbone).
BACKBONE = "backbone"
TOKEN_TABLE = "token_embedding"


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def normalize_images(images: jax.Array, dtype: Dtype = jnp.float32
                     ) -> jax.Array:
  """uint8 pixels in [0, 255] -> ``x / 127.5 - 1`` in [-1, 1], in `dtype`.

  The arithmetic is float32 (exact for uint8) and cast afterwards, so a
  bfloat16 model sees the same rounded inputs as a float32 one.
  """
  return (images.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)


def token_logits(class_embeddings: jax.Array, scale: jax.Array,
                 shift: jax.Array, token_emb: jax.Array) -> jax.Array:
  """Token logits ``s[b, n, q] = scale[b, n] * <z[b, n], e[q]> + shift[b, n]``.

  The single scoring function of the model: `OmniDet.__call__` uses it for the
  per-patch and the image logits, inference uses it for chunked
  full-vocabulary scoring (``token_emb`` ``[Q, D]`` shared by the batch) and
  image-guided queries. It does not normalise: pass normalised embeddings
  (as `OmniDet.encode` and `OmniDet.token_embeddings` return them). It does
  not mask padding either (it never sees token ids). Computed in float32.

  Args:
    class_embeddings: ``[B, N, D]`` normalised class embeddings.
    scale: ``[B, N]`` positive scales.
    shift: ``[B, N]`` shifts.
    token_emb: ``[B, Q, D]`` (per-example candidates) or ``[Q, D]`` (shared)
      normalised token embeddings.

  Returns:
    float32 ``[B, N, Q]`` logits.
  """
  z = class_embeddings.astype(jnp.float32)
  e = token_emb.astype(jnp.float32)
  if e.ndim == 2:
    cos = jnp.einsum("bnd,qd->bnq", z, e)
  elif e.ndim == 3:
    cos = jnp.einsum("bnd,bqd->bnq", z, e)
  else:
    raise ValueError(
        f"token_emb must be [Q, D] or [B, Q, D]; got shape {token_emb.shape}.")
  return (cos * scale.astype(jnp.float32)[..., None]
          + shift.astype(jnp.float32)[..., None])


class BoxHead(nn.Module):
  """3-layer MLP (gelu) from a patch token to 4 raw box outputs."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Alternate (embed, mlp) / (mlp, embed) so tensor parallelism splits the
    # hidden units without an extra all-gather between the first two layers.
    x = nn.gelu(nn.Dense(
        self.hidden_dim, dtype=self.dtype, name="Dense_0",
        kernel_init=_wlp(nn.initializers.lecun_normal(), ("embed", "mlp")),
        bias_init=_wlp(nn.initializers.zeros_init(), ("mlp",)))(x))
    x = nn.gelu(nn.Dense(
        self.hidden_dim, dtype=self.dtype, name="Dense_1",
        kernel_init=_wlp(nn.initializers.lecun_normal(), ("mlp", "embed")),
        bias_init=_wlp(nn.initializers.zeros_init(), ("embed",)))(x))
    # Zero-initialised: the first predictions are exactly the box prior.
    return nn.Dense(
        4, dtype=self.dtype, name="Dense_2",
        kernel_init=_wlp(nn.initializers.zeros_init(), ("embed", "box")),
        bias_init=_wlp(nn.initializers.zeros_init(), ("box",)))(x)


class OmniDet(nn.Module):
  """Open-vocabulary detector: ViT + one shared head over a token table.

  Build directly (``OmniDet(variant="B/16", image_size=768,
  vocab_size=V)``) or from a config slice (``OmniDet.from_config(
  config.model)``). Use::

    variables = model.init(rng, images, candidates, train=False)
    out = model.apply(variables, images, candidates, train=True,
                      rngs={"dropout": key})  # rngs only with dropout/droppath
    enc = model.apply(variables, images, train=False, method=OmniDet.encode)
    emb = model.apply(variables, ids, method=OmniDet.token_embeddings)

  Attributes:
    variant: ViT variant ``"<Ti|S|B|L>/<16|32>"``.
    image_size: square input side S in pixels (a multiple of the patch).
    vocab_size: V, rows of the token table.
    class_embed_dim: D, class-embedding / token-table width (default: width).
    dtype: compute dtype (e.g. ``jnp.bfloat16`` on TPU/GPU); parameters and
      all outputs stay float32.
    remat: rematerialise each ViT block in the backward pass.
    remat_policy: `jax.checkpoint_policies` name (see `vit.REMAT_POLICIES`).
    stem: "patch" (ViT; checkpoints) or "conv" (`vit.ConvStem`, for training
      from scratch).
    attention_impl: "xla" (default), "auto" (cuDNN flash attention on GPU in
      bf16/fp16, XLA otherwise) or "cudnn"; see `vit.ATTENTION_IMPLS`.
    dropout: dropout rate in the ViT blocks (train only).
    droppath: stochastic depth rate of the last ViT block (train only).
    width, depth, num_heads, mlp_dim: override the variant's dimensions
      (tests use tiny models this way; such a model loads no checkpoint).
    prior_prob: initial sigmoid probability of every token (sets the shift).
    init_logit_scale: initial value of the per-patch and image scales.
  """
  variant: str = "B/16"
  image_size: int = 768
  vocab_size: int = 0
  class_embed_dim: int | None = None
  dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "xla"
  stem: str = "patch"
  dropout: float = 0.0
  droppath: float = 0.0
  width: int | None = None
  depth: int | None = None
  num_heads: int | None = None
  mlp_dim: int | None = None
  prior_prob: float = 0.01
  init_logit_scale: float = 10.0

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "OmniDet":
    """Builds an OmniDet from a mapping / `ml_collections.ConfigDict`.

    Keys are the attribute names above; ``dtype`` may be a string
    (``"bfloat16"``).
    """
    kwargs = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    allowed = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
      raise ValueError(
          f"Unknown OmniDet config keys {unknown}; allowed: {sorted(allowed)}.")
    if isinstance(kwargs.get("dtype"), str):
      kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return cls(**kwargs)

  # ---------------------------------------------------------------- geometry

  @property
  def vit_config(self) -> dict[str, int]:
    """The backbone's dimensions: the variant's, with any overrides."""
    cfg = vit.decode_variant(self.variant)
    for key in ("width", "depth", "num_heads", "mlp_dim"):
      if getattr(self, key) is not None:
        cfg[key] = getattr(self, key)
    return cfg

  @property
  def patch_size(self) -> int:
    return self.vit_config["patch_size"]

  @property
  def grid(self) -> int:
    """Patches per side (768 px, /16 -> 48)."""
    return vit.grid_size(self.image_size, self.patch_size)

  @property
  def num_patches(self) -> int:
    """N, predictions per image (768 px, /16 -> 2304)."""
    return self.grid ** 2

  # ------------------------------------------------------------------ layers

  def setup(self):
    cfg = self.vit_config
    if self.vocab_size <= 1:
      raise ValueError(
          f"vocab_size must be the vocabulary's size (> 1, id 0 is padding); "
          f"got {self.vocab_size}. Pass vocab_size=len(vocab).")
    if not 0.0 < self.prior_prob < 1.0:
      raise ValueError(f"prior_prob must be in (0, 1); got {self.prior_prob}.")
    if self.init_logit_scale <= 1.0:
      raise ValueError(
          f"init_logit_scale must be > 1 (elu + 1 parameterisation); got "
          f"{self.init_logit_scale}.")
    width = cfg["width"]
    dim = self.class_embed_dim or width
    prior_logit = math.log(self.prior_prob / (1.0 - self.prior_prob))

    self.backbone = vit.VisionTransformer(
        **cfg, dtype=self.dtype, dropout=self.dropout, droppath=self.droppath,
        remat=self.remat, remat_policy=self.remat_policy,
        attention_impl=self.attention_impl, stem=self.stem)
    self.merged_class_token = nn.LayerNorm(
        dtype=self.dtype,
        scale_init=_wlp(nn.initializers.ones_init(), ("embed",)),
        bias_init=_wlp(nn.initializers.zeros_init(), ("embed",)))
    self.box_head = BoxHead(width, dtype=self.dtype)
    self.class_embed = nn.Dense(
        dim, dtype=self.dtype,
        kernel_init=_wlp(nn.initializers.lecun_normal(),
                         ("embed", "class_embed")),
        bias_init=_wlp(nn.initializers.zeros_init(), ("class_embed",)))
    small = nn.initializers.normal(stddev=0.01)
    # elu(x) + 1 == x + 1 for x > 0, so this bias starts scale at the value.
    self.logit_scale = nn.Dense(
        1, dtype=self.dtype,
        kernel_init=_wlp(small, ("embed", None)),
        bias_init=_wlp(nn.initializers.constant(self.init_logit_scale - 1.0),
                       (None,)))
    self.logit_shift = nn.Dense(
        1, dtype=self.dtype,
        kernel_init=_wlp(small, ("embed", None)),
        bias_init=_wlp(nn.initializers.constant(prior_logit), (None,)))
    # Rows have unit norm in expectation; only their direction is used.
    self.token_embedding = self.param(
        TOKEN_TABLE,
        _wlp(nn.initializers.normal(stddev=1.0 / math.sqrt(dim)),
             ("vocab", "embed")),
        (self.vocab_size, dim), jnp.float32)
    self.image_log_scale = self.param(
        "image_log_scale",
        _wlp(nn.initializers.constant(math.log(self.init_logit_scale)), ()),
        (), jnp.float32)
    self.image_shift = self.param(
        "image_shift", _wlp(nn.initializers.constant(prior_logit), ()),
        (), jnp.float32)

  # ----------------------------------------------------------------- methods

  def _check_images(self, images: jax.Array) -> None:
    s = self.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
      raise ValueError(
          f"images must be [B, {s}, {s}, 3] (image_size={s}); got shape "
          f"{images.shape}. Resize/pad on the host or set image_size.")
    if images.dtype != jnp.uint8:
      raise ValueError(
          f"images must be uint8 pixels (normalisation happens in the model); "
          f"got dtype {images.dtype}.")

  def encode(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Everything but the token logits (inference embeds images once).

    Args:
      images: uint8 ``[B, S, S, 3]``.
      train: enables dropout / stochastic depth.

    Returns:
      A dict of float32 arrays:
        ``pred_boxes`` ``[B, N, 4]``: ``(cx, cy, w, h)`` in [0, 1] of the
          canvas; prediction n belongs to patch row ``n // grid``, column
          ``n % grid``;
        ``class_embeddings`` ``[B, N, D]``: L2-normalised;
        ``logit_scale``, ``logit_shift`` ``[B, N]``;
        ``image_embedding`` ``[B, D]``: L2-normalised;
        ``image_scale``, ``image_shift`` ``[B]``.
    """
    self._check_images(images)
    x = normalize_images(images, self.dtype)
    pooled, patches = self.backbone(x, train=train)  # [B, W], [B, h, w, W]
    b, h, w, width = patches.shape
    tokens = jnp.reshape(patches, (b, h * w, width))  # [B, N, W]
    # OWL-ViT's merge: gate every patch by the image token, then LN.
    tokens = self.merged_class_token(tokens * pooled[:, None, :])
    tokens = nn.with_logical_constraint(tokens, ("batch", "length", "embed"))

    bias = jnp.asarray(box_bias_lib.box_bias(h, w))  # [N, 4]
    boxes = jax.nn.sigmoid(
        self.box_head(tokens).astype(jnp.float32) + bias)  # [B, N, 4]

    z = _l2_normalize(self.class_embed(tokens).astype(jnp.float32))  # [B,N,D]
    scale = nn.elu(self.logit_scale(tokens)[..., 0].astype(jnp.float32)) + 1.0
    shift = self.logit_shift(tokens)[..., 0].astype(jnp.float32)  # [B, N]

    # The image token goes through the same class projection as the patches.
    image_z = _l2_normalize(
        self.class_embed(pooled).astype(jnp.float32))  # [B, D]
    image_scale = jnp.minimum(jnp.exp(self.image_log_scale),
                              MAX_IMAGE_LOGIT_SCALE)
    return {
        "pred_boxes": boxes,
        "class_embeddings": z,
        "logit_scale": scale,
        "logit_shift": shift,
        "image_embedding": image_z,
        "image_scale": jnp.broadcast_to(image_scale, (b,)),
        "image_shift": jnp.broadcast_to(self.image_shift, (b,)),
    }

  def token_embeddings(self, token_ids: jax.Array) -> jax.Array:
    """Normalised rows of the token table: ``[...]`` ids -> ``[..., D]``."""
    rows = jnp.take(self.token_embedding, token_ids, axis=0)
    return _l2_normalize(rows.astype(jnp.float32))

  def __call__(self, images: jax.Array, candidates: jax.Array, *,
               train: bool) -> dict[str, jax.Array]:
    """Boxes and candidate-token logits for every patch, and image logits.

    Args:
      images: uint8 ``[B, S, S, 3]``.
      candidates: int32 ``[B, Q]`` token ids; 0 is padding.
      train: enables dropout / stochastic depth.

    Returns:
      `encode`'s dict plus float32 ``pred_logits`` ``[B, N, Q]``,
      ``image_logits`` ``[B, Q]`` (both `PAD_LOGIT` at padding candidates) and
      bool ``candidate_mask`` ``[B, Q]`` (True = real candidate).
    """
    if candidates.ndim != 2 or candidates.shape[0] != images.shape[0]:
      raise ValueError(
          f"candidates must be [B, Q] with B = {images.shape[0]} (images); "
          f"got shape {candidates.shape}.")
    if not jnp.issubdtype(candidates.dtype, jnp.integer):
      raise ValueError(
          f"candidates must be integer token ids; got dtype {candidates.dtype}.")
    out = self.encode(images, train=train)
    tok = self.token_embeddings(candidates)  # [B, Q, D]
    tok = nn.with_logical_constraint(tok, ("batch", "candidates", "embed"))
    valid = candidates != schema.PAD_ID  # [B, Q]

    logits = token_logits(out["class_embeddings"], out["logit_scale"],
                          out["logit_shift"], tok)  # [B, N, Q]
    logits = jnp.where(valid[:, None, :], logits, PAD_LOGIT)
    image_logits = token_logits(
        out["image_embedding"][:, None], out["image_scale"][:, None],
        out["image_shift"][:, None], tok)[:, 0]  # [B, Q]
    image_logits = jnp.where(valid, image_logits, PAD_LOGIT)
    out.update(pred_logits=logits, image_logits=image_logits,
               candidate_mask=valid)
    return out


def param_counts(params: Any) -> dict[str, int]:
  """Parameter counts by group: backbone, head, token table, total.

  Args:
    params: an OmniDet's params (or variables with a "params" key), boxed or
      not, concrete or abstract (`jax.eval_shape`).

  Returns:
    ``{"backbone": .., "head": .., "token_table": .., "total": ..}``; "head"
    is everything outside the backbone and the token table.
  """
  params = params.get("params", params)
  params = nn.unbox(params)

  def count(tree):
    return int(sum(np.prod(x.shape, dtype=np.int64)
                   for x in jax.tree_util.tree_leaves(tree)))

  total = count(params)
  backbone = count(params[BACKBONE])
  table = count(params[TOKEN_TABLE])
  return {"backbone": backbone, "head": total - backbone - table,
          "token_table": table, "total": total}
