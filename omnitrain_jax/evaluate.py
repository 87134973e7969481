r"""Evaluation: a checkpoint -> detections/grounding files -> standard metrics.

    python -m omnitrain_jax.evaluate --workdir=runs/demo [--config=CONFIG] \
        [--checkpoint_step=N] [--datasets=shapes_det,shapes_grd]
    python -m omnitrain_jax.evaluate --workdir=runs/demo \
        --dataset_json=instances_val2017.json --image_dir=val2017

Every process of a multi-host job runs the same command (as for training).
It restores only the params of the latest (or the named) checkpoint onto the
config's mesh, runs each evaluation dataset once, in file order, with one
jitted encode+score function whose batch is sharded over the mesh's ``data``
axis, gathers the small per-image results to the hosts
(`multihost_utils.process_allgather`), and process 0 writes
``WORKDIR/eval/STEP/``:

* ``detections_<dataset>.json``: COCO results (``image_id``, ``category_id``,
  ``bbox`` ``[x, y, w, h]`` in original-image pixels, ``score``), the
  ``eval.max_detections`` (300) best (box, category) pairs per image;
* ``grounding_<dataset>.json``: per phrase its query tokens, top-k boxes
  (``[x, y, w, h]`` px), scores, ground truth and hits;
* ``queries_<dataset>.json``: how the queries tokenized, the unknown words
  and the queries without any known token;
* ``metrics.json``: a flat dict of floats, merged with what an earlier run
  wrote for the same step, e.g. ``eval/shapes_det/AP50_base``,
  ``eval/shapes_grd/acc@0.5``.

Without ``--config`` the run's own ``WORKDIR/config.json`` (written by the
trainer) is used; ``--config.x=y`` overrides need ``--config``.

Datasets and protocols (``config.eval``; every field optional):

* Every det and grd source with a ``val`` file is evaluated (or those named
  in ``eval.datasets``). det: COCO AP/AP50/AP75/APs/m/l; ``lvis`` reader:
  LVIS federated AP and APr/APc/APf (faster-coco-eval ``lvis_style``);
  ShapesWorld: AP and AP50 also per open-vocabulary group (``base``,
  ``grd_novel``, ``img_novel`` from ``splits.json``). grd: RefCOCO-style
  Acc@0.5 (``refexp``) or, for sources whose name or file mentions
  "flickr", Flickr30k Recall@1/5/10 (``flickr``); override per source with
  ``eval.protocols={"name": "flickr"}``.
* ``--dataset_json=PATH --image_dir=DIR``: any COCO (or LVIS) file, its
  category names being the text queries -- the open-vocabulary use: names,
  no training. Names are cleaned like training names (LVIS ``hot_dog`` ->
  ``hot dog``, ``bow_(weapon)`` -> ``bow``; ``Monitor/TV`` -> the best of
  both).

Queries. Category names and phrases are tokenized with the run's vocabulary;
unknown words are logged once per dataset with counts and counted in the
metrics (``unknown_query_words``, ``queries_without_tokens``); a query with no
known token scores 0 (a grounding phrase without tokens counts as a miss). A
box's score for a query is the geometric mean of its token probabilities
(soft AND). Detection scores logits only for the union of the dataset's query
tokens, in chunks of ``eval.token_chunk`` tokens (`evaluation.inference`).

The trainer's periodic evaluation calls `run_evaluation(config, setup,
params, step=..., workdir=..., writer=...)`, the same code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from omnitrain_jax import checkpointing
from omnitrain_jax import runtime
from omnitrain_jax import sharding
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import readers
from omnitrain_jax.evaluation import coco_metrics
from omnitrain_jax.evaluation import detections as detections_lib
from omnitrain_jax.evaluation import grounding
from omnitrain_jax.evaluation import inference
from omnitrain_jax.evaluation import queries as queries_lib
from omnitrain_jax.models import omnidet
from omnitrain_jax.models import partitioning

DET_PROTOCOLS = ("coco", "lvis")
GRD_PROTOCOLS = ("refexp", "flickr")
PROTOCOLS = DET_PROTOCOLS + GRD_PROTOCOLS
GROUNDING_QUERIES = ("spans", "caption")
EVAL_SUBDIR = "eval"
METRICS_FILE = "metrics.json"
# Fields of the example batches the device needs (the rest are labels).
_FEED_KEYS = ("image", "image_id", "orig_size", "scale")


# ----------------------------------------------------------------------------
# Options and datasets.


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
    token_chunk: query tokens per logits chunk (memory ``[B, N, chunk]``).
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
    progress_every_secs: console progress period.
  """
  datasets: tuple[str, ...] = ()
  protocols: Mapping[str, str] = dataclasses.field(default_factory=dict)
  batch_size: int = 0
  max_detections: int = 300
  nms_iou: float = 0.0
  token_chunk: int = 1024
  coco_backend: str = "faster_coco_eval"
  max_batches: int | None = None
  grounding_query: str = "spans"
  recall_ks: tuple[int, ...] = (1, 5, 10)
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
    for name in ("max_detections", "token_chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 1.")
    if not 0.0 <= self.nms_iou < 1.0:
      raise ValueError(f"eval.nms_iou={self.nms_iou} must be in [0, 1) "
                       "(0: no NMS).")
    if self.max_batches is not None and self.max_batches < 1:
      raise ValueError(f"eval.max_batches={self.max_batches} must be >= 1 "
                       "or None (all).")
    if not self.recall_ks or min(self.recall_ks) < 1:
      raise ValueError(f"eval.recall_ks={self.recall_ks} must be k >= 1.")

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


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """One evaluation: a source's val split and how to score it.

  Attributes:
    name: the metrics' prefix ``eval/<name>/`` and the files' suffix.
    stream: ``det`` or ``grd``.
    source: the source name in ``info.sources[stream]``.
    protocol: one of `PROTOCOLS`.
    category_groups: det: group -> category ids, for ``AP_<group>``.
  """
  name: str
  stream: str
  source: str
  protocol: str
  category_groups: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=dict)


def _guess_protocol(spec: pipeline.SourceSpec) -> str:
  if spec.stream == "det":
    return "lvis" if spec.reader == "lvis" else "coco"
  text = f"{spec.name} {os.path.basename(spec.val)}".lower()
  return "flickr" if "flickr" in text else "refexp"


def _shapes_groups(info: pipeline.DataInfo) -> dict[str, tuple[int, ...]]:
  splits = info.splits or {}
  groups = {}
  for group in ("base", "grd_novel", "img_novel"):
    if f"{group}_categories" in splits:
      groups[group] = tuple(int(c) for c in splits[f"{group}_categories"])
  return groups


def eval_datasets(config: Any, info: pipeline.DataInfo,
                  options: EvalOptions | None = None) -> list[EvalDataset]:
  """The datasets `run_evaluation` scores for `config` (see module doc)."""
  options = options or EvalOptions.from_config(config)
  out = []
  for stream in ("det", "grd"):
    for name, spec in info.sources.get(stream, {}).items():
      if not spec.val or (options.datasets and name not in options.datasets):
        continue
      protocol = options.protocols.get(name) or _guess_protocol(spec)
      wanted = DET_PROTOCOLS if stream == "det" else GRD_PROTOCOLS
      if protocol not in wanted:
        raise ValueError(f"eval.protocols[{name!r}]={protocol!r} does not fit "
                         f"a {stream} source; use one of {wanted}.")
      groups = {}
      if (stream == "det" and info.splits is not None
          and spec.reader == "coco_instances"):
        groups = _shapes_groups(info)
      out.append(EvalDataset(name=name, stream=stream, source=name,
                             protocol=protocol, category_groups=groups))
  known = {d.name for d in out}
  missing = [n for n in options.datasets if n not in known]
  if missing:
    have = sorted(n for s in ("det", "grd")
                  for n, spec in info.sources.get(s, {}).items() if spec.val)
    raise ValueError(f"eval.datasets names {missing}, which are not det/grd "
                     f"sources with a val file; those are {have}.")
  return out


def with_dataset_json(info: pipeline.DataInfo, json_path: str, image_dir: str,
                      *, name: str | None = None, fmt: str = "auto"
                      ) -> tuple[pipeline.DataInfo, EvalDataset]:
  """Adds a COCO/LVIS file as a det source (val split) to `info`.

  Args:
    info: the run's data info (its vocabulary tokenizes the names).
    json_path: a COCO or LVIS instances file.
    image_dir: the folder its ``file_name``s (LVIS: ``coco_url`` tails) are
      relative to.
    name: the dataset's name (default: the file's stem).
    fmt: ``coco``, ``lvis``, or ``auto`` (LVIS when images carry
      ``neg_category_ids``).

  Returns:
    (the extended info, the dataset to evaluate).
  """
  json_path = os.path.abspath(os.path.expanduser(json_path))
  image_dir = os.path.abspath(os.path.expanduser(image_dir))
  if not os.path.exists(json_path):
    raise FileNotFoundError(f"--dataset_json={json_path} does not exist.")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"--image_dir={image_dir} is not a folder.")
  if fmt == "auto":
    data = readers.load_json(json_path)
    images = data.get("images") if isinstance(data, dict) else None
    lvis = bool(images) and isinstance(images[0], dict) and (
        "neg_category_ids" in images[0])
    fmt = "lvis" if lvis else "coco"
  if fmt not in ("coco", "lvis"):
    raise ValueError(f"dataset format {fmt!r}; use auto, coco or lvis.")
  name = name or os.path.splitext(os.path.basename(json_path))[0]
  spec = pipeline.SourceSpec(
      name=name, stream="det",
      reader="lvis" if fmt == "lvis" else "coco_instances",
      train=json_path, val=json_path, image_dir=image_dir)
  sources = {s: dict(v) for s, v in info.sources.items()}
  sources.setdefault("det", {})[name] = spec
  return (dataclasses.replace(info, sources=sources),
          EvalDataset(name=name, stream="det", source=name, protocol=fmt))


# ----------------------------------------------------------------------------
# Checkpoints and configs.


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved as ``WORKDIR/config.json``."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: pass --config=CONFIG (the training config "
        "file), or point --workdir at a training run's directory.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def finished_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps in ``WORKDIR/checkpoints`` (read-only look)."""
  directory = epath.Path(workdir) / checkpointing.CHECKPOINT_SUBDIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and (p / checkpointing.COMMIT_MARKER)
                .exists())


def restore_params(workdir: str, abstract_state: Any,
                   step: int | None = None) -> tuple[Any, int]:
  """Restores only the params of a finished checkpoint onto their shardings.

  Does not open a `checkpointing.Checkpointer` (which would clean up the
  in-flight saves of a trainer running in the same workdir).

  Args:
    workdir: the training run's directory.
    abstract_state: `train.setup(config).abstract_state` (target shardings).
    step: the step, or None for the latest finished one.

  Returns:
    (params, step).
  """
  if "://" not in workdir:  # Orbax reads only absolute paths.
    workdir = os.path.abspath(os.path.expanduser(workdir))
  steps = finished_steps(workdir)
  if not steps:
    raise ValueError(f"No finished checkpoint in {workdir}/"
                     f"{checkpointing.CHECKPOINT_SUBDIR}; train first or fix "
                     "--workdir.")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise ValueError(f"--checkpoint_step={step} is not a finished checkpoint "
                     f"in {workdir}; finished steps: {steps}.")
  path = (epath.Path(workdir) / checkpointing.CHECKPOINT_SUBDIR / str(step))
  restored = checkpointing.restore_params_from(path, abstract_state,
                                               keys=("params",))
  return restored.state["params"], int(step)


# ----------------------------------------------------------------------------
# Host helpers.


def _is_lead() -> bool:
  return jax.process_index() == 0


def _write_json(path: epath.Path, obj: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(obj, separators=(",", ":")))
  tmp.replace(path)  # Overwrites (a second evaluation of the same step).


def _rounded(x, decimals: int = detections_lib.BOX_DECIMALS) -> list:
  # float64 first: a rounded float32 prints as 32.0099983215332.
  return np.round(np.asarray(x, np.float64), decimals).tolist()


def _share_from_lead(obj: Any) -> Any:
  """Process 0's JSON-able `obj` on every process."""
  if jax.process_count() == 1:
    return obj
  data = json.dumps(obj).encode() if _is_lead() else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buf = np.zeros((size,), np.uint8)
  if _is_lead():
    buf[:] = np.frombuffer(data, np.uint8)
  buf = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(bytes(np.asarray(buf)).decode())


class _Progress:
  """Images done, images/s and ETA on the console (process 0)."""

  def __init__(self, name: str, total: int, every_secs: float):
    self.name, self.total, self.every = name, max(total, 1), every_secs
    self.start = time.monotonic()
    self.first: tuple[float, int] | None = None  # After compilation.
    self.last = self.start
    self.rate: float | None = None

  def __call__(self, done: int) -> None:
    now = time.monotonic()
    done = min(done, self.total)
    if self.first is None:
      self.first = (now, done)
      return
    t0, d0 = self.first
    if now > t0 and done > d0:
      self.rate = (done - d0) / (now - t0)
    if not _is_lead() or (now - self.last < self.every and done < self.total):
      return
    self.last = now
    eta = (self.total - done) / self.rate if self.rate else float("nan")
    logging.info("%s: %d/%d images (%.0f%%), %.1f images/s, elapsed %.0f s, "
                 "ETA %.0f s", self.name, done, self.total,
                 100.0 * done / self.total, self.rate or 0.0, now - self.start,
                 eta)


# ----------------------------------------------------------------------------
# The evaluator.


@dataclasses.dataclass
class _Prepared:
  """A dataset's host-side state, built once and reused every evaluation."""
  dataset: EvalDataset
  num_records: int
  report: queries_lib.QueryReport
  fn: Any                       # jitted (params, batch, consts) -> outputs
  consts: dict[str, np.ndarray]
  # det
  gt_path: str = ""
  category_ids: tuple[int, ...] = ()
  queries_json: list = dataclasses.field(default_factory=list)
  # grd
  record_image_ids: np.ndarray | None = None
  phrases: list = dataclasses.field(default_factory=list)  # per record
  query_shape: tuple[int, int] = (1, 1)
  ks: tuple[int, ...] = (1,)


class Evaluator:
  """Prepares each dataset once; `run` evaluates a set of params.

  Queries, the jitted functions and the grounding records are built on first
  use and reused, so periodic evaluation compiles once per dataset.
  """

  def __init__(self, config: Any, setup: Any, *,
               datasets: Sequence[EvalDataset] | None = None,
               info: pipeline.DataInfo | None = None,
               options: EvalOptions | None = None):
    """Creates the evaluator.

    Args:
      config: the full config.
      setup: `train.setup(config)`'s result (mesh, model, abstract state
        with shardings, info).
      datasets: what to evaluate (default `eval_datasets`).
      info: data info (default ``setup.info``); pass one extended by
        `with_dataset_json`.
      options: default ``EvalOptions.from_config(config)``.
    """
    self.config = config
    self.setup = setup
    self.info = info or setup.info
    self.options = options or EvalOptions.from_config(config)
    self.datasets = list(datasets if datasets is not None else
                         eval_datasets(config, self.info, self.options))
    self.mesh = setup.mesh
    self.model = setup.model
    self.batch_size = self.options.batch_size or config.data.eval_batch_size
    data = self.mesh.shape[sharding.DATA]
    if self.batch_size % data or self.batch_size % jax.process_count():
      raise ValueError(
          f"Evaluation batch size {self.batch_size} must be divisible by the "
          f"{data} data-parallel devices and {jax.process_count()} processes;"
          " set config.eval.batch_size (or data.eval_batch_size).")
    self._rules = tuple(map(tuple, partitioning.get_rules(
        config.logical_rules)))
    self._prepared: dict[str, _Prepared] = {}

  # ------------------------------------------------------------ jitting

  def _jit(self, fn):
    """jit with the batch sharded over ``data``; called inside the mesh and
    the logical rules so that the model's activation constraints apply."""
    batch = sharding.batch_sharding(self.mesh)
    jitted = jax.jit(fn,
                     in_shardings=(self.setup.state_shardings.params, batch,
                                   sharding.replicated(self.mesh)),
                     out_shardings=batch)
    mesh, rules = self.mesh, self._rules

    def call(*args):
      with partitioning.activation_sharding(mesh, rules):
        return jitted(*args)

    return call

  def _encode(self, params, images):
    return self.model.apply({"params": params}, images, train=False,
                            method=omnidet.OmniDet.encode)

  def _embed_fn(self, params):
    return lambda ids: self.model.apply(
        {"params": params}, ids, method=omnidet.OmniDet.token_embeddings)

  # ------------------------------------------------------------ preparing

  def _spec(self, ds: EvalDataset) -> pipeline.SourceSpec:
    return self.info.sources[ds.stream][ds.source]

  def _open(self, ds: EvalDataset) -> readers.RecordSource:
    return pipeline.open_source(self._spec(ds), "val",
                                strict=self.config.data.strict)

  def _prepare(self, ds: EvalDataset) -> _Prepared:
    if ds.name not in self._prepared:
      start = time.monotonic()
      prep = (self._prepare_det(ds) if ds.protocol in DET_PROTOCOLS
              else self._prepare_grd(ds))
      if _is_lead():
        prep.report.log()
        logging.info("%s: %d records, %s protocol, prepared in %.1f s.",
                     ds.name, prep.num_records, ds.protocol,
                     time.monotonic() - start)
      self._prepared[ds.name] = prep
    return self._prepared[ds.name]

  def _prepare_det(self, ds: EvalDataset) -> _Prepared:
    source = self._open(ds)
    names = source.category_names or {}
    if not names:
      raise ValueError(f"{ds.name}: the file lists no categories, so there "
                       "are no queries to score.")
    category_ids = tuple(sorted(names))
    report = queries_lib.QueryReport(ds.name)
    qs = report.add_all(queries_lib.category_query(self.info.tokenizer,
                                                   names[c])
                        for c in category_ids)
    union = queries_lib.TokenUnion.build(qs, self.options.token_chunk)
    n = self.model.num_patches
    k = min(self.options.max_detections, n * len(qs))
    chunk, trivial = union.chunk_size, union.trivial_groups
    nms = self.options.nms_iou or None

    def det_fn(params, batch, consts):
      enc = self._encode(params, batch["image"])
      scores = inference.union_query_scores(
          enc, self._embed_fn(params), consts["token_ids"], consts["weights"],
          consts["variant_valid"], consts["groups"], chunk_size=chunk,
          trivial_groups=trivial)  # [B, N, P]
      top, labels, boxes = inference.detect_top_k(
          scores, enc["pred_boxes"], k, nms_iou_threshold=nms)
      return {"scores": top, "labels": labels, "boxes": boxes,
              **{key: batch[key] for key in _FEED_KEYS if key != "image"}}

    consts = {"token_ids": union.token_ids, "weights": union.weights,
              "variant_valid": union.variant_valid, "groups": union.groups}
    queries_json = [{"category_id": c, "name": q.text,
                     "tokens": [list(t) for t in q.tokens],
                     "unknown_words": list(q.unknown)}
                    for c, q in zip(category_ids, qs)]
    return _Prepared(dataset=ds, num_records=len(source), report=report,
                     fn=self._jit(det_fn), consts=consts,
                     gt_path=self._spec(ds).val, category_ids=category_ids,
                     queries_json=queries_json)

  def _prepare_grd(self, ds: EvalDataset) -> _Prepared:
    source = self._open(ds)
    tokenizer = self.info.tokenizer
    report = queries_lib.QueryReport(ds.name)
    phrases, image_ids = [], np.zeros((len(source),), np.int64)
    for r in range(len(source)):
      rec = source[r]
      image_ids[r] = rec["image_id"]
      enc = tokenizer.encode(rec["caption"])
      pids = np.asarray(rec["phrase_ids"])
      spans = rec["box_spans"]
      per_record = []
      for pid in dict.fromkeys(pids.tolist()):
        idx = np.flatnonzero(pids == pid)
        windows = [] if self.options.grounding_query == "caption" else list(
            dict.fromkeys(tuple(sp) for i in idx for sp in spans[i]))
        q = report.add(queries_lib.phrase_query(enc, windows))
        per_record.append((q, np.asarray(rec["boxes"], np.float32)[idx]))
      phrases.append(per_record)
    max_phrases = max([len(p) for p in phrases] + [1])
    max_tokens = max([len(q.token_ids) for p in phrases for q, _ in p] + [1])
    ks = (1,) if ds.protocol == "refexp" else tuple(self.options.recall_ks)
    k = min(max(ks), self.model.num_patches)

    def grd_fn(params, batch, consts):
      del consts
      enc = self._encode(params, batch["image"])
      top, boxes = inference.ground_top_k(
          enc, self._embed_fn(params), batch["query_tokens"], k)
      return {"scores": top, "boxes": boxes, "record": batch["record"],
              **{key: batch[key] for key in _FEED_KEYS if key != "image"}}

    return _Prepared(dataset=ds, num_records=len(source), report=report,
                     fn=self._jit(grd_fn), consts={},
                     record_image_ids=image_ids, phrases=phrases,
                     query_shape=(max_phrases, max_tokens), ks=ks)

  # ------------------------------------------------------------ running

  def _batches(self, prep: _Prepared):
    """(batch number, local feed dict) of this process, in file order."""
    ds = pipeline.make_eval_dataset(
        self.config.data, self.info, stream=prep.dataset.stream,
        source=prep.dataset.source, batch_size=self.batch_size)
    pi, pc = jax.process_index(), jax.process_count()
    local = self.batch_size // pc
    # make_eval_dataset gives process p records p, p + P, ... then padding.
    num_real = len(range(pi, prep.num_records, pc))
    for j, batch in enumerate(ds):
      if self.options.max_batches is not None and j >= self.options.max_batches:
        break
      feed = {k: np.asarray(batch[k]) for k in _FEED_KEYS}
      if prep.dataset.stream == "grd":
        pos = j * local + np.arange(local)
        records = np.where(pos < num_real, pi + pos * pc, -1)
        self._check_records(prep, records, feed["image_id"])
        feed["record"] = records.astype(np.int32)
        feed["query_tokens"] = self._query_tokens(prep, records)
      yield j, feed

  def _check_records(self, prep, records, image_ids) -> None:
    for r, image_id in zip(records.tolist(), image_ids.tolist()):
      # -1: padding, or a record whose image could not be read (lenient).
      if r >= 0 and image_id >= 0 and image_id != prep.record_image_ids[r]:
        raise RuntimeError(
            f"{prep.dataset.name}: evaluation batch holds image {image_id} "
            f"where record {r} (image {prep.record_image_ids[r]}) was "
            "expected: pipeline.make_eval_dataset no longer yields process "
            "p's records p, p + P, ... in order; update Evaluator._batches.")

  def _query_tokens(self, prep, records) -> np.ndarray:
    p, l = prep.query_shape
    out = np.zeros((len(records), p, l), np.int32)
    for b, r in enumerate(records.tolist()):
      if r >= 0:
        out[b] = queries_lib.pad_queries([q for q, _ in prep.phrases[r]], p, l)
    return out

  def _run_dataset(self, prep: _Prepared, params, out_dir: epath.Path | None
                   ) -> dict[str, float]:
    ds = prep.dataset
    total = prep.num_records
    if self.options.max_batches is not None:
      total = min(total, self.options.max_batches * self.batch_size)
    progress = _Progress(ds.name, total, self.options.progress_every_secs)
    consume = (self._consume_det if ds.stream == "det"
               else self._consume_grd)
    state = {"results": [], "image_ids": set(), "rows": [],
             "acc": grounding.GroundingAccumulator(prep.ks)}
    start = time.monotonic()
    pending, done = None, 0
    for j, feed in self._batches(prep):
      out = prep.fn(params, sharding.host_to_global(feed, self.mesh),
                    prep.consts)
      if pending is not None:  # Overlap: gather j - 1 while j computes.
        consume(prep, multihost_utils.process_allgather(pending, tiled=True),
                state)
        progress(done)
      pending, done = out, (j + 1) * self.batch_size
    if pending is not None:
      consume(prep, multihost_utils.process_allgather(pending, tiled=True),
              state)
      progress(done)
    seconds = time.monotonic() - start
    metrics = {}
    if _is_lead():
      if ds.stream == "det":
        metrics = self._finish_det(prep, state, out_dir)
      else:
        metrics = self._finish_grd(prep, state, out_dir)
      metrics.update(prep.report.metrics())
      metrics["num_images"] = float(min(done, total))
      if progress.rate:
        metrics["images_per_sec"] = progress.rate
      logging.info("%s: evaluated in %.1f s: %s", ds.name, seconds,
                   ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
      if out_dir is not None:
        _write_json(out_dir / f"queries_{ds.name}.json",
                    {**prep.report.to_json(), "queries": prep.queries_json})
    return {f"eval/{ds.name}/{k}": float(v) for k, v in metrics.items()}

  def _canvas_boxes(self, out, boxes):
    return detections_lib.canvas_to_original_xyxy(
        boxes, self.model.image_size, out["scale"], out["orig_size"])

  def _consume_det(self, prep, out, state) -> None:
    if not _is_lead():
      return
    xyxy = self._canvas_boxes(out, out["boxes"])  # [B, K, 4]
    state["results"] += detections_lib.coco_results(
        out["image_id"], out["scores"], out["labels"], xyxy,
        prep.category_ids)
    state["image_ids"].update(int(i) for i in out["image_id"] if i >= 0)

  def _finish_det(self, prep, state, out_dir) -> dict[str, float]:
    results = state["results"]
    if out_dir is not None:
      _write_json(out_dir / f"detections_{prep.dataset.name}.json", results)
    partial = self.options.max_batches is not None
    return coco_metrics.evaluate_boxes(
        prep.gt_path, results, backend=self.options.coco_backend,
        lvis=prep.dataset.protocol == "lvis",
        category_groups=prep.dataset.category_groups,
        image_ids=sorted(state["image_ids"]) if partial else None)

  def _consume_grd(self, prep, out, state) -> None:
    if not _is_lead():
      return
    xyxy = self._canvas_boxes(out, out["boxes"])  # [B, P, k, 4]
    acc, rows = state["acc"], state["rows"]
    for b, r in enumerate(out["record"].tolist()):
      if r < 0:
        continue
      image_id = int(out["image_id"][b])
      for p, (q, gt) in enumerate(prep.phrases[r]):
        row = {"image_id": int(prep.record_image_ids[r]), "record": r,
               "phrase": q.text, "tokens": list(q.tokens[0]) if q.tokens
               else [], "gt_boxes": _rounded(detections_lib.xyxy_to_xywh(gt))}
        if image_id < 0 or q.empty:
          # Unreadable image, or a query without tokens: a miss (all-zero
          # scores would otherwise rank boxes by chance).
          acc.add_miss()
          row["hits"] = {str(k): False for k in acc.ks}
        else:
          hits = acc.add(xyxy[b, p], gt)
          row.update(
              boxes=_rounded(detections_lib.xyxy_to_xywh(xyxy[b, p])),
              scores=_rounded(out["scores"][b, p],
                              detections_lib.SCORE_DECIMALS),
              hits={str(k): v for k, v in hits.items()})
        rows.append(row)

  def _finish_grd(self, prep, state, out_dir) -> dict[str, float]:
    if out_dir is not None:
      _write_json(out_dir / f"grounding_{prep.dataset.name}.json",
                  state["rows"])
    acc = state["acc"]
    if prep.dataset.protocol == "refexp":
      return grounding.refexp_metrics(acc)
    return grounding.flickr_metrics(acc)

  def run(self, params, *, step: int, workdir: str | None,
          writer: Any = None) -> dict[str, float]:
    """Evaluates `params` on every dataset; writes files; returns metrics.

    Every process must call it (the batches are sharded over all devices);
    process 0 writes the files and computes the metrics, which every process
    receives.

    Args:
      params: the model params, with the state's shardings.
      step: the checkpoint/training step (names ``WORKDIR/eval/STEP``).
      workdir: where ``eval/STEP/`` goes; None writes nothing.
      writer: a `metric_writers.MetricWriter` to also write the metrics to.

    Returns:
      ``eval/<dataset>/<metric>`` -> float.
    """
    out_dir = None
    if workdir is not None and _is_lead():
      out_dir = epath.Path(workdir) / EVAL_SUBDIR / str(int(step))
      out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    for ds in self.datasets:
      prep = self._prepare(ds)
      metrics.update(self._run_dataset(prep, params, out_dir))
    if out_dir is not None:
      path = out_dir / METRICS_FILE
      merged = json.loads(path.read_text()) if path.exists() else {}
      merged.update(metrics)
      _write_json(path, merged)
      logging.info("Wrote %s", path)
    metrics = _share_from_lead(metrics)
    if writer is not None and metrics:
      writer.write_scalars(int(step), metrics)
    return metrics


# One evaluator kept between calls of `run_evaluation` (the trainer's periodic
# evaluation), so datasets are prepared and compiled once.
_CACHE: dict[str, Any] = {}


def run_evaluation(config: Any, setup: Any, params, *, step: int,
                   workdir: str | None, writer: Any = None
                   ) -> dict[str, float]:
  """Evaluates `params` on the config's evaluation datasets.

  The entry point for the trainer's periodic evaluation and this binary.
  Every process must call it.

  Args:
    config: the full config (``config.eval`` optional, see `EvalOptions`).
    setup: `train.setup(config)`'s result.
    params: the params to evaluate (with ``setup``'s shardings).
    step: the training step, for ``WORKDIR/eval/STEP/`` and the writer.
    workdir: the run's directory; None writes no files.
    writer: optional metric writer.

  Returns:
    Flat metrics, e.g. ``eval/shapes_det/AP50_base``.
  """
  key = json.dumps([id(setup), config.to_dict() if hasattr(config, "to_dict")
                    else repr(config)], sort_keys=True, default=str)
  if _CACHE.get("key") != key:
    _CACHE.clear()
    _CACHE.update(key=key, evaluator=Evaluator(config, setup))
  return _CACHE["evaluator"].run(params, step=step, workdir=workdir,
                                 writer=writer)


# ----------------------------------------------------------------------------
# The binary. Flags are defined only when this module runs as the program:
# the trainer imports it as a library, next to main.py's own flags.


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Config file (default: WORKDIR/config.json).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_integer("checkpoint_step", None,
                       "Checkpoint step (default: the latest finished).")
  flags.DEFINE_list("datasets", None,
                    "Source names to evaluate (default: config.eval.datasets,"
                    " else every det/grd source with a val file).")
  flags.DEFINE_string("dataset_json", None,
                      "Evaluate this COCO/LVIS instances file instead, its "
                      "category names as the queries.")
  flags.DEFINE_string("image_dir", None, "Image folder of --dataset_json.")
  flags.DEFINE_string("dataset_name", None,
                      "Name of --dataset_json (default: the file's stem).")
  flags.DEFINE_enum("dataset_format", "auto", ["auto", "coco", "lvis"],
                    "--dataset_json format (auto: LVIS when images have "
                    "neg_category_ids).")
  flags.DEFINE_integer("max_detections", None,
                       "Detections per image (default: config.eval, 300).")
  flags.DEFINE_float("nms_iou", None,
                     "Per-category NMS IoU of detections (default: "
                     "config.eval, 0 = none).")
  flags.DEFINE_enum("coco_backend", None, list(coco_metrics.BACKENDS),
                    "COCO AP tool (default: config.eval, faster_coco_eval).")
  flags.DEFINE_integer("batch_size", None,
                       "Global evaluation batch (default: config).")
  flags.DEFINE_integer("max_batches", None,
                       "Stop each dataset after this many batches.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs "
                      "outside TPU pods/SLURM.")
  flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
  flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from omnitrain_jax import train  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.quiet_library_logs()
  runtime.initialize_distributed(f.coordinator_address, f.num_processes,
                                 f.process_id)
  config = f.config or config_from_workdir(f.workdir)
  s = train.setup(config)
  options = EvalOptions.from_config(
      config, datasets=f.datasets, max_detections=f.max_detections,
      nms_iou=f.nms_iou, coco_backend=f.coco_backend, batch_size=f.batch_size,
      max_batches=f.max_batches)
  info, datasets = s.info, None
  if f.dataset_json:
    if not f.image_dir:
      raise app.UsageError("--dataset_json needs --image_dir (the folder its "
                           "file_names are relative to).")
    info, ds = with_dataset_json(info, f.dataset_json, f.image_dir,
                                 name=f.dataset_name, fmt=f.dataset_format)
    datasets = [ds]
  evaluator = Evaluator(config, s, datasets=datasets, info=info,
                        options=options)
  params, step = restore_params(f.workdir, s.abstract_state,
                                f.checkpoint_step)
  if _is_lead():
    logging.info("Evaluating step %d of %s on %s.", step, f.workdir,
                 [d.name for d in evaluator.datasets])
  metrics = evaluator.run(params, step=step, workdir=f.workdir)
  if _is_lead():
    for k, v in sorted(metrics.items()):
      logging.info("%-48s %.4f", k, v)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
