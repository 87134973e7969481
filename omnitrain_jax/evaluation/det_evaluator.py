"""Detection evaluation: category names as queries -> COCO results -> AP.

One dataset (a det source's val file): every category name becomes a text
query (`queries.category_query`); the jitted function encodes a batch, scores
the union of the queries' tokens in chunks (`inference.union_query_scores`)
and keeps the ``eval.max_detections`` best (box, category) pairs per image
(`inference.detect_top_k`, optional per-category NMS). A category set too
large for the union's ``[U', R]`` weights (``eval.union_max_entries``; e.g.
100k+ names) is scanned in query chunks instead
(`inference.chunked_detect_top_k`: a running top-k of (box, category) pairs,
never the ``[B, N, P]`` scores), with the same detections (`query_detector`
picks the path). Process 0 collects
COCO results (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in
original pixels, ``score``), writes ``detections_<name>.json`` and computes
COCO AP (LVIS federated AP for the ``lvis`` protocol; per-group AP for
ShapesWorld's open-vocabulary groups) with `coco_metrics`.

**Fixed AP** (``eval.fixed_ap``: LVIS datasets by default): the device also
keeps each category's ``eval.fixed_ap_per_image`` best boxes per image
(`inference.top_k_detections`, the same per-query NMS), process 0 merges
them into a running top-``eval.max_dets_per_cat`` per category over the
split (`coco_metrics.PerCategoryTopK`, bounded memory), and ``AP_fixed``
(``APr_fixed``, ...) is reported beside the standard AP
(`coco_metrics.evaluate_fixed_ap`). The results file stays the standard one.
Both paths give the candidates (the chunked one per query chunk), but the
host's running top-k holds ~2 x ``max_dets_per_cat`` detections per category,
so fixed AP over more than ``FIXED_AP_MAX_HELD / (2 x max_dets_per_cat)``
categories (13k at the default 10,000) is refused with an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
from etils import epath
import numpy as np

from omnitrain_jax.evaluation import coco_metrics
from omnitrain_jax.evaluation import context as context_lib
from omnitrain_jax.evaluation import datasets as datasets_lib
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import options as options_lib
from omnitrain_jax.evaluation import queries as queries_lib


# Fixed AP's host side holds up to ~2 * max_dets_per_cat detections per
# category (`coco_metrics.PerCategoryTopK`, ~40 bytes each): refuse more than
# this many (~10 GiB) rather than run out of memory at the end of a split.
FIXED_AP_MAX_HELD = 1 << 28


def _check_fixed_ap_fits(name: str, num_queries: int,
                         options: options_lib.EvalOptions) -> None:
  held = 2 * options.max_dets_per_cat * num_queries
  if held > FIXED_AP_MAX_HELD:
    raise ValueError(
        f"{name}: fixed AP over {num_queries} categories would hold up to "
        f"{held} detections on process 0 (2 x eval.max_dets_per_cat="
        f"{options.max_dets_per_cat} per category, ~{held * 40 / 2**30:.0f} "
        f"GiB; the limit is {FIXED_AP_MAX_HELD}). Set eval.fixed_ap=none or "
        "lower eval.max_dets_per_cat.")


def query_detector(qs: Sequence[queries_lib.Query],
                   options: options_lib.EvalOptions, *, num_boxes: int,
                   fixed_ap: bool = False
                   ) -> tuple[str, dict[str, np.ndarray], Callable[..., Any]]:
  """The det scoring path for a shared query set, its constants and function.

  ``union`` (`queries.TokenUnion` -> `inference.union_query_scores` ->
  `inference.detect_top_k`) while ``U' * R <= eval.union_max_entries``;
  else ``chunked`` (`queries.QueryChunks` ->
  `inference.chunked_detect_top_k`), which never builds the ``[U', R]``
  weights or the ``[B, N, P]`` scores. Both give the same detections (and
  fixed-AP candidates).

  Args:
    qs: the queries, one per category (may be empty queries).
    options: ``eval.max_detections``, ``nms_iou``, ``token_chunk``,
      ``union_max_entries``, ``fixed_ap_per_image``.
    num_boxes: N, the model's boxes per image.
    fixed_ap: also each category's ``fixed_ap_per_image`` best boxes per
      image (``fixed_scores`` ``[B, P, k]``, ``fixed_boxes``).

  Returns:
    (path name, constants (numpy, passed to `detect` on the device),
    ``detect(encoded, embed_tokens, consts) -> dict`` with ``scores``,
    ``labels``, ``boxes`` ``[B, max_detections, ...]`` and, with
    `fixed_ap`, the fixed-AP arrays).
  """
  n = num_boxes
  k = min(options.max_detections, n * len(qs))
  nms = options.nms_iou or None
  k_fixed = min(options.fixed_ap_per_image, n) if fixed_ap else None
  entries = queries_lib.TokenUnion.weight_entries(qs, options.token_chunk)
  if entries > options.union_max_entries:
    chunks = queries_lib.QueryChunks.build(qs, options.token_chunk)
    p = chunks.num_queries

    def detect_chunked(enc, embed, consts):
      return inference.chunked_detect_top_k(
          enc, embed, consts["tokens"], consts["query_valid"], k,
          num_queries=p, nms_iou_threshold=nms, fixed_k=k_fixed)

    consts = {"tokens": chunks.tokens, "query_valid": chunks.query_valid}
    return "chunked", consts, detect_chunked

  union = queries_lib.TokenUnion.build(qs, options.token_chunk)
  chunk, trivial = union.chunk_size, union.trivial_groups

  def detect_union(enc, embed, consts):
    scores = inference.union_query_scores(
        enc, embed, consts["token_ids"], consts["weights"],
        consts["variant_valid"], consts["groups"], chunk_size=chunk,
        trivial_groups=trivial)  # [B, N, P]
    top, labels, boxes = inference.detect_top_k(
        scores, enc["pred_boxes"], k, nms_iou_threshold=nms)
    out = {"scores": top, "labels": labels, "boxes": boxes}
    if k_fixed is not None:
      # Fixed AP's candidates: each category's best boxes of the image,
      # [B, P, k_fixed] (suppressed by NMS: score 0).
      out["fixed_scores"], out["fixed_boxes"], _ = (
          inference.top_k_detections(scores, enc["pred_boxes"], k_fixed,
                                     nms_iou_threshold=nms))
    return out

  consts = {"token_ids": union.token_ids, "weights": union.weights,
            "variant_valid": union.variant_valid, "groups": union.groups}
  return "union", consts, detect_union


class DetEvaluator:
  """Prepared once per dataset; consumes batches; `finish` gives metrics."""

  stream = "det"

  def __init__(self, ctx: context_lib.EvalContext,
               dataset: datasets_lib.EvalDataset, source: Any, gt_path: str):
    """Builds the queries and the jitted function.

    Args:
      ctx: the model side.
      dataset: what to evaluate.
      source: the opened val `readers.RecordSource` (category names).
      gt_path: the ground-truth file for COCO/LVIS AP.
    """
    self.ctx, self.dataset, self.gt_path = ctx, dataset, gt_path
    self.num_records = len(source)
    names = source.category_names or {}
    if not names:
      raise ValueError(f"{dataset.name}: the file lists no categories, so "
                       "there are no queries to score.")
    self.category_ids = tuple(sorted(names))
    self.report = queries_lib.QueryReport(dataset.name)
    qs = self.report.add_all(queries_lib.category_query(ctx.tokenizer,
                                                        names[c])
                             for c in self.category_ids)
    n = ctx.model.num_patches
    self.fixed_ap = fixed_ap = ctx.options.fixed_ap_for(dataset.protocol)
    if fixed_ap:
      _check_fixed_ap_fits(dataset.name, len(qs), ctx.options)
    self.path, self.consts, detect = query_detector(
        qs, ctx.options, num_boxes=n, fixed_ap=fixed_ap)
    logging.info("%s: %d category queries, %s scoring path.", dataset.name,
                 len(qs), self.path)

    def det_fn(params, batch, consts):
      enc = ctx.encode(params, batch["image"])
      return {**detect(enc, ctx.embed_fn(params), consts),
              **context_lib.passthrough(batch)}

    self.fn = ctx.jit(det_fn)
    self.queries_json = [{"category_id": c, "name": q.text,
                          "tokens": [list(t) for t in q.tokens],
                          "unknown_words": list(q.unknown)}
                         for c, q in zip(self.category_ids, qs)]
    self.reset()

  def reset(self) -> None:
    self._results: list[dict] = []
    self._image_ids: set[int] = set()
    self._top_per_cat = (coco_metrics.PerCategoryTopK(
        len(self.category_ids), self.ctx.options.max_dets_per_cat)
                         if self.fixed_ap else None)

  def feed(self, records: np.ndarray, feed: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """A local batch as is (the queries are the dataset's, in `consts`)."""
    del records
    return feed

  def consume(self, out: dict[str, np.ndarray]) -> None:
    """Adds one gathered batch of outputs (process 0)."""
    xyxy = self.ctx.canvas_boxes(out, out["boxes"])  # [B, K, 4]
    self._results += detections_lib.coco_results(
        out["image_id"], out["scores"], out["labels"], xyxy,
        self.category_ids)
    self._image_ids.update(int(i) for i in out["image_id"] if i >= 0)
    if self._top_per_cat is not None:
      fixed = self.ctx.canvas_boxes(out, out["fixed_boxes"])  # [B, P, k, 4]
      scores = np.asarray(out["fixed_scores"], np.float64)  # [B, P, k]
      image_ids = np.asarray(out["image_id"], np.int64)
      b, p, kk = scores.shape
      ok = (image_ids[:, None, None] >= 0) & (scores > 0)
      labels = np.broadcast_to(np.arange(p)[None, :, None], (b, p, kk))
      ids = np.broadcast_to(image_ids[:, None, None], (b, p, kk))
      self._top_per_cat.add(ids[ok], labels[ok], scores[ok], fixed[ok])

  def finish(self, out_dir: epath.Path | None) -> dict[str, float]:
    """Writes the results file; returns COCO/LVIS metrics (process 0)."""
    if out_dir is not None:
      context_lib.write_json(out_dir / f"detections_{self.dataset.name}.json",
                             self._results)
    partial = self.ctx.options.max_batches is not None
    lvis = self.dataset.protocol == "lvis"
    image_ids = sorted(self._image_ids) if partial else None
    metrics = coco_metrics.evaluate_boxes(
        self.gt_path, self._results, backend=self.ctx.options.coco_backend,
        lvis=lvis, category_groups=self.dataset.category_groups,
        image_ids=image_ids)
    if self._top_per_cat is not None:
      metrics.update(coco_metrics.evaluate_fixed_ap(
          self.gt_path, self._fixed_results(),
          backend=self.ctx.options.coco_backend, lvis=lvis,
          max_dets_per_cat=self.ctx.options.max_dets_per_cat,
          image_ids=image_ids))
    return metrics

  def _fixed_results(self) -> list[dict]:
    """The per-category top-k as COCO result dicts."""
    ids, labels, scores, xyxy = self._top_per_cat.arrays()
    return detections_lib.coco_results(
        ids, scores[:, None], labels[:, None], xyxy[:, None],
        self.category_ids)

  def queries_file(self) -> list:
    return self.queries_json
