"""Benchmark of the Hungarian matchers, all methods side by side; prints JSON.

  /work/venv/bin/python benchmarks/matching.py [--repeats 20] [--kinds detr,uniform]
      [--shapes 16x100x20,16x900x50,4x576x100,2x2304x100] [--no-optax]

For each shape [B, N, M] and cost kind it times (ms per batch, min over
repeats, after compilation; compile time reported separately):

* `scipy_loop_full`: scipy.optimize.linear_sum_assignment per example in a
  Python loop on the full padded M (host numpy, no JAX).
* `scipy_loop_valid`: the same on the valid columns only (the reference the
  ratios are taken against).
* `ours_scipy`: `linear_sum_assignment(method="scipy")` under jit.
* `ours_jax`: `linear_sum_assignment(method="jax")` under jit, given
  num_valid_cols.
* `ours_jax_full`: the same with num_valid_cols=None (every padded column
  solved as a real one), comparable to the field solvers below.
* `optax`: jit(vmap(optax.assignment.hungarian_algorithm)) on the full padded
  matrix (in-graph shortest-path Hungarian from the field, scenic's algorithm).

Settings per shape: `all` (all M columns valid), `valid7_12` (7-12 valid
targets, padded columns random like the rest) and `padconst7_12` (7-12 valid,
padded columns all one large constant, as in DETR padding). Each entry also
reports whether the in-graph solvers' total cost matched scipy's (rel. 1e-5).
Timings on a shared machine are noisy: re-run and compare within one run.
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from omnitrain_jax.matching import linear_sum_assignment

_PAD_CONST = 1e4


def _costs(rng, kind, b, n, m):
  if kind == "uniform":
    return rng.random((b, n, m)).astype(np.float32)
  # DETR-like: L1 of random boxes + class cost + GIoU-ish noise.
  pred = rng.random((b, n, 1, 4))
  tgt = rng.random((b, 1, m, 4))
  l1 = np.abs(pred - tgt).sum(-1)
  cls = -rng.random((b, n, m))
  return (5 * l1 + 2 * cls + 2 * rng.random((b, n, m))).astype(np.float32)


def _time(fn, repeats, min_s=0.2):
  """Min wall time of fn() in ms over >= repeats calls (and >= min_s total)."""
  best, total, i = float("inf"), 0.0, 0
  while i < repeats or total < min_s:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    best, total, i = min(best, dt), total + dt, i + 1
    if i >= 20 * repeats:
      break
  return 1e3 * best


def _scipy_loop(cost, nv):
  out = []
  for b in range(cost.shape[0]):
    out.append(scipy.optimize.linear_sum_assignment(cost[b, :, :nv[b]]))
  return out


def _total(cost, rows, cols):
  cost = np.asarray(cost, np.float64)
  rows, cols = np.asarray(rows), np.asarray(cols)
  ok = (rows >= 0) & (cols >= 0)
  b = np.arange(cost.shape[0])[:, None]
  return np.where(ok, cost[b, np.maximum(rows, 0), np.maximum(cols, 0)],
                  0).sum(1)


def _bench_jit(fn, args, repeats):
  jitted = jax.jit(fn)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_ms = 1e3 * (time.perf_counter() - t0)
  out = jax.block_until_ready(compiled(*args))
  ms = _time(lambda: jax.block_until_ready(compiled(*args)), repeats)
  return ms, compile_ms, out


def run_case(rng, kind, shape, setting, repeats, with_optax):
  b, n, m = shape
  cost = _costs(rng, kind, b, n, m)
  if setting == "all":
    nv = np.full((b,), m, np.int32)
  else:
    nv = rng.integers(7, 13, b).astype(np.int32)
  if setting == "padconst7_12":
    for e in range(b):
      cost[e, :, nv[e]:] = _PAD_CONST
  full_nv = np.full((b,), m, np.int32)

  res = {"kind": kind, "shape": list(shape), "setting": setting,
         "num_valid": nv.tolist() if setting != "all" else m}
  times, compiles, exact = {}, {}, {}
  times["scipy_loop_full"] = _time(lambda: _scipy_loop(cost, full_nv), repeats)
  times["scipy_loop_valid"] = _time(lambda: _scipy_loop(cost, nv), repeats)
  want_valid = np.array([cost[e][r, c].astype(np.float64).sum()
                         for e, (r, c) in enumerate(_scipy_loop(cost, nv))])
  want_full = np.array([cost[e][r, c].astype(np.float64).sum()
                        for e, (r, c) in enumerate(_scipy_loop(cost, full_nv))])
  jcost, jnv = jnp.asarray(cost), jnp.asarray(nv)

  def close(got, want):
    return bool(np.all(np.abs(got - want) <= 1e-5 * np.maximum(
        1.0, np.abs(want))))

  variants = [
      ("ours_scipy", lambda c, k: linear_sum_assignment(c, k, "scipy"),
       (jcost, jnv), want_valid),
      ("ours_jax", lambda c, k: linear_sum_assignment(c, k, "jax"),
       (jcost, jnv), want_valid),
      ("ours_jax_full", lambda c: linear_sum_assignment(c, None, "jax"),
       (jcost,), want_full),
  ]
  if with_optax:
    import optax  # pylint: disable=g-import-not-at-top
    variants.append(("optax", jax.vmap(optax.assignment.hungarian_algorithm),
                     (jcost,), want_full))
  for name, fn, args, want in variants:
    ms, cms, (rows, cols) = _bench_jit(fn, args, repeats)
    times[name], compiles[name] = ms, cms
    exact[name] = close(_total(cost, rows, cols), want)
  ref = times["scipy_loop_valid"]
  res["ms"] = {k: round(v, 4) for k, v in times.items()}
  res["compile_ms"] = {k: round(v, 1) for k, v in compiles.items()}
  res["ratio_to_scipy_valid"] = {k: round(v / ref, 2) for k, v in times.items()}
  res["total_cost_matches_scipy"] = exact
  return res


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes",
                      default="16x100x20,16x900x50,4x576x100,2x2304x100")
  parser.add_argument("--kinds", default="detr,uniform")
  parser.add_argument("--settings", default="all,valid7_12,padconst7_12")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-optax", action="store_true")
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  header = {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0]), "machine": platform.machine(),
            "note": "ms per batch, min over repeats; shared machine, noisy"}
  print(json.dumps(header), flush=True)
  for kind in args.kinds.split(","):
    for s in args.shapes.split(","):
      shape = tuple(int(x) for x in s.split("x"))
      for setting in args.settings.split(","):
        res = run_case(rng, kind, shape, setting, args.repeats,
                       not args.no_optax)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
  main()
