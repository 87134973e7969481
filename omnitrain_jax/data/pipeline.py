"""The grain input pipeline: three streams, a fixed composition in every batch.

This module only composes grain datasets. The sources come from the reader
table (`sources.py`), the data and vocabulary from `preparation.py`, the
per-example transforms from `transforms.py`, the counting of what was dropped
from `stats.py`.

Public API::

  info = preparation.prepare_data(config.data)  # data + vocabulary, cached
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
                 .filter(DropSkipped)               # drop skip markers, collect
                                                    # every element's metadata
  per stream:  IterDataset.mix({source: ds}, weights) (if several sources)
                 .map(ExampleKey).map(StripMeta)    # identity of the draws
                 .batch(share, list)                # this process's share
  all:         ZipIterDataset([det, grd, img]).map(StackStreams)
                 [.map(Candidates)]                 # with_candidates (tools);
                                                    # the trainer adds them
                                                    # over the global batch
                 [.mp_prefetch(workers)]            # whole pipeline / worker
                 .map(CountReport)                  # main process: counts
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
  shard), so they do not depend on the number of processes; so do the
  candidates, keyed by each example's (source, global index) (`ExampleKey`;
  `candidates.py`, "Determinism"). `repeat()` after `shuffle()` reshuffles
  each epoch.
* **Sharding.** Process p of P takes elements ``p, p + P, ...`` of each
  source's shuffled, repeated sequence (`MapDataset.slice`): over an epoch
  the processes together see every record once, with a fresh split each
  epoch. Each process batches ``share / P`` examples per stream (checked
  divisible).
* **Checkpointing.** The returned dataset's iterator implements
  ``get_state()/set_state()`` exactly (sources' positions, per-element rng
  counters; the candidates keep no state), also with worker processes; save
  it with orbax via ``grain.checkpoint.CheckpointSave(it)``. The state's
  layout depends on ``num_workers`` (grain's mp_prefetch keeps one state per
  worker): resume with the same worker count.
* **Bad input.** Strict mode raises the transforms' `DataError` (naming the
  file). Lenient mode turns bad records into skip markers, which
  `stats.DropSkipped` drops before batching; ``data.max_consecutive_skips``
  skips in a row (at most 2N - 1 for N records: they hold a whole pass, so
  a pass that yields nothing) raise a `DataError` naming the source and the commonest reason, where the
  repeated source would otherwise never yield a batch. Every element's metadata (skip,
  truncation counts of `PadToSpec`, epoch) travels in the batch (``_report``)
  to `stats.CountReport`, which runs in the main process -- also when the rest
  runs in worker processes --, counts it in `stats.PipelineStats` and logs a
  report at the end of every epoch of every source. Counts are not part of
  the iterator state (after a resume they count from zero).
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

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any
import zlib

import grain
import numpy as np

from omnitrain_jax.data import candidates as candidates_lib
from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema
from omnitrain_jax.data import sources as sources_lib
from omnitrain_jax.data import stats as stats_lib
from omnitrain_jax.data import transforms

META = transforms.META
REPORT = candidates_lib.REPORT
KEY = candidates_lib.KEY


# ----------------------------------------------------------------------------
# Transforms of the composition.


class ExampleKey(grain.transforms.Map):
  """Adds ``_key``, the example's identity for the candidate draws.

  (split, stream, source, global index) -> `candidates.example_key`: the
  index is the one `transforms.AttachMeta` gave before the process shard, so
  the key does not depend on the number of processes.
  """

  def map(self, element):
    meta = element[META]
    return {**element, KEY: candidates_lib.example_key(
        "train", meta["stream"], meta["source"], meta["index"])}


class _EvalKey(grain.transforms.MapWithIndex):
  """Eval: ``_key`` from the record's index in the file (shard item i of
  process p of P is record p + i * P; padding examples continue the count)."""

  def __init__(self, source: str, stream: str, pi: int, pc: int):
    self.source, self.stream, self.pi, self.pc = source, stream, pi, pc

  def map_with_index(self, index: int, element):
    return {**element, KEY: candidates_lib.example_key(
        "eval", self.stream, self.source, self.pi + index * self.pc)}


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
  1.7 MB per example, a visible share of the pipeline's time). The
  collector's metadata rides along in ``_report`` until `stats.CountReport`.
  """

  def __init__(self, collector: stats_lib.MetaCollector | None = None):
    self.collector = collector

  def map(self, parts):
    examples = [ex for part in parts for ex in part]
    batch = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
    if self.collector is not None:
      batch[REPORT] = {"metas": self.collector.drain()}
    return batch


class EvalFill(grain.transforms.Map):
  """Eval: padding placeholders and skipped records -> padding examples."""

  def __init__(self, spec: schema.Spec, stream: str,
               stats: stats_lib.PipelineStats):
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


def _chain(config: Any, info: preparation.DataInfo, *, train: bool
           ) -> list[Any]:
  augment, color_ids = None, None
  if train and config.augment.enabled:
    aug = config.augment
    # AugmentConfig's own defaults fill what a (saved, older) config lacks;
    # JSON-restored configs hold lists where the dataclass wants tuples.
    augment = transforms.AugmentConfig(**{
        f.name: tuple(aug[f.name]) if isinstance(aug[f.name], list)
        else aug[f.name]
        for f in dataclasses.fields(transforms.AugmentConfig)
        if f.name in aug})
    if augment.color_jitter_prob:
      # A jittered image lists its colour words in no_bg_tokens, which keeps
      # them out of det_batch_negatives_known's sampled negatives too.
      color_ids = color_word_ids(info.vocab, aug.get("color_words",
                                                  transforms.COLOR_WORDS))
  return transforms.example_transforms(
      info.spec, encoder=info.tokenizer, augment=augment,
      mirror=np.asarray(info.vocab.mirror_map()), color_ids=color_ids,
      strict=config.strict, min_box_size=config.min_box_size)


def color_word_ids(vocab: Any, words: Sequence[str]) -> np.ndarray:
  """int32 ids of the colour words the vocabulary holds (absent ones skipped).

  The words are matched as the vocabulary's normalized tokens (lower case);
  a colour jitter strips these ids from a jittered example's labels.
  """
  ids = {vocab.id(str(w).strip().lower()) for w in words}
  ids.discard(schema.UNK_ID)
  return np.array(sorted(ids), np.int32)


def _apply(ds: grain.MapDataset, chain: Sequence[Any], seed: int
           ) -> grain.MapDataset:
  for t in chain:
    if isinstance(t, grain.transforms.RandomMap):
      ds = ds.random_map(t, seed=seed)
    else:
      ds = ds.map(t)
  return ds


def _active_sources(info: preparation.DataInfo, stream: str
                    ) -> dict[str, sources_lib.SourceSpec]:
  specs = {n: s for n, s in info.sources[stream].items() if s.weight > 0}
  if not specs:
    raise ValueError(f"Stream {stream!r} has a batch share but no source with "
                     "weight > 0 in data.sources.")
  return specs


def make_train_dataset(config: Any, info: preparation.DataInfo, *,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       stats: stats_lib.PipelineStats | None = None,
                       with_candidates: bool = True) -> grain.IterDataset:
  """The training dataset of this process: infinite, fixed composition.

  Args:
    config: ``config.data``.
    info: from `preparation.prepare_data`.
    process_index: this process (default ``jax.process_index()``).
    process_count: processes (default ``jax.process_count()``).
    stats: where skips/truncations are counted (a new `stats.PipelineStats`
      when None; pass one to read the counts, e.g. for the trainer's
      metrics).
    with_candidates: add the candidate fields, their batch negatives taken
      from this process's batch (the global batch when process_count is 1).
      The trainer passes False and adds them over the global batch
      (`candidates.Candidates.build`): the batches then carry the example
      keys (``_key``, int64 [B, 2]) instead.

  Returns:
    A `grain.IterDataset` of batches with `schema.batch_shapes(spec, B)`
    (see `with_candidates`), B = sum(data.batch) / process_count, ordered
    [det..., grd..., img...]. Iterate with ``iter(ds)`` and checkpoint the
    iterator.
  """
  pi, pc = _process(process_index, process_count)
  shares = local_batch_shares(config.batch, pc)
  stats = stats if stats is not None else stats_lib.PipelineStats()
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

  collector = stats_lib.MetaCollector()
  parts = []
  for stream in schema.STREAMS:
    if not shares[stream]:
      continue
    per_source, weights = {}, {}
    for name, spec in _active_sources(info, stream).items():
      records = sources_lib.open_source(spec, "train", strict=config.strict,
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
      # A source whose records are all bad would loop forever: a bounded
      # run of skips is an error. 2N - 1 skips in a row hold a whole pass
      # over the N records (the epochs are permutations), so a source with
      # some good records never trips the cap below.
      limit = 0 if config.strict else min(
          int(config.get("max_consecutive_skips", 1000)) or 2 * len(records),
          2 * len(records) - 1)
      per_source[name] = it.filter(stats_lib.DropSkipped(
          collector, source=f"{stream}/{name}", file=str(spec.train),
          limit=limit))
      weights[name] = spec.weight
    if len(per_source) == 1:
      sds = next(iter(per_source.values()))
    else:
      sds = grain.IterDataset.mix(per_source, weights)
    sds = sds.map(ExampleKey()).map(StripMeta())
    sds = sds.batch(shares[stream], drop_remainder=True, batch_fn=_as_list)
    parts.append(sds)

  ds = grain.experimental.ZipIterDataset(parts).map(StackStreams(collector))
  if with_candidates:
    ds = ds.map(candidates_lib.candidates_from_config(config, info.vocab))
  if config.num_workers:
    # Whole batches cross the process boundary: one transfer per batch
    # rather than a dozen shared-memory arrays per example, which capped
    # per-example worker prefetch at ~450 examples/s on 16 cores.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers,
        per_worker_buffer_size=config.per_worker_buffer_size),
                        worker_init_fn=_init_worker)
  ds = ds.map(stats_lib.CountReport(stats))
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


def make_eval_dataset(config: Any, info: preparation.DataInfo, *,
                      stream: str = "det", source: str | None = None,
                      batch_size: int | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None,
                      stats: stats_lib.PipelineStats | None = None,
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
    info: from `preparation.prepare_data`.
    stream: which stream's source to evaluate.
    source: the source name (default: the stream's first source with a val
      file).
    batch_size: global eval batch (default ``config.eval_batch_size``),
      divisible by the process count.
    process_index: this process (default ``jax.process_index()``).
    process_count: processes (default ``jax.process_count()``).
    stats: skip counts (see `make_train_dataset`).
    with_candidates: add candidate tokens as in training (for a validation
      loss), keyed by the record's index in the file and with the batch
      negatives of the process's batch. Off by default: candidates start
      with the example's own positives, i.e. the labels; detection metrics
      score the full vocabulary or the dataset's category tokens instead.

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
  stats = stats if stats is not None else stats_lib.PipelineStats()
  specs = {n: s for n, s in info.sources[stream].items() if s.val}
  if not specs:
    raise ValueError(f"No {stream} source has a val file; set data.sources."
                     f"{stream}.<name>.val.")
  if source is None:
    source = next(iter(specs))
  if source not in specs:
    raise ValueError(f"Unknown {stream} eval source {source!r}; sources with "
                     f"a val file: {sorted(specs)}.")
  records = sources_lib.open_source(specs[source], "val",
                                    strict=config.strict, counter=stats.skips)
  num_batches = eval_num_batches(len(records), batch_size, pc)
  shard = _PaddedShard(records, pi, pc, num_batches * local, stream)
  ds = grain.MapDataset.source(shard)
  ds = ds.map_with_index(_EvalMeta(source, stream, shard.num_real))
  ds = _apply(ds, _chain(config, info, train=False), 0)
  ds = ds.map(EvalFill(info.spec, stream, stats))
  if with_candidates:
    ds = ds.map_with_index(_EvalKey(source, stream, pi, pc))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads,
      prefetch_buffer_size=config.prefetch_buffer_size
      if config.num_threads else 0))
  it = it.batch(local, drop_remainder=False)
  if with_candidates:
    it = it.map(candidates_lib.candidates_from_config(
        config, info.vocab, stats.candidates))
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
