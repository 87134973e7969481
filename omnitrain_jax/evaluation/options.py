"""``config.eval``: what to evaluate and how, with the defaults.

Every field is optional in a config; `config_lib` copies the defaults from
`EvalOptions` into ``config.eval`` (one schema, declared here), and the
evaluation binary's flags override them (`EvalOptions.from_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omnitrain_jax.evaluation import coco_metrics

DET_PROTOCOLS = ("coco", "lvis")
GRD_PROTOCOLS = ("refexp", "flickr")
PROTOCOLS = DET_PROTOCOLS + GRD_PROTOCOLS
GROUNDING_QUERIES = ("spans", "caption")
FIXED_AP = ("lvis", "all", "none")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """``config.eval`` fields, with their defaults.

  Attributes:
    datasets: source names to evaluate; empty: every det/grd source with a
      val file.
    protocols: source name -> protocol (``coco``, ``lvis``, ``refexp``,
      ``flickr``), overriding the guess from the reader and the name.
    batch_size: global evaluation batch; 0: ``data.eval_batch_size``.
    max_detections: (box, category) pairs kept per image (COCO/LVIS: 300).
    nms_iou: per-category NMS IoU over those pairs (det protocols); 0: none,
      the right choice for one-to-one training. Models trained with
      ``loss.matches_per_target > 1`` predict each object several times and
      need it (e.g. 0.5).
    token_chunk: query tokens per logits chunk (memory ``[B, N, chunk]``),
      on both det scoring paths (see ``union_max_entries``).
    union_max_entries: det datasets: the largest ``U' * R`` (union tokens x
      query variants) scored the union way (`queries.TokenUnion`: a float32
      ``[U', R]`` weight matrix, 4 bytes an entry, and ``[B, N, R]`` sums);
      a larger query set (e.g. 100k+ category names) is scanned in query
      chunks (`queries.QueryChunks`, `inference.chunked_detect_top_k`) with
      the same detections. Default 2**24 (64 MiB of weights; LVIS's 1203
      names need ~1.6M).
    coco_backend: ``faster_coco_eval`` or ``pycocotools`` (LVIS needs the
      former).
    max_batches: stop each dataset after this many batches (quick periodic
      evaluations; COCO metrics then cover only the evaluated images); None:
      all.
    grounding_query: ``spans``: a phrase's query is the caption's tokens
      inside its ``tokens_positive`` spans (as in training); ``caption``:
      the whole caption (for referring-expression files whose spans mark only
      the head noun).
    recall_ks: the k of Flickr30k Recall@k.
    fixed_ap: which det datasets also report fixed AP (``AP_fixed``, ...;
      `coco_metrics.evaluate_fixed_ap`): ``lvis`` (those of the LVIS
      protocol, as papers report LVIS), ``all``, or ``none``.
    max_dets_per_cat: fixed AP: detections kept per category over the whole
      split (Dave et al. 2021: 10,000).
    fixed_ap_per_image: fixed AP: boxes kept per category per image on the
      device (the candidates of the running per-category top-k; the split's
      top ``max_dets_per_cat`` of a category rarely needs more of one image).
    progress_every_secs: console progress period.
  """
  datasets: tuple[str, ...] = ()
  protocols: Mapping[str, str] = dataclasses.field(default_factory=dict)
  batch_size: int = 0
  max_detections: int = 300
  nms_iou: float = 0.0
  token_chunk: int = 1024
  union_max_entries: int = 1 << 24
  coco_backend: str = "faster_coco_eval"
  max_batches: int | None = None
  grounding_query: str = "spans"
  recall_ks: tuple[int, ...] = (1, 5, 10)
  fixed_ap: str = "lvis"
  max_dets_per_cat: int = 10_000
  fixed_ap_per_image: int = 10
  progress_every_secs: float = 10.0

  def __post_init__(self):
    if self.coco_backend not in coco_metrics.BACKENDS:
      raise ValueError(f"eval.coco_backend={self.coco_backend!r}; use one of "
                       f"{coco_metrics.BACKENDS}.")
    if self.grounding_query not in GROUNDING_QUERIES:
      raise ValueError(f"eval.grounding_query={self.grounding_query!r}; use "
                       f"one of {GROUNDING_QUERIES}.")
    bad = {k: v for k, v in self.protocols.items() if v not in PROTOCOLS}
    if bad:
      raise ValueError(f"eval.protocols={bad}: protocols are {PROTOCOLS}.")
    if self.fixed_ap not in FIXED_AP:
      raise ValueError(f"eval.fixed_ap={self.fixed_ap!r}; use one of "
                       f"{FIXED_AP}.")
    for name in ("max_detections", "token_chunk", "max_dets_per_cat",
                 "fixed_ap_per_image"):
      if getattr(self, name) < 1:
        raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 1.")
    if self.union_max_entries < 0:
      raise ValueError(f"eval.union_max_entries={self.union_max_entries} "
                       "must be >= 0 (0: always the chunked path).")
    if not 0.0 <= self.nms_iou < 1.0:
      raise ValueError(f"eval.nms_iou={self.nms_iou} must be in [0, 1) "
                       "(0: no NMS).")
    if self.max_batches is not None and self.max_batches < 1:
      raise ValueError(f"eval.max_batches={self.max_batches} must be >= 1 "
                       "or None (all).")
    if not self.recall_ks or min(self.recall_ks) < 1:
      raise ValueError(f"eval.recall_ks={self.recall_ks} must be k >= 1.")

  def fixed_ap_for(self, protocol: str) -> bool:
    """Whether a det dataset of `protocol` also reports fixed AP."""
    return self.fixed_ap == "all" or (self.fixed_ap == "lvis"
                                      and protocol == "lvis")

  @classmethod
  def from_config(cls, config: Any, **overrides) -> EvalOptions:
    """From ``config.eval`` (absent: defaults), then non-None `overrides`."""
    section = config.get("eval") if hasattr(config, "get") else None
    values = dict(section.to_dict() if hasattr(section, "to_dict")
                  else section or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
      raise ValueError(f"Unknown config.eval fields {unknown}; known: "
                       f"{sorted(allowed)}.")
    for key in ("datasets", "recall_ks"):
      if key in values:
        v = values[key]
        values[key] = tuple(v.split(",") if isinstance(v, str) else v or ())
    if "protocols" in values:
      values["protocols"] = dict(values["protocols"] or {})
    return cls(**values)
