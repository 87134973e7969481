"""COCO and LVIS box AP with the field's tools: faster-coco-eval or pycocotools.

`evaluate_boxes(gt, results, ...)` scores COCO results (`detections.
coco_results`) against a COCO/LVIS ground-truth file and returns flat
metrics:

* ``AP`` (IoU .50:.95), ``AP50``, ``AP75``, ``APs``/``APm``/``APl`` (area
  < 32^2, < 96^2, rest) and ``AR`` (at the last max-detections value);
* LVIS (``lvis=True``): the federated protocol -- a detection of a category
  that is neither annotated in its image nor in the image's
  ``neg_category_ids`` is ignored, one of a ``not_exhaustive_category_ids``
  category that matches nothing is not a false positive -- with 300
  detections per image across categories (``maxDets=[300]``), plus
  ``APr``/``APc``/``APf`` (rare/common/frequent categories). Only
  faster-coco-eval implements it (``lvis_style=True``); the ``lvis`` package
  crashes on numpy 2 and pycocotools has no federated mode.
* per category group (``category_groups={"base": [...], ...}``): ``AP_<g>``
  and ``AP50_<g>``, a separate evaluation with ``params.catIds`` restricted
  to the group (the open-vocabulary base/novel split: the mean over the
  group's categories, nothing else changes).

A value of -1 means "no ground truth to average over" (e.g. a group without
boxes in the evaluated images), the tools' own convention.

faster-coco-eval (C++ evaluate/accumulate) gives pycocotools' numbers about
9x faster (FACTS.md: 5k images x 100 detections, 48 s vs 5.2 s); the tests
check that both agree.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BACKENDS = ("faster_coco_eval", "pycocotools")
LVIS_MAX_DETS = 300
FIXED_AP_DETS_PER_CAT = 10_000

_COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_LVIS_STATS = ("APr", "APc", "APf")


def _noop(*args, **kwargs):
  del args, kwargs


def _copy_results(results: Sequence[Mapping[str, Any]]) -> list[dict]:
  # loadRes adds fields (id, area, iscrowd, segmentation) in place: give it
  # copies so the caller's list stays a clean results file.
  return [dict(r, bbox=list(r["bbox"])) for r in results]


def _load_gt(gt: str | os.PathLike | Mapping[str, Any], backend: str):
  if backend == "faster_coco_eval":
    import faster_coco_eval  # pylint: disable=g-import-not-at-top
    if isinstance(gt, Mapping):
      return faster_coco_eval.COCO(copy.deepcopy(dict(gt)))
    return faster_coco_eval.COCO(os.fspath(gt))
  from pycocotools import coco  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):
    if isinstance(gt, Mapping):
      api = coco.COCO()
      api.dataset = copy.deepcopy(dict(gt))
      api.createIndex()
      return api
    return coco.COCO(os.fspath(gt))


def _run(gt_api, dt_api, backend: str, *, lvis: bool,
         cat_ids: Sequence[int] | None, image_ids: Sequence[int] | None,
         max_dets: int | None = None):
  """One evaluate/accumulate/summarize; returns the evaluator.

  `max_dets` replaces the last ``maxDets`` (the cap per image and category
  the tools apply; fixed AP lifts it).
  """
  if backend == "faster_coco_eval":
    import faster_coco_eval  # pylint: disable=g-import-not-at-top
    ev = faster_coco_eval.COCOeval_faster(gt_api, dt_api, "bbox",
                                          lvis_style=lvis, print_function=_noop)
  else:
    from pycocotools import cocoeval  # pylint: disable=g-import-not-at-top
    ev = cocoeval.COCOeval(gt_api, dt_api, "bbox")
  if lvis:
    ev.params.maxDets = [LVIS_MAX_DETS]
  if max_dets is not None:
    ev.params.maxDets = list(ev.params.maxDets[:-1]) + [int(max_dets)]
  if cat_ids is not None:
    ev.params.catIds = sorted(int(c) for c in cat_ids)
  if image_ids is not None:
    ev.params.imgIds = sorted(int(i) for i in image_ids)
  with contextlib.redirect_stdout(io.StringIO()):
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev


def _stats(ev, backend: str, lvis: bool) -> dict[str, float]:
  if backend == "faster_coco_eval":
    d = ev.stats_as_dict
    out = {"AP": d["AP_all"], "AP50": d["AP_50"], "AP75": d["AP_75"],
           "APs": d["AP_small"], "APm": d["AP_medium"], "APl": d["AP_large"],
           "AR": d["AR_all"] if lvis else d["AR_third"]}
    if lvis:
      out.update(APr=d["APr"], APc=d["APc"], APf=d["APf"])
  else:
    s = ev.stats  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...
    out = dict(zip(_COCO_STATS, s[:6]))
    out["AR"] = s[8]
  return {k: float(v) for k, v in out.items()}


def metric_names(*, lvis: bool = False,
                 groups: Sequence[str] = ()) -> list[str]:
  """The keys `evaluate_boxes` returns."""
  names = list(_COCO_STATS) + ["AR"]
  if lvis:
    names += list(_LVIS_STATS)
  for g in groups:
    names += [f"AP_{g}", f"AP50_{g}"]
  return names


def fixed_ap_names(*, lvis: bool = False) -> list[str]:
  """The keys `evaluate_fixed_ap` returns."""
  return [f"{k}_fixed" for k in ("AP", "AP50") + (_LVIS_STATS if lvis
                                                   else ())]


def limit_dets_per_image(results: Sequence[Mapping[str, Any]],
                         max_dets: int) -> list[Mapping[str, Any]]:
  """Each image's `max_dets` best results across categories (LVIS API)."""
  by_image: dict[int, list] = {}
  for r in results:
    by_image.setdefault(r["image_id"], []).append(r)
  out = []
  for rs in by_image.values():
    if len(rs) > max_dets:
      rs = sorted(rs, key=lambda r: -r["score"])[:max_dets]
    out += rs
  return out


def _no_results(gt_api, names, image_ids) -> dict[str, float]:
  # pycocotools' loadRes fails on an empty list; nothing detected is AP 0
  # wherever there is ground truth.
  has_gt = bool(gt_api.getAnnIds(imgIds=list(image_ids) if image_ids
                                 is not None else []))
  return {k: 0.0 if has_gt else -1.0 for k in names}


def evaluate_boxes(gt: str | os.PathLike | Mapping[str, Any],
                   results: Sequence[Mapping[str, Any]], *,
                   backend: str = "faster_coco_eval", lvis: bool = False,
                   category_groups: Mapping[str, Sequence[int]] | None = None,
                   image_ids: Sequence[int] | None = None
                   ) -> dict[str, float]:
  """Box AP of COCO results against a COCO/LVIS ground truth.

  Args:
    gt: the ground-truth instances JSON (path) or its parsed dict.
    results: COCO result dicts (not modified).
    backend: "faster_coco_eval" (default) or "pycocotools".
    lvis: the LVIS federated protocol (faster_coco_eval only; the GT needs
      ``neg_category_ids``, ``not_exhaustive_category_ids`` and category
      ``frequency``).
    category_groups: group name -> category ids, for ``AP_<g>``/``AP50_<g>``.
    image_ids: evaluate only these images (default: all GT images), e.g.
      the images of a partial evaluation.

  Returns:
    ``metric_names(lvis=..., groups=...)`` -> value.

  Raises:
    ValueError: unknown backend, or LVIS with pycocotools.
  """
  _check_backend(backend, lvis)
  groups = dict(category_groups or {})
  names = metric_names(lvis=lvis, groups=list(groups))
  gt_api = _load_gt(gt, backend)
  if lvis:
    results = limit_dets_per_image(results, LVIS_MAX_DETS)
  if not results:
    return _no_results(gt_api, names, image_ids)
  with contextlib.redirect_stdout(io.StringIO()):
    dt_api = gt_api.loadRes(_copy_results(results))
  ev = _run(gt_api, dt_api, backend, lvis=lvis, cat_ids=None,
            image_ids=image_ids)
  out = _stats(ev, backend, lvis)
  for name, ids in groups.items():
    # Only categories the GT file knows (the eval would fail otherwise).
    known = sorted(set(int(c) for c in ids) & set(gt_api.getCatIds()))
    if not known:
      out[f"AP_{name}"] = out[f"AP50_{name}"] = -1.0
      continue
    g = _stats(_run(gt_api, dt_api, backend, lvis=lvis, cat_ids=known,
                    image_ids=image_ids), backend, lvis)
    out[f"AP_{name}"], out[f"AP50_{name}"] = g["AP"], g["AP50"]
  assert set(out) == set(names), (sorted(out), names)
  return out


def _check_backend(backend: str, lvis: bool) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; use one of {BACKENDS}.")
  if lvis and backend != "faster_coco_eval":
    raise ValueError(
        "The LVIS federated protocol needs backend='faster_coco_eval' "
        "(pycocotools has no federated mode; the lvis package crashes on "
        "numpy 2).")


def evaluate_fixed_ap(gt: str | os.PathLike | Mapping[str, Any],
                      results: Sequence[Mapping[str, Any]], *,
                      backend: str = "faster_coco_eval", lvis: bool = False,
                      max_dets_per_cat: int = FIXED_AP_DETS_PER_CAT,
                      image_ids: Sequence[int] | None = None
                      ) -> dict[str, float]:
  """Fixed AP (Dave et al. 2021): per-category top-k, no per-image cap.

  Each category keeps its `max_dets_per_cat` best results over all images
  (the caller may pass more, e.g. `PerCategoryTopK.results`); the tool's
  per-image-and-category cap is lifted to `max_dets_per_cat`, so no image
  loses a detection its category's top-k holds; then AP as `evaluate_boxes`
  computes it (LVIS: federated, ``lvis_style``).

  Args:
    gt: the ground-truth instances JSON (path) or its parsed dict.
    results: COCO result dicts (not modified).
    backend: "faster_coco_eval" (default) or "pycocotools" (COCO only).
    lvis: the LVIS federated protocol.
    max_dets_per_cat: detections kept per category over the split.
    image_ids: evaluate only these images (default: all GT images).

  Returns:
    ``fixed_ap_names(lvis=...)`` -> value.
  """
  _check_backend(backend, lvis)
  if max_dets_per_cat < 1:
    raise ValueError(f"max_dets_per_cat={max_dets_per_cat} must be >= 1.")
  names = fixed_ap_names(lvis=lvis)
  gt_api = _load_gt(gt, backend)
  by_cat: dict[int, list] = {}
  for r in results:
    by_cat.setdefault(r["category_id"], []).append(r)
  kept = []
  for rs in by_cat.values():
    if len(rs) > max_dets_per_cat:
      rs = sorted(rs, key=lambda r: -r["score"])[:max_dets_per_cat]
    kept += rs
  if not kept:
    return _no_results(gt_api, names, image_ids)
  with contextlib.redirect_stdout(io.StringIO()):
    dt_api = gt_api.loadRes(_copy_results(kept))
  ev = _run(gt_api, dt_api, backend, lvis=lvis, cat_ids=None,
            image_ids=image_ids, max_dets=max_dets_per_cat)
  if lvis:
    stats = _stats(ev, backend, lvis)  # summarize reads maxDets[-1].
  else:
    # COCO's summarize reads the slot of maxDets=100 by value: AP from the
    # accumulated precision [T, R, K, A, M] at the lifted cap instead.
    prec = np.asarray(ev.eval["precision"])[..., 0, -1]  # area "all"
    ap50 = prec[int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))]
    stats = {k: float(np.mean(x[x > -1])) if (x > -1).any() else -1.0
             for k, x in (("AP", prec), ("AP50", ap50))}
  return {f"{k}_fixed": stats[k] for k in ("AP", "AP50") + (
      _LVIS_STATS if lvis else ())}


class PerCategoryTopK:
  """The running `k` best detections of each category over a split.

  Bounded memory for fixed AP: candidates at or below a full category's
  current k-th score are dropped on arrival, the rest buffered and compacted
  (one vectorised sort) whenever the buffer outgrows the kept set (and
  `min_buffer`); so at most about ``2 * k * num_categories + min_buffer``
  detections are held, never all detections of the split. Ties at the k-th
  score keep the earlier arrival.
  """

  min_buffer = 1 << 18  # Candidates buffered at least before a compaction.

  def __init__(self, num_categories: int, k: int = FIXED_AP_DETS_PER_CAT):
    if k < 1 or num_categories < 1:
      raise ValueError(f"PerCategoryTopK(num_categories={num_categories}, "
                       f"k={k}): both must be >= 1.")
    self.num_categories, self.k = int(num_categories), int(k)
    self._floor = np.full((num_categories,), -np.inf)  # k-th score when full
    self._parts: list[tuple[np.ndarray, ...]] = []
    self._size = 0  # Detections held.
    self._kept = 0  # Of which the compacted top-k.

  def add(self, image_ids: np.ndarray, labels: np.ndarray,
          scores: np.ndarray, boxes: np.ndarray) -> None:
    """Adds candidates (flat).

    Args:
      image_ids: int ``[M]``.
      labels: int ``[M]`` category indices in ``[0, num_categories)``.
      scores: ``[M]``.
      boxes: ``[M, 4]`` (any format; kept as is).
    """
    image_ids = np.asarray(image_ids, np.int64).reshape(-1)
    labels = np.asarray(labels, np.int64).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    keep = scores > self._floor[labels]
    if not keep.any():
      return
    self._parts.append((image_ids[keep], labels[keep], scores[keep],
                        boxes[keep]))
    self._size += int(keep.sum())
    # Compact when the buffer outgrows what is kept (amortised O(n log n)).
    if self._size - self._kept > max(self._kept, self.min_buffer):
      self._compact()

  def _compact(self) -> None:
    if not self._parts:
      return
    ids, labels, scores, boxes = (np.concatenate(x) for x in
                                  zip(*self._parts))
    # By category, best first; ties keep arrival order (stable).
    order = np.lexsort((-scores, labels))
    labels = labels[order]
    start = np.searchsorted(labels, np.arange(self.num_categories))
    rank = np.arange(len(labels)) - start[labels]
    take = order[rank < self.k]
    ids, labels, scores, boxes = (ids[take], labels[rank < self.k],
                                  scores[take], boxes[take])
    counts = np.bincount(labels, minlength=self.num_categories)
    full = np.flatnonzero(counts >= self.k)
    # The k-th (last kept) score of each full category: the floor.
    last = np.searchsorted(labels, full, side="right") - 1
    self._floor[full] = scores[last]
    self._parts = [(ids, labels, scores, boxes)]
    self._size = self._kept = len(ids)

  def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, category indices, scores, boxes), by category, best first."""
    self._compact()
    if not self._parts:
      return (np.zeros((0,), np.int64), np.zeros((0,), np.int64),
              np.zeros((0,)), np.zeros((0, 4)))
    return self._parts[0]

  def __len__(self) -> int:
    self._compact()
    return self._size


def subset_images(gt: Mapping[str, Any], image_ids: Sequence[int]
                  ) -> dict[str, Any]:
  """A COCO/LVIS instances dict restricted to `image_ids` (in file order).

  Images and annotations outside the set go; everything else (categories
  with their ``frequency``, ``info``, ...) is kept as is.
  """
  ids = {int(i) for i in image_ids}
  out = {k: v for k, v in gt.items() if k not in ("images", "annotations")}
  out["images"] = [im for im in gt["images"] if int(im["id"]) in ids]
  out["annotations"] = [a for a in gt.get("annotations", [])
                        if int(a["image_id"]) in ids]
  return out


def lvis_minival(lvis_val: Mapping[str, Any],
                 coco_val2017: Mapping[str, Any]) -> dict[str, Any]:
  """LVIS v1 *minival*: the LVIS v1 val images that are COCO val2017 images.

  LVIS v1 val (19.8k images) draws from COCO train2017 and val2017; its
  images from val2017 (about 5k) are the "minival" MDETR evaluates on
  (``lvis_v1_minival.json``), and GLIP, Grounding DINO and YOLO-World after
  it, since models pre-trained on COCO train2017-derived data (RefCOCO,
  GoldG, Objects365 overlaps) have seen the rest. Image ids are COCO ids in
  both files.

  Args:
    lvis_val: the parsed ``lvis_v1_val.json``.
    coco_val2017: the parsed ``instances_val2017.json`` (only its
      ``images`` ids are used; ``image_info_val2017.json`` works too).

  Returns:
    The minival instances dict.
  """
  ids = [int(im["id"]) for im in coco_val2017["images"]]
  return subset_images(lvis_val, ids)


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m omnitrain_jax.evaluation.coco_metrics minival LVIS_VAL
  COCO_VAL2017 OUT``: writes the LVIS v1 minival file (`lvis_minival`).

  Evaluate on it with ``python -m omnitrain_jax.evaluate --workdir=W
  --dataset_json=OUT --image_dir=COCO_ROOT`` (LVIS is detected from the
  file), or make it an LVIS source's ``val``.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="coco_metrics")
  sub = parser.add_subparsers(dest="command", required=True)
  mv = sub.add_parser("minival", help="write lvis_v1_minival.json")
  mv.add_argument("lvis_val")
  mv.add_argument("coco_val2017")
  mv.add_argument("out")
  args = parser.parse_args(argv)
  with open(args.lvis_val) as f:
    lvis_val = json.load(f)
  with open(args.coco_val2017) as f:
    coco_val = json.load(f)
  out = lvis_minival(lvis_val, coco_val)
  with open(args.out, "w") as f:
    json.dump(out, f)
  print(f"{args.out}: {len(out['images'])} of {len(lvis_val['images'])} "
        f"LVIS val images, {len(out['annotations'])} annotations.")


if __name__ == "__main__":
  main()
