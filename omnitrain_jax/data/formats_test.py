"""Tests of the format sniffer and the shared file parsers."""

import io
import json
import pickle
import tarfile

import pytest

from omnitrain_jax.data import formats
from omnitrain_jax.data.errors import DataError


def _write(path, obj):
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return path


def test_sniffs_every_format(tmp_path):
  cats = [{"id": 1, "name": "person"}]
  files = {
      "coco_instances": _write(tmp_path / "coco.json", {
          "images": [{"id": 1}], "annotations": [], "categories": cats}),
      "lvis": _write(tmp_path / "lvis.json", {
          "images": [{"id": 1, "neg_category_ids": []}], "annotations": [],
          "categories": cats}),
      "mdetr_grounding": _write(tmp_path / "mdetr.json", {
          "images": [{"id": 1, "caption": "a man"}], "annotations": []}),
      "coco_captions": _write(tmp_path / "caps.json", {
          "images": [], "annotations": [{"image_id": 1, "caption": "a"}]}),
      "caption_jsonl": _write(tmp_path / "caps.jsonl",
                              '{"image": "a.jpg", "caption": "a"}\n'),
      "caption_csv": _write(tmp_path / "caps.csv", "path,caption\na.jpg,a\n"),
      "caption_json_list": _write(tmp_path / "list.json", [{"caption": "a"}]),
  }
  refs = tmp_path / "refs(umd).p"
  refs.write_bytes(pickle.dumps([{"sentences": []}], protocol=2))
  files["refcoco"] = refs
  shard = tmp_path / "00000.tar"
  with tarfile.open(shard, "w") as tar:
    info = tarfile.TarInfo("000000000.txt")
    info.size = 1
    tar.addfile(info, io.BytesIO(b"a"))
  files["webdataset"] = shard
  assert set(files) == set(formats.FORMATS)
  for want, path in files.items():
    assert formats.sniff_format(path) == want, path
  # LVIS is recognized by its categories too; JSONL without its suffix by
  # its several values or a caption key.
  lvis_cats = _write(tmp_path / "l2.json", {
      "images": [], "annotations": [],
      "categories": [{"id": 1, "name": "a", "frequency": "r"}]})
  assert formats.sniff_format(lvis_cats) == "lvis"
  two = _write(tmp_path / "two.json", '{"caption": "a"}\n{"caption": "b"}\n')
  doc = formats.parse(two)
  assert doc.format == "caption_jsonl"
  assert doc.content == [(1, {"caption": "a"}), (2, {"caption": "b"})]
  one = _write(tmp_path / "one.json", {"caption": "a"})
  assert formats.parse(one).content == [(1, {"caption": "a"})]


def test_parsed_contents(tmp_path):
  table = formats.parse(_write(tmp_path / "c.csv",
                               'path,Caption\na.jpg,"x, y"\r\nb.jpg,z\n'))
  assert table.content == formats.CsvTable(
      header=("path", "Caption"),
      rows=({"path": "a.jpg", "Caption": "x, y"},
            {"path": "b.jpg", "Caption": "z"}))
  lines = formats.parse(_write(tmp_path / "c.jsonl",
                               '{"a": 1}\r\n\n{"a": 2}\r\n'))
  assert lines.content == [(1, {"a": 1}), (3, {"a": 2})]


@pytest.mark.parametrize("name,content,match", [
    ("a.json", '{"info": {}}', "unrecognized keys"),
    ("a.json", '{"broken": ', "not valid JSON"),
    ("a.jsonl", '{"a": 1}\n{"a": \n', "line 2 column"),
    ("a.json", b"\xff\xfe{}", "not UTF-8 text"),
    ("a.p", b"\x80\x02cos\ngetcwd\nq\x00.", "refusing to load os.getcwd"),
    ("b.p", pickle.dumps({"a": 1}, protocol=2), "not a refs file"),
])
def test_bad_files_name_the_file_and_the_formats(tmp_path, name, content,
                                                 match):
  path = tmp_path / name
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  with pytest.raises(DataError, match=match) as e:
    formats.sniff_format(path)
  assert str(path) in str(e.value)


def test_unreadable_file(tmp_path):
  with pytest.raises(DataError, match="cannot read it"):
    formats.parse(tmp_path / "missing.json")
  with pytest.raises(DataError, match="missing annotation file"):
    formats.load_json(tmp_path / "missing.json")
  with pytest.raises(DataError, match="missing refs file"):
    formats.load_refs(tmp_path / "missing.p")


def test_expand_shards_braces_globs_and_lists(tmp_path):
  for i in (0, 1, 2, 10):
    (tmp_path / f"{i:05d}.tar").write_bytes(b"")
  d = str(tmp_path)
  assert formats.expand_shards(f"{d}/{{00000..00002}}.tar") == [
      f"{d}/{i:05d}.tar" for i in range(3)]
  assert formats.expand_shards(f"{d}/*.tar") == [
      f"{d}/{i:05d}.tar" for i in (0, 1, 2, 10)]
  assert formats.expand_shards("s/{a,b}-{8..10}.tar") == [
      "s/a-8.tar", "s/a-9.tar", "s/a-10.tar", "s/b-8.tar", "s/b-9.tar",
      "s/b-10.tar"]
  # Several patterns joined by "::"; a plain missing path is kept (the
  # reader reports it), a glob that matches nothing gives nothing.
  assert formats.expand_shards(f"{d}/00010.tar::x/1.tar::{d}/none*.tar") == [
      f"{d}/00010.tar", "x/1.tar"]
