"""Tests of the train step's token-table updates: sparse (lazy AdamW) vs dense.

The sparse step must give the rows a step touches exactly the dense update,
leave the other rows (and their moments) as they are, skip a non-finite step
without writing anything, and give the same result on a sharded table.
"""

import json
import os
import pathlib
import runpy
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnitrain_jax import model_setup
from omnitrain_jax import optim
from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema

REPO = pathlib.Path(__file__).resolve().parents[1]
TABLE = optim.TABLE
V = 300


def _config(update: str, **optimizer):
  config = runpy.run_path(str(REPO / "configs" / "shapes_demo.py"))[
      "get_config"]("tiny")
  with config.unlocked():
    config.optimizer.token_table_update = update
    config.optimizer.warmup_steps = 0
    config.optimizer.update(optimizer)
    config.total_steps = 10
  return config


def _batch(spec: schema.Spec, batch_size: int, ids: np.ndarray, seed: int,
           vocab_size: int = V) -> dict[str, np.ndarray]:
  """det examples with 1-2 boxes whose tokens and candidates come from `ids`."""
  rng = np.random.default_rng(seed)
  examples = []
  q = spec.num_candidates
  for b in range(batch_size):
    ex = schema.empty_example(spec, "det")
    s = spec.image_size
    ex["image"] = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    ex["image_id"] = np.int32(b)
    ex["orig_size"] = np.array([s, s], np.int32)
    n = int(rng.integers(1, 3))
    ex["boxes"][:n] = np.concatenate(
        [rng.uniform(0.3, 0.7, (n, 2)), rng.uniform(0.1, 0.3, (n, 2))], 1)
    ex["box_mask"][:n] = True
    cands = rng.choice(ids, size=min(q, len(ids)), replace=False)
    ex["box_tokens"][:n, 0] = cands[:n]
    ex["phrase_ids"][:n] = np.arange(n)
    ex["candidates"] = np.zeros(q, np.int32)
    ex["candidates"][:len(cands)] = cands
    ex["cand_known"] = ex["candidates"] > 0
    ex["cand_bg"] = ex["candidates"] > 0
    examples.append(ex)
  batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  assert batch["candidates"].max() < vocab_size
  return batch


def _setup(update: str, **optimizer):
  config = _config(update, **optimizer)
  spec = preparation.spec_from_config(config.data)
  setup = model_setup.create(config, vocab_size=V, spec=spec,
                             devices=jax.devices()[:1])
  return config, spec, setup


def _np(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def two_setups():
  # Weight decay on the table (not the default) makes the dense update of an
  # untouched row visible after one step.
  kw = dict(weight_decay=0.1, no_decay_regex=r"(pos_embedding|cls|norm|bias)")
  config, spec, dense = _setup("dense", **kw)
  _, _, sparse = _setup("sparse", **kw)
  return config, spec, dense, sparse


def test_sparse_state_keeps_the_table_apart(two_setups):
  config, _, dense, sparse = two_setups
  assert dense.table_tx is None and sparse.table_tx is not None
  d, s = dense.init_fn(config.seed), sparse.init_fn(config.seed)
  # The same initial parameters; the table's moments live beside opt_state.
  jax.tree.map(np.testing.assert_array_equal, _np(d.params), _np(s.params))
  assert d.table_opt_state is None
  mu = s.table_opt_state[0].mu
  assert mu.shape == s.params[TABLE].shape
  assert not any(x.shape == s.params[TABLE].shape
                 for x in jax.tree.leaves(s.opt_state))


def test_touched_rows_get_the_dense_update(two_setups):
  config, spec, dense, sparse = two_setups
  batch_size = config.batch_size
  ids = np.arange(2, 40)  # Candidates from 38 of the 300 rows.
  batch = _batch(spec, batch_size, ids, seed=1)
  d0 = dense.init_fn(config.seed)
  s0 = sparse.init_fn(config.seed)
  table0 = np.asarray(d0.params[TABLE])
  d1, dm = dense.train_step(d0, batch)
  s1, sm = sparse.train_step(s0, batch)
  np.testing.assert_allclose(float(sm["loss"]), float(dm["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(sm["grad_norm"]), float(dm["grad_norm"]),
                             rtol=1e-5)
  touched = np.zeros(V, bool)
  touched[np.unique(batch["candidates"])] = True
  touched[0] = False
  assert float(sm["table_rows_updated"]) == touched.sum()
  dt, st = np.asarray(d1.params[TABLE]), np.asarray(s1.params[TABLE])
  moved = np.abs(dt[touched] - table0[touched]).max()
  assert moved > 1e-4  # The step did move the rows.
  np.testing.assert_allclose(st[touched], dt[touched], rtol=1e-5,
                             atol=1e-6 * moved)
  # Untouched rows: dense decays them, sparse leaves them (and id 0) alone.
  assert np.abs(dt[~touched] - table0[~touched]).max() > 0
  np.testing.assert_array_equal(st[~touched], table0[~touched])
  # Moments of touched rows as dense; of the others still zero.
  d_mu = np.asarray(d1.opt_state[1].inner_states["head"].inner_state[0]
                    .mu[TABLE])
  s_mu = np.asarray(s1.table_opt_state[0].mu)
  np.testing.assert_allclose(s_mu[touched], d_mu[touched], rtol=1e-5,
                             atol=1e-9)
  assert np.all(s_mu[~touched] == 0)
  # The other parameters follow the same update.
  rest_d = {k: v for k, v in _np(d1.params).items() if k != TABLE}
  rest_s = {k: v for k, v in _np(s1.params).items() if k != TABLE}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               rest_s, rest_d)


def test_untouched_rows_do_not_coast(two_setups):
  """Two steps on disjoint rows: the first step's rows keep their values in
  the second under sparse (dense moves them on their momentum)."""
  config, spec, dense, sparse = two_setups
  first = _batch(spec, config.batch_size, np.arange(2, 30), seed=2)
  second = _batch(spec, config.batch_size, np.arange(30, 60), seed=3)
  s = sparse.init_fn(config.seed)
  s, _ = sparse.train_step(s, first)
  after_first = np.asarray(s.params[TABLE]).copy()
  mu_first = np.asarray(s.table_opt_state[0].mu).copy()
  s, _ = sparse.train_step(s, second)
  rows = np.unique(first["candidates"])
  rows = rows[rows > 0]
  np.testing.assert_array_equal(np.asarray(s.params[TABLE])[rows],
                                after_first[rows])
  np.testing.assert_array_equal(np.asarray(s.table_opt_state[0].mu)[rows],
                                mu_first[rows])
  # ... and the count advanced once per applied step (bias correction).
  assert int(s.table_opt_state[0].count) == 2
  d = dense.init_fn(config.seed)
  d, _ = dense.train_step(d, first)
  d_first = np.asarray(d.params[TABLE])[rows].copy()
  d, _ = dense.train_step(d, second)
  assert np.abs(np.asarray(d.params[TABLE])[rows] - d_first).max() > 1e-5


def test_nonfinite_step_writes_nothing(two_setups):
  config, spec, _, sparse = two_setups
  batch = _batch(spec, config.batch_size, np.arange(2, 40), seed=4)
  s0 = sparse.init_fn(config.seed)
  s0, _ = sparse.train_step(s0, batch)  # Non-zero moments.
  before = _np(s0)
  bad = dict(batch)
  cands = bad["candidates"].copy()
  cands[0, 0] = V + 5  # An id outside the table: a NaN row, a NaN loss.
  bad["candidates"] = cands
  s1, m = sparse.train_step(s0, bad)
  assert float(m["nonfinite"]) == 1.0
  after = _np(s1)
  assert int(after.skipped_steps) == int(before.skipped_steps) + 1
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.table_opt_state,
               before.table_opt_state)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state,
               before.opt_state)


def test_unknown_update_mode_is_an_error():
  with pytest.raises(ValueError, match="token_table_update"):
    _setup("lazy")


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from omnitrain_jax import model_setup, optim
    from omnitrain_jax.data import preparation
    from omnitrain_jax import train_step_test as t

    out = {}
    for name, overrides, devices in [
        ("1 device", {}, jax.devices()[:1]),
        ("fsdp data=4 x model=2", {"mesh.data": 4, "mesh.model": 2,
                                   "logical_rules": "fsdp"}, None)]:
      config = t._config("sparse")
      config.update_from_flattened_dict(overrides)
      spec = preparation.spec_from_config(config.data)
      setup = model_setup.create(config, vocab_size=t.V, spec=spec,
                                 devices=devices)
      state = setup.init_fn(config.seed)
      losses = []
      for step in range(3):
        batch = t._batch(spec, config.batch_size, np.arange(2, 80), seed=step)
        state, metrics = setup.train_step(state, batch)
        losses.append(float(metrics["loss"]))
      table = state.params[optim.TABLE]
      mu = state.table_opt_state[0].mu
      out[name] = {
          "losses": losses,
          "table": np.asarray(table).tolist(),
          "table_spec": [str(a) for a in table.sharding.spec],
          "mu_spec": [str(a) for a in mu.sharding.spec],
          "table_shard_rows": [s.data.shape[0] for s in
                               table.addressable_shards][:1],
      }
    print("RESULT " + json.dumps(out))
""")


def test_sharded_table_step_equals_single_device(tmp_path):
  script = tmp_path / "sharded.py"
  script.write_text(SHARDED_SCRIPT)
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(script), str(REPO)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = json.loads(line[len("RESULT "):])
  ref = result.pop("1 device")
  assert len(set(np.round(ref["losses"], 6))) == 3
  for name, got in result.items():
    # The table and its moments are split over "model" (2 shards of rows);
    # FSDP also splits the embedding dimension over "data". (The default
    # rules' data x model layout runs the sparse step in
    # tests/train_test.py's layouts test.)
    assert got["table_spec"][0] == "model", (name, got["table_spec"])
    assert got["mu_spec"] == got["table_spec"], name
    assert got["table_shard_rows"] == [V // 2], name
    if name.startswith("fsdp"):
      assert got["table_spec"][1] == "data", got["table_spec"]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-5,
                               err_msg=name)
    np.testing.assert_allclose(np.array(got["table"]), np.array(ref["table"]),
                               rtol=1e-4, atol=1e-6, err_msg=name)
