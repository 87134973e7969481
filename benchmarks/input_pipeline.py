r"""Input pipeline throughput: examples/s per stream and mixed, vs bare decoding.

    python benchmarks/input_pipeline.py                       # defaults below
    python benchmarks/input_pipeline.py --sizes=128 --seconds=1 --workers=0

Generates ShapesWorld (``--num_images`` per stream of ``--image_size`` px
JPEGs, default 480: about the pixel count of a 640x480 photo) into
``--cache_dir`` and measures, for each canvas size S in ``--sizes``:

* ``baseline``: bare decode + resize (longest side to S) + pad into a uint8
  canvas of the same det images, with the fastest decoder here (simplejpeg +
  cv2), on one core and with ``--threads`` threads: the ceiling of any
  pipeline that decodes these files;
* ``pipeline``: `make_train_dataset` batches (decode, tokenize, crop/flip,
  resize/pad, padding, batching, candidates) for each stream alone (16
  examples per batch) and mixed (8 + 4 + 4), in three modes: one core
  (``num_threads=0``: everything in the main thread), ``threads``
  (``num_threads=--threads``), ``workers`` (``num_workers=--workers``
  processes);
* ``ratio``: pipeline / baseline at the same number of cores.

Why 1000 images per stream: grain's `index_shuffle` costs about 1.4 ms per
element on a 40-record dataset, 0.3 ms at 256 and under 0.05 ms from 2000
records up (measured here), so a tiny dataset would measure grain's shuffle,
not the pipeline.

Plus ``anchor``: the one-core baseline on synthetic 640x480 JPEGs, the setup
of FACTS.md's "about 600 img/s per core" (simplejpeg + cv2 to 768^2).

Measured (2026-11-29, one 16-core x86 host of an H200 machine, Python 3.12,
other jobs running: load average 10-13, so read +-30%; --num_images=1000
--seconds=2 --streams=det,mixed; examples/s):

  ==========  ====================  =========  =========  ==========
  canvas S    bare decode+resize    one core   16 thr.    16 workers
              (1 core / 16 thr.)    det/mixed  det/mixed  det/mixed
  ==========  ====================  =========  =========  ==========
  128         358 / 4,427           324 / 379  667 / 627  2,757 / 3,542
  768         443 / 2,655           265 / 300  594 / 561  1,928 / 1,430
  ==========  ====================  =========  =========  ==========

An earlier run (same host, load ~4-11) had one core at 314-399 (128) and
285-357 (768) with baselines 592 and 488: the one-core pipeline costs about
1.5-2x bare decoding. Threads are capped by the GIL (the transforms' Python,
~1.5 ms per example); worker processes scale. The 2-core development machine
(shared by ~6 people) gives numbers too noisy to quote.

Prints one JSON object on stdout (progress on stderr). Rates are from a
machine shared with other jobs unless you know otherwise: read them as
rough, and compare ratios rather than absolute numbers. cv2 is limited to one
internal thread in this process (and in the pipeline's worker processes) so
that "one core" means one core.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import cv2
import numpy as np
import simplejpeg

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from omnitrain_jax import config_lib  # pylint: disable=g-import-not-at-top
from omnitrain_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from omnitrain_jax.data import preparation  # pylint: disable=g-import-not-at-top
from omnitrain_jax.data import schema  # pylint: disable=g-import-not-at-top

_SIZES = flags.DEFINE_list("sizes", ["128", "768"], "Canvas sizes S.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1000,
                                   "ShapesWorld train images per stream.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 480,
                                   "ShapesWorld image side, pixels.")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Measuring time per cell.")
_THREADS = flags.DEFINE_integer("threads", os.cpu_count() or 1,
                                "Threads for the 'threads' mode.")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1,
                                "Processes for the 'workers' mode (0: skip).")
_CACHE = flags.DEFINE_string("cache_dir", None,
                             "Where ShapesWorld goes (default: a temp dir).")
_STREAMS = flags.DEFINE_list("streams", ["det", "grd", "img", "mixed"],
                             "Cells to measure.")


def _log(*args):
  print(*args, file=sys.stderr, flush=True)


def decode_resize(data: bytes, size: int) -> np.ndarray:
  """The bare baseline: JPEG -> uint8 RGB, longest side to `size`, padded."""
  image = simplejpeg.decode_jpeg(data, colorspace="RGB")
  h, w = image.shape[:2]
  scale = size / max(h, w)
  nh, nw = min(size, max(1, round(h * scale))), min(size,
                                                    max(1, round(w * scale)))
  interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
  canvas = np.zeros((size, size, 3), np.uint8)
  canvas[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=interp)
  return canvas


def baseline_rate(blobs: list[bytes], size: int, threads: int,
                  seconds: float) -> float:
  """Images/s of `decode_resize` over `blobs` (in memory: no file I/O)."""
  n, t0 = 0, time.perf_counter()
  if threads <= 1:
    while time.perf_counter() - t0 < seconds:
      decode_resize(blobs[n % len(blobs)], size)
      n += 1
    return n / (time.perf_counter() - t0)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    chunk = 4 * threads
    while time.perf_counter() - t0 < seconds:
      list(pool.map(lambda b: decode_resize(b, size),
                    [blobs[(n + i) % len(blobs)] for i in range(chunk)]))
      n += chunk
  return n / (time.perf_counter() - t0)


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """640x480 JPEGs with photo-like content (smooth gradients + noise)."""
  rng = np.random.default_rng(seed)
  out = []
  yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
  for _ in range(count):
    a, b, c = rng.uniform(0.2, 1.0, 3)
    base = np.stack([128 + 100 * np.sin(xx / (40 * a) + yy / (70 * b)),
                     128 + 100 * np.cos(yy / (50 * c)),
                     128 + 80 * np.sin((xx + yy) / 90)], -1)
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255)
    out.append(simplejpeg.encode_jpeg(img.astype(np.uint8), quality=90))
  return out


def pipeline_rate(data, info, batch: dict[str, int], seconds: float
                  ) -> tuple[float, int]:
  """Examples/s of `make_train_dataset` (after 2 warm-up batches)."""
  data.batch.update(batch)
  it = iter(pipeline.make_train_dataset(data, info, process_index=0,
                                        process_count=1))
  try:
    for _ in range(2):  # Warm-up: worker start, first reads, caches.
      next(it)
    per_batch = sum(batch.values())
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
      b = next(it)
      n += 1
    rate = n * per_batch / (time.perf_counter() - t0)
    assert b["image"].dtype == np.uint8
  finally:
    if hasattr(it, "close"):
      it.close()
  return rate, n


def main(argv):
  del argv
  cv2.setNumThreads(1)
  cache = _CACHE.value or tempfile.mkdtemp(prefix="otj_bench_")
  data = config_lib.data_config()
  data.cache_dir = cache
  data.shapes_world.num_images = _NUM_IMAGES.value
  data.shapes_world.num_val_images = 8
  data.shapes_world.image_size = _IMAGE_SIZE.value
  data.prefetch_batches = 0  # Measure the work, not a buffer.
  t0 = time.perf_counter()
  info = preparation.prepare_data(data)
  _log(f"data ready in {time.perf_counter() - t0:.1f} s: {info.root}")
  det_dir = os.path.join(info.root, "images", "det_train")
  blobs = [open(os.path.join(det_dir, f), "rb").read()
           for f in sorted(os.listdir(det_dir))]
  anchor = synthetic_jpegs(16)
  result = {
      "machine": {"cpu_count": os.cpu_count(),
                  "loadavg_at_start": os.getloadavg()[0]},
      "setup": {"num_images": _NUM_IMAGES.value,
                "source_image_size": _IMAGE_SIZE.value,
                "threads": _THREADS.value, "workers": _WORKERS.value,
                "seconds_per_cell": _SECONDS.value},
      "anchor_640x480_to_768_one_core": round(
          baseline_rate(anchor, 768, 1, _SECONDS.value), 1),
      "sizes": {},
  }
  _log("anchor", result["anchor_640x480_to_768_one_core"])
  modes = [("one_core", 0, 0), ("threads", _THREADS.value, 0)]
  if _WORKERS.value:
    modes.append(("workers", 0, _WORKERS.value))
  cells = {"det": dict(det=16, grd=0, img=0), "grd": dict(det=0, grd=16, img=0),
           "img": dict(det=0, grd=0, img=16),
           "mixed": dict(det=8, grd=4, img=4)}
  for size in [int(s) for s in _SIZES.value]:
    data.spec.image_size = size
    info = preparation.DataInfo(**{**info.__dict__,
                                   "spec": preparation.spec_from_config(data)})
    base = {"one_core": baseline_rate(blobs, size, 1, _SECONDS.value),
            "threads": baseline_rate(blobs, size, _THREADS.value,
                                     _SECONDS.value)}
    base["workers"] = base["threads"]  # Same cores; decode releases the GIL.
    _log(f"S={size} baseline", base)
    out = {"baseline_decode_resize": {k: round(v, 1) for k, v in base.items()
                                      if k != "workers"}}
    for mode, threads, workers in modes:
      data.num_threads, data.num_workers = threads, workers
      row = {}
      for name in _STREAMS.value:
        rate, n = pipeline_rate(data, info, cells[name], _SECONDS.value)
        row[name] = {"examples_per_s": round(rate, 1),
                     "ratio_to_baseline": round(rate / base[mode], 3),
                     "batches": n}
        _log(f"S={size} {mode} {name}: {rate:.1f} ex/s")
      out[mode] = row
    result["sizes"][str(size)] = out
  result["machine"]["loadavg_at_end"] = os.getloadavg()[0]
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
