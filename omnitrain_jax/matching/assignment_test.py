"""Tests for omnitrain_jax.matching.assignment (one-to-many, per-shard scipy)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import scipy.optimize

from omnitrain_jax.matching import assignment
from omnitrain_jax.matching import linear_sum_assignment

_matrix_jit = jax.jit(assignment.assignment_matrix,
                      static_argnames=("matches_per_target", "method"))


def _cost(seed, b=4, n=8, m=3):
  return np.random.default_rng(seed).random((b, n, m)).astype(np.float32)


@pytest.mark.parametrize("method", ["jax", "scipy"])
def test_one_to_one_is_the_hungarian_matching(method):
  cost = _cost(0)
  num_cols = np.array([3, 1, 0, 2], np.int32)
  got = np.asarray(_matrix_jit(cost, num_cols, method=method))
  rows, cols = linear_sum_assignment(cost, num_cols, method=method)
  want = np.zeros_like(got)
  for b in range(4):
    for r, c in zip(np.asarray(rows[b]), np.asarray(cols[b])):
      if r >= 0:
        want[b, r, c] = 1
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got.sum((1, 2)), num_cols)
  assert np.all(got.sum(-1) <= 1)  # A prediction has at most one target.


@pytest.mark.parametrize("method", ["jax", "scipy"])
def test_matches_per_target_matches_each_target_k_times(method):
  cost = _cost(1)
  num_cols = np.array([3, 1, 0, 2], np.int32)
  got = np.asarray(_matrix_jit(cost, num_cols, matches_per_target=2,
                               method=method))
  for b, k in enumerate(num_cols):
    np.testing.assert_array_equal(got[b].sum(0), [2] * k + [0] * (3 - k))
  assert np.all(got.sum(-1) <= 1)
  # The optimum of the problem with every target repeated twice.
  for b, k in enumerate(num_cols):
    rep = np.tile(cost[b, :, :k], (1, 2))
    r, c = scipy.optimize.linear_sum_assignment(rep)
    np.testing.assert_allclose((got[b] * cost[b]).sum(), rep[r, c].sum(),
                               rtol=1e-6)


def test_more_matches_than_predictions_matches_every_target_once():
  # 3 targets x 3 > N = 5 predictions: all 5 matched, every target at least
  # once, the 2 spare predictions on the first targets' extra copies.
  cost = _cost(2, b=1, n=5, m=3)
  got = np.asarray(_matrix_jit(cost, np.array([3], np.int32),
                               matches_per_target=3, method="jax"))
  np.testing.assert_array_equal(got[0].sum(0), [2, 2, 1])
  np.testing.assert_array_equal(got[0].sum(-1), [1] * 5)


def test_errors():
  with pytest.raises(ValueError, match="matches_per_target"):
    assignment.assignment_matrix(_cost(0), np.zeros(4, np.int32),
                                 matches_per_target=0)
  with pytest.raises(ValueError, match="method"):
    assignment.assignment_matrix(_cost(0), np.zeros(4, np.int32),
                                 method="auction")


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from omnitrain_jax.matching import assignment, hungarian

    rng = np.random.default_rng(0)
    cost = rng.random((16, 12, 5)).astype(np.float32)
    nv = rng.integers(0, 6, 16).astype(np.int32)
    fn = jax.jit(assignment.assignment_matrix,
                 static_argnames=("matches_per_target", "method"))
    want = {k: np.asarray(fn(cost, nv, matches_per_target=k, method="jax"))
            for k in (1, 2)}

    seen = []
    host = hungarian._scipy_host
    def spy(cost, nv):
      seen.append(np.asarray(cost).shape[0])
      return host(cost, nv)
    hungarian._scipy_host = spy

    def run(mesh, k, method="scipy"):
      seen.clear()
      with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, P("data"))
        return np.asarray(fn(jax.device_put(cost, sh), jax.device_put(nv, sh),
                             matches_per_target=k, method=method))

    devices = np.array(jax.devices())
    data8 = Mesh(devices.reshape(8, 1), ("data", "model"))
    for k in (1, 2):
      np.testing.assert_array_equal(run(data8, k), want[k])
      # One host call per data shard, each with its own 2 examples only.
      assert seen == [2] * 8, (k, seen)
    # A "model" axis repeats each data shard's solve on its replicas.
    np.testing.assert_array_equal(
        run(Mesh(devices.reshape(4, 2), ("data", "model")), 1), want[1])
    assert seen == [4] * 8, seen
    # data = 1 (or no mesh): today's single callback on the whole batch.
    np.testing.assert_array_equal(
        run(Mesh(devices.reshape(1, 8), ("data", "model")), 1), want[1])
    assert seen == [16], seen
    seen.clear()
    np.testing.assert_array_equal(fn(cost, nv, method="scipy"), want[1])
    assert seen == [16], seen
    # The in-graph solver never calls the host, mesh or not.
    np.testing.assert_array_equal(run(data8, 1, method="jax"), want[1])
    assert seen == [], seen
    print("OK")
""")


def test_scipy_under_a_data_mesh_runs_per_shard():
  # Fake devices must be configured before jax starts: own process.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
