r"""Full-vocabulary top-k per box against the vocabulary size V; JSON.

  .venv/bin/python benchmarks/vocab_inference.py
  .venv/bin/python benchmarks/vocab_inference.py --vocab_sizes=1000,500000 \
      --batch=1 --k=10
  .venv/bin/python benchmarks/vocab_inference.py --vocab_sizes= --batch=2 \
      --det_categories=1203,100000,500000  # The det path only.

What ``predict --describe=K`` runs (and any full-vocabulary use: "which
tokens is this box?"): for every box, the K highest-logit tokens of the
whole table. `evaluation.inference.top_k_vocab` scans the table in chunks
of ``--chunk_size`` ids, merging each chunk's logits ``[B, N, chunk]`` into a
running top-k ``[B, N, K]``, so the ``[B, N, V]`` logits never exist. This
benchmark times, per V, side by side (round-robin, min over rounds), on the
ShapesWorld demo's model (ViT width 128, depth 4, conv stem, 128 px: N = 64
boxes, D = 128):

* ``chunked``: `top_k_vocab` over all B x N boxes of an encoded batch (the
  params as `OmniDet.token_embeddings` reads them: gather + normalise);
* ``dense``: the reference it avoids, ``[B, N, V]`` logits then one
  ``lax.top_k`` (skipped above ``--dense_max_vocab``);
* ``encode``: `OmniDet.encode` of the same batch, the V-independent part.

Memory: XLA's static plan of each compiled function (temporaries show the
dense ``[B, N, V]`` buffer; the chunked scan's stay at
``[B, N, k + chunk]``). ``same_top_k`` checks that the chunked and dense
token ids agree.

**The detection-evaluation path** (``det_cases``, per ``--det_categories``;
``--vocab_sizes=`` skips the section above): a shared query set of P
made-up category names (85% one token, 12% two words, 3% two "/"
alternatives, as LVIS's names roughly are) scored like
`evaluation.det_evaluator` does, encode included, keeping the
``--max_detections`` best (box, category) pairs per image:

* ``union``: `queries.TokenUnion` -> `inference.union_query_scores` ->
  `inference.detect_top_k` (a ``[U', R]`` weight matrix, ``[B, N, P]``
  scores); only where ``U' * R <= --union_max_entries``, otherwise the case
  says how many bytes its weights would take;
* ``chunked``: `queries.QueryChunks` -> `inference.chunked_detect_top_k`
  (a scan over query chunks of ``--det_chunk`` tokens, running top-k).

``same_detections``: both paths' labels agree and scores match (where both
ran); ``encode``: `OmniDet.encode` alone (``minus_encode_s``: the scoring
and top-k). Off unless ``--det_categories`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top
from omnitrain_jax import model_setup
from omnitrain_jax import train_step as train_step_lib
from omnitrain_jax.data import preparation
from omnitrain_jax.evaluation import det_evaluator
from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import options as options_lib
from omnitrain_jax.evaluation import queries as queries_lib
from omnitrain_jax.models import omnidet


def _dense_top_k(encoded, embed_all, k):
  """The reference: ``[B, N, V]`` logits, then one top-k."""
  logits = omnidet.token_logits(encoded["class_embeddings"],
                                encoded["logit_scale"],
                                encoded["logit_shift"], embed_all())
  v = logits.shape[-1]
  reserved = jnp.arange(v) < 2  # pad, unk
  logits = jnp.where(reserved, -jnp.inf, logits)
  return jax.lax.top_k(logits, k)


def _model_and_params(args, vocab_size: int):
  """The demo model at `args.dims` with V = `vocab_size`, and fresh params."""
  dims = dict(zip(("width", "depth", "num_heads", "mlp_dim"),
                  (int(x) for x in args.dims.split(","))))
  config = common.demo_config(image_size=args.image_size, batch=args.batch,
                              dims=dims)
  model = model_setup.build_model(config, vocab_size)
  dummy = model_setup.dummy_batch(
      preparation.spec_from_config(config.data))
  params = jax.jit(lambda rng: nn.unbox(train_step_lib.init_variables(
      rng, model=model, dummy_batch=dummy))["params"])(jax.random.key(0))
  return model, params


def _case(args, vocab_size: int, images: np.ndarray) -> dict[str, Any]:
  model, params = _model_and_params(args, vocab_size)

  def embed_fn(params):
    return lambda ids: model.apply({"params": params}, ids,
                                   method=omnidet.OmniDet.token_embeddings)

  def encode(params, images):
    return model.apply({"params": params}, images, train=False,
                       method=omnidet.OmniDet.encode)

  def chunked(params, images):
    return inference.top_k_vocab(encode(params, images), embed_fn(params),
                                 vocab_size, args.k,
                                 chunk_size=args.chunk_size)

  def dense(params, images):
    ids = jnp.arange(vocab_size, dtype=jnp.int32)
    return _dense_top_k(encode(params, images),
                        lambda: embed_fn(params)(ids), args.k)

  fns = {"chunked": chunked, "encode": encode}
  if vocab_size <= args.dense_max_vocab:
    fns["dense"] = dense
  compiled, out = {}, {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(params, images).compile()
    out[name] = {"compile_s": time.perf_counter() - t0,
                 "memory": common.compiled_memory(compiled[name])}
  timer = common.Timer()
  for name in fns:
    timer.add(name, common.plain_call(compiled[name], params, images))
  timer.run(args.repeats)
  for name in fns:
    out[name].update(timer.stats(name))
  case = {"vocab_size": vocab_size,
          "table_bytes": int(vocab_size * params[omnidet.TOKEN_TABLE].shape[1]
                             * 4),
          "variants": out}
  if "dense" in fns:
    _, ids_c = compiled["chunked"](params, images)
    _, ids_d = compiled["dense"](params, images)
    case["same_top_k"] = bool(np.array_equal(np.asarray(ids_c),
                                             np.asarray(ids_d)))
  case["chunked_minus_encode_s"] = (out["chunked"]["min_s"]
                                    - out["encode"]["min_s"])
  return case


def _made_up_queries(num: int, vocab_size: int, seed: int = 0
                     ) -> list[queries_lib.Query]:
  """`num` category queries over ids ``[2, vocab_size)``, LVIS-like shapes.

  Name p's head word is token ``2 + p``; 12% add one of 200 shared modifier
  words (two tokens, "red apple"), 3% have a second "/" alternative of one
  token ("Monitor/TV"): union ~P tokens, R ~1.03 P variants.
  """
  rng = np.random.default_rng(seed)
  kind = rng.random(num)
  extra = rng.integers(2 + num, vocab_size, num)
  modifier = 2 + num + rng.integers(0, 200, num)
  out = []
  for p in range(num):
    head = 2 + p
    if kind[p] < 0.12:
      variants = ((int(modifier[p]), head),)
    elif kind[p] < 0.15:
      variants = ((head,), (int(extra[p]),))
    else:
      variants = ((head,),)
    out.append(queries_lib.Query(text=f"name{p}", variants=variants))
  return out


def _det_cases(args, images: np.ndarray) -> list[dict[str, Any]]:
  """Union vs chunked det scoring per category count (see the doc)."""
  sizes = [int(x) for x in args.det_categories.split(",") if x]
  if not sizes:
    return []
  vocab_size = 2 + max(sizes) + 200 + 1000  # Heads, modifiers, alternatives.
  model, params = _model_and_params(args, vocab_size)
  n = model.num_patches

  def make(detect):
    def fn(params, images, consts):
      enc = model.apply({"params": params}, images, train=False,
                        method=omnidet.OmniDet.encode)
      embed = lambda ids: model.apply(  # pylint: disable=g-long-lambda
          {"params": params}, ids, method=omnidet.OmniDet.token_embeddings)
      return detect(enc, embed, consts)
    return fn

  encode = jax.jit(lambda params, images: model.apply(
      {"params": params}, images, train=False,
      method=omnidet.OmniDet.encode)).lower(params, images).compile()
  cases = []
  for num in sizes:
    qs = _made_up_queries(num, vocab_size)
    entries = queries_lib.TokenUnion.weight_entries(qs, args.det_chunk)
    case = {"num_categories": num, "num_boxes": n,
            "union_weight_entries": entries,
            "union_weight_bytes": 4 * entries, "variants": {}}
    paths = {"chunked": 0}
    if entries <= args.union_max_entries:
      paths["union"] = 1 << 62
    else:
      size = (f"{4 * entries / 2**30:.1f} GiB" if 4 * entries >= 2**30
              else f"{4 * entries / 2**20:.1f} MiB")
      case["union"] = (f"does not fit: [U', R] weights of {entries} entries "
                       f"({size} float32) > --union_max_entries="
                       f"{args.union_max_entries}")
    compiled, consts_of, results = {}, {}, {}
    for name, limit in paths.items():
      opts = options_lib.EvalOptions(
          max_detections=args.max_detections, token_chunk=args.det_chunk,
          union_max_entries=limit)
      t0 = time.perf_counter()
      path, consts, detect = det_evaluator.query_detector(qs, opts,
                                                          num_boxes=n)
      build_s = time.perf_counter() - t0
      assert path == name, (path, name)
      consts = jax.device_put(consts)
      t0 = time.perf_counter()
      compiled[name] = jax.jit(make(detect)).lower(params, images,
                                                   consts).compile()
      entry = {"host_build_s": build_s,
               "compile_s": time.perf_counter() - t0,
               "consts_bytes": int(sum(x.nbytes for x in consts.values())),
               "memory": common.compiled_memory(compiled[name])}
      if name == "chunked":
        entry["chunks"] = list(consts["tokens"].shape)  # [C, Pc, G, L]
      case["variants"][name] = entry
      consts_of[name] = consts
    timer = common.Timer()
    for name in paths:
      timer.add(name, common.plain_call(compiled[name], params, images,
                                        consts_of[name]))
    timer.add("encode", common.plain_call(encode, params, images))
    timer.run(args.repeats)
    case["encode"] = timer.stats("encode")
    for name in paths:
      case["variants"][name].update(timer.stats(name))
      results[name] = jax.device_get(compiled[name](params, images,
                                                    consts_of[name]))
    for name in paths:
      case["variants"][name]["minus_encode_s"] = (
          case["variants"][name]["min_s"] - case["encode"]["min_s"])
    if "union" in paths:
      u, c = results["union"], results["chunked"]
      case["same_detections"] = bool(
          np.array_equal(u["labels"], c["labels"])
          and np.allclose(u["scores"], c["scores"], rtol=1e-5, atol=1e-6))
      case["chunked_over_union_time"] = (case["variants"]["chunked"]["min_s"]
                                         / case["variants"]["union"]["min_s"])
    cases.append(case)
  return cases


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vocab_sizes", default="1000,100000,500000")
  parser.add_argument("--batch", type=int, default=8, help="Images.")
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--dims", default="128,4,4,512",
                      help="width,depth,heads,mlp of the ViT (the demo's).")
  parser.add_argument("--k", type=int, default=5, help="Tokens per box.")
  parser.add_argument("--chunk_size", type=int, default=4096)
  parser.add_argument("--dense_max_vocab", type=int, default=500_000,
                      help="Skip the dense reference above this V.")
  parser.add_argument("--det_categories", default="",
                      help="Det path: category counts, e.g. "
                      "1203,100000,500000 (default empty: skipped).")
  parser.add_argument("--det_chunk", type=int, default=1024,
                      help="Det path: eval.token_chunk.")
  parser.add_argument("--max_detections", type=int, default=300)
  parser.add_argument("--union_max_entries", type=int, default=1 << 24,
                      help="Det path: eval.union_max_entries.")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="Also write the JSON here.")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, args.image_size,
                                 args.image_size, 3), np.uint8)
  report = {"environment": common.environment(),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "cases": []}
  for v in (int(x) for x in args.vocab_sizes.split(",") if x):
    report["cases"].append(_case(args, v, images))
  if report["cases"]:
    base = report["cases"][0]["variants"]["chunked"]["min_s"]
    report["chunked_time_over_first"] = {
        str(c["vocab_size"]): c["variants"]["chunked"]["min_s"] / base
        for c in report["cases"]}
  report["det_cases"] = _det_cases(args, images)
  return common.emit(report, args.out)


if __name__ == "__main__":
  main()
