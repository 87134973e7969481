"""Vision Transformer image encoder (Flax Linen) for OmniDet.

Why Linen (not NNX): the trainer builds state the big_vision way -- abstract
variables from `jax.eval_shape(model.init, ...)` -> shardings from the logical
axis names (`nn.with_logical_partitioning`) -> `jax.jit(init,
out_shardings=...)` -- which needs pure `init`/`apply` functions; Linen gives
exactly that, and its parameter names can be chosen to match the published
ViT checkpoints.

Parameter names follow big_vision's `models/vit.py` (the current layout):

  embedding/{kernel,bias}                       patch embedding (a strided conv)
  pos_embedding                                 [1, h*w, width], patches only
  cls                                           [1, 1, width]
  Transformer/encoderblock_{i}/LayerNorm_0      pre-attention LN
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}
  Transformer/encoderblock_{i}/LayerNorm_1      pre-MLP LN
  Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}
  Transformer/encoder_norm

As in big_vision, position embeddings are added to the patch tokens *before*
the CLS token is prepended, so the CLS token has no position embedding of its
own. An AugReg (google-research/vision_transformer) checkpoint, whose
`pos_embedding` has a leading CLS row, loads exactly by adding that row to
`cls` (see `pretrained.py`).

The encoder is pre-LN; its outputs are the CLS token (the pooled image token)
and the grid of patch tokens, both after `encoder_norm`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# name -> (width, depth, num_heads); the MLP is 4x the width.
# Reference: Table 2 of https://arxiv.org/abs/2106.04560 (as big_vision).
VARIANTS = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}
PATCH_SIZES = (8, 14, 16, 32)  # /8: AugReg B/8; /14: CLIP-style L/14.

# Names accepted by `remat_policy` (attributes of `jax.checkpoint_policies`).
# Attention kernels for `attention_impl`. "xla" (the default) is the one
# measured on an H200: B/16 at 768 px, bf16, batch 16 trains at 62 img/s but
# peaks at 84 GiB without remat (XLA keeps the [B, H, L, L] probabilities;
# 9.5 GiB with remat). "auto" picks cuDNN's fused (flash) attention on GPU in
# 16-bit dtypes, XLA otherwise; "cudnn" forces it. The cuDNN path has NOT yet
# been run on a GPU here: try it with `python benchmarks/model_forward.py
# --attention_impl=auto`, which also prints the largest logit difference
# against XLA attention.
ATTENTION_IMPLS = ("auto", "xla", "cudnn")

# How pixels become tokens: "patch" (ViT's linear patch embedding, the layout
# of big_vision / AugReg checkpoints) or "conv" (a stack of stride-2 3x3
# convolutions, Xiao et al. 2021, "Early convolutions help transformers see
# better": faster, steadier optimisation when training from scratch).
STEMS = ("patch", "conv")

REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)

_wlp = nn.with_logical_partitioning


def decode_variant(variant: str) -> dict[str, int]:
  """Parses a variant string such as ``"B/16"`` into model dimensions.

  Args:
    variant: ``"<size>/<patch>"`` with size in Ti, S, B, L and patch in 16, 32.

  Returns:
    A dict with ``width``, ``depth``, ``num_heads``, ``mlp_dim`` and
    ``patch_size``.

  Raises:
    ValueError: for an unknown size or patch.
  """
  size, sep, patch = variant.partition("/")
  if not sep or size not in VARIANTS or not patch.isdigit() or (
      int(patch) not in PATCH_SIZES):
    raise ValueError(
        f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size "
        f"in {list(VARIANTS)} and patch in {list(PATCH_SIZES)}, e.g. 'B/16'.")
  width, depth, num_heads = VARIANTS[size]
  return dict(width=width, depth=depth, num_heads=num_heads,
              mlp_dim=4 * width, patch_size=int(patch))


def grid_size(image_size: int, patch_size: int) -> int:
  """Patches per side for a square `image_size` image (768, 16 -> 48)."""
  if image_size <= 0 or image_size % patch_size:
    raise ValueError(
        f"image_size {image_size} must be a positive multiple of the patch "
        f"size {patch_size}; use e.g. {max(1, image_size // patch_size) * patch_size}.")
  return image_size // patch_size


def resize_posemb(posemb: np.ndarray | jax.Array,
                  new_grid: int | Sequence[int],
                  old_grid: Sequence[int] | None = None) -> np.ndarray:
  """Resizes learned position embeddings to a new patch grid (bilinear).

  Works for both layouts: big_vision's ``[1, h*w, D]`` (patches only) and
  AugReg's ``[1, 1 + h*w, D]`` whose first row belongs to the CLS token; that
  row is returned untouched in front of the resized grid.

  Args:
    posemb: ``[1, L, D]`` or ``[L, D]`` position embeddings.
    new_grid: the target grid, ``g`` (square) or ``(h, w)``.
    old_grid: the source grid ``(h, w)``; inferred when `L` (or `L - 1`) is a
      perfect square.

  Returns:
    A numpy array of `posemb`'s rank and dtype, with ``h*w`` (+1 with a CLS
    row) rows.

  Raises:
    ValueError: if the source grid cannot be inferred.
  """
  posemb = np.asarray(posemb)
  squeeze = posemb.ndim == 2
  if squeeze:
    posemb = posemb[None]
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(
        f"posemb must be [1, L, D] or [L, D]; got shape {posemb.shape}.")
  new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
  length, dim = posemb.shape[1:]
  if old_grid is None:
    side = math.isqrt(length)
    side_cls = math.isqrt(length - 1) if length > 1 else -1
    if side * side == length:
      old_grid = (side, side)
    elif side_cls * side_cls == length - 1:
      old_grid = (side_cls, side_cls)
    else:
      raise ValueError(
          f"Cannot infer the patch grid of position embeddings with {length} "
          "rows (neither L nor L-1 is a square); pass old_grid=(h, w).")
  old_h, old_w = old_grid
  num_extra = length - old_h * old_w
  if num_extra not in (0, 1):
    raise ValueError(
        f"posemb has {length} rows, which does not fit grid {old_grid} "
        "(+ at most one CLS row).")
  extra, grid = posemb[:, :num_extra], posemb[:, num_extra:]
  if (old_h, old_w) != (new_h, new_w):
    grid = grid.reshape(old_h, old_w, dim).astype(np.float32)
    # Half-pixel-centred bilinear (as torch's align_corners=False); the
    # default antialiasing only acts when shrinking the grid.
    grid = jax.image.resize(grid, (new_h, new_w, dim), method="bilinear")
    grid = np.asarray(grid).astype(posemb.dtype).reshape(1, new_h * new_w, dim)
  out = np.concatenate([extra, grid], axis=1)
  return out[0] if squeeze else out


def _drop_path(module: nn.Module, x: jax.Array, rate: float,
               deterministic: bool) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per example."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(
      module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
      dtype=dtype, name=name,
      scale_init=_wlp(nn.initializers.ones_init(), ("embed",)),
      bias_init=_wlp(nn.initializers.zeros_init(), ("embed",)))


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> gelu -> Dense (names Dense_0, Dense_1)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(
        self.mlp_dim, dtype=self.dtype, name="Dense_0",
        kernel_init=_wlp(nn.initializers.xavier_uniform(), ("embed", "mlp")),
        bias_init=_wlp(nn.initializers.normal(stddev=1e-6), ("mlp",)))(x)
    x = nn.gelu(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(
        width, dtype=self.dtype, name="Dense_1",
        kernel_init=_wlp(nn.initializers.xavier_uniform(), ("mlp", "embed")),
        bias_init=_wlp(nn.initializers.normal(stddev=1e-6), ("embed",)))(x)


class HeadsDense(nn.Module):
  """A dense layer into (``to_heads``) or out of attention heads.

  to_heads: ``[..., D] -> [..., H, Dh]`` (kernel ``[D, H, Dh]``, bias
  ``[H, Dh]``); otherwise ``[..., H, Dh] -> [..., D]`` (kernel ``[H, Dh, D]``,
  bias ``[D]``) -- flax MHA's parameter layout, so checkpoints load as is.

  Not `nn.DenseGeneral`: that one initialises a flat 2-D kernel and reshapes
  it, which applies the 3-D logical-axis constraint to the 2-D value (an error)
  when initialising under a mesh. Here the kernel is created at its true shape
  and xavier gets the fan axes explicitly (the same fans as the flat matrix).
  """
  num_heads: int
  head_dim: int
  width: int
  to_heads: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, dh, d = self.num_heads, self.head_dim, self.width
    if self.to_heads:
      shape, names = (d, h, dh), ("embed", "heads", "kv")
      init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
      bias_shape, bias_names, eq = (h, dh), ("heads", "kv"), "...d,dhk->...hk"
    else:
      shape, names = (h, dh, d), ("heads", "kv", "embed")
      init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
      bias_shape, bias_names, eq = (d,), ("embed",), "...hk,hkd->...d"
    kernel = self.param("kernel", _wlp(init, names), shape, jnp.float32)
    bias = self.param("bias", _wlp(nn.initializers.zeros_init(), bias_names),
                      bias_shape, jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    return jnp.einsum(eq, x, kernel) + bias


class SelfAttention(nn.Module):
  """Multi-head self-attention with flax MHA's parameter layout.

  Own module (not `nn.MultiHeadDotProductAttention`) so that every kernel gets
  its own logical axis names, and so the core is `jax.nn.dot_product_attention`
  (XLA on TPU/CPU, cuDNN flash attention where available on GPU), which keeps
  the attention logits in float32 under bfloat16 compute.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  def _implementation(self) -> str:
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"Unknown attention_impl {self.attention_impl!r}; choose one of "
          f"{ATTENTION_IMPLS}.")
    if self.attention_impl != "auto":
      return self.attention_impl
    half = jnp.dtype(self.dtype) in (jnp.dtype(jnp.bfloat16),
                                     jnp.dtype(jnp.float16))
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(
          f"width {width} must be divisible by num_heads {self.num_heads}.")
    dims = dict(num_heads=self.num_heads, head_dim=width // self.num_heads,
                width=width, dtype=self.dtype)
    q = HeadsDense(**dims, to_heads=True, name="query")(x)  # [B, L, H, Dh]
    k = HeadsDense(**dims, to_heads=True, name="key")(x)
    v = HeadsDense(**dims, to_heads=True, name="value")(x)
    q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "kv"))
               for t in (q, k, v))
    y = jax.nn.dot_product_attention(
        q, k, v, implementation=self._implementation())  # [B, L, H, Dh]
    y = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
    return HeadsDense(**dims, to_heads=False, name="out")(y)  # [B, L, D]


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  droppath: float = 0.0
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    y = _layer_norm("LayerNorm_0", self.dtype)(x)
    y = SelfAttention(self.num_heads, self.dtype, self.attention_impl,
                      name="MultiHeadDotProductAttention_0")(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + _drop_path(self, y, self.droppath, deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    y = _layer_norm("LayerNorm_1", self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dtype, self.dropout, name="MlpBlock_0")(
        y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + _drop_path(self, y, self.droppath, deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
  """A stack of `Encoder1DBlock`s and the final LayerNorm ("encoder_norm")."""
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  droppath: float = 0.0
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    block_cls = Encoder1DBlock
    if self.remat:
      if self.remat_policy not in REMAT_POLICIES:
        raise ValueError(
            f"Unknown remat_policy {self.remat_policy!r}; choose one of "
            f"{REMAT_POLICIES}.")
      # `deterministic` (arg 2, counting self) is a Python bool: static.
      block_cls = nn.remat(
          Encoder1DBlock, static_argnums=(2,),
          policy=getattr(jax.checkpoint_policies, self.remat_policy))
    for i in range(self.depth):
      # Linearly increasing stochastic depth (DeiT/big_vision convention).
      rate = self.droppath * i / max(self.depth - 1, 1)
      x = block_cls(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
          dropout=self.dropout, droppath=rate,
          attention_impl=self.attention_impl, name=f"encoderblock_{i}")(
              x, deterministic)
    return _layer_norm("encoder_norm", self.dtype)(x)


class ConvStem(nn.Module):
  """Stride-2 3x3 convolutions down to one token per patch, then a 1x1.

  ``log2(patch_size)`` convolutions (patch 16: four), channels doubling up
  to `width` (16: ``width/8, width/4, width/2, width``), each followed by
  LayerNorm over channels and GELU (Xiao et al. 2021 use BatchNorm + ReLU;
  LayerNorm keeps the model free of batch statistics), then a 1x1
  projection to `width` ("embedding"). The token grid equals the patch
  stem's, so everything downstream (position embeddings, box bias, N) is
  unchanged. Not in big_vision / AugReg checkpoints: use it from scratch.
  """
  width: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = int(round(math.log2(self.patch_size)))
    if 2 ** n != self.patch_size:
      raise ValueError(f"stem='conv' needs a power-of-two patch size; got "
                       f"{self.patch_size} (use 8, 16 or 32, or stem='patch')."
                       )
    for i in range(n):
      channels = max(self.width // 2 ** (n - 1 - i), 8)
      x = nn.Conv(
          channels, (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
          use_bias=False, name=f"conv_{i}",
          kernel_init=_wlp(nn.initializers.he_normal(),
                           ("conv_h", "conv_w", "conv_in", "conv_out")))(x)
      x = nn.LayerNorm(
          dtype=self.dtype, name=f"norm_{i}",
          scale_init=_wlp(nn.initializers.ones_init(), ("conv_out",)),
          bias_init=_wlp(nn.initializers.zeros_init(), ("conv_out",)))(x)
      x = nn.gelu(x)
    return nn.Conv(
        self.width, (1, 1), dtype=self.dtype, name="embedding",
        kernel_init=_wlp(nn.initializers.lecun_normal(),
                         ("conv_h", "conv_w", "conv_in", "embed")),
        bias_init=_wlp(nn.initializers.zeros_init(), ("embed",)))(x)


class VisionTransformer(nn.Module):
  """ViT encoder with a CLS token and learned position embeddings.

  Attributes:
    width: residual stream width.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden units.
    patch_size: square patch side in pixels.
    dtype: compute dtype (parameters stay float32).
    dropout: dropout rate inside blocks (train only).
    droppath: maximum stochastic-depth rate (last block; train only).
    remat: rematerialise each block in the backward pass (saves memory).
    remat_policy: a `jax.checkpoint_policies` name, see `REMAT_POLICIES`.
    attention_impl: attention kernel, see `ATTENTION_IMPLS`.
    stem: "patch" or "conv", see `STEMS` and `ConvStem`.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  dtype: Dtype = jnp.float32
  dropout: float = 0.0
  droppath: float = 0.0
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "xla"
  stem: str = "patch"

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool
               ) -> tuple[jax.Array, jax.Array]:
    """Encodes normalised images.

    Args:
      images: float ``[B, H, W, 3]``, already normalised; H and W multiples of
        `patch_size`. The position-embedding grid is created for this size.
      train: enables dropout / stochastic depth (needs a "dropout" rng then).

    Returns:
      ``(pooled, patches)``: the CLS token ``[B, width]`` and the patch tokens
      ``[B, h, w, width]``, both after the final LayerNorm, in `dtype`.
    """
    p = self.patch_size
    if self.stem == "patch":
      x = nn.Conv(
          self.width, (p, p), strides=(p, p), padding="VALID",
          dtype=self.dtype, name="embedding",
          kernel_init=_wlp(nn.initializers.lecun_normal(),
                           ("conv_h", "conv_w", "conv_in", "embed")),
          bias_init=_wlp(nn.initializers.zeros_init(), ("embed",)))(
              images.astype(self.dtype))  # [B, h, w, D]
    elif self.stem == "conv":
      x = ConvStem(self.width, p, dtype=self.dtype, name="conv_stem")(
          images.astype(self.dtype))  # [B, h, w, D]
    else:
      raise ValueError(f"stem={self.stem!r}; use one of {STEMS}.")
    b, h, w, d = x.shape
    x = jnp.reshape(x, (b, h * w, d))
    posemb = self.param(
        "pos_embedding",
        _wlp(nn.initializers.normal(stddev=1 / np.sqrt(d)),
             (None, "length", "embed")),
        (1, h * w, d), jnp.float32)
    x = x + posemb.astype(self.dtype)
    cls = self.param("cls", _wlp(nn.initializers.zeros_init(),
                                 (None, None, "embed")), (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (b, 1, 1)), x],
                        axis=1)  # [B, 1 + h*w, D]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x = Encoder(
        depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        dtype=self.dtype, dropout=self.dropout, droppath=self.droppath,
        remat=self.remat, remat_policy=self.remat_policy,
        attention_impl=self.attention_impl, name="Transformer")(
            x, not train)
    return x[:, 0], jnp.reshape(x[:, 1:], (b, h, w, d))
