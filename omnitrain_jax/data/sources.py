"""The reader table: a config's ``data.sources`` -> opened `RecordSource`s.

Each entry of ``data.sources.<stream>.<name>`` names a ``reader`` of
`READERS` and its inputs::

  data.sources.det.coco = dict(reader="coco_instances",
                               train="annotations/instances_train2017.json",
                               val="annotations/instances_val2017.json",
                               image_dir="", weight=1.0)
  data.sources.grd.refcocog = dict(reader="refcoco", train="refs(umd).p",
                                   val="refs(umd).p",
                                   instances="instances.json",
                                   image_dir="train2014", train_split="train",
                                   val_split="val")
  data.sources.det.lvis = dict(reader="tfds_lvis", data_dir="tfds",
                               train="train", val="validation")
  data.sources.img.laion = dict(reader="webdataset",
                                train="laion/{00000..41407}.tar")

File readers take ``train``/``val`` as annotation files; the TFDS readers
(`tfds_readers.py`, ArrayRecord datasets prepared by ``tfds build``) take them
as TFDS split names and ``data_dir`` as the TFDS data folder (``dataset``
picks another TFDS name or version, e.g. ``ref_coco/refcoco_unc``); the
``webdataset`` reader takes them as shard patterns (a glob or a brace range
of tar files). Relative paths resolve against ``data.root`` (for
ShapesWorld: the generated dataset).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import os
from typing import Any

from absl import logging
import numpy as np

from omnitrain_jax.data import errors
from omnitrain_jax.data import formats
from omnitrain_jax.data import readers
from omnitrain_jax.data import schema
from omnitrain_jax.data import tfds_readers


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One annotation source of a stream, paths resolved.

  Attributes:
    name: source name (records' ``source``, skip-count key).
    stream: ``det``, ``grd`` or ``img``.
    reader: a key of `READERS`.
    train: training annotation file (TFDS readers: the split name).
    val: validation annotation file, or TFDS split ("" when none).
    image_dir: image folder the annotations' file names are relative to.
    val_image_dir: image folder of the val file ("": `image_dir`), for
      datasets with separate train and val folders (COCO's train2017/,
      val2017/).
    weight: mixing weight within the stream.
    instances: RefCOCO only: the release's ``instances.json``.
    train_split: RefCOCO only: the refs' split for training.
    val_split: RefCOCO only: the refs' split for validation.
    data_dir: TFDS readers only: the TFDS data folder ("": TFDS's default).
    dataset: TFDS readers only: the TFDS name ("": the reader's default,
      ``lvis`` or ``ref_coco/refcocog_umd``).
    held_out_images: det sources only: COCO image ids of other sources'
      evaluation images (RefCOCO/+/g val/test are COCO train2014 images,
      many in COCO train2017), set by `preparation.prepare_data`; the train
      records showing them are dropped or reported (`held_out_policy`).
    held_out_policy: ``"drop"`` (the default: train without them) or
      ``"report"`` (train on them, log how many).
    held_out_from: what the held-out images are (for the messages).
  """
  name: str
  stream: str
  reader: str
  train: str
  val: str = ""
  image_dir: str = ""
  val_image_dir: str = ""
  weight: float = 1.0
  instances: str = ""
  train_split: str = "train"
  val_split: str = "val"
  data_dir: str = ""
  dataset: str = ""
  held_out_images: frozenset[int] = dataclasses.field(default=frozenset(),
                                                      repr=False)
  held_out_policy: str = "drop"
  held_out_from: str = ""


@dataclasses.dataclass(frozen=True)
class Reader:
  """An entry of the reader table.

  Attributes:
    stream: the stream of the records it gives.
    load: the loader, called as ``load(train or val, name=, strict=,
      counter=, **keywords)`` with the `keywords` it takes.
    prepare: how to prepare its input (printed when it is missing).
    keywords: which of the loader's keyword arguments come from the source's
      config (`loader_keywords` says from which field).
    files: ``train``/``val`` are files (resolved against ``data.root`` and
      checked to exist), else TFDS split names.
    shards: ``train``/``val`` are shard patterns (`formats.expand_shards`:
      globs, brace ranges, ``::``-joined), each part resolved against
      ``data.root``; at least one shard must exist.
  """
  stream: str
  load: Callable[..., readers.RecordSource]
  prepare: str
  keywords: tuple[str, ...] = ("image_dir",)
  files: bool = True
  shards: bool = False


_TFDS_PREPARE = ("prepare it as ArrayRecord with `tfds build {dataset} "
                 "--file_format=array_record --data_dir=DATA_DIR` and set "
                 "data_dir")

# Config reader name -> how to open it.
READERS: dict[str, Reader] = {
    "coco_instances": Reader(
        "det", readers.load_coco_instances, "download COCO-format instances "
        "JSON (e.g. annotations/instances_train2017.json)"),
    "lvis": Reader(
        "det", readers.load_lvis, "download lvis_v1_train.json / "
        "lvis_v1_val.json from lvisdataset.org"),
    "mdetr_grounding": Reader(
        "grd", readers.load_mdetr_grounding, "download MDETR's annotations "
        "(final_*.json, mdetr_annotations.tar.gz)"),
    "refcoco": Reader(
        "grd", readers.load_refcoco, "download the refer release (refcocog.zip"
        " with refs(umd).p and instances.json)",
        keywords=("image_dir", "instances_path", "split")),
    "coco_captions": Reader(
        "img", readers.load_coco_captions, "download COCO captions "
        "(annotations/captions_train2017.json)"),
    "caption_jsonl": Reader(
        "img", readers.load_caption_jsonl, "write one {\"image\": path, "
        "\"caption\": text} object per line"),
    "caption_csv": Reader(
        "img", readers.load_caption_csv, "write a CSV with a path,caption "
        "header"),
    "webdataset": Reader(
        "img", readers.load_webdataset, "write WebDataset tar shards (e.g. "
        "img2dataset --output_format webdataset) and give them as a glob or "
        "brace pattern ('shards/{00000..00099}.tar')",
        keywords=(), shards=True),
    "tfds_lvis": Reader(
        "det", tfds_readers.load_tfds_lvis,
        _TFDS_PREPARE.format(dataset="lvis"),
        keywords=("data_dir", "dataset"), files=False),
    "tfds_ref_coco": Reader(
        "grd", tfds_readers.load_tfds_ref_coco,
        _TFDS_PREPARE.format(dataset="ref_coco/refcocog_umd"),
        keywords=("data_dir", "dataset"), files=False),
}


def loader_keywords(spec: SourceSpec, split: str) -> dict[str, Any]:
  """The keyword arguments `spec`'s loader takes from its config.

  Args:
    spec: the source.
    split: ``"train"`` or ``"val"``.

  Returns:
    {keyword: value} for the keywords of ``READERS[spec.reader]``.
  """
  values = {
      "image_dir": (spec.val_image_dir or spec.image_dir) if split == "val"
                   else spec.image_dir,
      "instances_path": spec.instances,
      "split": spec.train_split if split == "train" else spec.val_split,
      "data_dir": spec.data_dir or None,
      "dataset": spec.dataset,
  }
  keywords = READERS[spec.reader].keywords
  assert set(keywords) <= set(values), (spec.reader, keywords)
  # An unset TFDS name leaves the loader's default (lvis, ref_coco/...).
  return {k: values[k] for k in keywords
          if not (k == "dataset" and not values[k])}


def open_source(spec: SourceSpec, split: str, *, strict: bool,
                counter: errors.SkipCounter | None = None
                ) -> readers.RecordSource:
  """Opens a source's ``"train"`` or ``"val"`` annotations.

  Args:
    spec: the source.
    split: ``"train"`` or ``"val"``.
    strict: raise on the first bad record (True) or skip and count it.
    counter: where skips are counted (a new one when None).

  Returns:
    Its `readers.RecordSource`.

  Raises:
    ValueError: the source has no such split.
  """
  target = spec.train if split == "train" else spec.val
  if not target:
    raise ValueError(f"Source {spec.name!r} ({spec.stream}) has no {split} "
                     f"{'file' if READERS[spec.reader].files else 'split'}; "
                     f"set data.sources.{spec.stream}.{spec.name}.{split}.")
  records = READERS[spec.reader].load(
      target, name=spec.name, strict=strict, counter=counter,
      **loader_keywords(spec, split))
  if split == "train" and spec.held_out_images:
    records = hold_out(records, spec, target)
  return records


def hold_out(records: readers.RecordSource, spec: SourceSpec, file: str
             ) -> readers.RecordSource:
  """Drops (or reports) the train records of `spec.held_out_images`.

  The images are matched by COCO image id, read from each record's file name
  (`readers.coco_image_id`, as MM-Grounding-DINO's COCO-minus-RefCOCO
  filter matches ids), so a custom dataset's own ids never match. Dropped
  images are counted as skips (reason "held out"), in both modes, and one
  warning gives the count.

  Returns:
    `records` without those images (``"drop"``), or `records` itself.
  """
  if not hasattr(records, "coco_image_ids"):
    raise ValueError(f"data.sources.{spec.stream}.{spec.name}: reader "
                     f"{spec.reader!r} cannot hold out images by COCO id.")
  ids = records.coco_image_ids()
  overlap = np.isin(ids, np.fromiter(spec.held_out_images, np.int64))
  n = int(overlap.sum())
  records.num_held_out = n
  if not n:
    return records
  if spec.held_out_policy == "report":
    logging.warning(
        "%s: %d of %d train images of %s are %s (train/eval leakage; kept "
        "because data.eval_overlap='report').", spec.name, n, len(ids), file,
        spec.held_out_from)
    return records
  counter = records.skipped
  for i in np.flatnonzero(overlap).tolist():
    counter.add(spec.name, errors.DataError(
        file, f"image {ids[i]}", f"held out: the image is {spec.held_out_from}",
        "none needed: data.eval_overlap='drop' keeps evaluation images out of "
        "training ('report' keeps them)"))
  kept = records.without_records(overlap)
  kept.num_held_out = n
  logging.warning(
      "%s: dropped %d of %d train images of %s: they are %s (train/eval "
      "leakage; data.eval_overlap='drop', counted as skips).", spec.name, n,
      len(ids), file, spec.held_out_from)
  return kept


def source_specs(config: Any, root: str) -> dict[str, dict[str, SourceSpec]]:
  """Resolves ``config.sources`` (relative paths against `root`).

  Args:
    config: ``config.data``.
    root: the folder relative paths are relative to.

  Returns:
    stream -> source name -> `SourceSpec`, every stream present.

  Raises:
    ValueError: an unknown stream or reader, or a reader of another stream.
  """

  def resolve(p):
    if not p:
      return ""
    p = os.path.expanduser(str(p))
    return p if os.path.isabs(p) else os.path.join(root, p)

  def resolve_shards(p):  # Each "::"-joined pattern on its own.
    return "::".join(resolve(q.strip()) for q in str(p).split("::")
                     if q.strip())

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
      if READERS[reader].stream != stream:
        raise ValueError(f"data.sources.{stream}.{name}: reader {reader!r} "
                         f"gives {READERS[reader].stream!r} records, not "
                         f"{stream!r}.")
      # TFDS readers' train/val are split names, not files.
      target = resolve if READERS[reader].files else str
      if READERS[reader].shards:
        target = resolve_shards
      out[stream][name] = SourceSpec(
          name=name, stream=stream, reader=reader,
          train=target(src.get("train", "")), val=target(src.get("val", "")),
          image_dir=resolve(src.get("image_dir", "")),
          val_image_dir=resolve(src.get("val_image_dir", "")),
          weight=float(src.get("weight", 1.0)),
          instances=resolve(src.get("instances", "")),
          train_split=src.get("train_split", "train"),
          val_split=src.get("val_split", "val"),
          data_dir=resolve(src.get("data_dir", "")),
          dataset=src.get("dataset", ""))
  return out


def check_files(sources: Mapping[str, Mapping[str, SourceSpec]],
                batch: Mapping[str, int]) -> None:
  """Checks that the inputs of every source of a trained stream exist.

  Args:
    sources: from `source_specs`.
    batch: ``config.data.batch`` (streams with 0 examples are not checked).

  Raises:
    ValueError: a trained stream without sources, or a source without train
      input.
    FileNotFoundError: a missing file or folder; the message says how to
      prepare it.
  """
  for stream, specs in sources.items():
    if not batch.get(stream, 0):
      continue
    if not specs:
      raise ValueError(f"data.batch.{stream}={batch[stream]} but "
                       f"data.sources.{stream} is empty; add a source or set "
                       f"data.batch.{stream}=0.")
    for spec in specs.values():
      reader = READERS[spec.reader]
      files = [("instances", spec.instances)]
      if reader.files:
        files = [("train", spec.train), ("val", spec.val)] + files
      for what, path in files:
        if path and reader.shards:
          if not any(os.path.exists(p) for p in formats.expand_shards(path)):
            raise FileNotFoundError(
                f"data.sources.{stream}.{spec.name}.{what}: no shard of "
                f"{path} exists. Prepare them: {reader.prepare}; or fix the "
                "pattern (relative paths are relative to data.root).")
          continue
        if path and not os.path.exists(path):
          raise FileNotFoundError(
              f"data.sources.{stream}.{spec.name}.{what}: {path} does not "
              f"exist. Prepare it: {reader.prepare}; or fix the path "
              "(relative paths are relative to data.root).")
      if not spec.train:
        raise ValueError(f"data.sources.{stream}.{spec.name} has no train "
                         f"{'file' if reader.files else 'split'}.")
      for what, folder in (("image_dir", spec.image_dir),
                           ("val_image_dir", spec.val_image_dir),
                           ("data_dir", spec.data_dir)):
        if folder and not os.path.isdir(folder):
          how = ("Download/extract the images there" if what != "data_dir"
                 else f"Prepare the dataset there ({reader.prepare})")
          raise FileNotFoundError(
              f"data.sources.{stream}.{spec.name}.{what}: {folder} is not a "
              f"folder. {how} or fix the path.")
