"""What the input pipeline dropped: skips and truncations, counted in the main
process.

Every element carries its metadata (``_meta``: source, epoch, skip reason,
truncation counts; `transforms.new_meta`) until it is batched. The counting
must survive `mp_prefetch`, whose worker processes run the filter and the
batching in memory the main process cannot see, so the metadata travels with
the batch:

  per source:  .filter(DropSkipped(collector))   # drops skip markers, hands
                                                 # every element's metadata
                                                 # to the collector
  all:         StackStreams(collector)           # the batch's ``_report``
                                                 # takes the collected metadata
               .map(CountReport(stats))          # main process: counts it in
                                                 # `PipelineStats`

`PipelineStats` logs a report at the end of every epoch of every source;
skips count distinct records (and, apart, visits: a repeated source meets a
bad record once per epoch). `DropSkipped` ends lenient mode's skip-and-repeat
loop over a source with no readable record with a `DataError` (a bounded run
of skips in a row) instead of a hang.
Counts are not part of the iterator state (after a resume they count from
zero).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import threading
from typing import Any

from absl import logging
import grain

from omnitrain_jax.data import candidates as candidates_lib
from omnitrain_jax.data import errors
from omnitrain_jax.data import transforms

META = transforms.META
REPORT = candidates_lib.REPORT


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
    """Records a batch's ``_report`` (see `pipeline.StackStreams`,
    `CountReport`)."""
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
    out.update({f"skip_visits/{k}": v for k, v in self.skips.visits().items()})
    out.update({f"candidates/{k}": v
                for k, v in self.candidates.counts().items()})
    return out

  def report(self) -> str:
    lines = [self.skips.report()]
    lines += [f"  {k}: {v}" for k, v in self.counts().items()
              if not k.startswith(("skipped/", "skip_visits/"))]
    return "\n".join(lines)


class MetaCollector:
  """Metadata of the elements taken into the batch being assembled.

  `DropSkipped` adds each element's ``_meta`` before batching;
  `pipeline.StackStreams` moves them into the batch (``_report``);
  `CountReport`, in the main process, hands them to `PipelineStats` (module
  doc: why through the batch). One iterator at a time per dataset object (two
  interleaved iterators would mix their entries; the counts stay right, only
  their batch attribution moves).
  """

  def __init__(self):
    self._metas = []

  def add(self, meta: dict) -> None:
    self._metas.append(meta)

  def drain(self) -> list[dict]:
    metas, self._metas = self._metas, []
    return metas


class DropSkipped(grain.transforms.Filter):
  """Drops skip markers before batching; every element's metadata (skipped
  or not) goes to the `MetaCollector`.

  One per source. `limit` consecutive skip markers raise a `DataError`
  naming the source, the count and the commonest reason: lenient mode would
  otherwise loop forever over a repeated source with no readable record
  (every image missing), never yielding a batch.
  """

  def __init__(self, collector: MetaCollector, *, source: str = "",
               file: str = "", limit: int = 0):
    """Args: collector: see the class doc. source: ``stream/name``, for the
    error. file: the source's annotation file, for the error. limit: skips
    in a row that stop the run (0: never)."""
    self.collector = collector
    self.source, self.file, self.limit = source, file, int(limit)
    self._run = 0  # Skips in a row.
    self._reasons = collections.Counter()  # Of the current run.
    self._first: dict[str, str] = {}

  def filter(self, element) -> bool:
    if META in element:
      self.collector.add(element[META])
    if not transforms.is_skipped(element):
      if self._run:
        self._run = 0
        self._reasons.clear()
        self._first.clear()
      return True
    if self.limit:
      error = transforms.skip_error(element)
      why = errors.reason(error)
      self._run += 1
      self._reasons[why] += 1
      self._first.setdefault(why, str(error))
      if self._run >= self.limit:
        self._fail()
    return False

  def _fail(self) -> None:
    why, n = self._reasons.most_common(1)[0]
    raise errors.DataError(
        self.file or self.source, f"data source {self.source}",
        f"no usable record: the last {self._run} records read were all "
        f"skipped in lenient mode, {n} of them for {why!r} (first: "
        f"{self._first[why]})",
        "fix the data (python -m omnitrain_jax.data.inspect lists the "
        "skips), or take the source out of data.sources (or give it weight "
        "0); data.max_consecutive_skips sets how many skips in a row end the "
        "run")


class CountReport(grain.transforms.Map):
  """Main process: removes a batch's ``_report`` and counts it in
  `PipelineStats`."""

  def __init__(self, stats: PipelineStats):
    self.stats = stats

  def map(self, batch):
    report = batch.pop(REPORT, None)
    if report is not None:
      self.stats.record_report(report)
    return batch
