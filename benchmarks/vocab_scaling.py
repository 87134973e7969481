r"""The trainer's step time and memory against the vocabulary size V; JSON.

  /work/main/.venv/bin/python benchmarks/vocab_scaling.py
  .venv/bin/python benchmarks/vocab_scaling.py --vocab_sizes=1000,500000
  .venv/bin/python benchmarks/vocab_scaling.py --variant=B/16 --image_size=224 \
      --batch=4 --vocab_sizes=1000,500000            # B/16 at 224 px
  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python \
      benchmarks/vocab_scaling.py --class_embed_dim=768 --mesh=4,2 \
      --rules=fsdp --compile_only                  # memory per device, sharded
  python benchmarks/vocab_scaling.py --gpu        # on an accelerator

The claim under test (DESIGN.md section 3): the model gathers only the Q
candidate rows of the token table E [V, D] and its logits are [B, N, Q], so a
step should not grow with V beyond the table and its optimizer state. This
benchmark compiles the trainer's real step (`model_setup.create(config,
...).train_step`) for one model (default: the ShapesWorld demo's ViT of
width 128, depth 4 at 128 px, batch 16 = 8 det + 4 grd + 4 img, Q = 64,
D = 128) at V = 1k, 10k, 100k, 500k and runs, per V, side by side
(round-robin, min over rounds):

* ``sparse``: the default, ``optimizer.token_table_update="sparse"``: the
  step gathers the U <= min(1 + B * Q, V) unique candidate rows,
  differentiates w.r.t. those rows only, clips with the global norm and
  applies a lazy AdamW to them, scattering rows and moments back into the
  donated table (omnitrain_jax/optim.py says how it differs from dense AdamW).
* ``dense``: ``token_table_update="dense"``: the gradient of the row gather is
  a dense [V, D] array, and clipping, AdamW and the non-finite guard sweep the
  table and both moments every step.
* ``frozen_table``: the reference without the table's update: the same model
  and loss, the table neither differentiated nor updated (a benchmark-only
  step). It is the V-independent part of the step, what the claim promises.

Memory per V: XLA's static plan of each compiled step (`compiled.memory_
analysis()`: arguments, which hold the state, + outputs + temporaries -
donated aliases; per device under a mesh), the process RSS after the V
(cumulative: the allocator keeps what it had), and on GPU/TPU the allocator's
running peak. Also the bytes of the table and its two Adam moments.
``slopes`` fits time and memory linearly in V per variant: the sparse step's
compiled bytes should grow by the table and its two moments only (12 * D
bytes per row in f32, divided by the table's shards) and its temporaries not
at all. ``--compile_only`` skips the timing (memory of big shapes on fake
devices).

The machine's load average is in the JSON; timings on a shared CPU are noisy,
the side-by-side differences less so.
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
import numpy as np
import optax

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from omnitrain_jax import model_setup
from omnitrain_jax import optim
from omnitrain_jax import sharding
from omnitrain_jax import train_step as train_step_lib
from omnitrain_jax.data import preparation
from omnitrain_jax.losses import omni_loss as omni_loss_lib
from omnitrain_jax.models import omnidet

TABLE = omnidet.TOKEN_TABLE
VARIANTS = ("sparse", "dense", "frozen_table")


# ----------------------------------------------------- the frozen reference


def make_frozen_step(setup, loss_config, clip_norm: float):
  """The step with the table neither differentiated nor updated.

  The other parameters are updated as in the sparse step (its `tx` has no
  clipping; this step clips with their norm). The state is the sparse
  step's `TrainState`; the table and its moments pass through.
  """
  model, tx = setup.model, setup.tx

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rest, table = optim.split_table(state.params)
    ids, local = train_step_lib.unique_rows(batch["candidates"],
                                            table.shape[0])
    rows = jax.lax.stop_gradient(jnp.take(table, ids, axis=0))
    row_model = model.clone(vocab_size=ids.shape[0])

    def loss_fn(rest):
      out = row_model.apply({"params": {**rest, TABLE: rows}}, batch["image"],
                            local, train=True, rngs={"dropout": rng})
      return omni_loss_lib.omni_loss(out, batch, loss_config)

    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(rest)
    g_norm = optax.global_norm(g)
    g = optim.clip_by_norm(g, g_norm, clip_norm)
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]))

    def apply(_):
      updates, opt = tx.update(g, state.opt_state, rest)
      return optax.apply_updates(rest, updates), opt

    rest, opt = jax.lax.cond(finite, apply,
                             lambda _: (rest, state.opt_state), None)
    return state.replace(step=state.step + 1, params={**rest, TABLE: table},
                         opt_state=opt), dict(metrics, grad_norm=g_norm)
  return step


# ------------------------------------------------------------------- cases


def _config(args, update: str):
  dims = None
  if args.dims:
    dims = dict(zip(("width", "depth", "num_heads", "mlp_dim"),
                    (int(x) for x in args.dims.split(","))))
  config = common.demo_config(
      variant=args.variant, image_size=args.image_size, batch=args.batch,
      dtype=args.dtype, num_candidates=args.num_candidates,
      matcher=args.matcher, dims=dims,
      class_embed_dim=args.class_embed_dim or None)
  with config.unlocked():
    config.optimizer.token_table_update = update
    # Full learning rate from the first step, so that the check's step
    # moves the rows measurably (the cost does not depend on it).
    config.optimizer.warmup_steps = 0
    if args.mesh:
      config.mesh.data, config.mesh.model = (int(x)
                                             for x in args.mesh.split(","))
    if args.rules:
      config.logical_rules = args.rules
  return config


def sparse_check(setups, batch, seed: int) -> dict[str, Any]:
  """One step from the same state, dense vs sparse: the touched rows agree."""
  states = {}
  for name in ("dense", "sparse"):
    state = setups[name].init_fn(seed)
    table0 = np.asarray(state.params[TABLE])
    states[name] = np.asarray(setups[name].train_step(state, batch)[0]
                              .params[TABLE])
  ids = np.unique(np.asarray(batch["candidates"]))
  touched = np.zeros(table0.shape[0], bool)
  touched[ids[ids > 0]] = True
  d, s = states["dense"], states["sparse"]
  moved = float(np.max(np.abs(d[touched] - table0[touched])))
  diff = float(np.max(np.abs(d[touched] - s[touched])))
  return {"touched_rows": int(touched.sum()),
          "touched_rows_moved_by": moved,
          "touched_rows_max_abs_diff": diff,
          "touched_rows_diff_over_move": diff / max(moved, 1e-30),
          "untouched_rows_moved_sparse": float(np.max(np.abs(
              s[~touched] - table0[~touched]))) if (~touched).any() else 0.0}


def run_vocab(vocab_size: int, *, args, check: bool) -> dict[str, Any]:
  """All variants at one V."""
  variants = args.variants.split(",")
  setups = {}
  for name in variants:
    update = "dense" if name == "dense" else "sparse"
    config = _config(args, update)
    spec = preparation.spec_from_config(config.data)
    setups[name] = model_setup.create(config, vocab_size=vocab_size,
                                      spec=spec)
  setup = next(iter(setups.values()))
  rules = setup.rules
  batch = jax.device_put(
      common.synthetic_batch(spec, config.data.batch, vocab_size,
                             seed=args.seed),
      sharding.batch_sharding(setup.mesh))
  model = setup.model
  dim = model.class_embed_dim or model.vit_config["width"]

  programs: dict[str, dict[str, Any]] = {}
  compiled_fns = {}
  states = {}
  for name in variants:
    st = setups[name]
    if name == "frozen_table":
      fn = st.jit(make_frozen_step(st, model_setup.loss_config(config),
                                   float(config.optimizer.grad_clip_norm)),
                  in_shardings=(st.state_shardings,
                                sharding.batch_sharding(st.mesh)),
                  out_shardings=(st.state_shardings,
                                 sharding.replicated(st.mesh)),
                  donate_argnums=(0,))
    else:
      fn = st.train_step
    jitted = fn.__wrapped__ if hasattr(fn, "__wrapped__") else fn
    t0 = time.perf_counter()
    with sharding.activation_sharding(st.mesh, rules):
      compiled = jitted.lower(st.abstract_state, batch).compile()
    programs[name] = {"compile_s": time.perf_counter() - t0,
                      "flops": common.compiled_flops(compiled),
                      "memory": common.compiled_memory(compiled)}
    compiled_fns[name] = compiled
  check_out = None
  if check and not args.compile_only:
    check_out = sparse_check(setups, batch, args.seed)
  table_bytes = vocab_size * dim * 4
  out = {
      "vocab_size": vocab_size,
      "table_shape": [vocab_size, dim],
      "table_bytes": table_bytes,
      "table_and_adam_bytes": 3 * table_bytes,
      "table_sharding": str(setup.state_shardings.params[TABLE].spec),
      "devices": setup.mesh.size,
      "unique_ids_bound": int(min(1 + batch["candidates"].size, vocab_size)),
  }
  if not args.compile_only:
    timer = common.Timer()
    for name in variants:
      timer.add(name, common.donating_call(
          compiled_fns[name], setups[name].init_fn(args.seed), batch))
    load_before = common.load_average()
    timer.run(args.repeats, min_total_s=0.5)
    out["load_average_during"] = [load_before, common.load_average()]
    for name in variants:
      programs[name].update(timer.stats(name))
    del timer
  out["variants"] = programs
  out["rss_after"] = common.rss_bytes()
  if not args.compile_only:
    t = {k: v["min_s"] for k, v in programs.items()}
    if "dense" in t and "frozen_table" in t:
      out["dense_minus_frozen_s"] = t["dense"] - t["frozen_table"]
    if "sparse" in t and "frozen_table" in t:
      out["sparse_minus_frozen_s"] = t["sparse"] - t["frozen_table"]
  peak = common.device_peak_bytes()
  if peak is not None:
    out["device_peak_bytes_so_far"] = peak
  if check_out is not None:
    out["sparse_check"] = check_out
  del compiled_fns, batch, setups, setup
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
    entry = {}
    if all("min_s" in r["variants"][name] for r in results):
      ts = np.array([r["variants"][name]["min_s"] for r in results])
      slope, icpt = np.polyfit(vs, ts, 1)
      entry.update({"s_per_100k_rows": slope * 1e5, "s_at_v0": icpt,
                    "time_ratio_last_over_first": ts[-1] / ts[0]})
    for key in ("total", "temp"):
      mems = [(r["variants"][name].get("memory") or {}).get(key)
              for r in results]
      if all(m is not None for m in mems):
        mslope, micpt = np.polyfit(vs, np.array(mems, np.float64), 1)
        entry[f"compiled_{key}_bytes_per_row"] = mslope
        entry[f"compiled_{key}_bytes_at_v0"] = micpt
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
  parser.add_argument("--class_embed_dim", type=int, default=0,
                      help="D, the table's width (default: the ViT width)")
  parser.add_argument("--mesh", default="",
                      help="data,model mesh shape (default: all devices on "
                      "data)")
  parser.add_argument("--rules", default="",
                      help="logical rules preset (default, fsdp)")
  parser.add_argument("--compile_only", action="store_true",
                      help="compile and report memory; no timing, no check")
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
  report: dict[str, Any] = {"benchmark": "vocab_scaling",
                            "environment": common.environment(),
                            "rss_start": common.rss_bytes()}
  results = []
  for i, v in enumerate(sizes):
    results.append(run_vocab(
        v, args=args,
        check=(i == 0 and not args.no_check
               and {"dense", "sparse"} <= set(args.variants.split(",")))))
  report["config"] = {
      "variant": args.variant or "demo (Ti/16, width 128, depth 4)",
      "dims": args.dims or None, "image_size": args.image_size,
      "batch": args.batch, "streams": common.stream_composition(args.batch),
      "num_candidates": args.num_candidates, "dtype": args.dtype,
      "matcher": args.matcher, "class_embed_dim": args.class_embed_dim or None,
      "mesh": args.mesh or None, "rules": args.rules or "default",
      "compile_only": args.compile_only}
  report["per_vocab"] = results
  report["slopes"] = _slopes(results)
  return common.emit(report, args.out)


if __name__ == "__main__":
  main()
