"""Annotation files -> what the vocabulary builder counts (`AnnotationFile`s).

`formats.parse` sniffs and parses each file (the parser the readers use too);
this module takes from the parsed document what `vocab.builder` counts:

======================  ===================================================
format                  categories / texts
======================  ===================================================
``coco_instances``,     category names (LVIS synonyms too), each with its
``lvis``                number of annotations
``mdetr_grounding``     each image entry's ``caption`` (the phrases are
                        substrings of it)
``coco_captions``       each annotation's ``caption``
``caption_jsonl``       each line's ``caption`` (or ``captions`` list)
``caption_json_list``   each entry's ``caption`` (or ``captions`` list)
``caption_csv``         the ``caption`` column (any letter case)
``refcoco``             each ref's sentences' ``sent`` (else ``raw``)
``webdataset``          each sample's caption (``.txt``, else the ``.json``'s
                        ``caption``) of one tar shard
======================  ===================================================

Unlike the readers, nothing here checks boxes or image entries: a vocabulary
needs only names and texts, so an instances file without image sizes is fine.
A text that is not a string (a caption that is a number) raises a `DataError`
or, with ``strict=False``, is skipped and counted in the `SkipCounter` the
readers count in too (source ``"vocabulary"``); structural problems (no
category name, no ``sentences`` list, no caption column) stay errors.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
import os
from typing import Any

from omnitrain_jax.data import errors
from omnitrain_jax.data import formats
from omnitrain_jax.data.errors import DataError, SkipCounter
from omnitrain_jax.vocab import builder
from omnitrain_jax.vocab import vocabulary as vocabulary_lib


# The source name of the vocabulary build's skips in a `SkipCounter`.
SKIP_SOURCE = "vocabulary"
# Receives the `DataError` of a bad text (raises it, or counts it).
_BadText = Callable[[DataError], None]


def read_annotations(path: str | os.PathLike[str], *,
                     on_bad_text: _BadText | None = None
                     ) -> builder.AnnotationFile:
  """Reads one annotation file's categories or texts, sniffing its format.

  Args:
    path: a file in one of `formats.FORMATS` (local or `etils.epath` path).
    on_bad_text: called with the `DataError` of a text that is not a string
      (lenient mode: count it); None raises it.

  Returns:
    The categories or texts it holds.

  Raises:
    DataError: unreadable file or unrecognized / malformed content; the
      message names the file and the expected formats.
  """

  def bad_text(error: DataError) -> None:
    if on_bad_text is None:
      raise error
    on_bad_text(error)

  doc = formats.parse(path)
  categories, texts = _CONTENTS[doc.format](doc.path, doc.content, bad_text)
  return builder.AnnotationFile(doc.path, doc.format,
                                categories=tuple(categories),
                                texts=tuple(texts))


def build_from_files(
    files: Sequence[str | os.PathLike[str] | builder.AnnotationFile], *,
    strict: bool = True, counter: SkipCounter | None = None,
    **kwargs: Any) -> tuple[vocabulary_lib.Vocabulary, dict]:
  """`builder.build_vocabulary` of annotation files.

  Args:
    files: file paths (read with `read_annotations`) or already read
      `builder.AnnotationFile`s.
    strict: False: texts that are not strings are skipped and counted.
    counter: where lenient skips are counted, as source `SKIP_SOURCE` (the
      pipeline's `stats.PipelineStats.skips`, so that they are reported with
      the readers' skips).
    **kwargs: `builder.build_vocabulary`'s options (``max_size``, ...).

  Returns:
    `(vocabulary, summary)`; after lenient skips the summary also has
    ``"skipped"`` (``vocabulary/<reason>`` -> texts left out) and
    ``"skipped_records"`` (``[file, record, problem, fix]`` of each).
  """
  skipped: list[DataError] = []

  def skip(error: DataError) -> None:
    errors.handle(error, strict=strict, counter=counter, source=SKIP_SOURCE)
    skipped.append(error)

  lenient = not strict and counter is not None
  vocab, summary = builder.build_vocabulary(
      [f if isinstance(f, builder.AnnotationFile) else
       read_annotations(f, on_bad_text=skip if lenient else None)
       for f in files], **kwargs)
  if skipped:
    summary["skipped"] = dict(collections.Counter(
        f"{SKIP_SOURCE}/{errors.reason(e)}" for e in skipped))
    summary["skipped_records"] = [[e.file, e.record, e.problem, e.fix]
                                  for e in skipped]
  return vocab, summary


def _captions_of(name: str, entries: Iterable, bad_text: _BadText,
                 where: str = "entry", start: int = 0) -> list[str]:
  """The 'caption' strings (or 'captions' lists) of dict entries."""
  texts = []
  for i, e in enumerate(entries, start=start):
    cap = e.get("caption", e.get("captions")) if isinstance(e, dict) else None
    if isinstance(cap, str):
      texts.append(cap)
    elif isinstance(cap, list) and all(isinstance(c, str) for c in cap):
      texts.extend(cap)
    else:
      bad_text(DataError(name, f"{where} {i}",
                         f"bad caption: no 'caption' string in {e!r:.80}",
                         "give every entry a 'caption' (or 'captions' list), "
                         "or set strict=False to skip it"))
  return texts


def _instances(name: str, obj: dict, bad_text: _BadText):
  del bad_text  # Categories are structure: a bad one stays an error.
  anns = obj.get("annotations") or []
  num_boxes = collections.Counter()
  for a in anns:
    num_boxes[a.get("category_id")] += 1
  out = []
  for i, c in enumerate(obj["categories"]):
    if not isinstance(c, dict) or not isinstance(c.get("name"), str):
      raise DataError(name, f"categories[{i}]", f"no 'name' string in {c!r}",
                      "give each category a 'name'")
    syn = c.get("synonyms") or ()
    out.append(builder.Category(
        c["name"], tuple(s for s in syn if isinstance(s, str)),
        num_boxes.get(c.get("id"), 0)))
  return out, ()


def _mdetr(name: str, obj: dict, bad_text: _BadText):
  # One image entry per (image, caption); phrases are substrings of the
  # caption, so the caption is what is counted.
  texts = []
  for i, im in enumerate(obj["images"]):
    cap = im.get("caption")
    if not isinstance(cap, str):
      bad_text(DataError(name, f"images[{i}] (id {im.get('id')})",
                         f"bad caption: {cap!r}, not a string",
                         "give every image entry a 'caption' string, or set "
                         "strict=False to skip it"))
      continue
    texts.append(cap)
  return (), texts


def _coco_captions(name: str, obj: dict, bad_text: _BadText):
  return (), _captions_of(name, obj["annotations"], bad_text)


def _jsonl(name: str, lines: list[tuple[int, Any]], bad_text: _BadText):
  texts = []
  for line_no, entry in lines:
    texts.extend(_captions_of(name, [entry], bad_text, "line",
                              start=line_no))
  return (), texts


def _json_list(name: str, entries: list, bad_text: _BadText):
  return (), _captions_of(name, entries, bad_text)


def _csv(name: str, table: formats.CsvTable, bad_text: _BadText):
  del bad_text  # A CSV cell is always text.
  fields = [f.strip().lower() for f in table.header]
  if "caption" not in fields:
    raise DataError(name, "header", f"no 'caption' column in {fields}",
                    "add a 'caption' column (a header row such as "
                    "'path,caption')")
  col = table.header[fields.index("caption")]
  return (), [r[col] or "" for r in table.rows]


def _refcoco(name: str, refs: list, bad_text: _BadText):
  texts = []
  for i, ref in enumerate(refs):
    sents = ref.get("sentences") if isinstance(ref, dict) else None
    if not isinstance(sents, list):
      raise DataError(name, f"ref {i}", "no 'sentences' list",
                      "use the refs(umd).p file of the REFER toolkit")
    for s in sents:
      sent = s.get("sent", s.get("raw")) if isinstance(s, dict) else None
      if not isinstance(sent, str):
        bad_text(DataError(name, f"ref {i} (ref_id {ref.get('ref_id')})",
                           f"bad sentence: no 'sent' string in {s!r:.80}",
                           "use the refs(umd).p file of the REFER toolkit, "
                           "or set strict=False to skip it"))
        continue
      texts.append(sent)
  return (), texts


def _webdataset(name: str, shard: formats.Shard, bad_text: _BadText):
  # Each sample's caption (``.txt``, else the ``.json``'s ``caption``), by
  # the reader's rule; a sample without a usable one is a bad text.
  texts = []
  for sample in shard.samples:
    caption, problem = formats.sample_caption(sample)
    if caption is None:
      bad_text(DataError(name, f"key {sample.key!r}", problem,
                         "rewrite the sample, or set strict=False to skip "
                         "it"))
      continue
    texts.append(caption)
  return (), texts


# Format -> (file name, parsed content, bad text handler) -> (categories,
# texts).
_CONTENTS = {
    "coco_instances": _instances,
    "lvis": _instances,
    "mdetr_grounding": _mdetr,
    "coco_captions": _coco_captions,
    "caption_jsonl": _jsonl,
    "caption_json_list": _json_list,
    "caption_csv": _csv,
    "refcoco": _refcoco,
    "webdataset": _webdataset,
}
assert set(_CONTENTS) == set(formats.FORMATS)
