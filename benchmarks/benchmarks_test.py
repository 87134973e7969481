"""Smoke tests of the training benchmarks: tiny sizes, JSON keys, no timings.

  /work/venv/bin/python -m pytest -q benchmarks/benchmarks_test.py

(Not in pytest.ini's testpaths; run it by path.) Nothing here asserts a time:
the benchmarks' numbers are for people to read.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks import train_step
from benchmarks import vocab_scaling
from omnitrain_jax.data import schema

# A 1-block ViT of width 32 at 32 px: 4 patches; compiles in seconds.
_TINY = ["--image_size=32", "--dims=32,1,2,64", "--num_candidates=16",
         "--repeats=1"]


def test_synthetic_batch_has_the_schema_and_all_streams():
  spec = schema.Spec(image_size=32, max_boxes=6, num_candidates=16)
  composition = common.stream_composition(4)
  assert composition == {"det": 2, "grd": 1, "img": 1}
  batch = common.synthetic_batch(spec, composition, vocab_size=400)
  shapes = schema.batch_shapes(spec, 4)
  assert set(batch) == set(shapes)
  for key, (shape, dtype) in shapes.items():
    assert batch[key].shape == shape, key
    assert batch[key].dtype == dtype, key
  np.testing.assert_array_equal(batch["stream"], [0, 0, 1, 2])
  assert batch["box_mask"][:3].any(axis=1).all()  # det and grd have boxes,
  assert not batch["box_mask"][3].any()  # img has none,
  assert (batch["caption_tokens"][2:] > 0).any(axis=1).all()  # but captions.
  assert batch["cand_bg"][:2].any() and not batch["cand_bg"][2:].any()
  assert ((batch["candidates"] >= 0) & (batch["candidates"] < 400)).all()


def test_flops_memory_and_peaks():
  n = 64
  f = jax.jit(lambda a, b: a @ b)
  a = jnp.ones((n, n))
  compiled = f.lower(a, a).compile()
  assert common.compiled_flops(compiled) == 2 * n**3
  memory = common.compiled_memory(compiled)
  assert memory["argument"] == 2 * n * n * 4
  assert memory["output"] == n * n * 4
  assert common.spec_peak_tflops("NVIDIA H200") == 989.0
  assert common.spec_peak_tflops("TPU v5 lite") == 197.0
  assert common.spec_peak_tflops("TPU v5") == 459.0
  assert common.spec_peak_tflops("cpu") is None
  assert len(common.load_average()) == 3


def test_train_step_json():
  report = train_step.main(_TINY + [
      "--variant=Ti/16", "--batch=3", "--vocab_size=300", "--max_boxes=4",
      "--matmul_size=128", "--components=none"])
  assert {"environment", "matmul_peak", "cases", "load_average_end"} <= set(
      report)
  (case,) = report["cases"]
  assert case["config"]["streams"] == {"det": 1, "grd": 1, "img": 1}
  assert set(case["variants"]) == {"full_step", "bare_vit_fwd_bwd"}
  for entry in case["variants"].values():
    assert {"min_s", "median_s", "runs", "compile_s", "flops",
            "flops_per_s", "frac_of_peak"} <= set(entry)
  assert case["variants"]["full_step"]["flops"] > case["variants"][
      "bare_vit_fwd_bwd"]["flops"] > 0
  assert {"full_over_bare_vit_flop_rate", "full_over_bare_vit_time",
          "full_frac_of_peak"} <= set(case["summary"])
  assert case["memory_full_step"]["total"] > 0


def _timing(seconds):
  return {"min_s": seconds, "compile_s": 10 * seconds, "flops": None,
          "flops_per_s": None, "frac_of_peak": None}


def test_optimizer_guards_agree_and_skip_non_finite_steps():
  # The trainer's guard (cond), the previous one (where) and none.
  tx = optax.adamw(1e-2)
  params = {"a": {"w": jnp.ones((3, 2))}, "b": {"v": jnp.arange(4.0)}}
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  opt_state = tx.init(params)

  def run(guard, loss):
    return train_step._optimizer_tail(  # pylint: disable=protected-access
        params, opt_state, grads, jnp.float32(loss), tx=tx, guard=guard)

  (bare_params, _), norm = run("none", 1.0)
  assert not np.allclose(bare_params["a"]["w"], params["a"]["w"])
  for guard in ("cond", "where"):
    (new_params, _), guard_norm = run(guard, 1.0)
    jax.tree.map(np.testing.assert_allclose, new_params, bare_params)
    np.testing.assert_allclose(guard_norm, norm)
    (kept_params, kept_state), _ = run(guard, np.nan)
    jax.tree.map(np.testing.assert_array_equal, kept_params, params)
    jax.tree.map(np.testing.assert_array_equal, kept_state, opt_state)
  summary = train_step._summarize({  # pylint: disable=protected-access
      "full_step": _timing(4.0), "bare_vit_fwd_bwd": _timing(2.0),
      "optimizer_cond_guard": _timing(1.0),
      "optimizer_where_guard": _timing(2.0), "optimizer_bare": _timing(0.5)})
  assert summary["optimizer_where_over_cond_guard_time"] == 2.0
  assert summary["optimizer_where_over_cond_guard_compile"] == 2.0
  assert summary["optimizer_cond_guard_over_bare_time"] == 2.0
  assert summary["optimizer_where_guard_over_bare_time"] == 4.0
  assert set(summary["standalone_s"]) == set(train_step.OPTIMIZER_COMPONENTS)


def test_vocab_scaling_json_and_sparse_rows_match_dense():
  report = vocab_scaling.main(_TINY + [
      "--vocab_sizes=300", "--batch=4"])
  (entry,) = report["per_vocab"]
  assert entry["vocab_size"] == 300
  assert entry["table_and_adam_bytes"] == 3 * 300 * 32 * 4
  assert set(entry["variants"]) == {"dense", "sparse", "frozen_table"}
  for variant in entry["variants"].values():
    assert {"min_s", "compile_s", "flops", "memory"} <= set(variant)
  check = entry["sparse_check"]
  # The rows a step touches get the dense AdamW update (to rounding).
  assert check["touched_rows_moved_by"] > 1e-4
  assert check["touched_rows_diff_over_move"] < 1e-3
  assert check["untouched_rows_moved_sparse"] == 0.0
  assert report["slopes"] == {}  # One V: no line to fit.


def test_batch_predict_reports_every_batch_size():
  from benchmarks import batch_predict  # pylint: disable=import-outside-toplevel
  report = batch_predict.main(["--num_images=3", "--batches=1,2",
                               "--image_size=32"])
  assert set(report["results"]) == {"batch_1", "batch_2", "batch_1_png",
                                    "batch_2_png"}
  assert report["results"]["batch_1"]["ratio_to_batch_1"] == 1.0
  assert all(r["images_per_sec"] > 0 for r in report["results"].values())


def test_vocab_inference_chunked_top_k_matches_dense():
  from benchmarks import vocab_inference  # pylint: disable=import-outside-toplevel
  report = vocab_inference.main([
      "--vocab_sizes=20000,30000", "--batch=2", "--image_size=32",
      "--dims=32,1,2,64", "--repeats=1", "--chunk_size=128", "--k=3",
      "--dense_max_vocab=20000"])
  large, larger = report["cases"]
  assert (large["vocab_size"], larger["vocab_size"]) == (20000, 30000)
  assert set(large["variants"]) == {"chunked", "dense", "encode"}
  assert set(larger["variants"]) == {"chunked", "encode"}  # Dense skipped.
  assert large["same_top_k"] is True
  # Only the dense reference holds [B, N, V] logits (B = 2, N = 4).
  logits_bytes = 2 * 4 * 20000 * 4
  assert large["variants"]["dense"]["memory"]["temp"] >= logits_bytes
  assert large["variants"]["chunked"]["memory"]["temp"] < logits_bytes / 4
  assert set(report["chunked_time_over_first"]) == {"20000", "30000"}


def test_vocab_inference_det_paths_agree():
  from benchmarks import vocab_inference  # pylint: disable=import-outside-toplevel
  report = vocab_inference.main([
      "--vocab_sizes=", "--det_categories=200,2000", "--image_size=32",
      "--dims=32,1,2,64", "--det_chunk=128", "--union_max_entries=100000",
      "--max_detections=20", "--repeats=1"])
  small, large = report["det_cases"]
  assert set(small["variants"]) == {"chunked", "union"}
  assert small["same_detections"] is True
  assert isinstance(large["union"], str) and "does not fit" in large["union"]
  assert set(large["variants"]) == {"chunked"}
