r"""The full OmniDet train step against a bare ViT forward+backward (JSON).

  /work/venv/bin/python benchmarks/train_step.py                 # CPU presets
  /work/venv/bin/python benchmarks/train_step.py --variant=B/16 \
      --image_size=224 --batch=2 --repeats=5 --matcher=scipy
  python benchmarks/train_step.py --gpu [--remat] [--batch=16] \
      [--peak_tflops=989]

What runs, side by side in one process (each variant once per round,
round-robin, minimum over rounds; see `common.Timer`):

* ``full_step``: `model_setup.create(config, ...).train_step` -- the real jitted step
  (OmniDet forward+backward, Hungarian matching, the three-stream loss,
  global-norm clipping, AdamW with two learning rates, the non-finite guard
  as a ``lax.cond``), state donated, on a synthetic batch with the schema's
  shapes and det/grd/img content (`common.synthetic_batch`: boxes, box
  tokens, phrases, captions, candidates from the real sampler).
* ``bare_vit_fwd_bwd``: the same backbone (the OmniDet's own ViT module and
  parameters), same resolution, batch and dtype, ``value_and_grad`` of a
  trivial scalar loss (mean of squared outputs), jitted. The reference the
  goal is stated against (full step >= 0.9 x its FLOP rate).

And the breakdown, to find where the full step loses time (``--components``):

* ``grad_only``: model forward+backward through the real loss (matching
  included), no optimizer: ``full_step - grad_only`` is the optimizer and
  the guards.
* ``model_fwd_bwd``: the OmniDet (ViT + head + token gather) with a trivial
  loss: ``model_fwd_bwd - bare_vit_fwd_bwd`` is the head;
  ``grad_only - model_fwd_bwd`` is the loss with matching.
* ``model_fwd``, ``bare_vit_fwd``: forward only.
* ``loss_fwd``, ``loss_fwd_bwd``: `omni_loss` alone on fixed model outputs
  (gradient w.r.t. the outputs), matching included.
* ``matching``: the matcher alone on a ``[B, N, M]`` cost.
* The optimizer alone (``tx.update`` + ``apply_updates`` on donated params
  and moments), three ways, side by side -- the comparison behind the
  trainer's choice of non-finite guard:

  - ``optimizer_cond_guard``: what `train_step.train_step` does (isfinite
    per group, then ``lax.cond(finite, update, keep)``);
  - ``optimizer_where_guard``: the previous guard, kept for comparison only
    (the update always runs, then ``jnp.where(finite, new, old)`` over every
    parameter and moment);
  - ``optimizer_bare``: no guard.

  The summary gives their time and compile-time ratios.

FLOPs are XLA's cost analysis of each compiled program, per device
(multiply-add = 2; the matcher's while loop counted once, a scipy callback
as 0). The peak is
the measured f32 (bf16 with ``--gpu``) matmul rate of this machine
(``matmul_peak``, before and after the cases; the max is used); with
``--gpu`` the JSON also gives MFU against the chip's dense bf16 peak
(``--peak_tflops``, default from `common.DENSE_BF16_PEAK_TFLOPS`: H100/H200
989, A100 312, TPU v4 275, v5e 197, v5p 459 TFLOP/s, vendor numbers without
sparsity). With ``--remat`` the compiled program recomputes the forward, so
its FLOPs are hardware FLOPs (HFU); MFU then uses the FLOPs of the same step
lowered without remat (model FLOPs).

GPU run (one short call; the preset compiles ``full_step``,
``bare_vit_fwd_bwd``, ``grad_only``, ``optimizer_cond_guard`` and
``optimizer_where_guard``; add ``--components=none`` for the fastest run or
``all`` for the whole breakdown)::

  python benchmarks/train_step.py --gpu --out=$OUT/train_step_gpu.json
  python benchmarks/train_step.py --gpu --remat --batch=16

The machine's load average is in the JSON: on a shared CPU every timing can
be 1.5-3.5x slower than on a quiet one, the ratios (same run, interleaved)
much less so.

Measured *before* the trainer adopted the ``lax.cond`` guard, when
``full_step`` still had the ``jnp.where`` guard and the cond-guarded step was
timed as a separate program (2-core CPU shared with other jobs, load average
2.5-5.3; jax 0.10.2, f32, V = 32k, Q = 64, M = 16, jax matcher, min of 5
rounds; measured matmul peak 128 GFLOP/s vs 196 on a quiet machine; not
re-measured since)::

                                 B/16 @224, B=2       Ti/16 @128, B=8
  bare ViT fwd+bwd               2.34 s  90 GFLOP/s   0.313 s  58 GFLOP/s
  full step (where guard)        3.41 s  64 GFLOP/s   0.469 s  40 GFLOP/s
  full / bare FLOP rate          0.71                 0.70
  grad only (no optimizer)       2.52 s  (0.95)       0.316 s  (1.01)
  full - grad only (optimizer)   0.89 s  (26%)        0.153 s  (33%)
  AdamW alone / + where guard    0.62 s / 1.01 s      0.050 s / 0.139 s
  AdamW + lax.cond guard         0.80 s               0.068 s
  loss fwd+bwd incl. matching    0.6 ms               0.8 ms
  matcher alone                  0.06 ms              0.09 ms
  compile: full step where/cond  83 s / 26 s          59 s / 20 s

The whole gap to the bare ViT was the optimizer: without it the step ran at
0.95-1.0x the bare ViT's FLOP rate (head +4% FLOPs; loss and matching are
well under 1%). AdamW is memory-bound elementwise work over every parameter
-- 112M for B/16 of which the V = 32k token table is 24.6M, 11.8M for Ti/16
of which the table is 6.1M -- and at these small CPU batches it cost a
quarter to a third of the step. The where guard's keep-or-replace
(`jnp.where` over params and moments) made the optimizer 1.6-2.8x slower
alone and the step 3x slower to compile; the ``lax.cond`` guard (full step
2-5% faster here, within noise for B/16) removed most of both, so the
trainer (`train_step.train_step`) now uses it, and ``full_step`` measures
it. The where guard is kept only as the optimizer-level comparison
(``optimizer_where_guard`` vs ``optimizer_cond_guard`` and
``optimizer_bare``). Updating only the gathered table rows (benchmarks/
vocab_scaling.py, ``sparse_rows``) removes the table's share. At accelerator
sizes (B/16 at 768 px, batch 8+: ~50x the FLOPs per step) the optimizer is a
few percent; measure with ``--gpu``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from omnitrain_jax import matching  # pylint: disable=g-import-not-at-top
from omnitrain_jax import model_setup
from omnitrain_jax import sharding
from omnitrain_jax.data import preparation
from omnitrain_jax.losses import omni_loss as omni_loss_lib
from omnitrain_jax.models import omnidet
from omnitrain_jax.models import vit

CPU_CASES = (  # (variant, image_size, batch): the anchors of FACTS.md.
    ("B/16", 224, 2),
    ("Ti/16", 128, 8),
)
# The optimizer alone, with the trainer's guard, the previous guard (kept for
# comparison) and none: name -> the `guard` of `_optimizer_tail`.
OPTIMIZER_COMPONENTS = {
    "optimizer_cond_guard": "cond",    # What `train_step.train_step` does.
    "optimizer_where_guard": "where",  # The previous guard, for comparison.
    "optimizer_bare": "none",
}
ALL_COMPONENTS = ("grad_only", "model_fwd_bwd", "model_fwd", "bare_vit_fwd",
                  "loss_fwd", "loss_fwd_bwd", "matching",
                  *OPTIMIZER_COMPONENTS)
# Cheap enough for one short accelerator call (each is one more compile; the
# optimizer-only programs are small).
GPU_COMPONENTS = ("grad_only", "optimizer_cond_guard", "optimizer_where_guard")


def _with_rules(fn, rules):
  """Runs `fn` under flax's logical axis rules, as the trainer's step does."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with nn.logical_axis_rules(tuple(map(tuple, rules))):
      return fn(*args, **kwargs)
  return wrapped


def _trivial_loss(tree) -> jax.Array:
  """Mean of squares of every float output: touches them all, costs little."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return sum(jnp.mean(jnp.square(x.astype(jnp.float32))) for x in leaves)


def _optimizer_tail(params, opt_state, grads, loss, *, tx, guard: str):
  """The step after the gradient, with one of three non-finite guards.

  ``guard="cond"`` mirrors `train_step.train_step` (per-group isfinite, then
  the update inside ``lax.cond(finite, update, keep)``; keep in sync);
  ``"where"`` is the guard the trainer used before, kept for comparison (the
  update always runs, then ``jnp.where(finite, new, old)`` over every
  parameter and moment); ``"none"`` is the bare update.

  Args:
    params: the parameters (donated by the benchmark's jit).
    opt_state: the optimizer state (donated too).
    grads: gradients with the parameters' structure.
    loss: the scalar loss (its finiteness counts, as in the step).
    tx: the optimizer.
    guard: "cond", "where" or "none".

  Returns:
    ``((new_params, new_opt_state), grad_norm)``.
  """
  def update(_):
    updates, new_opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state

  if guard == "none":
    return update(None), optax.global_norm(grads)
  ok = [jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                           for x in jax.tree.leaves(sub)]))
        for sub in grads.values()]
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(ok))
  if guard == "cond":
    new = jax.lax.cond(finite, update, lambda _: (params, opt_state), None)
  elif guard == "where":
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), update(None),
                       (params, opt_state))
  else:
    raise ValueError(f"guard={guard!r}: use 'cond', 'where' or 'none'.")
  return new, optax.global_norm(grads)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def run_case(*, variant: str, image_size: int, batch: int, dtype: str,
             matcher: str, num_candidates: int, max_boxes: int,
             vocab_size: int, remat: bool, remat_policy: str,
             attention_impl: str, components, repeats: int,
             peak_flops_per_s: float | None, dims=None,
             seed: int = 0) -> dict[str, Any]:
  """Builds one configuration, times every variant, returns its JSON dict."""
  config = common.demo_config(
      variant=variant, image_size=image_size, batch=batch, dtype=dtype,
      num_candidates=num_candidates, max_boxes=max_boxes, matcher=matcher,
      remat=remat, remat_policy=remat_policy, attention_impl=attention_impl,
      dims=dims)
  spec = preparation.spec_from_config(config.data)
  setup = model_setup.create(config, vocab_size=vocab_size, spec=spec)
  rules = setup.rules
  model, tx = setup.model, setup.tx
  loss_config = model_setup.loss_config(config)

  host_batch = common.synthetic_batch(
      spec, config.data.batch, vocab_size, seed=seed)
  batch_arrays = jax.device_put(host_batch, sharding.batch_sharding(setup.mesh))
  images, cands = batch_arrays["image"], batch_arrays["candidates"]
  state = setup.init_fn(seed)
  params = state.params
  counts = omnidet.param_counts(params)
  key = jax.random.key(seed)

  programs: dict[str, dict[str, Any]] = {}
  timer = common.Timer()

  def add(name, jitted, *args, donate_state=False):
    # `model_setup` wraps its jitted step to trace it in the mesh context.
    jitted = jitted if hasattr(jitted, "lower") else jitted.__wrapped__
    t0 = time.perf_counter()
    with sharding.activation_sharding(setup.mesh, rules):
      compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    programs[name] = {"compile_s": compile_s,
                      "flops": common.compiled_flops(compiled),
                      "memory": common.compiled_memory(compiled)}
    call = (common.donating_call(compiled, *args) if donate_state
            else common.plain_call(compiled, *args))
    timer.add(name, call)
    return compiled

  # -------------------------------------------------------- the two anchors
  add("full_step", setup.train_step, setup.init_fn(seed), batch_arrays,
      donate_state=True)

  backbone = vit.VisionTransformer(
      **model.vit_config, dtype=model.dtype, remat=model.remat,
      remat_policy=model.remat_policy, attention_impl=model.attention_impl,
      stem=model.stem)

  def vit_loss(backbone_params, images):
    x = omnidet.normalize_images(images, model.dtype)
    return _trivial_loss(backbone.apply({"params": backbone_params}, x,
                                        train=True))

  add("bare_vit_fwd_bwd",
      jax.jit(_with_rules(jax.value_and_grad(vit_loss), rules)),
      params[omnidet.BACKBONE], images)

  # -------------------------------------------------------------- breakdown
  def loss_fn(params):
    outputs = model.apply({"params": params}, images, cands, train=True,
                          rngs={"dropout": key})
    return omni_loss_lib.omni_loss(outputs, batch_arrays, loss_config)

  def model_loss(params):
    outputs = model.apply({"params": params}, images, cands, train=True,
                          rngs={"dropout": key})
    return _trivial_loss({k: v for k, v in outputs.items()
                          if k not in ("pred_logits", "image_logits")} | {
        # Padding candidates hold -1e9: leave them out of the sum.
        "l": jnp.where(outputs["candidate_mask"][:, None],
                       outputs["pred_logits"], 0.0),
        "i": jnp.where(outputs["candidate_mask"], outputs["image_logits"],
                       0.0)})

  forward = jax.jit(_with_rules(
      lambda p: model.apply({"params": p}, images, cands, train=False), rules))
  with sharding.activation_sharding(setup.mesh, rules):
    outputs = forward(params)
  float_outputs = {k: outputs[k] for k in
                   ("pred_boxes", "pred_logits", "image_logits")}

  def loss_on_outputs(float_outputs):
    return omni_loss_lib.omni_loss(float_outputs, batch_arrays, loss_config)[0]

  if "grad_only" in components:
    add("grad_only", jax.jit(_with_rules(
        jax.value_and_grad(loss_fn, has_aux=True), rules)), params)
  if "model_fwd_bwd" in components:
    add("model_fwd_bwd", jax.jit(_with_rules(
        jax.value_and_grad(model_loss), rules)), params)
  if "model_fwd" in components:
    add("model_fwd", forward, params)
  if "bare_vit_fwd" in components:
    add("bare_vit_fwd", jax.jit(_with_rules(vit_loss, rules)),
        params[omnidet.BACKBONE], images)
  if "loss_fwd" in components:
    add("loss_fwd", jax.jit(loss_on_outputs), float_outputs)
  if "loss_fwd_bwd" in components:
    add("loss_fwd_bwd", jax.jit(jax.value_and_grad(loss_on_outputs)),
        float_outputs)
  if "matching" in components:
    b, n, m = outputs["pred_boxes"].shape[0], model.num_patches, max_boxes
    cost = jax.random.uniform(jax.random.key(1), (b, n, m))
    is_box_stream = batch_arrays["stream"] != 2  # img has no boxes.
    num_cols = jnp.where(is_box_stream, batch_arrays["box_mask"].sum(-1), 0
                         ).astype(jnp.int32)
    add("matching", jax.jit(functools.partial(
        matching.linear_sum_assignment, method=matcher)), cost, num_cols)
  for name, guard in OPTIMIZER_COMPONENTS.items():
    if name in components:
      tail_fn = functools.partial(_optimizer_tail, tx=tx, guard=guard)
      opt_params = _copy(params)
      grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
      tail = jax.jit(lambda po, g, loss, f=tail_fn: f(po[0], po[1], g, loss),
                     donate_argnums=(0,))
      add(name, tail, (opt_params, tx.init(opt_params)), grads,
          jnp.float32(1.0), donate_state=True)

  load_before = common.load_average()
  timer.run(repeats, min_total_s=1.0)
  results = {}
  for name, prog in programs.items():
    stats = timer.stats(name)
    results[name] = {**stats, "compile_s": prog["compile_s"],
                     **common.rate_entry(prog["flops"], stats["min_s"],
                                         peak_flops_per_s)}
  summary = _summarize(results)
  out = {
      "config": {"variant": variant, "image_size": image_size,
                 "batch": batch, "streams": dict(config.data.batch),
                 "dtype": dtype, "matcher": matcher,
                 "num_candidates": num_candidates, "max_boxes": max_boxes,
                 "num_patches": model.num_patches, "vocab_size": vocab_size,
                 "remat": remat, "attention_impl": attention_impl,
                 "dims": model.vit_config, "params": counts},
      "load_average_during": [load_before, common.load_average()],
      "variants": results,
      "summary": summary,
      "memory_full_step": programs["full_step"]["memory"],
  }
  peak = common.device_peak_bytes()
  if peak is not None:
    out["device_peak_bytes"] = peak
  if remat:
    # Model FLOPs: the same step without rematerialisation (lowered only).
    no_remat = common.demo_config(
        variant=variant, image_size=image_size, batch=batch, dtype=dtype,
        num_candidates=num_candidates, max_boxes=max_boxes, matcher=matcher,
        remat=False, attention_impl=attention_impl, dims=dims)
    setup2 = model_setup.create(no_remat, vocab_size=vocab_size, spec=spec)
    step2 = setup2.train_step.__wrapped__
    with sharding.activation_sharding(setup2.mesh, rules):
      out["model_flops_full_step"] = common.compiled_flops(
          step2.lower(setup2.abstract_state, batch_arrays))
  return out


def _summarize(r: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Ratios and the time breakdown of the full step."""
  full, bare = r["full_step"], r["bare_vit_fwd_bwd"]
  t = {k: v["min_s"] for k, v in r.items()}
  out = {
      "full_over_bare_vit_flop_rate": (
          full["flops_per_s"] / bare["flops_per_s"]
          if full["flops_per_s"] and bare["flops_per_s"] else None),
      "full_over_bare_vit_time": t["full_step"] / t["bare_vit_fwd_bwd"],
      "full_over_bare_vit_flops": (
          full["flops"] / bare["flops"]
          if full["flops"] and bare["flops"] else None),
      "full_frac_of_peak": full["frac_of_peak"],
      "bare_vit_frac_of_peak": bare["frac_of_peak"],
  }
  # Differences of minimums: each can be off by the noise of two timings.
  parts = {}
  if "model_fwd_bwd" in t:
    parts["head_and_gather"] = t["model_fwd_bwd"] - t["bare_vit_fwd_bwd"]
  if "grad_only" in t and "model_fwd_bwd" in t:
    parts["loss_with_matching"] = t["grad_only"] - t["model_fwd_bwd"]
  if "grad_only" in t:
    parts["optimizer_and_guard"] = t["full_step"] - t["grad_only"]
  # The guards side by side: the trainer's (cond) against the previous one
  # (where) and against none.
  cond, where = "optimizer_cond_guard", "optimizer_where_guard"
  if cond in r and where in r:
    out["optimizer_where_over_cond_guard_time"] = t[where] / t[cond]
    out["optimizer_where_over_cond_guard_compile"] = (
        r[where]["compile_s"] / r[cond]["compile_s"])
  if "optimizer_bare" in r:
    for name in (cond, where):
      if name in r:
        out[f"{name}_over_bare_time"] = t[name] / t["optimizer_bare"]
  if parts:
    parts["bare_vit_fwd_bwd"] = t["bare_vit_fwd_bwd"]
    out["breakdown_s"] = parts
    out["breakdown_frac_of_full"] = {k: v / t["full_step"]
                                     for k, v in parts.items()}
  standalone = {k: t[k] for k in ("loss_fwd", "loss_fwd_bwd", "matching",
                                  *OPTIMIZER_COMPONENTS) if k in t}
  if standalone:
    out["standalone_s"] = standalone
    out["standalone_frac_of_full"] = {k: v / t["full_step"]
                                      for k, v in standalone.items()}
  return out


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variant", default=None,
                      help="ViT variant (default: the CPU presets "
                      f"{CPU_CASES}; B/16 with --gpu).")
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--dtype", default=None,
                      help="compute dtype (float32; bfloat16 with --gpu)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="rounds over all variants (3 CPU, 10 --gpu)")
  parser.add_argument("--matcher", default="jax", choices=("jax", "scipy"))
  parser.add_argument("--num_candidates", type=int, default=64)
  parser.add_argument("--max_boxes", type=int, default=16)
  parser.add_argument("--vocab_size", type=int, default=32_000)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--remat_policy", default="nothing_saveable")
  parser.add_argument("--attention_impl", default="xla")
  parser.add_argument("--components", default=None,
                      help="comma list of breakdown programs, 'all' or 'none' "
                      f"(default: all on CPU, {','.join(GPU_COMPONENTS)} "
                      "with --gpu); one of " + ",".join(ALL_COMPONENTS))
  parser.add_argument("--gpu", action="store_true",
                      help="accelerator preset: bf16, B/16 at 768 px, batch "
                      "8, MFU against --peak_tflops")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="dense bf16 peak per device (default: from the "
                      "device kind, see common.DENSE_BF16_PEAK_TFLOPS)")
  parser.add_argument("--matmul_size", type=int, default=None,
                      help="side of the peak-measuring matmul (2048 CPU, 8192 "
                      "--gpu)")
  parser.add_argument("--dims", default="",
                      help="width,depth,num_heads,mlp_dim overriding the "
                      "variant's (tests: a tiny model)")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args(argv)

  if args.gpu:
    cases = [(args.variant or "B/16", args.image_size or 768,
              args.batch or 8)]
    dtype = args.dtype or "bfloat16"
    repeats = args.repeats or 10
    default_components = GPU_COMPONENTS
  elif args.variant or args.image_size or args.batch:
    variant, size, batch = CPU_CASES[0]
    cases = [(args.variant or variant, args.image_size or size,
              args.batch or batch)]
    dtype, repeats = args.dtype or "float32", args.repeats or 3
    default_components = ALL_COMPONENTS
  else:
    cases = list(CPU_CASES)
    dtype, repeats = args.dtype or "float32", args.repeats or 3
    default_components = ALL_COMPONENTS
  if args.components is None:
    components = default_components
  elif args.components == "all":
    components = ALL_COMPONENTS
  elif args.components == "none":
    components = ()
  else:
    components = tuple(c for c in args.components.split(",") if c)
    unknown = sorted(set(components) - set(ALL_COMPONENTS))
    if unknown:
      parser.error(f"unknown --components {unknown}; use {ALL_COMPONENTS}")

  dims = None
  if args.dims:
    values = [int(x) for x in args.dims.split(",")]
    if len(values) != 4:
      parser.error(f"--dims={args.dims!r}: give width,depth,num_heads,mlp_dim")
    dims = dict(zip(("width", "depth", "num_heads", "mlp_dim"), values))
  on_cpu = jax.default_backend() == "cpu"
  mm_dtype = jnp.float32 if dtype == "float32" else jnp.dtype(dtype)
  mm_n = args.matmul_size or (2048 if on_cpu else 8192)
  report: dict[str, Any] = {"benchmark": "train_step",
                            "environment": common.environment()}
  mm_before = common.matmul_flops_per_s(mm_n, mm_dtype)
  spec_peak = args.peak_tflops or common.spec_peak_tflops(
      jax.devices()[0].device_kind)
  # Fractions are of the measured matmul rate (the max of the two
  # measurements is only known at the end: recomputed below).
  cases_out = []
  for variant, size, batch in cases:
    cases_out.append(run_case(
        variant=variant, image_size=size, batch=batch, dtype=dtype,
        matcher=args.matcher, num_candidates=args.num_candidates,
        max_boxes=args.max_boxes, vocab_size=args.vocab_size,
        remat=args.remat, remat_policy=args.remat_policy,
        attention_impl=args.attention_impl, components=components,
        repeats=repeats, peak_flops_per_s=mm_before, dims=dims))
  mm_after = common.matmul_flops_per_s(mm_n, mm_dtype)
  peak = max(mm_before, mm_after)
  for case in cases_out:
    for v in case["variants"].values():
      v["frac_of_peak"] = (v["flops_per_s"] / peak if v["flops_per_s"]
                           else None)
    case["summary"]["full_frac_of_peak"] = (
        case["variants"]["full_step"]["frac_of_peak"])
    case["summary"]["bare_vit_frac_of_peak"] = (
        case["variants"]["bare_vit_fwd_bwd"]["frac_of_peak"])
    if spec_peak:
      full = case["variants"]["full_step"]
      spec = spec_peak * 1e12
      model_flops = case.get("model_flops_full_step") or full["flops"]
      if full["flops"]:
        # XLA's cost analysis is of the partitioned program: per device.
        case["summary"]["mfu"] = model_flops / full["min_s"] / spec
        case["summary"]["hfu"] = full["flops"] / full["min_s"] / spec
        bare = case["variants"]["bare_vit_fwd_bwd"]
        # Its compiled FLOPs include the recomputed forward under --remat.
        key = "bare_vit_hfu" if args.remat else "bare_vit_mfu"
        case["summary"][key] = (bare["flops"] / bare["min_s"] / spec
                                if bare["flops"] else None)
  report["matmul_peak"] = {
      "n": mm_n, "dtype": str(jnp.dtype(mm_dtype)),
      "flops_per_s_before": mm_before, "flops_per_s_after": mm_after,
      "flops_per_s_used": peak}
  if spec_peak:
    report["spec_peak_tflops_per_device"] = spec_peak
    report["spec_peak_note"] = (
        "dense bf16 vendor peak per device, no sparsity; MFU = model FLOPs "
        "per device (XLA cost analysis of the partitioned step; without "
        "remat with --remat) / step time / peak; HFU counts the recomputed "
        "forward too")
  report["cases"] = cases_out
  return common.emit(report, args.out)


if __name__ == "__main__":
  main()
