"""Tests for omnitrain_jax.matching.hungarian, with scipy as the oracle."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from omnitrain_jax.matching import hungarian
from omnitrain_jax.matching import linear_sum_assignment

_lsa_jit = jax.jit(linear_sum_assignment, static_argnames="method")


def _detr_like(rng, b, n, m):
  """L1 of random boxes + class cost + GIoU-ish noise, [B, N, M]."""
  pred = rng.random((b, n, 1, 4))
  tgt = rng.random((b, 1, m, 4))
  l1 = np.abs(pred - tgt).sum(-1)
  cls = -rng.random((b, n, m))
  return (5 * l1 + 2 * cls + 2 * rng.random((b, n, m))).astype(np.float32)


def _cost_batch(rng, kind, b, n, m):
  if kind == "uniform":
    return rng.random((b, n, m)).astype(np.float32)
  if kind == "ints":  # many ties
    return rng.integers(0, 4, (b, n, m)).astype(np.float32)
  if kind == "equal":
    return np.full((b, n, m), 3.0, np.float32)
  if kind == "large":
    return (1e6 * rng.random((b, n, m))).astype(np.float32)
  if kind == "tiny":
    return (1e-6 * rng.random((b, n, m))).astype(np.float32)
  if kind == "detr":
    return _detr_like(rng, b, n, m)
  raise ValueError(kind)


def _check(cost, num_valid, rows, cols, rtol=2e-6):
  """Valid matching, -1 padding in place, total cost equal to scipy's."""
  cost = np.asarray(cost, np.float64)
  rows, cols = np.asarray(rows), np.asarray(cols)
  b, n, m = cost.shape
  assert rows.shape == cols.shape == (b, min(n, m))
  assert rows.dtype == cols.dtype == np.int32
  for e in range(b):
    k = int(num_valid[e])
    p = min(n, k)
    r, c = rows[e, :p], cols[e, :p]
    assert (rows[e, p:] == -1).all() and (cols[e, p:] == -1).all(), (e, k)
    assert ((r >= 0) & (r < n)).all() and ((c >= 0) & (c < k)).all(), (e, r, c)
    assert len(set(r.tolist())) == p, ("repeated row", e, r)
    assert (np.diff(c) > 0).all(), ("cols not sorted/unique", e, c)
    if k == 0:
      continue
    sr, sc = scipy.optimize.linear_sum_assignment(cost[e, :, :k])
    want = cost[e, sr, sc].sum()
    got = cost[e, r, c].sum()
    scale = np.abs(cost[e, :, :k]).max() * max(p, 1)
    assert abs(got - want) <= rtol * scale, (e, n, m, k, got, want)


@pytest.mark.parametrize("method", ["jax", "scipy"])
@pytest.mark.parametrize("n,m", [(1, 1), (7, 7), (12, 5), (5, 12), (40, 9),
                                 (3, 17)])
def test_matches_scipy(method, n, m):
  rng = np.random.default_rng(1000 * n + m)
  kinds = ["uniform", "ints", "equal", "large", "tiny", "detr"]
  cost = np.concatenate([_cost_batch(rng, k, 8, n, m) for k in kinds])
  num_valid = rng.integers(0, m + 1, len(cost))
  num_valid[:3] = [0, m, min(n, m)]
  rows, cols = _lsa_jit(cost, num_valid, method=method)
  _check(cost, num_valid, rows, cols)


def test_many_seeds_jax():
  """Many random problems of one shape in one compiled call."""
  rng = np.random.default_rng(7)
  cost = np.concatenate([_cost_batch(rng, k, 100, 30, 12)
                         for k in ["uniform", "ints", "detr"]])
  num_valid = rng.integers(0, 13, len(cost))
  rows, cols = _lsa_jit(cost, num_valid, method="jax")
  _check(cost, num_valid, rows, cols)


def test_many_targets_span_init_chunks():
  """K up to 60 crosses the 16/32/... chunks of the greedy initialisation."""
  rng = np.random.default_rng(11)
  cost = np.concatenate([_cost_batch(rng, k, 6, 80, 60)
                         for k in ["uniform", "ints", "detr", "large"]])
  num_valid = rng.integers(0, 61, len(cost))
  num_valid[:3] = [60, 17, 48]
  rows, cols = _lsa_jit(cost, num_valid, method="jax")
  _check(cost, num_valid, rows, cols)


def test_unique_optimum_same_pairs_as_scipy():
  rng = np.random.default_rng(3)
  cost = _detr_like(rng, 16, 50, 10)
  num_valid = rng.integers(0, 11, 16)
  got = _lsa_jit(cost, num_valid, method="jax")
  want = _lsa_jit(cost, num_valid, method="scipy")
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  # N >= M: pair k belongs to target k.
  for e in range(16):
    np.testing.assert_array_equal(got[1][e, :num_valid[e]],
                                  np.arange(num_valid[e]))


def test_padded_columns_are_ignored():
  """Whatever sits in the padded columns must not change the answer."""
  rng = np.random.default_rng(4)
  cost = _detr_like(rng, 4, 20, 8)
  num_valid = np.array([3, 0, 8, 5])
  poisoned = cost.copy()
  for e, k in enumerate(num_valid):
    poisoned[e, :, k:] = -1e9
  for method in ("jax", "scipy"):
    a = _lsa_jit(cost, num_valid, method=method)
    b = _lsa_jit(poisoned, num_valid, method=method)
    np.testing.assert_array_equal(a[0], b[0])


def test_default_all_columns_valid_and_padded_constant():
  rng = np.random.default_rng(5)
  cost = _detr_like(rng, 4, 30, 10)
  cost[:, :, 6:] = 1e4  # DETR-style constant padding, solved as real columns
  rows, cols = _lsa_jit(cost, method="jax")
  _check(cost, np.full(4, 10), rows, cols)


def test_vmap_over_extra_axis():
  rng = np.random.default_rng(6)
  cost = _detr_like(rng, 3 * 4, 9, 6).reshape(3, 4, 9, 6)
  num_valid = rng.integers(0, 7, (3, 4))
  for method in ("jax", "scipy"):
    fn = jax.jit(jax.vmap(lambda c, k, method=method: linear_sum_assignment(
        c, k, method=method)))
    rows, cols = fn(cost, num_valid)
    assert rows.shape == (3, 4, 6)
    _check(cost.reshape(12, 9, 6), num_valid.reshape(12),
           rows.reshape(12, 6), cols.reshape(12, 6))


@pytest.mark.parametrize("method", ["jax", "scipy"])
def test_grad_through_matched_loss(method):
  rng = np.random.default_rng(8)
  pred = jnp.asarray(rng.random((2, 10, 4)), jnp.float32)
  tgt = jnp.asarray(rng.random((2, 5, 4)), jnp.float32)
  num_valid = jnp.array([5, 2])

  def loss(pred):
    cost = jnp.abs(pred[:, :, None] - tgt[:, None]).sum(-1)  # [B, N, M]
    rows, cols = linear_sum_assignment(cost, num_valid, method=method)
    valid = rows >= 0
    matched = jnp.take_along_axis(
        jnp.take_along_axis(cost, jnp.maximum(rows, 0)[..., None], 1)[:, :, 0],
        jnp.maximum(cols, 0), 1)  # cost[b, rows[b, k], cols[b, k]], [B, P]
    return jnp.sum(jnp.where(valid, matched, 0.0))

  g = jax.jit(jax.grad(loss))(pred)
  assert g.shape == pred.shape
  assert np.isfinite(np.asarray(g)).all()
  # Exactly the matched predictions get a gradient: 5 + 2 rows.
  assert int((np.abs(np.asarray(g)).sum(-1) > 0).sum()) == 7


def test_empty_shapes():
  for shape in [(3, 0, 4), (3, 4, 0), (0, 4, 4)]:
    rows, cols = linear_sum_assignment(np.zeros(shape, np.float32))
    assert rows.shape == cols.shape == (shape[0], min(shape[1:]))


def test_input_errors():
  with pytest.raises(ValueError, match="method"):
    linear_sum_assignment(np.zeros((1, 2, 2)), method="auction")
  with pytest.raises(ValueError, match=r"\[B, N, M\]"):
    linear_sum_assignment(np.zeros((2, 2)))
  with pytest.raises(ValueError, match=r"\[0, M=2\]"):
    linear_sum_assignment(np.zeros((1, 2, 2)), np.array([3]))
  with pytest.raises(ValueError, match="shape"):
    linear_sum_assignment(np.zeros((1, 2, 2)), np.array([1, 1]))


def test_nan_terminates_with_valid_matching():
  cost = np.random.default_rng(9).random((2, 6, 4)).astype(np.float32)
  cost[0, 2, 1] = np.nan
  cost[1] = np.nan
  rows, cols = _lsa_jit(cost, None, method="jax")
  for e in range(2):
    assert sorted(np.asarray(cols[e]).tolist()) == [0, 1, 2, 3]
    assert len(set(np.asarray(rows[e]).tolist())) == 4


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from omnitrain_jax.matching import hungarian

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    cost = rng.random((16, 12, 5)).astype(np.float32)
    nv = rng.integers(0, 6, 16).astype(np.int32)
    want = hungarian.linear_sum_assignment(cost, nv, method="scipy")

    seen = []
    host = hungarian._scipy_host
    def spy(cost, nv):
      seen.append(np.asarray(cost).shape[0])
      return host(cost, nv)
    hungarian._scipy_host = spy

    sh = NamedSharding(mesh, P("data"))
    cost_s, nv_s = jax.device_put(cost, sh), jax.device_put(nv, sh)
    for method in ("scipy", "jax"):
      fn = jax.jit(lambda c, k: hungarian.sharded_linear_sum_assignment(
          c, k, mesh=mesh, batch_axis="data", method=method))
      rows, cols = fn(cost_s, nv_s)
      np.testing.assert_array_equal(np.asarray(rows), np.asarray(want[0]))
      np.testing.assert_array_equal(np.asarray(cols), np.asarray(want[1]))
      assert len(rows.sharding.device_set) == 8, rows.sharding
      assert rows.sharding.spec == P("data"), rows.sharding
    # One host call per shard, each with its 2 examples only.
    assert seen == [2] * 8, seen
    try:
      hungarian.sharded_linear_sum_assignment(cost[:12], nv[:12], mesh=mesh)
    except ValueError as e:
      assert "divisible" in str(e)
    else:
      raise AssertionError("expected ValueError")
    print("OK")
""")


def test_sharded_scipy_stays_per_shard():
  # Fake devices must be configured before jax starts: own process.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
