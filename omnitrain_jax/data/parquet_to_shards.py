r"""Parquet of (image bytes, caption) -> WebDataset tar shards, once.

    python -m omnitrain_jax.data.parquet_to_shards --out=cc12m_shards \
        cc12m/*.parquet [--image_column=jpg] [--caption_column=caption] \
        [--samples_per_shard=10000]

Training reads caption data at random (a shuffled `grain.MapDataset`), and a
parquet file gives no random access to one image: its images sit in row
groups of thousands (img2dataset's parquet output and Hugging Face's caption
datasets keep a whole shard in one), each compressed as a block. So the
parquet files are converted once into tar shards, which the ``webdataset``
reader indexes by byte offset (`readers.load_webdataset`); streaming row
groups instead would give up the pipeline's per-source shuffling and
checkpointed order.

Each row becomes ``KEY.jpg`` (the image bytes as stored; the extension only
names the member, the decoder reads the bytes' own format), ``KEY.txt`` (the
caption) and ``KEY.json`` (``caption``, ``width``, ``height`` and ``url``
when the row has them). The image column is ``jpg`` (img2dataset) or
``image`` (Hugging Face: bytes, or a struct with ``bytes``) unless
``--image_column`` says; a row whose image or caption is null keeps its other
members, so the reader reports it by its strict/lenient rules, naming the
shard and the key. Keys are the row's ``key`` column when present, else the
running row number (9 digits, as img2dataset numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
import io
import json
import os
import tarfile

from absl import app
from absl import flags

from omnitrain_jax.data import errors
from omnitrain_jax.data import formats

_IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp")
_META_COLUMNS = ("width", "height", "url")


def _image_bytes(value) -> bytes | None:
  if isinstance(value, dict):  # Hugging Face Image(): {"bytes", "path"}.
    value = value.get("bytes")
  return bytes(value) if isinstance(value, (bytes, bytearray)) else None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def convert(parquet_files: Sequence[str], out_dir: str, *,
            image_column: str = "", caption_column: str = "caption",
            samples_per_shard: int = 10_000, batch_size: int = 256
            ) -> list[str]:
  """Writes the rows of `parquet_files` as tar shards ``out_dir/00000.tar``...

  Args:
    parquet_files: the parquet files, read in order, row group by row group.
    out_dir: the shard folder (created).
    image_column: the column of image bytes ("": ``jpg`` or ``image``, the
      first present).
    caption_column: the caption column.
    samples_per_shard: rows per shard (img2dataset writes 10,000).
    batch_size: rows read at a time.

  Returns:
    The shard paths (give ``out_dir/{00000..NNNNN}.tar`` or ``out_dir/*.tar``
    to the ``webdataset`` reader).

  Raises:
    DataError: a file that is no parquet, or lacks the columns.
  """
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if samples_per_shard < 1:
    raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1.")
  os.makedirs(out_dir, exist_ok=True)
  shards, tar, row = [], None, 0
  try:
    for path in parquet_files:
      try:
        pf = pq.ParquetFile(path)
      except Exception as e:  # pyarrow raises several types for a bad file.
        raise errors.DataError(path, "file", f"not a parquet file ({e})",
                               "pass parquet files") from None
      names = pf.schema_arrow.names
      image = image_column or next(
          (c for c in _IMAGE_COLUMNS if c in names), "")
      for col, what in ((image, "--image_column"),
                        (caption_column, "--caption_column")):
        if col not in names:
          raise errors.DataError(
              path, "schema", f"no column {col!r} (columns: {names})",
              f"name the column with {what}")
      extra = [c for c in ("key", *_META_COLUMNS) if c in names]
      for batch in pf.iter_batches(batch_size=batch_size,
                                   columns=[image, caption_column, *extra]):
        for fields in batch.to_pylist():
          if row % samples_per_shard == 0:
            if tar is not None:
              tar.close()
            shards.append(os.path.join(
                out_dir, f"{row // samples_per_shard:05d}.tar"))
            tar = tarfile.open(shards[-1], "w", format=tarfile.USTAR_FORMAT)
          key = str(fields.get("key") or f"{row:09d}")
          data = _image_bytes(fields[image])
          if data is not None:
            _add(tar, f"{key}.jpg", data)
          caption = fields[caption_column]
          meta = {k: fields[k] for k in _META_COLUMNS if k in fields}
          if isinstance(caption, str):
            _add(tar, f"{key}.txt", caption.encode("utf-8"))
            meta["caption"] = caption
          _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
          row += 1
  finally:
    if tar is not None:
      tar.close()
  return shards


_OUT = flags.DEFINE_string("out", None, "Folder for the tar shards.",
                           required=True)
_IMAGE = flags.DEFINE_string("image_column", "", "Column of image bytes "
                             "(default: jpg or image, the first present).")
_CAPTION = flags.DEFINE_string("caption_column", "caption", "Caption column.")
_PER_SHARD = flags.DEFINE_integer("samples_per_shard", 10_000,
                                  "Rows per tar shard.")


def main(argv):
  patterns = argv[1:]
  if not patterns:
    raise app.UsageError("Give one or more parquet files (or globs).")
  files = [p for pat in patterns for p in formats.expand_shards(pat)]
  with errors.exit_on_user_errors((errors.DataError, FileNotFoundError,
                                   ValueError)):
    shards = convert(files, _OUT.value, image_column=_IMAGE.value,
                     caption_column=_CAPTION.value,
                     samples_per_shard=_PER_SHARD.value)
  print(json.dumps({"shards": len(shards), "first": shards[:1],
                    "pattern": os.path.join(_OUT.value, "*.tar")}))


if __name__ == "__main__":
  app.run(main)
