r"""Export: a trained run -> a self-contained `jax.export` detector directory.

    python -m omnitrain_jax.export --workdir=runs/demo --out=exported/demo
    python -m omnitrain_jax.export --workdir=runs/demo --out=DIR \
        [--checkpoint_step=N] [--image_size=PX] [--batch=B] \
        [--max_queries=16] [--max_tokens=8] [--max_boxes=20] \
        [--platforms=cpu,cuda,tpu]

The directory holds:

* ``detect.jax_exported``: the detector serialized with `jax.export`
  (StableHLO, one lowering per platform of ``--platforms``): ``(params,
  images, query_tokens, nms_iou) -> {scores, boxes, box_index, keep}``. See
  `detect_function` for the computation and ``signature.json`` for shapes.
* ``params.npz``: the checkpoint's params, flat (``"a/b/c"`` keys); they are
  an argument of the exported function, not constants baked into it, so the
  StableHLO stays small whatever the model's size.
* ``vocab.txt``: the run's vocabulary (the tokenizer's input), or ``--vocab``'s
  (token rows matched to the run's by token string).
* ``signature.json``: input shapes and dtypes, output names, the
  pre-processing, the platforms, the config the model came from and the
  checkpoint step.

Images enter as uint8 canvases ``[B, S, S, 3]``: the longest side resized to
S and padded bottom/right with 0, as `data.transforms.ResizePad` does for
prediction; `OmniDet.encode` normalises them inside the function. Queries
enter as padded token ids ``[P, L]`` (0 = pad; an all-pad row scores 0), so
one artifact serves any query set of up to P queries of up to L tokens
without recompiling. By default the batch dimension is symbolic (any B);
``--batch=B`` fixes it.

`omnitrain_jax.serving.load(DIR)` runs the directory without the training
code (no flax, optax or orbax).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from omnitrain_jax import checkpointing
from omnitrain_jax import config_lib
from omnitrain_jax import model_setup
from omnitrain_jax.data import preparation
from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import predictor as predictor_lib
from omnitrain_jax.losses import box_ops
from omnitrain_jax.models import omnidet
from omnitrain_jax.models import vit
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

FORMAT = "omnitrain_jax.export/1"
EXPORTED_FILE = "detect.jax_exported"
PARAMS_FILE = "params.npz"
VOCAB_FILE = "vocab.txt"
SIGNATURE_FILE = "signature.json"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
OUTPUTS = ("scores", "boxes", "box_index", "keep")
_POSEMB_PATH = ("backbone", "pos_embedding")


def detect_function(model: omnidet.OmniDet, max_boxes: int):
  """The exported computation: images and query tokens -> top-k boxes.

  Prediction's scoring (`Predictor._detect_fn` for text queries):
  `inference.score_queries` with the rows of `OmniDet.token_embeddings`, the
  `max_boxes` best boxes per query (`inference.top_k_boxes`) and greedy NMS
  among them (`inference.nms_keep`). The keep mask is returned instead of
  re-sorting, so the host can take the first k <= `max_boxes` ranks and get
  exactly what `Predictor.predict(max_boxes=k)` keeps (greedy NMS decides a
  box by the higher-scoring boxes only).

  Args:
    model: the `OmniDet`.
    max_boxes: K, boxes per query (static, <= the model's patches).

  Returns:
    ``detect(params, images, query_tokens, nms_iou) -> dict`` with
    ``scores`` float32 ``[B, P, K]`` descending, ``boxes`` float32
    ``[B, P, K, 4]`` (cx, cy, w, h in [0, 1] of the canvas), ``box_index``
    int32 ``[B, P, K]`` and ``keep`` bool ``[B, P, K]`` (False: suppressed
    by a higher-scoring box of the same query with IoU > ``nms_iou``; pass
    ``nms_iou >= 1`` for no NMS).
  """

  def detect(params, images, query_tokens, nms_iou):
    enc = model.apply({"params": params}, images, train=False,
                      method=omnidet.OmniDet.encode)
    embed = lambda ids: model.apply(  # pylint: disable=g-long-lambda
        {"params": params}, ids, method=omnidet.OmniDet.token_embeddings)
    scores = inference.score_queries(enc, embed, query_tokens)  # [B, N, P]
    top, boxes, index = inference.top_k_boxes(scores, enc["pred_boxes"],
                                              max_boxes)  # [B, P, K], ...
    keep = inference.nms_keep(box_ops.cxcywh_to_xyxy(boxes), top, nms_iou)
    return {"scores": top, "boxes": boxes, "box_index": index, "keep": keep}

  return detect


def flatten_params(params: Any) -> dict[str, np.ndarray]:
  """Nested params -> ``{"a/b/c": array}`` (the ``params.npz`` layout)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    flat[key] = np.asarray(leaf)
  return flat


def _resize_params(params: Any, model: omnidet.OmniDet,
                   image_size: int) -> Any:
  """Params of a model trained at another size: position embeddings resized.

  The token grid changes with the image size; everything else (convolution
  kernels, the head, the token table) does not depend on it.
  """
  grid = vit.grid_size(image_size, model.patch_size)
  params = jax.tree.map(lambda x: x, params)  # A copy of the dicts.
  node = params
  for key in _POSEMB_PATH[:-1]:
    node = node[key]
  node[_POSEMB_PATH[-1]] = vit.resize_posemb(node[_POSEMB_PATH[-1]], grid)
  return params


def _parse_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  out = tuple(dict.fromkeys(p.strip().lower() for p in platforms
                            if p.strip()))
  if not out:
    raise ValueError("--platforms is empty; pass e.g. cpu or cpu,cuda,tpu.")
  return out


def export_run(workdir: str, out: str, *, step: int | None = None,
               image_size: int | None = None, batch: int | None = None,
               max_queries: int = 16, max_tokens: int = 8,
               max_boxes: int = 20,
               platforms: Sequence[str] = DEFAULT_PLATFORMS,
               vocab: str | None = None) -> dict[str, Any]:
  """Writes the export directory of a training run (see the module doc).

  Args:
    workdir: the training run.
    out: the directory to write (created; existing files are replaced).
    step: checkpoint step (default: the latest finished).
    image_size: canvas side S (default: the config's); another size resizes
      the position embeddings (bilinear), as loading a backbone does.
    batch: a fixed batch size, or None for a symbolic batch dimension.
    max_queries: P, queries per call.
    max_tokens: L, tokens per query.
    max_boxes: K, boxes per query (capped at the model's patches).
    platforms: lowering platforms (``cpu``, ``cuda``, ``rocm``, ``tpu``).
    vocab: vocabulary file (default: `predictor.resolve_vocab`); one other
      than the run's ``WORKDIR/vocab.txt`` (e.g. with new class names) gets
      the trained rows of the tokens it shares with it, matched by token
      string (`vocab_transfer`, reported in the log), and is the one
      exported.

  Returns:
    The signature (also written as ``signature.json``).
  """
  for name, value in (("max_queries", max_queries),
                      ("max_tokens", max_tokens), ("max_boxes", max_boxes)):
    if value < 1:
      raise ValueError(f"--{name}={value} must be >= 1.")
  if batch is not None and batch < 1:
    raise ValueError(f"--batch={batch} must be >= 1 (or unset for a "
                     "symbolic batch).")
  platforms = _parse_platforms(platforms)
  config = config_lib.config_from_workdir(workdir)
  vocab_path = predictor_lib.resolve_vocab(workdir, config, vocab)
  vocabulary = vocabulary_lib.Vocabulary.load(vocab_path)
  # The sequence of `Predictor.from_workdir`: no dataset is opened.
  setup = model_setup.create(config, vocab_size=len(vocabulary),
                             spec=preparation.spec_from_config(config.data))
  # A vocabulary other than the run's gets the trained rows by token string
  # (new tokens from their word pieces), as `predict --vocab` does.
  params, step = checkpointing.restore_params(workdir, setup.abstract_state,
                                              step, vocab=vocabulary)
  params = jax.device_get(params)
  model = setup.model
  trained_size = model.image_size
  if image_size and image_size != trained_size:
    model = model.clone(image_size=int(image_size))
    params = _resize_params(params, model, int(image_size))
  s, n = model.image_size, model.num_patches
  k = min(max_boxes, n)

  # --------------------------------------------------------------- export
  if batch is None:
    (b,) = jax.export.symbolic_shape("b")
  else:
    b = int(batch)
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  args = (abstract_params,
          jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
          jax.ShapeDtypeStruct((max_queries, max_tokens), jnp.int32),
          jax.ShapeDtypeStruct((), jnp.float32))
  start = time.time()
  # Traced outside any mesh: no sharding annotations, one device.
  exported = jax.export.export(jax.jit(detect_function(model, k)),
                               platforms=platforms)(*args)
  export_secs = time.time() - start
  try:
    serialized = exported.serialize()
  except ImportError as e:  # jax does not depend on flatbuffers.
    raise ImportError(f"{e}: pip install flatbuffers (setup.py pins the "
                      "version).") from None

  # ---------------------------------------------------------------- write
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, EXPORTED_FILE), "wb") as f:
    f.write(serialized)
  np.savez(os.path.join(out, PARAMS_FILE), **flatten_params(params))
  shutil.copyfile(vocab_path, os.path.join(out, VOCAB_FILE))
  batch_dim = "b" if batch is None else int(batch)
  signature = {
      "format": FORMAT,
      "files": {"exported": EXPORTED_FILE, "params": PARAMS_FILE,
                "vocab": VOCAB_FILE},
      "platforms": list(exported.platforms),
      "jax_version": jax.__version__,
      "calling_convention_version": exported.calling_convention_version,
      "checkpoint_step": step,
      "workdir": os.path.abspath(workdir),
      "call": "exported.call(params, images, query_tokens, nms_iou)",
      "inputs": {
          "params": {"file": PARAMS_FILE, "layout": "flat keys 'a/b/c' -> "
                     "the nested params dict"},
          "images": {"shape": [batch_dim, s, s, 3], "dtype": "uint8"},
          "query_tokens": {"shape": [max_queries, max_tokens],
                           "dtype": "int32", "pad_id": 0},
          "nms_iou": {"shape": [], "dtype": "float32",
                      "meaning": "per-query greedy NMS IoU; >= 1 disables"},
      },
      "outputs": {
          "scores": {"shape": [batch_dim, max_queries, k],
                     "dtype": "float32", "meaning": "descending"},
          "boxes": {"shape": [batch_dim, max_queries, k, 4],
                    "dtype": "float32",
                    "meaning": "cx, cy, w, h in [0, 1] of the canvas"},
          "box_index": {"shape": [batch_dim, max_queries, k],
                        "dtype": "int32", "meaning": "patch index in [0, N)"},
          "keep": {"shape": [batch_dim, max_queries, k], "dtype": "bool",
                   "meaning": "False: suppressed by NMS"},
      },
      "batch": batch_dim,
      "max_queries": max_queries,
      "max_tokens": max_tokens,
      "max_boxes": k,
      "num_patches": n,
      "image_size": s,
      "trained_image_size": trained_size,
      "preprocessing": {
          "decode": "uint8 RGB, EXIF orientation applied (JPEG); grayscale "
                    "and palette to RGB, alpha dropped "
                    "(omnitrain_jax.data.images.load_image)",
          "resize": f"longest side to {s} (round(side * scale), scale = "
                    f"{s} / max(h, w)); cv2.INTER_AREA when shrinking, "
                    "cv2.INTER_LINEAR when growing; padded bottom/right with "
                    "0 (omnitrain_jax.data.transforms.ResizePad)",
          "normalisation": "inside the function: x / 127.5 - 1",
          "boxes_to_pixels": "xyxy = (cx -+ w/2, cy -+ h/2) * S / scale, "
                             "clipped to the image",
      },
      "queries": "free text -> omnitrain_jax.evaluation.queries.text_query "
                 "(the vocabulary's tokens of the text, unique, in order) "
                 "-> one row of query_tokens; score = geometric mean of the "
                 "box's token probabilities",
      "config": json.loads(config.to_json()),
      "export_seconds": round(export_secs, 2),
  }
  with open(os.path.join(out, SIGNATURE_FILE), "w") as f:
    json.dump(signature, f, indent=2)
  logging.info("Exported step %d for %s (batch %s, %d queries x %d tokens, "
               "%d boxes) in %.1f s to %s.", step, ", ".join(
                   exported.platforms), batch_dim, max_queries, max_tokens,
               k, export_secs, out)
  return signature


# Flags are defined only when this module runs as the program.
def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_string("out", None, "The export directory to write.")
  flags.DEFINE_integer("checkpoint_step", None,
                       "Checkpoint step (default: the latest finished).")
  flags.DEFINE_integer("image_size", None,
                       "Canvas side in pixels (default: the config's).")
  flags.DEFINE_integer("batch", None,
                       "Fixed batch size (default: a symbolic batch).")
  flags.DEFINE_integer("max_queries", 16, "P, queries per call.")
  flags.DEFINE_integer("max_tokens", 8, "L, tokens per query.")
  flags.DEFINE_integer("max_boxes", 20, "K, boxes per query.")
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                    "Lowering platforms (cpu, cuda, rocm, tpu).")
  flags.DEFINE_string("vocab", None, "Vocabulary file (default: the run's); "
                      "rows are matched to the run's by token string.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  from omnitrain_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.quiet_library_logs()
  signature = export_run(
      f.workdir, f.out, step=f.checkpoint_step, image_size=f.image_size,
      batch=f.batch, max_queries=f.max_queries, max_tokens=f.max_tokens,
      max_boxes=f.max_boxes, platforms=f.platforms, vocab=f.vocab)
  print(f"Exported step {signature['checkpoint_step']} to {f.out} "
        f"(platforms {', '.join(signature['platforms'])}; images "
        f"{signature['inputs']['images']['shape']} uint8; queries "
        f"[{f.max_queries}, {f.max_tokens}] token ids).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
