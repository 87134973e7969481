"""Tests of the parquet -> tar shards conversion, read back by the reader."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnitrain_jax.data import images
from omnitrain_jax.data import parquet_to_shards
from omnitrain_jax.data import readers
from omnitrain_jax.data import readers_test
from omnitrain_jax.data.errors import DataError, SkipCounter


def test_img2dataset_parquet_to_shards_and_back(tmp_path):
  # img2dataset's parquet output: one row per sample, the image in "jpg".
  rows = [{"key": f"{k:09d}", "url": f"https://example.com/{k}.jpg",
           "caption": f"a kite number {k}", "status": "success",
           "width": 16, "height": 12,
           "jpg": readers_test._jpeg_bytes(16, 12)} for k in range(5)]
  rows[3]["caption"] = None  # A row without a caption.
  path = tmp_path / "00000.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
  shards = parquet_to_shards.convert([str(path)], str(tmp_path / "out"),
                                     samples_per_shard=2, batch_size=3)
  assert [s.rsplit("/", 1)[1] for s in shards] == [
      "00000.tar", "00001.tar", "00002.tar"]
  pattern = str(tmp_path / "out" / "{00000..00002}.tar")
  with pytest.raises(DataError, match="missing caption") as e:
    readers.load_webdataset(pattern)
  assert e.value.file == shards[1] and e.value.record == "key '000000003'"
  counter = SkipCounter()
  src = readers.load_webdataset(pattern, strict=False, counter=counter,
                                name="cc")
  assert [r["caption"] for r in src] == [
      "a kite number 0", "a kite number 1", "a kite number 2",
      "a kite number 4"]
  assert counter.counts() == {"cc/missing caption": 1}
  assert [r["image_id"] for r in src] == [0, 1, 2, 4]
  assert (src[3]["width"], src[3]["height"]) == (16, 12)
  assert images.decode_record(src[3])["image"].shape == (12, 16, 3)


def test_hugging_face_image_struct_and_bad_columns(tmp_path):
  image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  table = pa.table({
      "image": pa.array([{"bytes": readers_test._jpeg_bytes(8, 8),
                          "path": "a.jpg"}], type=image),
      "text": ["a red kite"]})
  path = tmp_path / "train-00000-of-00001.parquet"
  pq.write_table(table, path)
  with pytest.raises(DataError, match=r"no column 'caption'.*--caption_column"):
    parquet_to_shards.convert([str(path)], str(tmp_path / "x"))
  shards = parquet_to_shards.convert([str(path)], str(tmp_path / "out"),
                                     caption_column="text")
  rec = readers.load_webdataset(shards[0])[0]
  assert rec["caption"] == "a red kite" and rec["image_id"] == 0
  assert images.decode_record(rec)["image"].shape == (8, 8, 3)
  not_parquet = tmp_path / "x.parquet"
  not_parquet.write_bytes(b"not parquet")
  with pytest.raises(DataError, match="not a parquet file"):
    parquet_to_shards.convert([str(not_parquet)], str(tmp_path / "y"))
