"""Helpers shared by the training benchmarks (train_step.py, vocab_scaling.py).

* Timing: `Timer` runs each named variant once per round, round-robin, and
  keeps the minimum. On a shared machine the load changes from second to
  second; interleaving the variants exposes them to the same load, so their
  *ratios* are more trustworthy than back-to-back runs. Minimums, not means:
  noise only ever adds time.
* FLOPs: `compiled_flops` reads XLA's cost analysis of a compiled (or
  lowered) program. In JAX 0.10.2 `Compiled.cost_analysis()` returns a dict
  (older releases returned a list with one dict per program); both are
  handled. XLA counts a multiply-add as 2 FLOPs, counts a `while` body once
  (the in-graph Hungarian solver's loop is under-counted, which is harmless:
  it is a negligible share) and a host callback (scipy matcher) as 0.
* Peaks: `matmul_flops_per_s` measures a large matmul on the device (the
  practical peak of this machine); `spec_peak_tflops` looks a device kind up
  in `DENSE_BF16_PEAK_TFLOPS` (vendor dense bf16 numbers, no sparsity).
* Memory: `compiled_memory` (XLA's static buffer assignment: arguments,
  outputs, temporaries, aliasing) works on every backend; `device_peak_bytes`
  is the allocator's running peak on GPU/TPU (None on CPU); `rss_bytes` is the
  process's resident set (current and high-water mark) from /proc.
* Context: `environment()` returns the JAX version, devices and the load
  average, which every benchmark prints with its numbers.

Also `synthetic_batch`: a batch with the schema's shapes and plausible content
(boxes, box tokens, phrases, captions, known negatives, candidates from the
real candidate sampler) for the three streams.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax.data import candidates as candidates_lib
from omnitrain_jax.data import schema

# Dense (no 2:4 sparsity) bf16 matmul peaks per chip, in TFLOP/s, from the
# vendors' data sheets. Keys are matched case-insensitively as substrings of
# `jax.Device.device_kind` (longest key first, so "v5 lite" beats "v5").
DENSE_BF16_PEAK_TFLOPS = {
    "h200": 989.0,       # NVIDIA H200 SXM (same tensor cores as H100 SXM)
    "h100": 989.0,       # NVIDIA H100 SXM (PCIe: 756)
    "a100": 312.0,       # NVIDIA A100
    "tpu v4": 275.0,     # per chip
    "tpu v5 lite": 197.0,  # v5e (device_kind "TPU v5 lite")
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,     # v5p reports "TPU v5"
}


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages (a 2-core machine at 6 is busy)."""
  return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  dev = jax.devices()[0]
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "machine": platform.machine(),
      "load_average_start": load_average(),
  }


def compiled_flops(compiled_or_lowered) -> float | None:
  """Total FLOPs of a program from XLA's cost analysis (None if unknown)."""
  try:
    cost = compiled_or_lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None  # Some backends/programs have no cost model.
  if cost is None:
    return None
  if isinstance(cost, (list, tuple)):  # JAX < 0.4.30: one dict per program.
    cost = cost[0] if cost else {}
  flops = cost.get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's static memory plan of a compiled program, in bytes.

  ``total`` = arguments + outputs + temporaries - aliased (donated buffers
  reused for outputs): what the program needs at once, the parameters and
  optimizer state included (they are arguments).
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  out = {
      "argument": int(m.argument_size_in_bytes),
      "output": int(m.output_size_in_bytes),
      "temp": int(m.temp_size_in_bytes),
      "alias": int(m.alias_size_in_bytes),
  }
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  peak = getattr(m, "peak_memory_in_bytes", None)
  if peak:
    out["peak"] = int(peak)
  return out


def device_peak_bytes(device=None) -> int | None:
  """The allocator's peak bytes in use on `device` (GPU/TPU); None on CPU."""
  stats = (device or jax.devices()[0]).memory_stats()
  if not stats:
    return None
  peak = stats.get("peak_bytes_in_use")
  return int(peak) if peak is not None else None


def rss_bytes() -> dict[str, int]:
  """Current (VmRSS) and peak (VmHWM) resident memory of this process."""
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(("VmRSS:", "VmHWM:")):
          key, value = line.split(":", 1)
          out["rss" if key == "VmRSS" else "rss_peak"] = (
              int(value.split()[0]) * 1024)
  except OSError:
    pass
  return out


def spec_peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak of a device kind from `DENSE_BF16_PEAK_TFLOPS`."""
  kind = device_kind.lower()
  for key in sorted(DENSE_BF16_PEAK_TFLOPS, key=len, reverse=True):
    if key in kind:
      return DENSE_BF16_PEAK_TFLOPS[key]
  return None


def matmul_flops_per_s(n: int = 2048, dtype=jnp.float32, repeats: int = 5
                       ) -> float:
  """FLOP/s of an ``[n, n] @ [n, n]`` matmul on the default device (best run).

  Several matmuls are chained in one program so that dispatch overhead does
  not count on fast accelerators.
  """
  chain = 1 if jax.default_backend() == "cpu" else 20
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)

  @jax.jit
  def f(a, b):
    # The whole product is returned (a slice could let XLA shrink the dot);
    # different right-hand sides keep it from folding the chain.
    acc = jnp.dot(a, b, preferred_element_type=jnp.float32)
    for i in range(1, chain):
      acc += jnp.dot(a, b * (1 + i), preferred_element_type=jnp.float32)
    return acc

  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 * chain / best


class Timer:
  """Times named zero-argument calls round-robin; keeps every sample.

  Each call must block until its work is done (`jax.block_until_ready`).
  A call that donates its state keeps the state in a closure and replaces it
  with the returned one (see `donating_call`).
  """

  def __init__(self):
    self.calls: dict[str, Callable[[], Any]] = {}
    self.samples: dict[str, list[float]] = {}

  def add(self, name: str, call: Callable[[], Any]) -> None:
    call()  # Warm-up: first-run allocations and caches are not timed.
    self.calls[name] = call
    self.samples[name] = []

  def run(self, repeats: int, min_total_s: float = 0.0) -> None:
    """`repeats` rounds (more for calls faster than min_total_s / repeats)."""
    for _ in range(repeats):
      for name, call in self.calls.items():
        t0 = time.perf_counter()
        call()
        self.samples[name].append(time.perf_counter() - t0)
    # Fast calls (an optimizer update, the matcher) get extra runs so that
    # their minimum is as settled as the slow ones'.
    for name, call in self.calls.items():
      while sum(self.samples[name]) < min_total_s and len(
          self.samples[name]) < 50 * repeats:
        t0 = time.perf_counter()
        call()
        self.samples[name].append(time.perf_counter() - t0)

  def stats(self, name: str) -> dict[str, float]:
    s = self.samples[name]
    return {"min_s": min(s), "median_s": float(np.median(s)), "runs": len(s)}


def donating_call(compiled, state, *rest) -> Callable[[], Any]:
  """A call of ``compiled(state, *rest) -> (state, aux)`` that donates `state`.

  The new state replaces the old one in the closure, so every call gets a
  live buffer.
  """
  cell = [state]

  def call():
    new_state, aux = compiled(cell[0], *rest)
    jax.block_until_ready(aux)
    jax.block_until_ready(new_state)
    cell[0] = new_state
    return aux
  return call


def plain_call(compiled, *args) -> Callable[[], Any]:
  def call():
    return jax.block_until_ready(compiled(*args))
  return call


def rate_entry(flops: float | None, seconds: float,
               peak_flops_per_s: float | None) -> dict[str, float | None]:
  """FLOP/s achieved and its fraction of a peak."""
  rate = flops / seconds if flops and seconds > 0 else None
  frac = rate / peak_flops_per_s if rate and peak_flops_per_s else None
  return {"flops": flops, "flops_per_s": rate, "frac_of_peak": frac}


def round_floats(tree, digits: int = 4):
  """Rounds floats in nested dicts/lists to `digits` significant digits."""
  if isinstance(tree, Mapping):
    return {k: round_floats(v, digits) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [round_floats(v, digits) for v in tree]
  if isinstance(tree, float) and np.isfinite(tree) and tree != 0.0:
    return float(f"{tree:.{digits}g}")
  return tree


# ------------------------------------------------------------ synthetic data


def emit(report: dict[str, Any], out: str | None) -> dict[str, Any]:
  """Adds the final load average, rounds, prints the JSON (and writes `out`)."""
  report["load_average_end"] = load_average()
  report = round_floats(report)
  text = json.dumps(report, indent=1)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")
  return report


def stream_composition(batch: int) -> dict[str, int]:
  """det : grd : img = 2 : 1 : 1 (the demo's mix), every stream when B >= 3.

  B = 1 is det only and B = 2 is det + grd: the loss computes every term for
  every example and masks by stream, so the composition changes only the
  matcher's work (img examples have no columns to match).
  """
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got {batch}.")
  if batch == 1:
    return {"det": 1, "grd": 0, "img": 0}
  if batch == 2:
    return {"det": 1, "grd": 1, "img": 0}
  grd = img = max(batch // 4, 1)
  return {"det": batch - grd - img, "grd": grd, "img": img}


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
  """``n`` boxes ``cx, cy, w, h`` in [0, 1], fully inside the canvas."""
  wh = rng.uniform(0.05, 0.4, (n, 2))
  c = rng.uniform(wh / 2, 1 - wh / 2)
  return np.concatenate([c, wh], axis=1).astype(np.float32)


def synthetic_batch(spec: schema.Spec, composition: Mapping[str, int],
                    vocab_size: int, *, seed: int = 0,
                    num_categories: int = 80,
                    min_vocab_negatives: int = 4) -> dict[str, np.ndarray]:
  """A batch with the schema's shapes and plausible det/grd/img content.

  det examples have 4..M boxes whose tokens are a two-token category
  (``colour shape``-like, from ``num_categories`` categories) and the other
  categories' tokens as known negatives; grd examples have 1..3 phrases of
  1..4 tokens, each with 1..2 boxes, and the phrases' tokens plus a few more
  as the caption; img examples have 4..C caption tokens and no boxes.
  Candidates, ``cand_known`` and ``cand_bg`` come from the real sampler
  (`omnitrain_jax.data.candidates.Candidates`).

  Args:
    spec: the static shapes.
    composition: examples per stream, in det, grd, img order.
    vocab_size: V (token ids are drawn from [2, V)).
    seed: numpy seed.
    num_categories: det categories.
    min_vocab_negatives: the candidate sampler's reserved vocabulary slots.

  Returns:
    numpy arrays, `schema.batch_shapes(spec, B)`.
  """
  rng = np.random.default_rng(seed)
  m, t = spec.max_boxes, spec.max_box_tokens
  first = schema.UNK_ID + 1
  if vocab_size < first + 2 * num_categories + 16:
    raise ValueError(f"vocab_size={vocab_size} is too small for "
                     f"{num_categories} two-token categories.")
  # Category c = (colour token, shape token): ids first + c and
  # first + num_categories + c; free text draws from the whole vocabulary.
  cat_tokens = np.stack([first + np.arange(num_categories),
                         first + num_categories + np.arange(num_categories)], 1)
  examples = []
  for stream, count in composition.items():
    for _ in range(count):
      ex = schema.empty_example(spec, stream)
      s = spec.image_size
      ex["image"] = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
      ex["image_id"] = np.int32(len(examples))
      ex["orig_size"] = np.array([s, s], np.int32)
      if stream == "det":
        n = int(rng.integers(min(4, m), m + 1))
        cats = rng.integers(0, num_categories, n)
        ex["boxes"][:n] = _random_boxes(rng, n)
        ex["box_mask"][:n] = True
        ex["box_tokens"][:n, :2] = cat_tokens[cats]
        ex["phrase_ids"][:n] = np.arange(n)
        absent = np.setdiff1d(np.arange(num_categories), cats)
        neg = rng.permutation(np.unique(cat_tokens[absent]))
        neg = neg[~np.isin(neg, cat_tokens[cats])][:spec.max_neg_tokens]
        ex["neg_tokens"][:neg.size] = neg
      elif stream == "grd":
        n = 0
        caption = []
        for phrase in range(int(rng.integers(1, 4))):
          k = int(rng.integers(1, 3))
          if n + k > m:
            break
          toks = rng.integers(first, vocab_size, int(rng.integers(1, t + 1)))
          ex["boxes"][n:n + k] = _random_boxes(rng, k)
          ex["box_mask"][n:n + k] = True
          ex["box_tokens"][n:n + k, :toks.size] = toks
          ex["phrase_ids"][n:n + k] = phrase
          caption += toks.tolist()
          n += k
        caption += rng.integers(first, vocab_size, 3).tolist()
        caption = caption[:spec.max_caption_tokens]
        ex["caption_tokens"][:len(caption)] = caption
      else:
        c = int(rng.integers(min(4, spec.max_caption_tokens),
                             spec.max_caption_tokens + 1))
        ex["caption_tokens"][:c] = rng.integers(first, vocab_size, c)
      examples.append(ex)
  batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  batch[candidates_lib.KEY] = np.stack([
      candidates_lib.example_key("train", "synthetic", f"seed{seed}", i)
      for i in range(len(examples))])
  sampler = candidates_lib.Candidates(
      spec.num_candidates,
      candidates_lib.sampling_probs(None, vocab_size),
      min_vocab_negatives=min(min_vocab_negatives, spec.num_candidates),
      seed=seed)
  return sampler.build(batch)


# ------------------------------------------------------------------ configs


def demo_config(*, variant: str | None = None, image_size: int = 128,
                batch: int = 16, dtype: str = "float32",
                num_candidates: int = 64, max_boxes: int = 16,
                matcher: str = "jax", remat: bool = False,
                remat_policy: str = "nothing_saveable",
                attention_impl: str = "xla", class_embed_dim: int | None = None,
                dims: Mapping[str, int] | None = None):
  """`configs/shapes_demo.py` with the model, shapes and batch overridden.

  Args:
    variant: a ViT variant ("B/16") at its standard dimensions, or None for
      the demo's small ViT (Ti/16 at width 128, depth 4).
    image_size, batch, dtype, num_candidates, max_boxes, matcher, remat,
      remat_policy, attention_impl, class_embed_dim: the config fields of the
      same names (``batch`` split by `stream_composition`).
    dims: overrides of ``width``, ``depth``, ``num_heads``, ``mlp_dim``
      (tests use tiny models).

  Returns:
    A locked config.
  """
  from configs import shapes_demo  # pylint: disable=import-outside-toplevel
  config = shapes_demo.get_config()
  with config.unlocked():
    if variant is not None:
      config.model.variant = variant
      for key in ("width", "depth", "num_heads", "mlp_dim"):
        config.model[key] = None
    for key, value in (dims or {}).items():
      config.model[key] = int(value)
    config.model.image_size = image_size
    config.model.dtype = dtype
    config.model.remat = remat
    config.model.remat_policy = remat_policy
    config.model.class_embed_dim = class_embed_dim
    if attention_impl != "xla":
      config.model.attention_impl = attention_impl
    config.data.spec.image_size = image_size
    config.data.spec.num_candidates = num_candidates
    config.data.spec.max_boxes = max_boxes
    config.data.batch = dict(stream_composition(batch))
    config.batch_size = batch
    config.loss.matcher = matcher
  return config
