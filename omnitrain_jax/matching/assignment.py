"""From a batch of matching costs to a 0/1 assignment matrix.

`assignment_matrix(cost, num_cols, matches_per_target=k, method=...)` solves
the Hungarian problems of `hungarian.linear_sum_assignment` and returns the
matching as a float ``[B, N, M]`` 0/1 matrix, the form a loss multiplies with.
On top of the solver it adds:

* **One-to-many matching** (``k > 1``, H-DETR's "hybrid" matching, Jia et al.
  2023): every target is repeated k times in the cost, so k predictions are
  matched to each target.
* **Per-shard host matching**: with ``method="scipy"``, when traced under a
  mesh (`jax.set_mesh`) whose ``batch_axis`` has more than one device, the
  solve goes through `hungarian.sharded_linear_sum_assignment`, so every
  device's host callback gets only its own examples instead of the whole
  sharded batch being gathered onto one device. ``method="jax"`` runs in-graph
  and XLA shards it like the rest of the step, so it never needs this.

Shapes: B examples, N predictions (rows), M targets (columns).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omnitrain_jax.matching import hungarian


def assignment_matrix(cost: jnp.ndarray, num_cols: jnp.ndarray, *,
                      matches_per_target: int = 1, method: str = "jax",
                      batch_axis: str = "data") -> jnp.ndarray:
  """The minimum-cost matching of predictions to targets, as a 0/1 matrix.

  Args:
    cost: float ``[B, N, M]``; ``cost[b, i, j]`` is the cost of matching
      prediction i to target j. Not differentiated.
    num_cols: int ``[B]``, the real targets of each example; targets are padded
      at the end, columns ``>= num_cols[b]`` are never matched.
    matches_per_target: k, the predictions matched to each target (1: the
      one-to-one matching of DETR). When ``k x num_cols > N`` every target is
      still matched once and the spare predictions go to extra copies of the
      first targets.
    method: ``"jax"`` (in-graph solver) or ``"scipy"`` (host callback, per
      shard under a mesh; see the module docstring).
    batch_axis: the mesh axis the batch is sharded over (``method="scipy"``
      only).

  Returns:
    float32 ``[B, N, M]``: 1 where prediction i is matched to target j. Each
    prediction has at most one target; each real target has k predictions
    (``min(k x num_cols, N)`` pairs in all).
  """
  if matches_per_target < 1:
    raise ValueError(f"matches_per_target={matches_per_target} must be >= 1 "
                     "(1: one-to-one matching).")
  cost = jax.lax.stop_gradient(cost)
  _, n, m = cost.shape
  k = matches_per_target
  if k == 1:
    row_ind, col_ind = _solve(cost, num_cols, method, batch_axis)
  else:
    # Column j of the repeated cost is target j mod count, so the first
    # min(k * count, N) columns hold every target at least once (when
    # count <= N) and the valid columns stay first, as the solver expects.
    rep = jnp.arange(k * m, dtype=jnp.int32)[None, :] % jnp.maximum(
        num_cols, 1)[:, None]  # [B, kM]
    rep_cost = jnp.take_along_axis(cost, rep[:, None, :], axis=2)  # [B, N, kM]
    rep_cols = jnp.minimum(k * num_cols, n)  # [B]
    row_ind, rep_col = _solve(rep_cost, rep_cols, method, batch_axis)
    col_ind = jnp.where(
        rep_col >= 0,
        jnp.take_along_axis(rep, jnp.maximum(rep_col, 0), axis=1), -1)
  return _pairs_to_matrix(row_ind, col_ind, n, m)


def _split_batch_mesh(batch_axis):
  """The context mesh when it splits the batch over several devices, else None.

  The context mesh is the one set by `jax.set_mesh` (the trainer traces its
  step inside it). None when there is no mesh, when `batch_axis` is not one of
  its axes or has size 1, or when `batch_axis` is already manual (tracing
  inside a `shard_map`, where each device already holds only its own shard).

  Args:
    batch_axis: the mesh axis the batch is sharded over.

  Returns:
    The `jax.sharding.AbstractMesh`, or None.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or batch_axis not in mesh.axis_names:
    return None
  if mesh.shape[batch_axis] == 1 or batch_axis in mesh.manual_axes:
    return None
  return mesh


def _solve(cost, num_cols, method, batch_axis):
  """`linear_sum_assignment`, per shard for the host solver on a split batch."""
  mesh = _split_batch_mesh(batch_axis) if method == "scipy" else None
  if mesh is None:
    return hungarian.linear_sum_assignment(cost, num_cols, method=method)
  # Manual over every mesh axis (JAX runs callbacks only there), so with a
  # "model" axis > 1 each model replica solves its data shard again: the
  # results agree, and that costs less than gathering the batch.
  return hungarian.sharded_linear_sum_assignment(
      cost, num_cols, mesh=mesh, batch_axis=batch_axis, method=method)


def _pairs_to_matrix(row_ind, col_ind, n, m):
  """[B, K] index pairs (-1 = none) -> 0/1 float assignment matrix [B, N, M]."""
  rows = jax.nn.one_hot(row_ind, n, dtype=jnp.float32)  # [B, K, N]; -1 -> 0s
  cols = jax.nn.one_hot(col_ind, m, dtype=jnp.float32)  # [B, K, M]
  valid = ((row_ind >= 0) & (col_ind >= 0)).astype(jnp.float32)[..., None]
  return jnp.einsum("bkn,bkm->bnm", rows * valid, cols)
