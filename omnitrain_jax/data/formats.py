"""Annotation file formats: their names, the one sniffer, the file parsers.

Every annotation file is parsed here, once per format, for everyone who reads
one: the readers (`readers.py`, records for training and evaluation), the
vocabulary's inputs (`vocab_inputs.py`) and the evaluation's format detection
(`sniff_format`). The names are the reader names of `sources.READERS` where a
reader exists:

=====================  ===================================================
format                 file
=====================  ===================================================
``coco_instances``     COCO instances JSON (``images``, ``annotations``,
                       ``categories``; also Objects365 in COCO format)
``lvis``               LVIS v1 instances JSON (as COCO, plus per-image
                       ``neg_category_ids`` or per-category ``synonyms`` /
                       ``frequency``)
``mdetr_grounding``    MDETR grounding JSON (image entries with a
                       ``caption``, boxes with ``tokens_positive``)
``coco_captions``      COCO captions JSON (annotations with a ``caption``)
``refcoco``            the refer release's ``refs(umd).p`` pickle
``caption_jsonl``      one ``{"image": path, "caption": text}`` object a line
``caption_csv``        CSV with a header row (``path,caption``)
``caption_json_list``  a JSON list of ``{"caption": ...}`` objects (read by
                       the vocabulary only; no reader)
=====================  ===================================================

`parse` sniffs a file's format from its content (the suffix decides only
between text formats: ``.jsonl``, ``.csv``, pickles) and returns the parsed
document; `sniff_format` returns just the name. The record-level checks, which
differ between a training reader (every box validated) and the vocabulary
(names and texts only), stay with those consumers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import csv
import dataclasses
import functools
import gc
import io
import json
import os
import pickle
from typing import Any

from etils import epath

from omnitrain_jax.data.errors import DataError

FORMATS = {
    "coco_instances": "COCO/Objects365 instances JSON (with 'categories')",
    "lvis": "LVIS instances JSON (with 'categories', and images' "
            "'neg_category_ids' or categories' 'synonyms'/'frequency')",
    "mdetr_grounding": "MDETR grounding JSON ('images' with 'caption')",
    "coco_captions": "COCO captions JSON ('annotations' with 'caption')",
    "refcoco": "a RefCOCO refs(umd).p pickle",
    "caption_jsonl": "JSONL of {'image': ..., 'caption': ...}",
    "caption_csv": "CSV with a 'caption' column",
    "caption_json_list": "a JSON list of {'caption': ...}",
}
_FORMAT_HELP = "pass one of: " + "; ".join(
    f"{name} ({what})" for name, what in FORMATS.items())

_PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


@dataclasses.dataclass(frozen=True)
class Document:
  """A parsed annotation file.

  Attributes:
    path: the file.
    format: one of `FORMATS`.
    content: the parsed file: the JSON document (``coco_instances``,
      ``lvis``, ``mdetr_grounding``, ``coco_captions``,
      ``caption_json_list``), the list of refs (``refcoco``), a list of
      (line number, JSON value) per non-blank line (``caption_jsonl``), or a
      `CsvTable` (``caption_csv``).
  """
  path: str
  format: str
  content: Any


@dataclasses.dataclass(frozen=True)
class CsvTable:
  """A CSV file with a header row.

  Attributes:
    header: the column names as written.
    rows: one {column: cell} per data row.
  """
  header: tuple[str, ...]
  rows: tuple[dict[str, str], ...]


def gc_paused(fn: Callable) -> Callable:
  """Runs `fn` with the cyclic garbage collector paused.

  Parsing creates millions of small acyclic objects; the collector's repeated
  passes over them cost about a quarter of the parse time (measured on a 74 MB
  LVIS-like file: json.load 3.6 s -> 2.7 s).
  """
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    enabled = gc.isenabled()
    gc.disable()
    try:
      return fn(*args, **kwargs)
    finally:
      if enabled:
        gc.enable()
  return wrapped


# ----------------------------------------------------------------------------
# Sniffing.


def sniff_format(path: str | os.PathLike[str]) -> str:
  """The format of an annotation file, from its content.

  Args:
    path: the file (local or `etils.epath` path).

  Returns:
    One of `FORMATS`, e.g. ``"coco_instances"`` or ``"lvis"``.

  Raises:
    DataError: the file cannot be read or is in none of the formats; the
      message names the file and the formats.
  """
  return parse(path).format


@gc_paused
def parse(path: str | os.PathLike[str]) -> Document:
  """Reads an annotation file, sniffing its format (see `sniff_format`).

  Args:
    path: the file (local or `etils.epath` path).

  Returns:
    The parsed `Document`.

  Raises:
    DataError: unreadable, not valid JSON / CSV / pickle, or in none of the
      formats.
  """
  p = epath.Path(path)
  name = os.fspath(path)
  try:
    data = p.read_bytes()
  except OSError as e:
    raise DataError(name, "file", f"cannot read it ({e})",
                    "check the path and permissions") from e
  suffix = p.suffix.lower()
  # Pickle protocol 2+ starts with 0x80; RefCOCO's refs(umd).p is protocol 2.
  if data[:1] == b"\x80" or suffix in _PICKLE_SUFFIXES:
    return Document(name, "refcoco", refs_from_bytes(name, data))
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(name, "file", f"not UTF-8 text ({e})",
                    _FORMAT_HELP) from e
  if suffix == ".csv" or not text.lstrip().startswith(("{", "[")):
    return Document(name, "caption_csv", _csv_table(name, text))
  if suffix == ".jsonl":
    return Document(name, "caption_jsonl", _jsonl_content(name, text))
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":  # Several JSON values: JSON lines.
      return Document(name, "caption_jsonl", _jsonl_content(name, text))
    raise json_error(name, e, _FORMAT_HELP) from None
  if isinstance(obj, dict) and ("caption" in obj or "captions" in obj):
    # A one-line JSONL file without the .jsonl suffix.
    return Document(name, "caption_jsonl", [(1, obj)])
  return Document(name, _json_format(name, obj), obj)


def _json_format(name: str, obj: Any) -> str:
  """The format of a parsed JSON document, from its keys."""
  # `parse` only gets here for text starting with "{" or "[".
  if isinstance(obj, list):
    return "caption_json_list"
  images = _first(obj.get("images"))
  annotation = _first(obj.get("annotations"))
  if isinstance(images, dict) and "caption" in images:
    # MDETR: one image entry per (image, caption).
    return "mdetr_grounding"
  if isinstance(annotation, dict) and "caption" in annotation:
    return "coco_captions"
  if "categories" in obj:
    cats = obj["categories"] if isinstance(obj["categories"], list) else []
    lvis = (isinstance(images, dict) and "neg_category_ids" in images) or any(
        isinstance(c, dict) and ("synonyms" in c or "frequency" in c)
        for c in cats)
    return "lvis" if lvis else "coco_instances"
  raise DataError(name, "top level", f"unrecognized keys {sorted(obj)[:8]}",
                  _FORMAT_HELP)


def _first(entries: Any) -> Any:
  return entries[0] if isinstance(entries, list) and entries else None


# ----------------------------------------------------------------------------
# JSON.


def json_error(path: str, e: json.JSONDecodeError, fix: str) -> DataError:
  """The `DataError` of a JSON syntax error: file, line, column, fix."""
  return DataError(path, f"line {e.lineno} column {e.colno}",
                   f"not valid JSON: {e.msg}", fix)


@gc_paused
def load_json(path: str | os.PathLike) -> Any:
  """Parses a JSON file; errors name the file, line and column.

  Args:
    path: the JSON file.

  Returns:
    The parsed object.

  Raises:
    DataError: the file is missing or is not valid JSON.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DataError(path, "file", "missing annotation file: it does not exist",
                    "check the path in the config") from None
  except json.JSONDecodeError as e:
    raise json_error(path, e, "the file is truncated or not JSON; "
                     "re-download or regenerate it") from None
  except UnicodeDecodeError as e:
    raise DataError(path, f"byte {e.start}", "not valid JSON: not UTF-8 text",
                    "re-download or regenerate the file") from None


def check_top_level(data: Any, path: str, keys: Sequence[str],
                    what: str) -> None:
  """Checks that `data` is an object holding lists under `keys`.

  A file-level check: it always raises, there is nothing to skip to.

  Args:
    data: the parsed JSON document.
    path: its file (for the message).
    keys: the keys that must hold lists.
    what: what the file should be ("a COCO instances file").

  Raises:
    DataError: the file is not `what`.
  """
  if not isinstance(data, dict):
    raise DataError(path, "top level", f"not {what}: expected a JSON object, "
                    f"got {type(data).__name__}", f"pass {what}")
  for key in keys:
    if key not in data:
      raise DataError(path, "top level", f"missing required key: {key!r}",
                      f"pass {what} (keys {list(keys)})")
    if not isinstance(data[key], list):
      raise DataError(path, "top level", f"malformed {key!r}: expected a list,"
                      f" got {type(data[key]).__name__}", f"pass {what}")


# ----------------------------------------------------------------------------
# JSON lines and CSV.


def text_lines(f: Iterable[str], path: str) -> Iterator[str]:
  """Lines of a text file; a decoding error names the file."""
  try:
    yield from f
  except UnicodeDecodeError as e:
    raise DataError(path, f"byte {e.start}", "not UTF-8 text",
                    "re-encode the file as UTF-8") from None


def jsonl_values(lines: Iterable[str]
                 ) -> Iterator[tuple[int, Any | json.JSONDecodeError]]:
  """(1-based line number, parsed value) of each non-blank JSON line.

  A line that is not valid JSON gives its `json.JSONDecodeError` in place of
  the value, so that the caller decides: raise, or skip and count it.
  """
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      yield line_no, e


def _jsonl_content(name: str, text: str) -> list[tuple[int, Any]]:
  out = []
  # Universal newlines, as the readers open JSONL files.
  for line_no, value in jsonl_values(io.StringIO(text, newline=None)):
    if isinstance(value, json.JSONDecodeError):
      raise DataError(name, f"line {line_no} column {value.colno}",
                      f"not valid JSON: {value.msg}",
                      "write one JSON object a line")
    out.append((line_no, value))
  return out


def _csv_table(name: str, text: str) -> CsvTable:
  # newline="": the csv module's own line handling, as the readers open CSVs.
  reader = csv.DictReader(io.StringIO(text, newline=""))
  try:
    rows = tuple(reader)
  except csv.Error as e:
    raise DataError(name, f"line {reader.line_num}", f"not valid CSV: {e}",
                    "fix the file's quoting") from None
  return CsvTable(header=tuple(reader.fieldnames or ()), rows=rows)


# ----------------------------------------------------------------------------
# RefCOCO refs pickles.


class RefsUnpickler(pickle.Unpickler):
  """Loads only plain data: a refs file needs no classes, and refusing them
  keeps a downloaded pickle from running code."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: a refs file holds only lists, "
        "dicts, strings and numbers")


def load_refs(path: str | os.PathLike) -> list:
  """Loads a refer release's ``refs(umd).p`` (plain data only).

  Args:
    path: the refs pickle.

  Returns:
    The list of refs (dicts).

  Raises:
    DataError: missing, not a loadable pickle, refused (it holds classes), or
      not a list.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise DataError(path, "file", "missing refs file: it does not exist",
                    "check the path in the config") from None
  return refs_from_bytes(path, data)


def refs_from_bytes(path: str, data: bytes) -> list:
  """`load_refs` of a file's bytes (`path` names it in errors)."""
  refs = None
  for encoding in ("utf-8", "latin1"):  # Python 2 pickles hold byte strings.
    try:
      refs = RefsUnpickler(io.BytesIO(data), encoding=encoding).load()
      break
    except UnicodeDecodeError:
      continue
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
            IndexError, AttributeError, ImportError) as e:
      raise DataError(path, "file", f"not a valid refs pickle: {e}",
                      "pass the refs(umd).p file of the refer release "
                      "(re-download it if truncated)") from None
  else:
    raise DataError(path, "file", "not a valid refs pickle: undecodable text",
                    "pass the refs(umd).p file of the refer release")
  if not isinstance(refs, list):
    raise DataError(path, "top level", "not a refs file: expected a list "
                    f"of refs, got {type(refs).__name__}",
                    "pass the refs(umd).p file of the refer release")
  return refs
