"""The grain input pipeline: three streams, a fixed composition in every batch.

Public API::

  info = pipeline.prepare_data(config.data)     # data + vocabulary, cached
  ds = pipeline.make_train_dataset(config.data, info)   # grain.IterDataset
  it = iter(ds)                                  # checkpoint it.get_state()
  batch = next(it)                               # schema.batch_shapes(...)
  eval_ds = pipeline.make_eval_dataset(config.data, info, stream="det")

Training graph (per process)::

  per source:  MapDataset.source(records)
                 .shuffle(seed_s).repeat()          # reshuffled every epoch
                 .map_with_index(AttachMeta)        # epoch = index // len
                 .map(Decode).map(Tokenize)
                 .random_map(RandomCropFlip)        # seeded by global index
                 .map(ResizePad).map(PadToSpec)
                 [process_index::process_count]     # disjoint shards
                 .to_iter_dataset(ReadOptions)      # reader threads
                 .filter(Account)                   # drop skip markers, note
                                                    # metadata in the ledger
  per stream:  IterDataset.mix({source: ds}, weights) (if several sources)
                 .map(StripMeta).batch(share, list) # this process's share
  all:         ZipIterDataset([det, grd, img]).map(StackStreams)
                 .random_map(Candidates)            # needs the whole batch
                 [.mp_prefetch(workers)]            # whole pipeline / worker
                 .map(Settle)                       # main process: counts
                 [ThreadPrefetchIterDataset]        # overlap with the step

Design decisions:

* **Exact composition.** Each stream is batched to its share *before* the
  streams are combined, then zipped (`grain.experimental.ZipIterDataset`), so
  every batch holds exactly ``batch.det`` + ``batch.grd`` + ``batch.img``
  examples, ordered [det..., grd..., img...]. (`IterDataset.mix` followed by one
  `batch` is exact only while nothing filters after the mix; lenient mode
  filters.)
* **Several sources in a stream** (COCO + LVIS) are mixed by weight with
  `IterDataset.mix` *after* each source's filter and *before* the stream's
  batch: the mix then draws from streams of valid examples, so the weights
  hold exactly over what is trained on (a source's bad records don't shrink
  its share), and nothing filters between mix and batch.
* **Seeds.** Every random choice derives from ``data.seed`` and names
  (`derive_seed`): each source's shuffle and augmentation, the candidates.
  Shuffle and augmentation use the *global* record index (before the process
  shard), so they do not depend on the number of processes; the candidate
  sampler adds the process index. `repeat()` after `shuffle()` reshuffles
  each epoch.
* **Sharding.** Process p of P takes elements ``p, p + P, ...`` of each
  source's shuffled, repeated sequence (`MapDataset.slice`): over an epoch
  the processes together see every record once, with a fresh split each
  epoch. Each process batches ``share / P`` examples per stream (checked
  divisible).
* **Checkpointing.** The returned dataset's iterator implements
  ``get_state()/set_state()`` exactly (sources' positions, per-element rng
  counters, the candidate sampler's counter), also with worker processes; save
  it with orbax via ``grain.checkpoint.CheckpointSave(it)``. The state's
  layout depends on ``num_workers`` (grain's mp_prefetch keeps one state per
  worker): resume with the same worker count.
* **Bad input.** Strict mode raises the transforms' `DataError` (naming the
  file). Lenient mode turns bad records into skip markers, which `Account`
  drops before batching. Every element's metadata (skip, truncation counts of
  `PadToSpec`, epoch) travels in the batch (``_report``) to `Settle`, which
  runs in the main process -- also when the rest runs in worker processes --,
  counts it in `PipelineStats` and logs a report at the end of every epoch of
  every source. Counts are not part of the iterator state (after a resume
  they count from zero).
* **Parallelism.** ``data.num_threads`` reader threads per process
  (`grain.ReadOptions`, split over the sources by their examples per batch)
  and/or ``data.num_workers`` processes (`mp_prefetch`, spawn: needs absl
  flags parsed, seconds to start), each running the *whole* pipeline on its
  slice of every source and handing over finished batches. With workers the
  batch order depends on their number (each worker fills whole batches from
  its slice); composition and coverage do not. Measured on a 16-core host
  (``benchmarks/input_pipeline.py``; 480 px JPEGs; other jobs were running,
  so +-30%): one core gives 265-380 examples/s, 60-100% of a bare
  simplejpeg+cv2 decode+resize on one core; 16 threads stop at ~600-670
  (the transforms' Python holds the GIL); 16 workers give 2,760 (det) /
  3,540 (mixed) examples/s at 128 px and 1,930 / 1,430 at 768 px, 55-80% of
  16 threads of bare decode+resize. An earlier design with workers per
  source handing over single examples (a dozen shared-memory arrays each)
  stopped at ~450 examples/s. So: threads for small runs, workers to feed
  an accelerator.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from typing import Any
import zlib

from absl import logging
import grain
import numpy as np

from omnitrain_jax.data import candidates as candidates_lib
from omnitrain_jax.data import errors
from omnitrain_jax.data import readers
from omnitrain_jax.data import schema
from omnitrain_jax.data import shapes_world
from omnitrain_jax.data import transforms
from omnitrain_jax.vocab import builder as vocab_builder
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

META = transforms.META
REPORT = candidates_lib.REPORT

# Bump when the vocabulary cache key must change (builder behaviour).
_VOCAB_CACHE_VERSION = 1


# ----------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One annotation source of a stream, paths resolved.

  Attributes:
    name: source name (records' ``source``, skip-count key).
    stream: ``det``, ``grd`` or ``img``.
    reader: a key of `READERS`.
    train: training annotation file.
    val: validation annotation file ("" when none).
    image_dir: image folder the annotations' file names are relative to.
    weight: mixing weight within the stream.
    instances: RefCOCO only: the release's ``instances.json``.
    train_split: RefCOCO only: the refs' split for training.
    val_split: RefCOCO only: the refs' split for validation.
  """
  name: str
  stream: str
  reader: str
  train: str
  val: str = ""
  image_dir: str = ""
  weight: float = 1.0
  instances: str = ""
  train_split: str = "train"
  val_split: str = "val"


def _open_coco(spec, path, split, **kw):
  del split
  return readers.load_coco_instances(path, spec.image_dir, **kw)


def _open_lvis(spec, path, split, **kw):
  del split
  return readers.load_lvis(path, spec.image_dir, **kw)


def _open_mdetr(spec, path, split, **kw):
  del split
  return readers.load_mdetr_grounding(path, spec.image_dir, **kw)


def _open_refcoco(spec, path, split, **kw):
  return readers.load_refcoco(path, spec.instances, spec.image_dir,
                              split=split, **kw)


def _open_coco_captions(spec, path, split, **kw):
  del split
  return readers.load_coco_captions(path, spec.image_dir, **kw)


def _open_jsonl(spec, path, split, **kw):
  del split
  return readers.load_caption_jsonl(path, image_root=spec.image_dir or None,
                                    **kw)


def _open_csv(spec, path, split, **kw):
  del split
  return readers.load_caption_csv(path, image_root=spec.image_dir or None,
                                  **kw)


# Config name -> (stream, opener, how to prepare the file).
READERS = {
    "coco_instances": ("det", _open_coco, "download COCO-format instances "
                       "JSON (e.g. annotations/instances_train2017.json)"),
    "lvis": ("det", _open_lvis, "download lvis_v1_train.json / "
             "lvis_v1_val.json from lvisdataset.org"),
    "mdetr_grounding": ("grd", _open_mdetr, "download MDETR's annotations "
                        "(final_*.json, mdetr_annotations.tar.gz)"),
    "refcoco": ("grd", _open_refcoco, "download the refer release "
                "(refcocog.zip with refs(umd).p and instances.json)"),
    "coco_captions": ("img", _open_coco_captions, "download COCO captions "
                      "(annotations/captions_train2017.json)"),
    "caption_jsonl": ("img", _open_jsonl, "write one {\"image\": path, "
                      "\"caption\": text} object per line"),
    "caption_csv": ("img", _open_csv, "write a CSV with a path,caption "
                    "header"),
}


def open_source(spec: SourceSpec, split: str, *, strict: bool,
                counter: errors.SkipCounter | None = None
                ) -> readers.RecordSource:
  """Opens a source's ``"train"`` or ``"val"`` annotations as a RecordSource."""
  path = spec.train if split == "train" else spec.val
  if not path:
    raise ValueError(f"Source {spec.name!r} ({spec.stream}) has no {split} "
                     f"file; set data.sources.{spec.stream}.{spec.name}."
                     f"{split}.")
  _, opener, _ = READERS[spec.reader]
  ref_split = spec.train_split if split == "train" else spec.val_split
  return opener(spec, path, ref_split, name=spec.name, strict=strict,
                counter=counter)


def _source_specs(config: Any, root: str) -> dict[str, dict[str, SourceSpec]]:
  """Resolves ``config.sources`` (relative paths against `root`)."""

  def resolve(p):
    if not p:
      return ""
    p = os.path.expanduser(str(p))
    return p if os.path.isabs(p) else os.path.join(root, p)

  out = {s: {} for s in schema.STREAMS}
  for stream, sources in config.sources.items():
    if stream not in schema.STREAMS:
      raise ValueError(f"data.sources has a stream {stream!r}; streams are "
                       f"{schema.STREAMS}.")
    for name, src in sources.items():
      src = dict(src)
      reader = src.get("reader", "")
      if reader not in READERS:
        raise ValueError(f"data.sources.{stream}.{name}.reader={reader!r}; "
                         f"use one of {sorted(READERS)}.")
      if READERS[reader][0] != stream:
        raise ValueError(f"data.sources.{stream}.{name}: reader {reader!r} "
                         f"gives {READERS[reader][0]!r} records, not "
                         f"{stream!r}.")
      out[stream][name] = SourceSpec(
          name=name, stream=stream, reader=reader,
          train=resolve(src.get("train", "")), val=resolve(src.get("val", "")),
          image_dir=resolve(src.get("image_dir", "")),
          weight=float(src.get("weight", 1.0)),
          instances=resolve(src.get("instances", "")),
          train_split=src.get("train_split", "train"),
          val_split=src.get("val_split", "val"))
  return out


def _check_files(sources: Mapping[str, Mapping[str, SourceSpec]],
                 batch: Mapping[str, int]) -> None:
  for stream, specs in sources.items():
    if not batch.get(stream, 0):
      continue
    if not specs:
      raise ValueError(f"data.batch.{stream}={batch[stream]} but "
                       f"data.sources.{stream} is empty; add a source or set "
                       f"data.batch.{stream}=0.")
    for spec in specs.values():
      how = READERS[spec.reader][2]
      for what, path in (("train", spec.train), ("val", spec.val),
                         ("instances", spec.instances)):
        if path and not os.path.exists(path):
          raise FileNotFoundError(
              f"data.sources.{stream}.{spec.name}.{what}: {path} does not "
              f"exist. Prepare it: {how}; or fix the path (relative paths are "
              "relative to data.root).")
      if not spec.train:
        raise ValueError(f"data.sources.{stream}.{spec.name} has no train "
                         "file.")
      if spec.image_dir and not os.path.isdir(spec.image_dir):
        raise FileNotFoundError(
            f"data.sources.{stream}.{spec.name}.image_dir: {spec.image_dir} "
            "is not a folder. Download/extract the images there or fix the "
            "path.")


# ----------------------------------------------------------------------------
# prepare_data: the cache, ShapesWorld and the vocabulary.


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Everything `prepare_data` resolved, for the pipelines and the trainer.

  Attributes:
    root: the folder relative source paths were resolved against (for
      ShapesWorld: the generated dataset).
    sources: stream -> source name -> `SourceSpec`.
    vocab_path: the vocabulary file.
    vocab: the loaded `Vocabulary`.
    tokenizer: a `Tokenizer` over it.
    spec: the static shapes (`schema.Spec`).
    splits: ShapesWorld's ``splits.json`` (open-vocabulary split: base and
      novel tokens and categories); None for other data.
  """
  root: str
  sources: dict[str, dict[str, SourceSpec]]
  vocab_path: str
  vocab: vocabulary_lib.Vocabulary
  tokenizer: tokenizer_lib.Tokenizer
  spec: schema.Spec
  splits: dict | None = None


def default_cache_dir() -> str:
  """``$OMNITRAIN_CACHE``, else ``data_cache/`` in a source checkout, else
  ``~/.cache/omnitrain_jax``."""
  env = os.environ.get("OMNITRAIN_CACHE")
  if env:
    return env
  repo = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  if os.path.exists(os.path.join(repo, "setup.py")) and os.access(repo,
                                                                  os.W_OK):
    return os.path.join(repo, "data_cache")
  return os.path.join(os.path.expanduser("~"), ".cache", "omnitrain_jax")


def spec_from_config(config: Any) -> schema.Spec:
  return schema.Spec(**dict(config.spec))


def _shapes_params(config: Any) -> dict[str, Any]:
  params = dict(config.shapes_world)
  for k, v in params.items():
    if isinstance(v, list):
      params[k] = tuple(v)
  return params


def _atomic_dir(final: str, build) -> None:
  """Builds a folder with ``build(tmp)`` and renames it into place.

  Several processes may race (hosts sharing a file system, parallel tests):
  each builds its own temporary folder; the first rename wins and the others
  delete theirs. A reader never sees a half-written folder.
  """
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
  try:
    build(tmp)
    try:
      os.rename(tmp, final)
      tmp = None
    except OSError:
      if not os.path.isdir(final):
        raise
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


def ensure_shapes_world(params: Mapping[str, Any], cache_dir: str) -> str:
  """The ShapesWorld dataset for `params` in the cache, generated if missing.

  The folder name holds the generator's parameter fingerprint, so changed
  parameters (or a new generator version) generate a new dataset instead of
  reusing a stale one.
  """
  fingerprint = shapes_world.params_fingerprint(**params)
  root = os.path.join(cache_dir, f"shapes_world-{fingerprint}")
  meta = shapes_world.output_paths(root)["meta"]
  if os.path.exists(meta):
    return root
  if os.path.isdir(root):  # Incomplete (an interrupted older layout).
    shutil.rmtree(root, ignore_errors=True)
  logging.info("Generating ShapesWorld %s into %s ...", dict(params), root)
  _atomic_dir(root, lambda tmp: shapes_world.generate(tmp, **params))
  return root


def _vocab_inputs(sources: Mapping[str, Mapping[str, SourceSpec]],
                  batch: Mapping[str, int]) -> list[str]:
  files = []
  for stream, specs in sources.items():
    if not batch.get(stream, 0):
      continue
    for spec in specs.values():
      files.append(spec.train)
  return files


def ensure_vocabulary(files: Sequence[str], cache_dir: str, *,
                      max_size: int, split_categories: bool = False,
                      min_count: int = 1) -> str:
  """A vocabulary built from `files`, cached by their identity and the params."""
  key = {"version": _VOCAB_CACHE_VERSION, "max_size": max_size,
         "split_categories": split_categories, "min_count": min_count,
         "files": [(os.path.abspath(f), os.path.getsize(f),
                    os.stat(f).st_mtime_ns) for f in files]}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()
                          ).hexdigest()[:16]
  path = os.path.join(cache_dir, "vocab", f"vocab-{digest}.txt")
  if os.path.exists(path):
    return path
  logging.info("Building the vocabulary from %s ...", list(files))
  vocab, summary = vocab_builder.build_vocabulary(
      list(files), max_size=max_size, split_categories=split_categories,
      min_count=min_count)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Vocabulary.save writes a temporary file and renames it: race-safe.
  tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
  vocab.save(tmp)
  os.replace(tmp, path)
  logging.info("Vocabulary: %d tokens -> %s (%s)", len(vocab), path,
               json.dumps({k: summary[k] for k in list(summary)[:6]},
                          default=str))
  return path


def prepare_data(config: Any) -> DataInfo:
  """Makes the data ready: generates ShapesWorld if needed, builds the vocab.

  Args:
    config: ``config.data``.

  Returns:
    A `DataInfo`.

  Raises:
    FileNotFoundError: a configured file is missing (the message names it
      and says how to prepare it).
    ValueError: an inconsistent config.
  """
  cache_dir = os.path.expanduser(config.cache_dir or default_cache_dir())
  batch = dict(config.batch)
  if config.dataset == "shapes_world":
    root = ensure_shapes_world(_shapes_params(config), cache_dir)
    with open(shapes_world.output_paths(root)["splits"]) as f:
      splits = json.load(f)
  elif config.dataset == "files":
    root = os.path.expanduser(config.root or os.getcwd())
    splits = None
  else:
    raise ValueError(f"data.dataset={config.dataset!r}; use 'shapes_world' "
                     "or 'files'.")
  sources = _source_specs(config, root)
  _check_files(sources, batch)
  if config.vocab.path:
    vocab_path = os.path.expanduser(config.vocab.path)
    if not os.path.exists(vocab_path):
      raise FileNotFoundError(
          f"data.vocab.path: {vocab_path} does not exist. Build it with "
          "`python -m omnitrain_jax.vocab.build --out=vocab.txt "
          "TRAIN_ANNOTATION_FILES...` or set data.vocab.path='' to build it "
          "from the configured sources into the cache.")
  else:
    vocab_path = ensure_vocabulary(
        _vocab_inputs(sources, batch), cache_dir,
        max_size=config.vocab.max_size,
        split_categories=config.vocab.split_categories,
        min_count=config.vocab.min_count)
  vocab = vocabulary_lib.Vocabulary.load(vocab_path)
  return DataInfo(root=root, sources=sources, vocab_path=vocab_path,
                  vocab=vocab, tokenizer=tokenizer_lib.Tokenizer(vocab),
                  spec=spec_from_config(config), splits=splits)


# ----------------------------------------------------------------------------
# Statistics: skips and truncations, counted in the main process.


class PipelineStats:
  """What the pipeline dropped, for logs and the trainer's metrics.

  Attributes:
    skips: `errors.SkipCounter` of bad records (load time and run time).
    candidates: `candidates.CandidateStats`.
    epoch_reports: the last report line of each finished source epoch.
  """

  def __init__(self):
    self.skips = errors.SkipCounter()
    self.candidates = candidates_lib.CandidateStats()
    self._lock = threading.Lock()
    self._counts = collections.Counter()  # (source, key) -> n
    self._epoch = {}  # source -> current epoch
    self._epoch_counts = collections.defaultdict(collections.Counter)
    self.epoch_reports: list[str] = []

  def record(self, element: Mapping[str, Any]) -> None:
    """Counts one element's skip / truncations; reports finished epochs."""
    self.record_meta(element[META])

  def record_report(self, report: Mapping[str, Any]) -> None:
    """Records a batch's ``_report`` (see `StackStreams`, `Settle`)."""
    for meta in report.get("metas", ()):
      self.record_meta(meta)
    self.candidates.add(report.get("candidates", {}))

  def record_meta(self, meta: Mapping[str, Any]) -> None:
    """Counts one element's ``_meta`` (skip, truncations, epoch)."""
    source, epoch = meta["source"], meta["epoch"]
    with self._lock:
      last = self._epoch.setdefault(source, epoch)
      if epoch > last:
        self._report_epoch(source, last)
        self._epoch[source] = epoch
      per_epoch = self._epoch_counts[source]
      if meta["skip"] is not None:
        per_epoch["skipped"] += 1
      for k, v in meta["counts"].items():
        self._counts[(source, k)] += v
        per_epoch[k] += v
    if meta["skip"] is not None:
      self.skips.add(source, errors.DataError(*meta["skip"]))

  def _report_epoch(self, source: str, epoch: int) -> None:
    counts = dict(sorted(self._epoch_counts.pop(source, {}).items()))
    line = f"data source {source}: epoch {epoch} done: " + (
        ", ".join(f"{k}={v}" for k, v in counts.items()) or "nothing dropped")
    logging.info("%s", line)
    if counts.get("skipped"):
      logging.warning("%s", self.skips.report())
    self.epoch_reports.append(line)
    del self.epoch_reports[:-100]

  def counts(self) -> dict[str, int]:
    """Flat counters: ``skipped/<source>/<reason>``, ``<key>/<source>``, ..."""
    with self._lock:
      out = {f"{k}/{s}": v for (s, k), v in sorted(self._counts.items())}
    out.update({f"skipped/{k}": v for k, v in self.skips.counts().items()})
    out.update({f"candidates/{k}": v
                for k, v in self.candidates.counts().items()})
    return out

  def report(self) -> str:
    lines = [self.skips.report()]
    lines += [f"  {k}: {v}" for k, v in self.counts().items()
              if not k.startswith("skipped/")]
    return "\n".join(lines)


class Ledger:
  """Metadata of the elements taken into the batch being assembled.

  `Account` adds each element's ``_meta`` before batching; `StackStreams`
  moves them into the batch (``_report``); `Settle`, in the main process,
  hands them to `PipelineStats`. Going through the batch lets the counting
  survive `mp_prefetch`: the filter and the batching run in worker processes,
  whose memory the main process cannot see. One iterator at a time per
  dataset object (two interleaved iterators would mix their entries; the
  counts stay right, only their batch attribution moves).
  """

  def __init__(self):
    self._metas = []

  def add(self, meta: dict) -> None:
    self._metas.append(meta)

  def drain(self) -> list[dict]:
    metas, self._metas = self._metas, []
    return metas


class Account(grain.transforms.Filter):
  """Drops skip markers before batching; notes every element in the ledger."""

  def __init__(self, ledger: Ledger):
    self.ledger = ledger

  def filter(self, element) -> bool:
    if META in element:
      self.ledger.add(element[META])
    return not transforms.is_skipped(element)


class StripMeta(grain.transforms.Map):
  """Removes ``_meta`` so that batches hold exactly the schema's arrays."""

  def map(self, element):
    return {k: v for k, v in element.items() if k != META}


def _as_list(examples):
  """grain batch_fn: keep the examples as a list (stacked once, later)."""
  return list(examples)


class StackStreams(grain.transforms.Map):
  """(det examples, grd examples, img examples) -> one batch, in that order.

  Streams are "batched" as lists and stacked here once: stacking each stream
  and concatenating after would copy every image twice (at 768 px that is
  1.7 MB per example, a visible share of the pipeline's time). The ledger's
  entries ride along in ``_report`` until `Settle`.
  """

  def __init__(self, ledger: Ledger | None = None):
    self.ledger = ledger

  def map(self, parts):
    examples = [ex for part in parts for ex in part]
    batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
    if self.ledger is not None:
      batch[REPORT] = {"metas": self.ledger.drain()}
    return batch


class Settle(grain.transforms.Map):
  """Main process: moves a batch's ``_report`` into `PipelineStats`."""

  def __init__(self, stats: PipelineStats):
    self.stats = stats

  def map(self, batch):
    report = batch.pop(REPORT, None)
    if report is not None:
      self.stats.record_report(report)
    return batch


class EvalFill(grain.transforms.Map):
  """Eval: padding placeholders and skipped records -> padding examples."""

  def __init__(self, spec: schema.Spec, stream: str, stats: PipelineStats):
    self.spec, self.stream, self.stats = spec, stream, stats

  def map(self, element):
    if META in element and not transforms.is_padding(element):
      self.stats.record(element)
    if transforms.is_padding(element) or transforms.is_skipped(element):
      return schema.empty_example(self.spec, self.stream)
    return {k: v for k, v in element.items() if k != META}


# ----------------------------------------------------------------------------
# Datasets.


def derive_seed(seed: int, *names: Any) -> int:
  """A 32-bit seed from `seed` and names; stable across processes and runs."""
  tag = zlib.crc32("/".join(str(n) for n in names).encode())
  return int(np.random.SeedSequence([int(seed), tag]).generate_state(1)[0])


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None \
        else process_index
    process_count = jax.process_count() if process_count is None \
        else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, "
                     f"process_count={process_count}).")
  return process_index, process_count


def local_batch_shares(batch: Mapping[str, int],
                       process_count: int) -> dict[str, int]:
  """Per-process examples of each stream per batch (checked divisible)."""
  unknown = set(batch) - set(schema.STREAMS)
  if unknown:
    raise ValueError(f"data.batch has streams {sorted(unknown)}; streams are "
                     f"{schema.STREAMS}.")
  shares = {s: int(batch.get(s, 0)) for s in schema.STREAMS}
  if any(n < 0 for n in shares.values()) or not sum(shares.values()):
    raise ValueError(f"data.batch={shares}: counts must be >= 0 and not all "
                     "0.")
  bad = {s: n for s, n in shares.items() if n % process_count}
  if bad:
    raise ValueError(
        f"Per-stream batch counts {bad} are not divisible by process_count="
        f"{process_count}: every process must get the same number of examples "
        f"of each stream. Fix: make data.batch.det/grd/img multiples of "
        f"{process_count}.")
  return {s: n // process_count for s, n in shares.items()}


def _split_parallelism(total: int, shares: Mapping[tuple[str, str], float]
                       ) -> dict[tuple[str, str], int]:
  """Splits `total` threads/workers over sources by their share (>= 1 each)."""
  if total <= 0:
    return {k: 0 for k in shares}
  s = sum(shares.values())
  return {k: max(1, round(total * v / s)) for k, v in shares.items()}


def _init_worker(worker_index: int, worker_count: int) -> None:
  """In each mp_prefetch worker: one cv2 thread (the workers are the
  parallelism; cv2's own pool would oversubscribe the cores N-fold)."""
  del worker_index, worker_count
  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(1)


def _chain(config: Any, info: DataInfo, *, train: bool) -> list[Any]:
  augment = None
  if train and config.augment.enabled:
    augment = transforms.AugmentConfig(
        crop_prob=config.augment.crop_prob,
        crop_min_scale=config.augment.crop_min_scale,
        flip_prob=config.augment.flip_prob,
        grd_crop_prob=config.augment.get("grd_crop_prob", None))
  return transforms.example_transforms(
      info.spec, encoder=info.tokenizer, augment=augment,
      mirror=np.asarray(info.vocab.mirror_map()), strict=config.strict,
      min_box_size=config.min_box_size)


def _apply(ds: grain.MapDataset, chain: Sequence[Any], seed: int
           ) -> grain.MapDataset:
  for t in chain:
    if isinstance(t, grain.transforms.RandomMap):
      ds = ds.random_map(t, seed=seed)
    else:
      ds = ds.map(t)
  return ds


def _active_sources(info: DataInfo, stream: str) -> dict[str, SourceSpec]:
  specs = {n: s for n, s in info.sources[stream].items() if s.weight > 0}
  if not specs:
    raise ValueError(f"Stream {stream!r} has a batch share but no source with "
                     "weight > 0 in data.sources.")
  return specs


def make_train_dataset(config: Any, info: DataInfo, *,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       stats: PipelineStats | None = None
                       ) -> grain.IterDataset:
  """The training dataset of this process: infinite, fixed composition.

  Args:
    config: ``config.data``.
    info: from `prepare_data`.
    process_index: this process (default ``jax.process_index()``).
    process_count: processes (default ``jax.process_count()``).
    stats: where skips/truncations are counted (a new `PipelineStats` when
      None; pass one to read the counts, e.g. for the trainer's metrics).

  Returns:
    A `grain.IterDataset` of batches with `schema.batch_shapes(spec, B)`,
    B = sum(data.batch) / process_count, ordered [det..., grd..., img...].
    Iterate with ``iter(ds)`` and checkpoint the iterator.
  """
  pi, pc = _process(process_index, process_count)
  shares = local_batch_shares(config.batch, pc)
  stats = stats if stats is not None else PipelineStats()
  chain = _chain(config, info, train=True)

  # (stream, source) -> examples per batch, to split the reader threads.
  load = {}
  for stream in schema.STREAMS:
    if shares[stream]:
      specs = _active_sources(info, stream)
      total_w = sum(s.weight for s in specs.values())
      for name, s in specs.items():
        load[(stream, name)] = shares[stream] * s.weight / total_w
  threads = _split_parallelism(config.num_threads, load)

  ledger = Ledger()
  parts = []
  for stream in schema.STREAMS:
    if not shares[stream]:
      continue
    per_source, weights = {}, {}
    for name, spec in _active_sources(info, stream).items():
      records = open_source(spec, "train", strict=config.strict,
                            counter=stats.skips)
      ds = grain.MapDataset.source(records)
      ds = ds.shuffle(seed=derive_seed(config.seed, stream, name, "shuffle"))
      ds = ds.repeat()
      ds = ds.map_with_index(
          transforms.AttachMeta(name, stream, len(records)))
      ds = _apply(ds, chain, derive_seed(config.seed, stream, name, "augment"))
      ds = ds[pi::pc]
      it = ds.to_iter_dataset(grain.ReadOptions(
          num_threads=threads[(stream, name)],
          prefetch_buffer_size=config.prefetch_buffer_size
          if threads[(stream, name)] else 0))
      per_source[name] = it.filter(Account(ledger))
      weights[name] = spec.weight
    if len(per_source) == 1:
      sds = next(iter(per_source.values()))
    else:
      sds = grain.IterDataset.mix(per_source, weights)
    sds = sds.map(StripMeta()).batch(shares[stream], drop_remainder=True,
                                     batch_fn=_as_list)
    parts.append(sds)

  ds = grain.experimental.ZipIterDataset(parts).map(StackStreams(ledger))
  ds = ds.random_map(
      candidates_lib.candidates_from_config(config, info.vocab),
      seed=derive_seed(config.seed, "candidates", pi))
  if config.num_workers:
    # Whole batches cross the process boundary: one transfer per batch
    # rather than a dozen shared-memory arrays per example, which capped
    # per-example worker prefetch at ~450 examples/s on 16 cores.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers,
        per_worker_buffer_size=config.per_worker_buffer_size),
                        worker_init_fn=_init_worker)
  ds = ds.map(Settle(stats))
  if config.prefetch_batches and not config.num_workers:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=config.prefetch_batches)
  return ds


class _PaddedShard(Sequence):
  """Process `pi`'s strided shard of `records`, padded to `length`."""

  def __init__(self, records, pi: int, pc: int, length: int, stream: str):
    self.records, self.pi, self.pc = records, pi, pc
    self.length, self.stream = length, stream
    self.num_real = len(range(pi, len(records), pc))

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int):
    if i < self.num_real:
      return self.records[self.pi + i * self.pc]
    return transforms.padding_record(self.records.name, self.stream, i)


def eval_num_batches(num_records: int, batch_size: int,
                     process_count: int) -> int:
  """Batches every process yields so that all see the same number."""
  per_process = math.ceil(num_records / process_count)
  return math.ceil(per_process / (batch_size // process_count))


def make_eval_dataset(config: Any, info: DataInfo, *, stream: str = "det",
                      source: str | None = None,
                      batch_size: int | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None,
                      stats: PipelineStats | None = None,
                      with_candidates: bool = False) -> grain.IterDataset:
  """One pass over a source's validation split, in file order, sharded.

  No augmentation. Process p takes records p, p + P, ...; every process
  yields the same number of batches (`eval_num_batches`), the last ones
  padded with padding examples (``image_id = -1``, no boxes), so that a
  multi-host evaluation never waits for a process that ran out. In lenient
  mode a bad record becomes a padding example too (and is counted), for the
  same reason.

  Args:
    config: ``config.data``.
    info: from `prepare_data`.
    stream: which stream's source to evaluate.
    source: the source name (default: the stream's first source with a val
      file).
    batch_size: global eval batch (default ``config.eval_batch_size``),
      divisible by the process count.
    process_index: this process (default ``jax.process_index()``).
    process_count: processes (default ``jax.process_count()``).
    stats: skip counts (see `make_train_dataset`).
    with_candidates: add candidate tokens as in training (for a validation
      loss). Off by default: candidates start with the example's own
      positives, i.e. the labels; detection metrics score the full vocabulary
      or the dataset's category tokens instead.

  Returns:
    A finite `grain.IterDataset` of batches (`schema.example_shapes`, plus the
    candidate fields when `with_candidates`).
  """
  pi, pc = _process(process_index, process_count)
  batch_size = batch_size or config.eval_batch_size
  if batch_size % pc:
    raise ValueError(f"Eval batch size {batch_size} is not divisible by "
                     f"process_count={pc}. Fix: data.eval_batch_size.")
  local = batch_size // pc
  stats = stats if stats is not None else PipelineStats()
  specs = {n: s for n, s in info.sources[stream].items() if s.val}
  if not specs:
    raise ValueError(f"No {stream} source has a val file; set data.sources."
                     f"{stream}.<name>.val.")
  if source is None:
    source = next(iter(specs))
  if source not in specs:
    raise ValueError(f"Unknown {stream} eval source {source!r}; sources with "
                     f"a val file: {sorted(specs)}.")
  records = open_source(specs[source], "val", strict=config.strict,
                        counter=stats.skips)
  num_batches = eval_num_batches(len(records), batch_size, pc)
  shard = _PaddedShard(records, pi, pc, num_batches * local, stream)
  ds = grain.MapDataset.source(shard)
  ds = ds.map_with_index(_EvalMeta(source, stream, shard.num_real))
  ds = _apply(ds, _chain(config, info, train=False), 0)
  ds = ds.map(EvalFill(info.spec, stream, stats))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads,
      prefetch_buffer_size=config.prefetch_buffer_size
      if config.num_threads else 0))
  it = it.batch(local, drop_remainder=False)
  if with_candidates:
    it = it.random_map(candidates_lib.candidates_from_config(
        config, info.vocab, stats.candidates),
                       seed=derive_seed(config.seed, "eval_candidates", pi))
  return it


class _EvalMeta(grain.transforms.MapWithIndex):
  """Attaches ``_meta`` to real records (padding records carry their own)."""

  def __init__(self, source: str, stream: str, num_real: int):
    self.source, self.stream, self.num_real = source, stream, num_real

  def map_with_index(self, index: int, record):
    if index >= self.num_real:
      return record
    out = dict(record)
    out[META] = transforms.new_meta(self.source, self.stream, 0, index)
    return out
