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
         cat_ids: Sequence[int] | None, image_ids: Sequence[int] | None):
  """One evaluate/accumulate/summarize; returns the evaluator."""
  if backend == "faster_coco_eval":
    import faster_coco_eval  # pylint: disable=g-import-not-at-top
    ev = faster_coco_eval.COCOeval_faster(gt_api, dt_api, "bbox",
                                          lvis_style=lvis, print_function=_noop)
  else:
    from pycocotools import cocoeval  # pylint: disable=g-import-not-at-top
    ev = cocoeval.COCOeval(gt_api, dt_api, "bbox")
  if lvis:
    ev.params.maxDets = [LVIS_MAX_DETS]
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
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; use one of {BACKENDS}.")
  if lvis and backend != "faster_coco_eval":
    raise ValueError(
        "The LVIS federated protocol needs backend='faster_coco_eval' "
        "(pycocotools has no federated mode; the lvis package crashes on "
        "numpy 2).")
  groups = dict(category_groups or {})
  names = metric_names(lvis=lvis, groups=list(groups))
  gt_api = _load_gt(gt, backend)
  if not results:
    # pycocotools' loadRes fails on an empty list; nothing detected is AP 0
    # wherever there is ground truth.
    has_gt = bool(gt_api.getAnnIds(imgIds=list(image_ids) if image_ids
                                   is not None else []))
    return {k: 0.0 if has_gt else -1.0 for k in names}
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
