r"""Train-step time and memory against the vocabulary size V; prints JSON.

  /work/venv/bin/python benchmarks/vocab_scaling.py
  /work/venv/bin/python benchmarks/vocab_scaling.py --vocab_sizes=1000,500000 \
      --repeats=5
  python benchmarks/vocab_scaling.py --gpu      # same, on an accelerator

The claim under test (DESIGN.md section 3): the model gathers only the Q
candidate rows of the token table E [V, D] and its logits are [B, N, Q], so a
step should not grow with V beyond the table and its optimizer state. This
benchmark runs one small model (the ShapesWorld demo's: a ViT of width 128,
depth 4 at 128 px, batch 16 = 8 det + 4 grd + 4 img, Q = 64, D = 128) at
V = 1k, 10k, 100k, 500k and, per V, side by side (round-robin, min over
rounds):

* ``dense``: the real step, `model_setup.create(config, ...).train_step`. The gradient of
  the row gather is a dense [V, D] array (zeros + scatter-add), and global-
  norm clipping, AdamW (read p, g, m, v; write p, m, v), weight decay (when
  the config decays the table) and the non-finite guard (isfinite, keep-or-replace of params *and* moments) all
  sweep the whole table every step: O(V * D) work however few rows were used.
* ``frozen_table``: the same model and loss with the table neither
  differentiated nor updated (the rest as in ``dense``): the V-independent
  part of the step, i.e. what the claim promises.
* ``sparse_rows``: the fix, measured. The step gathers the U <= 1 + B * Q
  unique candidate rows, differentiates w.r.t. those rows only (the model is
  applied as a clone with ``vocab_size=U`` on batch-local ids, so the
  gradient is [U, D]), clips with the same global norm, and applies a *lazy*
  AdamW to the touched rows only (gather m, v; update; scatter back into the
  donated table and moments): O(U * D) per step. Lazy Adam (TF-Addons
  LazyAdam, PyTorch SparseAdam) differs from dense AdamW on the rows *not*
  touched in a step: they do not coast on their momentum, their moments do
  not decay, and weight decay does not shrink them. The rows a step touches get exactly the dense update (checked
  here: ``sparse_check``, two steps on one batch against ``dense``).
* ``table_adamw``: clipping + AdamW + guard over the [V, D] table leaf alone,
  given a dense gradient: an estimate of the optimizer's elementwise share of
  ``dense - frozen_table``.

Memory per V: XLA's static plan of each compiled step (`compiled.memory_
analysis()`: arguments, which hold the state, + outputs + temporaries -
donated aliases), the process RSS after the V (cumulative: the allocator
keeps what it had), and on GPU/TPU the allocator's running peak
(`memory_stats()['peak_bytes_in_use']`; V runs in increasing order, so it is
the peak up to this V). Also the bytes of the table and its two Adam moments.
``slopes`` fits time and memory linearly in V per variant.

The machine's load average is in the JSON; timings on a shared CPU are noisy,
the side-by-side differences less so.

Measured (2-core CPU shared with other jobs, load average 5.4-5.8, so times
are ~2-3x a quiet machine's; jax 0.10.2, f32, defaults; min of 3-4 rounds)::

  V        dense    frozen_table  sparse_rows  table_adamw  compiled MB (dense / sparse)
  1k       0.143 s  0.141 s       0.146 s      0.0004 s     101 / 104
  10k      0.145 s  0.136 s       0.147 s      0.002 s      122 / 118
  100k     0.257 s  0.152 s       0.147 s      0.107 s      355 / 256
  500k     0.804 s  0.151 s       0.145 s      0.550 s      1557 / 871

The dense step grows by 0.134 s per 100k rows (5.6x from 1k to 500k) and by
2934 compiled bytes per row: the table, its two moments (1536 B/row with
D = 128) *and* ~1400 B/row of temporaries (the dense [V, D] gradient and the
update's intermediates). The table's AdamW + clip + guard alone
(``table_adamw``) is 0.55 of the 0.65 s that 500k rows add; the rest is the
dense gradient (zeros + scatter-add) and its norm / isfinite sweeps. The
frozen and sparse-rows steps are flat in V (slopes within noise) and grow in
memory by exactly the table + moments (1536 B/row). The lazy update matched
the dense one on the touched rows (relative difference 3e-5 after two steps).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from omnitrain_jax import optim
from omnitrain_jax import model_setup
from omnitrain_jax import sharding
from omnitrain_jax.data import preparation
from omnitrain_jax.losses import omni_loss as omni_loss_lib
from omnitrain_jax.models import omnidet

TABLE = omnidet.TOKEN_TABLE
VARIANTS = ("dense", "frozen_table", "sparse_rows", "table_adamw")


# ------------------------------------------------------------- sparse step


def init_sparse_state(params, rest_tx, rng_data) -> dict[str, Any]:
  """The state of `make_row_step`: the table and its moments kept apart."""
  rest = {k: v for k, v in params.items() if k != TABLE}
  table = params[TABLE]
  return {"step": jnp.zeros((), jnp.int32),
          "count": jnp.zeros((), jnp.int32),  # Finite (applied) updates.
          "rest": rest, "rest_opt": rest_tx.init(rest), "table": table,
          "table_mu": jnp.zeros_like(table), "table_nu": jnp.zeros_like(table),
          "rng": rng_data, "skipped_steps": jnp.zeros((), jnp.int32)}


def make_row_step(model, loss_config, opt_config, total_steps: int,
                  num_ids: int, *, frozen: bool):
  """A train step that touches only the batch's candidate rows of the table.

  Args:
    model: the OmniDet.
    loss_config: the `LossConfig`.
    opt_config: ``config.optimizer``.
    total_steps: for the schedules.
    num_ids: 1 + B * Q, the static bound on the unique candidate ids
      (padding id 0 included).
    frozen: do not differentiate or update the table at all.

  Returns:
    ``(step, make_rest_tx)``: ``step(state, batch) -> (state, metrics)`` over
    the state of `init_sparse_state`, and ``make_rest_tx(rest_params)``, the
    optimizer of the other parameters (AdamW without clipping: the step
    clips with the global norm of all gradients, the table's rows included,
    as the dense step does).
  """
  no_clip = ml_collections.ConfigDict(opt_config.to_dict())
  no_clip.grad_clip_norm = 0.0
  clip = float(opt_config.grad_clip_norm or 0.0)
  head_schedule = optim.make_schedule(opt_config, total_steps)
  b1, b2, eps = opt_config.b1, opt_config.b2, opt_config.eps
  wd = opt_config.weight_decay
  # The table's row model: identical but for the table's row count, so the
  # gradient w.r.t. the gathered rows is [U, D], never [V, D].
  row_model = model.clone(vocab_size=num_ids)
  decays_table = bool(optim.decay_mask(
      {TABLE: jax.ShapeDtypeStruct((2, 2), jnp.float32)},
      opt_config.no_decay_regex)[TABLE])

  def make_rest_tx(rest_params):
    # Built from the tree's structure and shapes only: the same transform
    # inits the state (`init_sparse_state`) and updates it in `step`.
    return optim.make_optimizer(no_clip, total_steps, rest_params)[0]

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]),
                             state["step"])
    cands = batch["candidates"]  # [B, Q]
    ids = jnp.concatenate([jnp.zeros((1,), cands.dtype), cands.reshape(-1)])
    # Sorted unique ids, padded with 0; id 0 (padding) is always uniq[0], so
    # padding candidates map to local id 0 and stay padding for the model.
    uniq, inv = jnp.unique(ids, size=num_ids, fill_value=0,
                           return_inverse=True)
    local = inv.reshape(-1)[1:].reshape(cands.shape)  # [B, Q]
    table = state["table"]
    rows = jnp.take(table, uniq, axis=0)  # [U, D]

    def loss_fn(rest, rows):
      outputs = row_model.apply({"params": {**rest, TABLE: rows}},
                                batch["image"], local, train=True,
                                rngs={"dropout": rng})
      # The loss maps box/caption tokens onto the *original* candidate ids.
      return omni_loss_lib.omni_loss(outputs, batch, loss_config)

    if frozen:
      (loss, metrics), g_rest = jax.value_and_grad(loss_fn, has_aux=True)(
          state["rest"], rows)
      g_rows = jnp.zeros((0,), jnp.float32)
    else:
      (loss, metrics), (g_rest, g_rows) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(state["rest"], rows)
    g_norm = optax.global_norm((g_rest, g_rows))
    # optax.clip_by_global_norm's rule.
    scale = (jnp.where(g_norm < clip, 1.0, clip / g_norm) if clip > 0
             else jnp.ones(()))
    g_rest = jax.tree.map(lambda g: g * scale, g_rest)
    g_rows = g_rows * scale
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves((g_rest, g_rows))]))

    rest_tx = make_rest_tx(state["rest"])
    updates, rest_opt = rest_tx.update(g_rest, state["rest_opt"],
                                        state["rest"])
    rest = optax.apply_updates(state["rest"], updates)
    keep = lambda new, old: jax.tree.map(  # pylint: disable=g-long-lambda
        lambda a, b: jnp.where(finite, a, b), new, old)
    new = dict(state)
    new.update(step=state["step"] + 1,
               count=state["count"] + finite.astype(jnp.int32),
               rest=keep(rest, state["rest"]),
               rest_opt=keep(rest_opt, state["rest_opt"]),
               skipped_steps=state["skipped_steps"] + (~finite).astype(
                   jnp.int32))
    if not frozen:
      # Lazy AdamW on the touched rows (optax.adamw's arithmetic: Adam with
      # bias correction at count + 1, then decoupled decay, then -lr).
      count = state["count"]
      lr = head_schedule(count)
      t = (count + 1).astype(jnp.float32)
      mu = b1 * jnp.take(state["table_mu"], uniq, axis=0) + (1 - b1) * g_rows
      nu = b2 * jnp.take(state["table_nu"], uniq, axis=0) + (
          1 - b2) * g_rows * g_rows
      upd = (mu / (1 - b1**t)) / (jnp.sqrt(nu / (1 - b2**t)) + eps)
      if decays_table:
        upd = upd + wd * rows
      new_rows = rows - lr * upd
      # Write real rows only (not padding id 0 nor the fill), only when the
      # step is finite; V is out of bounds: dropped.
      v = table.shape[0]
      idx = jnp.where((uniq > 0) & finite, uniq, v)
      new.update(
          table=table.at[idx].set(new_rows, mode="drop"),
          table_mu=state["table_mu"].at[idx].set(mu, mode="drop"),
          table_nu=state["table_nu"].at[idx].set(nu, mode="drop"))
    metrics = dict(metrics)
    metrics["grad_norm"] = g_norm
    metrics["nonfinite"] = (~finite).astype(jnp.float32)
    return new, metrics

  return step, make_rest_tx


def _table_adamw(opt_config, total_steps: int):
  """Clip + AdamW + the non-finite guard over the table leaf alone."""
  tx = optax.chain(
      optax.clip_by_global_norm(opt_config.grad_clip_norm),
      optax.adamw(optim.make_schedule(opt_config, total_steps),
                  b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                  weight_decay=opt_config.weight_decay))

  def update(state, grads):
    params, opt_state = state
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.isfinite(grads))
    keep = lambda new, old: jax.tree.map(  # pylint: disable=g-long-lambda
        lambda a, b: jnp.where(finite, a, b), new, old)
    return (keep(new_params, params), keep(new_opt, opt_state)), finite
  return tx, update


# ------------------------------------------------------------------ checks


def sparse_check(dense_step, row_step, setup, params_init, batch, rest_tx_fn,
                 seed: int) -> dict[str, Any]:
  """Two steps on one batch, dense vs lazy rows: the touched rows must agree.

  (Step 0 runs at learning rate 0 under warmup; step 1 moves the rows.)

  Returns:
    max |difference| of the other parameters, of the touched rows, and how
    far the untouched rows moved under each (dense: weight decay only;
    sparse: not at all).
  """
  dense_state = setup.init_fn(seed)  # The same values as `params_init`.
  init_table = np.asarray(params_init[TABLE])
  # Both steps donate their state: give each its own buffers.
  params = jax.tree.map(jnp.copy, params_init)
  rest = {k: v for k, v in params.items() if k != TABLE}
  sparse_state = init_sparse_state(params, rest_tx_fn(rest),
                                   jnp.copy(dense_state.rng))
  for _ in range(2):
    dense_state, _ = dense_step(dense_state, batch)
    sparse_state, _ = row_step(sparse_state, batch)
  ids = np.unique(np.asarray(batch["candidates"]))
  ids = ids[ids > 0]
  touched = np.zeros(params_init[TABLE].shape[0], bool)
  touched[ids] = True
  d_table = np.asarray(dense_state.params[TABLE])
  s_table = np.asarray(sparse_state["table"])
  rest_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(
                      jax.tree.leaves({k: v for k, v in
                                       dense_state.params.items()
                                       if k != TABLE}),
                      jax.tree.leaves(sparse_state["rest"])))
  moved = np.max(np.abs(d_table[touched] - init_table[touched]))
  diff = np.max(np.abs(d_table[touched] - s_table[touched]))
  return {
      "touched_rows": int(touched.sum()),
      "touched_rows_moved_by": float(moved),
      "touched_rows_max_abs_diff": float(diff),
      "touched_rows_diff_over_move": float(diff / max(moved, 1e-30)),
      "other_params_max_abs_diff": rest_diff,
      "untouched_rows_moved_dense": float(np.max(np.abs(
          d_table[~touched] - init_table[~touched]))),
      "untouched_rows_moved_sparse": float(np.max(np.abs(
          s_table[~touched] - init_table[~touched]))),
  }


# ------------------------------------------------------------------- cases


def run_vocab(vocab_size: int, *, args, rules, check: bool) -> dict[str, Any]:
  """All variants at one V."""
  dims = None
  if args.dims:
    dims = dict(zip(("width", "depth", "num_heads", "mlp_dim"),
                    (int(x) for x in args.dims.split(","))))
  config = common.demo_config(
      variant=args.variant, image_size=args.image_size, batch=args.batch,
      dtype=args.dtype, num_candidates=args.num_candidates,
      matcher=args.matcher, dims=dims)
  with config.unlocked():
    # Full learning rate from the second step on, so that `sparse_check`'s
    # two steps move the rows measurably (the cost does not depend on it).
    config.optimizer.warmup_steps = 1
  spec = preparation.spec_from_config(config.data)
  setup = model_setup.create(config, vocab_size=vocab_size, spec=spec)
  model = setup.model
  batch = jax.device_put(
      common.synthetic_batch(spec, config.data.batch, vocab_size,
                             seed=args.seed),
      sharding.batch_sharding(setup.mesh))
  num_ids = 1 + batch["candidates"].size
  loss_config = model_setup.loss_config(config)
  dim = model.class_embed_dim or model.vit_config["width"]

  programs: dict[str, dict[str, Any]] = {}
  compiled_fns = {}
  timer = common.Timer()

  def add(name, jitted, state, *rest):
    jitted = jitted if hasattr(jitted, "lower") else jitted.__wrapped__
    t0 = time.perf_counter()
    with sharding.activation_sharding(setup.mesh, rules):
      compiled = jitted.lower(state, *rest).compile()
    programs[name] = {"compile_s": time.perf_counter() - t0,
                      "flops": common.compiled_flops(compiled),
                      "memory": common.compiled_memory(compiled)}
    compiled_fns[name] = compiled
    return compiled

  variants = args.variants.split(",")
  params0 = setup.init_fn(args.seed).params
  rest0 = {k: v for k, v in params0.items() if k != TABLE}
  states = {}  # Each variant's own state (its step donates it).
  if "dense" in variants:
    states["dense"] = (setup.init_fn(args.seed), batch)
    add("dense", setup.train_step, *states["dense"])
  make_rest_tx = None
  for name in ("frozen_table", "sparse_rows"):
    if name in variants:
      step, make_rest_tx = make_row_step(
          model, loss_config, config.optimizer, config.total_steps, num_ids,
          frozen=name == "frozen_table")
      params = jax.tree.map(jnp.copy, params0)
      states[name] = (init_sparse_state(
          params, make_rest_tx(rest0),
          jax.random.key_data(jax.random.key(args.seed))), batch)
      add(name, jax.jit(step, donate_argnums=(0,)), *states[name])
  if "table_adamw" in variants:
    tx, update = _table_adamw(config.optimizer, config.total_steps)
    table = jnp.copy(params0[TABLE])
    states["table_adamw"] = ((table, tx.init(table)),
                             jnp.full_like(table, 1e-3))
    add("table_adamw", jax.jit(update, donate_argnums=(0,)),
        *states["table_adamw"])
  check_out = None
  if check:  # Before timing: on fresh states, with the compiled programs.
    check_out = sparse_check(
        compiled_fns["dense"], compiled_fns["sparse_rows"], setup, params0,
        batch, make_rest_tx, args.seed)
  del params0, rest0
  for name, args_ in states.items():
    timer.add(name, common.donating_call(compiled_fns[name], *args_))
  del states

  load_before = common.load_average()
  timer.run(args.repeats, min_total_s=0.5)
  out_variants = {}
  for name, prog in programs.items():
    out_variants[name] = {**timer.stats(name), **prog}
  table_bytes = vocab_size * dim * 4
  out = {
      "vocab_size": vocab_size,
      "table_shape": [vocab_size, dim],
      "table_bytes": table_bytes,
      "table_and_adam_bytes": 3 * table_bytes,
      "unique_ids_bound": num_ids,
      "load_average_during": [load_before, common.load_average()],
      "variants": out_variants,
      "rss_after": common.rss_bytes(),
  }
  t = {k: v["min_s"] for k, v in out_variants.items()}
  if "dense" in t and "frozen_table" in t:
    out["dense_minus_frozen_s"] = t["dense"] - t["frozen_table"]
  if "sparse_rows" in t and "frozen_table" in t:
    out["sparse_minus_frozen_s"] = t["sparse_rows"] - t["frozen_table"]
  peak = common.device_peak_bytes()
  if peak is not None:
    out["device_peak_bytes_so_far"] = peak
  if check_out is not None:
    out["sparse_check"] = check_out
  del timer, compiled_fns, batch, setup
  gc.collect()
  return out


def _slopes(results: list[dict[str, Any]]) -> dict[str, Any]:
  """Least-squares lines in V: seconds and compiled bytes per 100k rows."""
  vs = np.array([r["vocab_size"] for r in results], np.float64)
  out = {}
  if len(vs) < 2:
    return out
  names = set.intersection(*(set(r["variants"]) for r in results))
  for name in sorted(names):
    ts = np.array([r["variants"][name]["min_s"] for r in results])
    slope, icpt = np.polyfit(vs, ts, 1)
    entry = {"s_per_100k_rows": slope * 1e5, "s_at_v0": icpt,
             "time_ratio_last_over_first": ts[-1] / ts[0]}
    mems = [(r["variants"][name].get("memory") or {}).get("total")
            for r in results]
    if all(m is not None for m in mems):
      mslope, micpt = np.polyfit(vs, np.array(mems, np.float64), 1)
      entry["compiled_bytes_per_row"] = mslope
      entry["compiled_bytes_at_v0"] = micpt
    out[name] = entry
  return out


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab_sizes", default="1000,10000,100000,500000")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--variant", default=None,
                      help="ViT variant at standard size (default: the demo's "
                      "width-128 depth-4 Ti/16)")
  parser.add_argument("--dims", default="",
                      help="width,depth,num_heads,mlp_dim override (tests)")
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--num_candidates", type=int, default=64)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--matcher", default="jax", choices=("jax", "scipy"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_check", action="store_true",
                      help="skip the dense-vs-sparse check at the first V")
  parser.add_argument("--gpu", action="store_true",
                      help="accelerator preset: bf16 compute, 10 repeats")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args(argv)
  if args.gpu:
    args.dtype = "bfloat16" if args.dtype == "float32" else args.dtype
    args.repeats = max(args.repeats, 10)
  unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
  if unknown:
    parser.error(f"unknown --variants {unknown}; use {VARIANTS}")
  sizes = sorted(int(v) for v in args.vocab_sizes.split(","))
  config0 = common.demo_config(variant=args.variant, image_size=args.image_size,
                               batch=args.batch)
  rules = sharding.rules_from_config(config0.logical_rules)

  report: dict[str, Any] = {"benchmark": "vocab_scaling",
                            "environment": common.environment(),
                            "rss_start": common.rss_bytes()}
  results = []
  for i, v in enumerate(sizes):
    results.append(run_vocab(
        v, args=args, rules=rules,
        check=(i == 0 and not args.no_check
               and {"dense", "sparse_rows"} <= set(args.variants.split(",")))))
  report["config"] = {
      "variant": args.variant or "demo (Ti/16, width 128, depth 4)",
      "dims": args.dims or None, "image_size": args.image_size,
      "batch": args.batch, "streams": common.stream_composition(args.batch),
      "num_candidates": args.num_candidates, "dtype": args.dtype,
      "matcher": args.matcher}
  report["per_vocab"] = results
  report["slopes"] = _slopes(results)
  return common.emit(report, args.out)


if __name__ == "__main__":
  main()
