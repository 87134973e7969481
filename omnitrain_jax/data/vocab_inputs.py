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
======================  ===================================================

Unlike the readers, nothing here checks boxes or image entries: a vocabulary
needs only names and texts, so an instances file without image sizes is fine.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import os
from typing import Any

from omnitrain_jax.data import formats
from omnitrain_jax.data.errors import DataError
from omnitrain_jax.vocab import builder
from omnitrain_jax.vocab import vocabulary as vocabulary_lib


def read_annotations(path: str | os.PathLike[str]) -> builder.AnnotationFile:
  """Reads one annotation file's categories or texts, sniffing its format.

  Args:
    path: a file in one of `formats.FORMATS` (local or `etils.epath` path).

  Returns:
    The categories or texts it holds.

  Raises:
    DataError: unreadable file or unrecognized / malformed content; the
      message names the file and the expected formats.
  """
  doc = formats.parse(path)
  categories, texts = _CONTENTS[doc.format](doc.path, doc.content)
  return builder.AnnotationFile(doc.path, doc.format,
                                categories=tuple(categories),
                                texts=tuple(texts))


def build_from_files(
    files: Sequence[str | os.PathLike[str] | builder.AnnotationFile],
    **kwargs: Any) -> tuple[vocabulary_lib.Vocabulary, dict]:
  """`builder.build_vocabulary` of annotation files.

  Args:
    files: file paths (read with `read_annotations`) or already read
      `builder.AnnotationFile`s.
    **kwargs: `builder.build_vocabulary`'s options (``max_size``, ...).

  Returns:
    `(vocabulary, summary)`.
  """
  return builder.build_vocabulary(
      [f if isinstance(f, builder.AnnotationFile) else read_annotations(f)
       for f in files], **kwargs)


def _captions_of(name: str, entries: Iterable, where: str = "entry",
                 start: int = 0) -> list[str]:
  """The 'caption' strings (or 'captions' lists) of dict entries."""
  texts = []
  for i, e in enumerate(entries, start=start):
    cap = e.get("caption", e.get("captions")) if isinstance(e, dict) else None
    if isinstance(cap, str):
      texts.append(cap)
    elif isinstance(cap, list) and all(isinstance(c, str) for c in cap):
      texts.extend(cap)
    else:
      raise DataError(name, f"{where} {i}", f"no 'caption' string in {e!r:.80}",
                      "give every entry a 'caption' (or 'captions' list)")
  return texts


def _instances(name: str, obj: dict):
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


def _mdetr(name: str, obj: dict):
  # One image entry per (image, caption); phrases are substrings of the
  # caption, so the caption is what is counted.
  texts = []
  for i, im in enumerate(obj["images"]):
    cap = im.get("caption")
    if not isinstance(cap, str):
      raise DataError(name, f"images[{i}] (id {im.get('id')})",
                      f"caption is {cap!r}, not a string",
                      "give every image entry a 'caption' string")
    texts.append(cap)
  return (), texts


def _coco_captions(name: str, obj: dict):
  return (), _captions_of(name, obj["annotations"])


def _jsonl(name: str, lines: list[tuple[int, Any]]):
  texts = []
  for line_no, entry in lines:
    texts.extend(_captions_of(name, [entry], "line", start=line_no))
  return (), texts


def _json_list(name: str, entries: list):
  return (), _captions_of(name, entries)


def _csv(name: str, table: formats.CsvTable):
  fields = [f.strip().lower() for f in table.header]
  if "caption" not in fields:
    raise DataError(name, "header", f"no 'caption' column in {fields}",
                    "add a 'caption' column (a header row such as "
                    "'path,caption')")
  col = table.header[fields.index("caption")]
  return (), [r[col] or "" for r in table.rows]


def _refcoco(name: str, refs: list):
  texts = []
  for i, ref in enumerate(refs):
    sents = ref.get("sentences") if isinstance(ref, dict) else None
    if not isinstance(sents, list):
      raise DataError(name, f"ref {i}", "no 'sentences' list",
                      "use the refs(umd).p file of the REFER toolkit")
    for s in sents:
      sent = s.get("sent", s.get("raw")) if isinstance(s, dict) else None
      if not isinstance(sent, str):
        raise DataError(name, f"ref {i} (ref_id {ref.get('ref_id')})",
                        f"sentence without 'sent': {s!r:.80}",
                        "use the refs(umd).p file of the REFER toolkit")
      texts.append(sent)
  return (), texts


# Format -> (file name, parsed content) -> (categories, texts).
_CONTENTS = {
    "coco_instances": _instances,
    "lvis": _instances,
    "mdetr_grounding": _mdetr,
    "coco_captions": _coco_captions,
    "caption_jsonl": _jsonl,
    "caption_json_list": _json_list,
    "caption_csv": _csv,
    "refcoco": _refcoco,
}
assert set(_CONTENTS) == set(formats.FORMATS)
