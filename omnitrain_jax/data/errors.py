"""Bad-input handling shared by every reader and transform.

Policy (config ``data.strict``):
  * strict (default): the first bad record raises `DataError`, whose message
    names the file, the record and the fix.
  * lenient: the record is skipped and counted in a `SkipCounter` (distinct
    records, and visits: a repeated source meets a bad record every epoch);
    the pipeline logs the counts (per source and reason) at the end of every
    epoch of that source and at the end of the run, so nothing is dropped
    silently. A source that yields nothing is an error, not a hang
    (`stats.DropSkipped`).

The binaries print these errors as one line (`exit_on_user_errors`), with the
"set strict=False" advice spelled as each binary's option
(`lenient_advice`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading

from absl import logging


class DataError(ValueError):
  """A bad file or record. The message says which one and how to fix it."""

  def __init__(self, file: str, record: str, problem: str, fix: str):
    self.file, self.record, self.problem, self.fix = file, record, problem, fix
    super().__init__(f"{file}: {record}: {problem}. Fix: {fix}")

  def __reduce__(self):
    # Picklable, so that an error raised in a grain worker process reaches
    # the main process as itself.
    return (DataError, (self.file, self.record, self.problem, self.fix))


class SkipCounter:
  """Thread-safe counts of skipped records, keyed by (source, reason).

  A record is counted once however often it is visited (a bad image of a
  repeated source is met again every epoch): `counts`, `total` and `report`
  count distinct records (by source, file and record name), `visits` every
  encounter.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._records: dict[tuple[str, str], set[tuple[str, str]]] = (
        collections.defaultdict(set))
    self._visits = collections.Counter()
    self._examples: dict[tuple[str, str], str] = {}

  def __getstate__(self):
    # grain pickles sources (and their counters) into worker processes.
    with self._lock:
      return {"records": {k: sorted(v) for k, v in self._records.items()},
              "visits": dict(self._visits), "examples": dict(self._examples)}

  def __setstate__(self, state):
    self._lock = threading.Lock()
    self._records = collections.defaultdict(set, {
        k: {tuple(r) for r in v} for k, v in state["records"].items()})
    self._visits = collections.Counter(state["visits"])
    self._examples = state["examples"]

  def add(self, source: str, error: DataError) -> None:
    key = (source, reason(error))
    with self._lock:
      self._records[key].add((error.file, error.record))
      self._visits[key] += 1
      self._examples.setdefault(key, str(error))

  def total(self) -> int:
    """Distinct records skipped (a record skipped for two reasons once)."""
    with self._lock:
      return len({(s, *r) for (s, _), recs in self._records.items()
                  for r in recs})

  def total_visits(self) -> int:
    with self._lock:
      return sum(self._visits.values())

  def counts(self) -> dict[str, int]:
    """``source/reason`` -> distinct records."""
    with self._lock:
      return {f"{s}/{r}": len(v) for (s, r), v in sorted(self._records.items())}

  def visits(self) -> dict[str, int]:
    """``source/reason`` -> times a record was skipped (once per epoch)."""
    with self._lock:
      return {f"{s}/{r}": n for (s, r), n in sorted(self._visits.items())}

  def report(self) -> str:
    """A human-readable multi-line summary, one line per (source, reason)."""
    total, visits = self.total(), self.total_visits()
    with self._lock:
      if not self._records:
        return "no records skipped"
      lines = [f"skipped {total} bad record{'s' * (total != 1)}"
               + (f" ({visits} visits over the epochs)" if visits > total
                  else "") + ":"]
      for (s, r), recs in sorted(self._records.items()):
        n, v = len(recs), self._visits[(s, r)]
        again = f", {v} visits" if v > n else ""
        lines.append(f"  {s}: {n} x {r}{again} "
                     f"(first: {self._examples[(s, r)]})")
      return "\n".join(lines)


def reason(error: DataError) -> str:
  """The kind of problem, the key skips are counted by ("missing image
  file", "bad caption", ...)."""
  return error.problem.split(":")[0]


# How the readers' and decoders' fixes offer lenient mode, e.g. "..., or set
# strict=False to skip such records", "(or set strict=False to accept ...)".
_LENIENT_CLAUSE = re.compile(
    r",?\s*\(?\s*or set strict=False(?: \(config data\.strict\))?"
    r"(?P<rest>[^.;)]*)\)?")
_SET_STRICT = re.compile(r"set strict=False(?: \(config data\.strict\))?")


def lenient_advice(message: str, option: str | None,
                   instead: str = "") -> str:
  """Rewrites a message's "set strict=False" advice for one binary.

  Args:
    message: an error message (usually a `DataError`'s).
    option: how this binary turns lenient mode on (e.g.
      ``"--config.data.strict=False"``); None when it has none.
    instead: with ``option=None``, what to do instead (appended once when the
      advice was removed).

  Returns:
    The message with ``set strict=False`` spelled as `option`, or without
    the advice (and with `instead`) when the binary has no such option.
  """
  if option is not None:
    return _SET_STRICT.sub(f"pass {option}", message)
  out, n = _LENIENT_CLAUSE.subn("", message)
  if n and instead:
    out = out.rstrip().rstrip(".") + f". {instead}"
  return out


def handle(error: DataError, *, strict: bool, counter: SkipCounter | None,
           source: str) -> None:
  """Raises `error` when strict, else counts it as a skip."""
  if strict or counter is None:
    raise error
  counter.add(source, error)


@contextlib.contextmanager
def exit_on_user_errors(error_types: tuple[type[BaseException], ...], *,
                        lenient: str | None = None, instead: str = ""):
  """Prints a user-facing error as one line (``Error: ...``) and exits.

  The binaries wrap their work in it: an error of one of `error_types` (the
  message names the file or setting, what is wrong and the fix) ends the
  process with its ``exit_code`` attribute (default 1) after one line on
  stderr instead of a traceback; the traceback goes to the log at debug
  level (``--verbosity=1`` shows it). Other exceptions propagate unchanged
  (bugs keep their tracebacks).

  Args:
    error_types: the exception types this binary reports as one line.
    lenient: how this binary turns lenient data mode on (e.g.
      ``"--config.data.strict=False"``), for the messages' "set
      strict=False" advice; None when it has no such option.
    instead: with ``lenient=None``, what to advise instead.

  Yields:
    Nothing.
  """
  try:
    yield
  except error_types as e:  # pylint: disable=catching-non-exception
    logging.debug("Traceback:", exc_info=True)
    message = lenient_advice(str(e), lenient, instead)
    sys.stdout.flush()
    sys.stderr.write(f"\nError: {message}\n")
    sys.stderr.flush()
    logging.flush()
    # Not sys.exit: orbax's threads of a failed save would print pages of
    # "Event loop is closed" while the interpreter shuts down, and input
    # pipeline threads stuck on a stalled source would never be joined.
    os._exit(int(getattr(e, "exit_code", 1)))  # pylint: disable=protected-access
