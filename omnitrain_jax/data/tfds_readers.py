"""Readers for TFDS-prepared datasets, through ``tfds`` data sources (no TF).

`tfds.data_source`-style random access reads ArrayRecord files without
TensorFlow for the ``lvis`` and ``ref_coco`` builders (measured with
tensorflow-datasets 4.9.10). ``coco`` and ``coco_captions`` are legacy builders
whose construction imports TensorFlow: `load_tfds` refuses them with a pointer
to the JSON readers, which read the same annotation files.

In a config, the reader table (`sources.READERS`) names them ``tfds_lvis``
and ``tfds_ref_coco``: ``train``/``val`` are TFDS split names, ``data_dir``
the TFDS data folder and ``dataset`` an optional other TFDS name::

  data.sources.det.lvis = dict(reader="tfds_lvis", data_dir="tfds",
                               train="train", val="validation")

Records follow `schema.py` (plus ``box_spans``, see `readers.py`): the image
stays encoded in ``image_bytes`` (``image_path`` is None) and is decoded by
`images.load_image`; TFDS boxes, normalized ``[ymin, xmin, ymax, xmax]``, are
turned into pixel ``x0, y0, x1, y1`` with the size read from the encoded
image's header (microseconds; the stored, pre-EXIF size, which is the size the
TFDS builders normalized by). Image and mask features are not decoded
(``SkipDecoding``); segmentation masks are ignored.

Validation: boxes are checked with `readers.check_boxes` when a record is
built (LVIS) or at construction (RefCOCO, which reads the split once anyway).
In lenient mode a bad box is dropped and counted in the source's
`SkipCounter`; counts made inside grain worker processes stay in those
processes (the builders' own checks make bad boxes rare: TFDS rejects
coordinates outside [0, 1] and min > max when preparing).

A source pickles without its TFDS handle and reopens the dataset on first use
after unpickling (grain worker processes).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from omnitrain_jax.data import errors
from omnitrain_jax.data import images
from omnitrain_jax.data import readers
from omnitrain_jax.data.errors import DataError, SkipCounter

# Builders whose construction imports TensorFlow, and the JSON reader to use.
_NEEDS_TENSORFLOW = {
    "coco": "readers.load_coco_instances (instances_*.json) or "
            "readers.load_coco_captions (captions_*.json)",
    "coco_captions": "readers.load_coco_captions (captions_*.json)",
}

_raw_bytes_decoder_cls = None


def _raw_bytes_decoder():
  """A decoder that returns encoded bytes, also inside ``Sequence`` features.

  ``tfds.decode.SkipDecoding`` lacks the numpy batch method that sequences
  (LVIS segmentation masks, RefCOCO masks) call; this adds it.
  """
  global _raw_bytes_decoder_cls
  if _raw_bytes_decoder_cls is None:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    class RawBytes(tfds.decode.SkipDecoding):

      def decode_batch_example_np(self, serialized):
        return serialized

    _raw_bytes_decoder_cls = RawBytes
  return _raw_bytes_decoder_cls()


def _builder_name(dataset: str) -> str:
  return dataset.split("/")[0].split(":")[0].strip()


def _refuse_legacy(dataset: str) -> None:
  name = _builder_name(dataset)
  if name in _NEEDS_TENSORFLOW:
    raise ValueError(
        f"TFDS dataset {dataset!r} is a legacy builder that needs TensorFlow, "
        "which this project does not install. Read the original annotation "
        f"files instead with omnitrain_jax.data.{_NEEDS_TENSORFLOW[name]}, or "
        "install tensorflow-cpu yourself to use it.")


def open_data_source(dataset: str, split: str, *, data_dir: str | None,
                     decoders: dict[str, Any]):
  """Opens a prepared TFDS split for random access; never downloads.

  Args:
    dataset: TFDS name, ``"name[/config][:version]"``.
    split: split name (``"train"``, ``"validation"``, ...; TFDS slicing
      syntax works too).
    data_dir: the TFDS data folder (TFDS's default when None).
    decoders: TFDS decoders for features to leave encoded.

  Returns:
    The TFDS data source (``__len__``, ``__getitem__``).

  Raises:
    ValueError: a legacy builder needing TensorFlow, or the dataset is not
      prepared in a random-access format under `data_dir`.
  """
  _refuse_legacy(dataset)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except ModuleNotFoundError as e:
    raise ValueError(f"TFDS dataset {dataset!r} needs {e.name!r} to be "
                     f"constructed: {e}. Use the JSON readers in "
                     "omnitrain_jax.data.readers instead.") from None
  if not builder.is_prepared():
    raise ValueError(
        f"TFDS dataset {dataset!r} is not prepared under {builder.data_dir}. "
        "Prepare it where TensorFlow-free random access works, e.g. "
        f"`tfds build {dataset} --file_format=array_record "
        f"--data_dir={data_dir or '~/tensorflow_datasets'}` (manual downloads "
        "as the builder's instructions say), or pass the data_dir that holds "
        "it.")
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError as e:
    raise ValueError(
        f"TFDS dataset {dataset!r} under {builder.data_dir} is not in a "
        f"random-access format: {e}. Re-prepare it with "
        "--file_format=array_record.") from None


class _TfdsSource(readers.RecordSource):
  """Shared handle management: reopen the TFDS source after unpickling."""

  def __init__(self, *, dataset, split, data_dir, mask_key, name, stream,
               strict, counter):
    counter = SkipCounter() if counter is None else counter
    super().__init__(name=name, stream=stream, skipped=counter, num_skipped=0)
    self.dataset, self.split, self.data_dir = dataset, split, data_dir
    self._mask_key = mask_key
    self._strict = strict
    self._ds = None

  @property
  def tfds_source(self):
    """The underlying TFDS data source (opened on first use)."""
    if self._ds is None:
      self._ds = open_data_source(self.dataset, self.split,
                                  data_dir=self.data_dir,
                                  decoders=_decoders(self._mask_key))
    return self._ds

  def __getstate__(self):
    state = super().__getstate__()
    state["_ds"] = None  # Reopened lazily: its decoder class is local.
    return state

  def _where(self) -> str:
    return f"tfds:{self.dataset}[{self.split}]"

  def _size(self, data: bytes, index: int, image_id: int) -> tuple[int, int]:
    try:
      return images.image_size(data)
    except ValueError as e:
      raise DataError(self._where(), f"example {index} (image/id "
                      f"{image_id})", f"corrupt image: {e}",
                      "re-prepare the dataset, or set strict=False to skip "
                      "such records") from None

  def _report(self, record: str, problem: str) -> None:
    errors.handle(DataError(self._where(), record, problem,
                            "re-prepare the dataset from fixed annotations, "
                            "or set strict=False to skip it"),
                  strict=self._strict, counter=self.skipped, source=self.name)


def _pixel_boxes(bboxes, width: int, height: int) -> np.ndarray:
  """TFDS normalized [ymin, xmin, ymax, xmax] -> pixel x0, y0, x1, y1."""
  b = np.asarray(bboxes, np.float64).reshape(-1, 4)
  return b[:, [1, 0, 3, 2]] * np.array([width, height, width, height])


def _decoders(mask_key: str) -> dict[str, Any]:
  """Leaves the image and the per-object masks encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return {"image": tfds.decode.SkipDecoding(),
          "objects": {mask_key: _raw_bytes_decoder()}}


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsLvisSource(_TfdsSource):
  """LVIS from TFDS (``lvis``), one det record per image."""

  def __init__(self, split: str, *, data_dir=None, dataset="lvis",
               name="lvis", strict=True, counter=None):
    super().__init__(dataset=dataset, split=split, data_dir=data_dir,
                     mask_key="segmentation", name=name,
                     stream="det", strict=strict, counter=counter)
    labels = self.tfds_source.dataset_info.features["objects"]["label"]
    # The TFDS builder stores label = LVIS category id - 1; records use the
    # LVIS ids so that results match the LVIS JSON for evaluation.
    self.category_names = {i + 1: n.replace("_", " ").strip()
                           for i, n in enumerate(labels.names)}

  def __len__(self) -> int:
    return len(self.tfds_source)

  def _record(self, index: int) -> dict[str, Any]:
    ex = self.tfds_source[index]
    data = ex["image"]
    image_id = int(ex["image/id"])
    height, width = self._size(data, index, image_id)
    objects = ex["objects"]
    xyxy = _pixel_boxes(objects["bbox"], width, height)
    boxes, codes = readers.check_boxes(xyxy, width, height)
    ann_ids = [int(i) for i in objects["id"]]
    for b in np.flatnonzero(codes):
      self._report(f"example {index} (image/id {image_id}) "
                   f"annotation id {ann_ids[b]}",
                   readers.box_problem(codes[b], xyxy[b], width, height))
    keep = codes == readers.BOX_OK
    cats = [int(c) + 1 for c, k in zip(objects["label"], keep) if k]
    names = self.category_names
    n = len(cats)
    return {
        "stream": "det",
        "source": self.name,
        "image_id": image_id,
        "image_path": None,
        "image_bytes": bytes(data),
        "width": width,
        "height": height,
        "boxes": boxes[keep].reshape(n, 4),
        "box_texts": [names[c] for c in cats],
        "category_ids": np.asarray(cats, np.int32).reshape(n),
        "phrase_ids": np.arange(n, dtype=np.int32),
        "caption": "",
        "neg_texts": [names[int(c) + 1] for c in ex["neg_category_ids"]],
        "not_exhaustive_texts": [names[int(c) + 1] for c in
                                 ex["not_exhaustive_category_ids"]],
        "box_spans": [[] for _ in range(n)],
    }


class TfdsRefCocoSource(_TfdsSource):
  """RefCOCO/+/g from TFDS (``ref_coco/<config>``), one grd record per
  referring expression.

  The split is read once at construction to index (example, object,
  expression) triples and to validate boxes and texts (image bytes are not
  decoded; about one pass over the files).
  """

  def __init__(self, split: str, *, data_dir=None,
               dataset="ref_coco/refcocog_umd", name="refcocog", strict=True,
               counter=None):
    super().__init__(dataset=dataset, split=split, data_dir=data_dir,
                     mask_key="mask", name=name, stream="grd",
                     strict=strict, counter=counter)
    ds = self.tfds_source
    index, sizes = [], []
    for e in range(len(ds)):
      ex = ds[e]
      image_id = int(ex["image/id"])
      height, width = self._size(ex["image"], e, image_id)
      objects = ex["objects"]
      xyxy = _pixel_boxes(objects["bbox"], width, height)
      _, codes = readers.check_boxes(xyxy, width, height)
      raws = objects["refexp"]["raw"]
      for o in range(len(xyxy)):
        rec = (f"example {e} (image/id {image_id}) object id "
               f"{int(objects['id'][o])}")
        if codes[o]:
          self._report(rec, readers.box_problem(codes[o], xyxy[o], width,
                                                   height))
          self.num_skipped += 1
          continue
        for r, raw in enumerate(raws[o]):
          if not _text(raw).strip():
            self._report(f"{rec} refexp {r}",
                         "bad caption: empty referring expression")
            self.num_skipped += 1
            continue
          index.append((e, o, r))
      sizes.append((height, width))
    self._index = np.asarray(index, np.int32).reshape(-1, 3)
    self._sizes = np.asarray(sizes, np.int32).reshape(-1, 2)

  def __len__(self) -> int:
    return len(self._index)

  def _record(self, index: int) -> dict[str, Any]:
    e, o, r = (int(v) for v in self._index[index])
    ex = self.tfds_source[e]
    height, width = (int(v) for v in self._sizes[e])
    objects = ex["objects"]
    xyxy = _pixel_boxes(objects["bbox"][o], width, height)
    boxes, _ = readers.check_boxes(xyxy, width, height)
    caption = _text(objects["refexp"]["raw"][o][r]).strip()
    return {
        "stream": "grd",
        "source": self.name,
        "image_id": int(ex["image/id"]),
        "image_path": None,
        "image_bytes": bytes(ex["image"]),
        "width": width,
        "height": height,
        "boxes": boxes,
        "box_texts": [caption],
        "category_ids": np.full((1,), -1, np.int32),
        "phrase_ids": np.zeros((1,), np.int32),
        "caption": caption,
        "neg_texts": [],
        "not_exhaustive_texts": [],
        "box_spans": [[[0, len(caption)]]],
    }


def load_tfds_lvis(split: str, *, data_dir: str | os.PathLike | None = None,
                   dataset: str = "lvis", name: str = "lvis",
                   strict: bool = True,
                   counter: SkipCounter | None = None) -> TfdsLvisSource:
  """LVIS prepared by TFDS (ArrayRecord), one det record per image.

  ``category_ids`` are LVIS ids (TFDS label + 1). TFDS does not store the
  categories' frequency groups: ``category_frequency`` is None (evaluate
  against the LVIS JSON, which has them).

  Args:
    split: TFDS split (``train``, ``validation``, ``minival``, ...).
    data_dir: the TFDS data folder (TFDS's default when None).
    dataset: TFDS name, with optional version (``lvis:1.4.0``).
    name: source name.
    strict: raise on a bad box (True) or drop and count it.
    counter: where skips are counted (a new one when None).

  Returns:
    A det `RecordSource`.
  """
  return TfdsLvisSource(split, data_dir=_path(data_dir), dataset=dataset,
                        name=name, strict=strict, counter=counter)


def load_tfds_ref_coco(split: str, *,
                       data_dir: str | os.PathLike | None = None,
                       dataset: str = "ref_coco/refcocog_umd",
                       name: str = "refcocog", strict: bool = True,
                       counter: SkipCounter | None = None
                       ) -> TfdsRefCocoSource:
  """RefCOCO/+/g prepared by TFDS, one grd record per referring expression.

  Args:
    split: TFDS split (``train``, ``validation``, ``test``, ``testA``, ...).
    data_dir: the TFDS data folder (TFDS's default when None).
    dataset: ``ref_coco/<config>``: refcoco_unc, refcoco_google,
      refcocoplus_unc, refcocog_google, refcocog_umd.
    name: source name.
    strict: raise on a bad box or empty expression (True) or skip and count.
    counter: where skips are counted (a new one when None).

  Returns:
    A grd `RecordSource`.
  """
  return TfdsRefCocoSource(split, data_dir=_path(data_dir), dataset=dataset,
                           name=name, strict=strict, counter=counter)


_LOADERS = {"lvis": load_tfds_lvis, "ref_coco": load_tfds_ref_coco}


def load_tfds(dataset: str, split: str, *,
              data_dir: str | os.PathLike | None = None, **kwargs
              ) -> readers.RecordSource:
  """Dispatches on the TFDS builder name (``lvis``, ``ref_coco/...``).

  Args:
    dataset: TFDS name, ``"name[/config][:version]"``.
    split: TFDS split.
    data_dir: the TFDS data folder.
    **kwargs: ``name``, ``strict``, ``counter`` of the specific loader.

  Returns:
    The dataset's `RecordSource`.

  Raises:
    ValueError: an unsupported builder (legacy ``coco``/``coco_captions``
      need TensorFlow: the message names the JSON reader to use).
  """
  _refuse_legacy(dataset)
  builder = _builder_name(dataset)
  if builder not in _LOADERS:
    raise ValueError(f"TFDS dataset {dataset!r} has no record mapping; "
                     f"supported builders: {sorted(_LOADERS)}. Use the JSON "
                     "readers in omnitrain_jax.data.readers for other data.")
  return _LOADERS[builder](split, data_dir=data_dir, dataset=dataset, **kwargs)


def _path(p) -> str | None:
  return None if p is None else os.fspath(p)
