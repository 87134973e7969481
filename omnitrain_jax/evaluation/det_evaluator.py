"""Detection evaluation: category names as queries -> COCO results -> AP.

One dataset (a det source's val file): every category name becomes a text
query (`queries.category_query`); the jitted function encodes a batch, scores
the union of the queries' tokens in chunks (`inference.union_query_scores`)
and keeps the ``eval.max_detections`` best (box, category) pairs per image
(`inference.detect_top_k`, optional per-category NMS). Process 0 collects
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
"""

from __future__ import annotations

from typing import Any

from etils import epath
import numpy as np

from omnitrain_jax.evaluation import coco_metrics
from omnitrain_jax.evaluation import context as context_lib
from omnitrain_jax.evaluation import datasets as datasets_lib
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import queries as queries_lib


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
    union = queries_lib.TokenUnion.build(qs, ctx.options.token_chunk)
    n = ctx.model.num_patches
    k = min(ctx.options.max_detections, n * len(qs))
    chunk, trivial = union.chunk_size, union.trivial_groups
    nms = ctx.options.nms_iou or None
    self.fixed_ap = fixed_ap = ctx.options.fixed_ap_for(dataset.protocol)
    k_fixed = min(ctx.options.fixed_ap_per_image, n)

    def det_fn(params, batch, consts):
      enc = ctx.encode(params, batch["image"])
      scores = inference.union_query_scores(
          enc, ctx.embed_fn(params), consts["token_ids"], consts["weights"],
          consts["variant_valid"], consts["groups"], chunk_size=chunk,
          trivial_groups=trivial)  # [B, N, P]
      top, labels, boxes = inference.detect_top_k(
          scores, enc["pred_boxes"], k, nms_iou_threshold=nms)
      out = {"scores": top, "labels": labels, "boxes": boxes,
             **context_lib.passthrough(batch)}
      if fixed_ap:
        # Fixed AP's candidates: each category's best boxes of the image,
        # [B, P, k_fixed] (suppressed by NMS: score 0).
        out["fixed_scores"], out["fixed_boxes"], _ = (
            inference.top_k_detections(scores, enc["pred_boxes"], k_fixed,
                                       nms_iou_threshold=nms))
      return out

    self.fn = ctx.jit(det_fn)
    self.consts = {"token_ids": union.token_ids, "weights": union.weights,
                   "variant_valid": union.variant_valid,
                   "groups": union.groups}
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
