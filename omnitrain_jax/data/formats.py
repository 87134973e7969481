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
``webdataset``         a WebDataset tar shard as img2dataset writes it
                       (``KEY.jpg`` + ``KEY.txt`` [+ ``KEY.json``] members)
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
import glob
import io
import json
import os
import pickle
import re
import tarfile
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
    "webdataset": "a WebDataset .tar shard (KEY.jpg + KEY.txt members)",
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
  suffix = p.suffix.lower()
  if suffix == ".tar":  # Streamed: a shard can be gigabytes.
    return Document(name, "webdataset", read_shard(name))
  try:
    data = p.read_bytes()
  except OSError as e:
    raise DataError(name, "file", f"cannot read it ({e})",
                    "check the path and permissions") from e
  if data[257:262] == b"ustar":  # A tar file without the .tar suffix.
    return Document(name, "webdataset", read_shard(name, io.BytesIO(data)))
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


# ----------------------------------------------------------------------------
# WebDataset tar shards (img2dataset's output).


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# WebDataset's sample key: the member path up to the first "." of its base
# name ("0000/000000123.jpg" -> key "0000/000000123", extension "jpg").
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^(\d+)\.\.(\d+)$")


@dataclasses.dataclass(frozen=True)
class ShardSample:
  """The members of one sample of a shard.

  Attributes:
    key: the sample key (``"000000123"``).
    members: extension -> (data offset, size) in the tar file.
    texts: the ``txt`` and ``json`` members' bytes (read while indexing).
  """
  key: str
  members: dict[str, tuple[int, int]]
  texts: dict[str, bytes]


@dataclasses.dataclass(frozen=True)
class Shard:
  """One indexed tar shard.

  Attributes:
    path: the shard.
    samples: its samples, in file order.
    error: why reading stopped early (a truncated or corrupt tar), else "".
  """
  path: str
  samples: tuple[ShardSample, ...]
  error: str = ""


def expand_shards(pattern: str) -> list[str]:
  """The shard files of a pattern, in order.

  Brace patterns expand as WebDataset / img2dataset write them:
  ``{00000..00099}`` is a zero-padded numeric range, ``{a,b}`` a list;
  several braces multiply. Each result with ``*``, ``?`` or ``[`` is then a
  glob (sorted); a plain path is kept even when it does not exist (the
  reader reports it). Several patterns may be separated by ``::``.

  Args:
    pattern: e.g. ``"laion/{00000..00099}.tar"`` or ``"cc12m/*.tar"``.

  Returns:
    The paths, duplicates removed.
  """
  out = []
  for part in pattern.split("::"):
    for path in _expand_braces(part.strip()):
      if any(c in path for c in "*?["):
        out.extend(sorted(glob.glob(path)))
      elif path:
        out.append(path)
  return list(dict.fromkeys(out))


def _expand_braces(pattern: str) -> list[str]:
  m = _BRACE_RE.search(pattern)
  if m is None:
    return [pattern]
  body = m.group(1)
  r = _RANGE_RE.match(body)
  if r:
    lo, hi = r.group(1), r.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    step = 1 if int(hi) >= int(lo) else -1
    choices = [str(i).zfill(width)
               for i in range(int(lo), int(hi) + step, step)]
  else:
    choices = body.split(",")
  head, tail = pattern[:m.start()], pattern[m.end():]
  return [head + c + rest for c in choices for rest in _expand_braces(tail)]


class _NotPlainUstar(Exception):
  """The shard has headers the fast path does not parse."""


def _ustar_members(f) -> Iterator[tuple[str, int, int, bool]]:
  """(name, data offset, size, is a file) per member of a plain ustar tar.

  Reads only the 512-byte headers and seeks over the data: about 10x
  faster than the tarfile module on shards of 10,000 samples. Raises
  `_NotPlainUstar` at a pax / GNU long-name header, a base-256 size or a
  first header without the ustar magic, and `tarfile.ReadError` where a
  header is cut or missing.
  """
  pos = 0
  while True:
    f.seek(pos)
    header = f.read(512)
    if len(header) < 512 or not header.strip(b"\0"):
      if header.strip(b"\0"):
        raise tarfile.ReadError("unexpected end of data")
      return  # End of archive (zero blocks, or the end of the file).
    # The magic, not the checksum, tells a header from damage: summing 512
    # bytes in Python doubled the indexing time.
    if header[257:262] != b"ustar":
      if not pos:
        raise _NotPlainUstar()  # Maybe a v7 tar: let the tarfile module try.
      raise tarfile.ReadError("no tar header where one should be")
    kind = header[156:157]
    if kind in (b"x", b"g", b"L", b"K") or header[124] & 0x80:
      raise _NotPlainUstar()
    try:
      size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
      raise tarfile.ReadError("bad size field in a tar header") from None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
      name = prefix + b"/" + name
    yield (name.decode("utf-8", "replace"), pos + 512, size,
           kind in (b"0", b"\0", b"7"))
    pos += 512 + (size + 511) // 512 * 512


def _tarfile_members(tar: tarfile.TarFile
                     ) -> Iterator[tuple[str, int, int, bool]]:
  """`_ustar_members` through the tarfile module (every tar format)."""
  while True:
    info = tar.next()
    if info is None:
      return
    yield info.name, info.offset_data, info.size, info.isfile()


def _index_members(f, members, samples: dict[str, ShardSample]) -> str:
  """Groups `members` into `samples` (in place); returns the error or ""."""
  try:
    for name, offset, size, is_file in members:
      m = _KEY_RE.match(name) if is_file else None
      if m is None:
        continue  # Not part of a sample (a folder, a README).
      key, ext = m.group(1), m.group(2).lower()
      sample = samples.get(key)
      if sample is None:
        sample = samples[key] = ShardSample(key, {}, {})
      sample.members[ext] = (offset, size)
      if ext in ("txt", "json"):
        f.seek(offset)
        sample.texts[ext] = f.read(size)
        if len(sample.texts[ext]) != size:
          raise tarfile.ReadError("unexpected end of data")
  except (tarfile.TarError, OSError, EOFError) as e:
    if samples:
      samples.popitem()  # The sample being read may be incomplete.
    return (f"truncated or corrupt tar: reading stopped after "
            f"{len(samples)} samples ({e})")
  return ""


def read_shard(path: str, fileobj: io.BufferedIOBase | None = None) -> Shard:
  """Indexes a WebDataset tar shard: members by sample, caption bytes read.

  Image members are not read (only their offsets); ``txt`` and ``json``
  members are. A truncated or corrupt shard keeps the samples before the
  damage and says why in `Shard.error` (the sample being read when it broke
  is left out).

  Args:
    path: the shard (names it in messages).
    fileobj: its open file, else it is opened.

  Returns:
    The `Shard`.

  Raises:
    DataError: the shard is missing or not a tar file at all.
  """
  try:
    f = fileobj if fileobj is not None else open(path, "rb")
  except FileNotFoundError:
    raise DataError(path, "file", "missing shard: it does not exist",
                    "check the shard pattern in the config") from None
  samples: dict[str, ShardSample] = {}
  error = ""
  try:
    try:
      members = _ustar_members(f)
      error = _index_members(f, members, samples)
    except _NotPlainUstar:
      # Extension headers (pax, GNU long names): the tarfile module.
      samples.clear()
      f.seek(0)
      try:
        tar = tarfile.open(fileobj=f, mode="r:")
      except tarfile.TarError as e:
        raise DataError(path, "file", f"not a tar file: {e}",
                        "re-download or rewrite the shard") from None
      error = _index_members(f, _tarfile_members(tar), samples)
    # A member cut off at the end of the file ends the tar without an error.
    size = f.seek(0, io.SEEK_END)
    while samples and any(o + n > size for o, n in
                          next(reversed(samples.values())).members.values()):
      samples.popitem()
      error = error or ("truncated or corrupt tar: it ends inside a member "
                        f"after {len(samples)} complete samples")
  finally:
    if fileobj is None:
      f.close()
  return Shard(path, tuple(samples.values()), error)


def sample_caption(sample: ShardSample) -> tuple[str | None, str]:
  """A sample's caption: its ``txt`` member, else its ``json``'s
  ``"caption"`` (img2dataset writes both).

  Returns:
    (caption, "") or (None, the problem).
  """
  raw = sample.texts.get("txt")
  if raw is None and "json" in sample.texts:
    try:
      meta = json.loads(sample.texts["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
      meta = None
    caption = meta.get("caption") if isinstance(meta, dict) else None
    if isinstance(caption, str) and caption.strip():
      return caption.strip(), ""
    return None, ("missing caption: no .txt member and no 'caption' in the "
                  ".json member")
  if raw is None:
    return None, "missing caption: no .txt (or .json) member"
  try:
    caption = raw.decode("utf-8-sig").strip()
  except UnicodeDecodeError:
    return None, "bad caption: the .txt member is not UTF-8 text"
  if not caption:
    return None, "bad caption: the .txt member is empty"
  return caption, ""
