"""Grounding evaluation: each phrase of a caption -> its top-k boxes -> hits.

One dataset (a grd source's val file, MDETR style: a caption per record and
``tokens_positive`` spans per box). What a *phrase* is depends on the
protocol:

* ``refexp`` (RefCOCO/+/g Acc@0.5): a record's boxes grouped by
  ``phrase_ids``, queried with the union of their spans;
* ``flickr`` (Flickr30k Entities Recall@k, MDETR's ``flickr_eval``): every
  phrase *mention* of the sentence, MDETR's ``tokens_positive_eval`` (read
  from the record when the reader carries it, else from the val file's image
  entry), each queried with its own spans and scored against all boxes of its
  entity (`grounding_metrics.mention_boxes`), any-box and merged-box
  (``R@k_anybox``, ``R@k_mergedbox``). A record without
  ``tokens_positive_eval`` falls back to the ``phrase_ids`` grouping.

The query is the caption's tokens inside the phrase's spans
(``eval.grounding_query="spans"``, as in training) or the whole caption
(``"caption"``). The jitted function scores them and keeps the top-k boxes
per phrase (`inference.ground_top_k`); process 0 counts hits
(`grounding_metrics`) and writes ``grounding_<name>.json`` (per phrase: its
tokens, top-k boxes in pixels, scores, ground truth and hits).
"""

from __future__ import annotations

from typing import Any

from absl import logging
from etils import epath
import numpy as np

from omnitrain_jax.data import formats
from omnitrain_jax.evaluation import context as context_lib
from omnitrain_jax.evaluation import datasets as datasets_lib
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import grounding_metrics
from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import queries as queries_lib


class GrdEvaluator:
  """Prepared once per dataset; consumes batches; `finish` gives metrics."""

  stream = "grd"

  def __init__(self, ctx: context_lib.EvalContext,
               dataset: datasets_lib.EvalDataset, source: Any,
               gt_path: str | None = None):
    """Builds every record's phrase queries and the jitted function.

    Args:
      ctx: the model side.
      dataset: what to evaluate.
      source: the opened val `readers.RecordSource` (grounding records).
      gt_path: the val file; the ``flickr`` protocol reads its image entries'
        ``tokens_positive_eval`` when the records do not carry them.
    """
    self.ctx, self.dataset = ctx, dataset
    self.num_records = len(source)
    self.report = queries_lib.QueryReport(dataset.name)
    self.phrases = []  # Per record: [(query, gt boxes xyxy)].
    self.record_image_ids = np.zeros((len(source),), np.int64)
    flickr = dataset.protocol == "flickr"
    mentions_of = _eval_mentions(gt_path) if flickr else {}
    self.num_mentions_without_boxes = 0
    for r in range(len(source)):
      rec = source[r]
      self.record_image_ids[r] = rec["image_id"]
      enc = ctx.tokenizer.encode(rec["caption"])
      boxes = np.asarray(rec["boxes"], np.float32).reshape(-1, 4)
      spans = rec["box_spans"]
      mentions = rec.get("tokens_positive_eval",
                         mentions_of.get(int(rec["image_id"])))
      if flickr and mentions is not None:
        groups = []
        for m in mentions:
          idx = grounding_metrics.mention_boxes(m, spans)
          if not len(idx):  # Its boxes were dropped by the reader.
            self.num_mentions_without_boxes += 1
            continue
          groups.append(([tuple(int(v) for v in sp) for sp in m], idx))
      else:
        pids = np.asarray(rec["phrase_ids"])
        groups = []
        for pid in dict.fromkeys(pids.tolist()):
          idx = np.flatnonzero(pids == pid)
          groups.append((list(dict.fromkeys(tuple(sp) for i in idx
                                            for sp in spans[i])), idx))
      per_record = []
      for windows, idx in groups:
        if ctx.options.grounding_query == "caption":
          windows = []
        q = self.report.add(queries_lib.phrase_query(enc, windows))
        per_record.append((q, boxes[idx]))
      self.phrases.append(per_record)
    if self.num_mentions_without_boxes:
      logging.warning(
          "%s: %d phrase mentions lost all their boxes in the reader "
          "(lenient mode) and are not counted.", dataset.name,
          self.num_mentions_without_boxes)
    max_phrases = max([len(p) for p in self.phrases] + [1])
    max_tokens = max([len(q.token_ids) for p in self.phrases for q, _ in p]
                     + [1])
    self.query_shape = (max_phrases, max_tokens)
    self.ks = ((1,) if dataset.protocol == "refexp"
               else tuple(ctx.options.recall_ks))
    k = min(max(self.ks), ctx.model.num_patches)

    def grd_fn(params, batch, consts):
      del consts
      enc = ctx.encode(params, batch["image"])
      top, boxes = inference.ground_top_k(
          enc, ctx.embed_fn(params), batch["query_tokens"], k)
      return {"scores": top, "boxes": boxes, "record": batch["record"],
              **context_lib.passthrough(batch)}

    self.fn = ctx.jit(grd_fn)
    self.consts = {}
    self.reset()

  def reset(self) -> None:
    if self.dataset.protocol == "flickr":
      self._acc = grounding_metrics.FlickrAccumulator(self.ks)
    else:
      self._acc = grounding_metrics.GroundingAccumulator(self.ks)
    self._rows: list[dict] = []

  def feed(self, records: np.ndarray, feed: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """Adds the records' indices and phrase tokens to a local batch.

    Args:
      records: int ``[local batch]``: the record of each example, -1 for
        padding.
      feed: the batch's `context.FEED_KEYS` fields.

    Returns:
      `feed` with ``record`` and ``query_tokens`` ``[b, P, L]``.
    """
    self._check_records(records, feed["image_id"])
    p, l = self.query_shape
    tokens = np.zeros((len(records), p, l), np.int32)
    for b, r in enumerate(records.tolist()):
      if r >= 0:
        tokens[b] = queries_lib.pad_queries([q for q, _ in self.phrases[r]],
                                            p, l)
    return {**feed, "record": records.astype(np.int32),
            "query_tokens": tokens}

  def _check_records(self, records, image_ids) -> None:
    for r, image_id in zip(records.tolist(), image_ids.tolist()):
      # -1: padding, or a record whose image could not be read (lenient).
      if r >= 0 and image_id >= 0 and image_id != self.record_image_ids[r]:
        raise RuntimeError(
            f"{self.dataset.name}: evaluation batch holds image {image_id} "
            f"where record {r} (image {self.record_image_ids[r]}) was "
            "expected: pipeline.make_eval_dataset no longer yields process "
            "p's records p, p + P, ... in order; update Evaluator._batches.")

  def consume(self, out: dict[str, np.ndarray]) -> None:
    """Adds one gathered batch of outputs (process 0)."""
    xyxy = self.ctx.canvas_boxes(out, out["boxes"])  # [B, P, k, 4]
    rounded = context_lib.rounded
    for b, r in enumerate(out["record"].tolist()):
      if r < 0:
        continue
      image_id = int(out["image_id"][b])
      for p, (q, gt) in enumerate(self.phrases[r]):
        row = {"image_id": int(self.record_image_ids[r]), "record": r,
               "phrase": q.text, "tokens": list(q.tokens[0]) if q.tokens
               else [], "gt_boxes": rounded(detections_lib.xyxy_to_xywh(gt))}
        if image_id < 0 or q.empty:
          # Unreadable image, or a query without tokens: a miss (all-zero
          # scores would otherwise rank boxes by chance).
          self._acc.add_miss()
          row["hits"] = {str(k): False for k in self._acc.ks}
          if self.dataset.protocol == "flickr":
            row["hits_mergedbox"] = row["hits"]
        else:
          hits = self._acc.add(xyxy[b, p], gt)
          row.update(
              boxes=rounded(detections_lib.xyxy_to_xywh(xyxy[b, p])),
              scores=rounded(out["scores"][b, p],
                             detections_lib.SCORE_DECIMALS))
          if self.dataset.protocol == "flickr":
            # "hits": any-box, as for refexp; the merged-box variant beside.
            row["hits"] = {str(k): v for k, v in hits["anybox"].items()}
            row["hits_mergedbox"] = {str(k): v for k, v
                                     in hits["mergedbox"].items()}
          else:
            row["hits"] = {str(k): v for k, v in hits.items()}
        self._rows.append(row)

  def finish(self, out_dir: epath.Path | None) -> dict[str, float]:
    """Writes the per-phrase file; returns Acc@0.5 or Recall@k (process 0)."""
    if out_dir is not None:
      context_lib.write_json(out_dir / f"grounding_{self.dataset.name}.json",
                             self._rows)
    if self.dataset.protocol == "refexp":
      return grounding_metrics.refexp_metrics(self._acc)
    return grounding_metrics.flickr_metrics(self._acc)

  def queries_file(self) -> list:
    return []


def _eval_mentions(gt_path: str | None) -> dict[int, list]:
  """{image entry id: its ``tokens_positive_eval``} of an MDETR-style file.

  Empty when there is no file or it is not a COCO-style dict (the records
  then fall back to the ``phrase_ids`` grouping).
  """
  if not gt_path:
    return {}
  data = formats.load_json(gt_path)
  images = data.get("images") if isinstance(data, dict) else None
  out = {}
  for im in images or ():
    if (isinstance(im, dict) and "tokens_positive_eval" in im
        and isinstance(im.get("id"), int)):
      out[im["id"]] = im["tokens_positive_eval"]
  return out
