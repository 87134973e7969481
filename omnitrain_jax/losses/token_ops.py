"""Token-set operations in candidate space, shared by the matching cost and the loss.

Each example scores Q candidate token ids (``batch["candidates"]``, 0 = pad); a
box's or caption's token ids are mapped onto those candidates in-graph
(`candidate_targets`), so the model never sees the full vocabulary. The other
functions are the elementwise pieces that both the Hungarian cost
(`matching_cost.py`) and the loss terms (`terms.py`) are built from, so the
cost and the loss it approximates stay the same expressions.

Shapes: B examples, N predictions, M targets (boxes), Q candidates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked softmax entries get this logit: finite (no inf - inf = NaN anywhere) but
# far below any real logit, so exp() underflows to exactly 0.
NEG_LOGIT = -1e9


def candidate_targets(tokens: jnp.ndarray,
                      candidates: jnp.ndarray) -> jnp.ndarray:
  """Maps token-id sets onto each example's candidate list.

  ``out[b, ..., q] = any_t(tokens[b, ..., t] == candidates[b, q]) and
  candidates[b, q] > 0``.

  Args:
    tokens: int ``[B, ..., T]`` token ids, 0 = pad (e.g. `box_tokens` [B, M, T]
      or `caption_tokens` [B, C]).
    candidates: int ``[B, Q]`` candidate token ids, 0 = pad.

  Returns:
    bool ``[B, ..., Q]``.
  """
  extra = tokens.ndim - 2  # Axes between B and T.
  cand = candidates.reshape(
      (candidates.shape[0],) + (1,) * (extra + 1) + candidates.shape[1:])
  hit = jnp.any(tokens[..., :, None] == cand, axis=-2)  # [B, ..., Q]
  valid = (candidates > 0).reshape(
      (candidates.shape[0],) + (1,) * extra + candidates.shape[1:])
  return hit & valid


def uniform_over(targets: jnp.ndarray) -> jnp.ndarray:
  """Uniform distributions over the True entries of each row (0 if none).

  Args:
    targets: bool ``[..., Q]``.

  Returns:
    float32 ``[..., Q]``, each row summing to 1 (or 0 for an empty row).
  """
  t = targets.astype(jnp.float32)
  return t / jnp.maximum(t.sum(-1, keepdims=True), 1.0)


def masked_log_softmax(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """log_softmax over the last axis restricted to `mask`; 0 where masked.

  Masked entries take `NEG_LOGIT` rather than -inf, so neither the value nor
  the gradient is NaN when a whole row is masked; their output is 0, so a
  masked entry never reaches a loss or its gradient.

  Args:
    logits: float ``[..., Q]``.
    mask: bool, broadcastable to `logits`.

  Returns:
    float ``[..., Q]``.
  """
  logp = jax.nn.log_softmax(jnp.where(mask, logits, NEG_LOGIT), axis=-1)
  return jnp.where(mask, logp, 0.0)


def sigmoid_focal(logits: jnp.ndarray, targets: jnp.ndarray, alpha: float,
                  gamma: float) -> jnp.ndarray:
  """Elementwise sigmoid focal loss (Lin et al., 2017).

  Args:
    logits: float ``[...]``.
    targets: float ``[...]`` in {0, 1}.
    alpha: weight of positives (negatives get 1 - alpha).
    gamma: focusing exponent.

  Returns:
    float ``[...]``.
  """
  p = jax.nn.sigmoid(logits)
  ce = targets * jax.nn.softplus(-logits) + (1 - targets) * jax.nn.softplus(
      logits)
  p_t = targets * p + (1 - targets) * (1 - p)
  alpha_t = targets * alpha + (1 - targets) * (1 - alpha)
  return alpha_t * (1 - p_t)**gamma * ce


def focal_cost(logits: jnp.ndarray, alpha: float,
               gamma: float) -> jnp.ndarray:
  """Cost of calling each token positive rather than negative.

  The Deformable-DETR / OWL-ViT focal matching cost: `sigmoid_focal` of the
  token as a positive minus its `sigmoid_focal` as a negative, written out
  (``1 - p_t`` is ``1 - p`` resp. ``p``) as those implementations do.

  Args:
    logits: float ``[...]``.
    alpha: focal alpha, as in `sigmoid_focal`.
    gamma: focal gamma, as in `sigmoid_focal`.

  Returns:
    float ``[...]``.
  """
  p = jax.nn.sigmoid(logits)
  pos = alpha * (1 - p)**gamma * jax.nn.softplus(-logits)
  neg = (1 - alpha) * p**gamma * jax.nn.softplus(logits)
  return pos - neg


def batch_token_set(tokens: jnp.ndarray, keep: jnp.ndarray,
                    candidates: jnp.ndarray) -> jnp.ndarray:
  """Which candidates occur anywhere in the batch's kept token sets.

  ``out[b, q]``: ``candidates[b, q]`` equals a nonzero ``tokens[b', ..., t]``
  of *any* example b' with ``keep[b', ...]``. Used for the tokens the batch
  gives box supervision (`omni_loss`, img phrase matching). A sort and a
  binary search (O((S + BQ) log S) for S token slots), not a [BQ, S]
  comparison, so it stays cheap for large batches.

  Args:
    tokens: int ``[B, ..., T]`` token ids, 0 = pad (e.g. `box_tokens`).
    keep: bool ``[B, ...]`` (the shape of `tokens` without T): which token
      sets count (e.g. the real boxes of det examples).
    candidates: int ``[B, Q]``, 0 = pad.

  Returns:
    bool ``[B, Q]`` (False for padding candidates).
  """
  ids = jnp.where(keep[..., None], tokens, 0).reshape(-1)
  ids = jnp.sort(ids)  # [S]
  pos = jnp.searchsorted(ids, candidates)  # [B, Q]
  hit = jnp.take(ids, jnp.minimum(pos, ids.shape[0] - 1)) == candidates
  return hit & (candidates > 0)
