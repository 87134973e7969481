"""Bad-input handling shared by every reader and transform.

Policy (config ``data.strict``):
  * strict (default): the first bad record raises `DataError`, whose message
    names the file, the record and the fix.
  * lenient: the record is skipped and counted in a `SkipCounter`; the pipeline
    logs the counts (per source and reason) at the end of every epoch of that
    source and at the end of the run, so nothing is dropped silently.
"""

from __future__ import annotations

import collections
import threading


class DataError(ValueError):
  """A bad file or record. The message says which one and how to fix it."""

  def __init__(self, file: str, record: str, problem: str, fix: str):
    self.file, self.record, self.problem, self.fix = file, record, problem, fix
    super().__init__(f"{file}: {record}: {problem}. Fix: {fix}")


class SkipCounter:
  """Thread-safe counts of skipped records, keyed by (source, reason)."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts = collections.Counter()
    self._examples: dict[tuple[str, str], str] = {}

  def __getstate__(self):
    # grain pickles sources (and their counters) into worker processes.
    with self._lock:
      return {"counts": dict(self._counts), "examples": dict(self._examples)}

  def __setstate__(self, state):
    self._lock = threading.Lock()
    self._counts = collections.Counter(state["counts"])
    self._examples = state["examples"]

  def add(self, source: str, error: DataError) -> None:
    key = (source, error.problem.split(":")[0])
    with self._lock:
      self._counts[key] += 1
      self._examples.setdefault(key, str(error))

  def total(self) -> int:
    with self._lock:
      return sum(self._counts.values())

  def counts(self) -> dict[str, int]:
    with self._lock:
      return {f"{s}/{r}": n for (s, r), n in sorted(self._counts.items())}

  def report(self) -> str:
    """A human-readable multi-line summary, one line per (source, reason)."""
    with self._lock:
      if not self._counts:
        return "no records skipped"
      lines = [f"skipped {sum(self._counts.values())} bad records:"]
      for (s, r), n in sorted(self._counts.items()):
        lines.append(f"  {s}: {n} x {r} (first: {self._examples[(s, r)]})")
      return "\n".join(lines)


def handle(error: DataError, *, strict: bool, counter: SkipCounter | None,
           source: str) -> None:
  """Raises `error` when strict, else counts it as a skip."""
  if strict or counter is None:
    raise error
  counter.add(source, error)
