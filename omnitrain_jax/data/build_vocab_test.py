"""Tests for the vocabulary command line (`python -m
omnitrain_jax.data.build_vocab`)."""

import json
import subprocess
import sys

from omnitrain_jax.data import vocab_inputs_test
from omnitrain_jax.vocab.vocabulary import Vocabulary

COLORS = vocab_inputs_test.COLORS
_shapes = vocab_inputs_test._shapes
_coco = vocab_inputs_test._coco


def test_cli_writes_vocab_and_prints_summary(tmp_path):
  out = tmp_path / "vocab.txt"
  jsonl = tmp_path / "caps.jsonl"
  jsonl.write_text('{"image": "a.jpg", "caption": "a red star"}\n')
  proc = subprocess.run(
      [sys.executable, "-m", "omnitrain_jax.data.build_vocab",
       f"--out={out}", "--max_size=50", str(_shapes(tmp_path)),
       str(_coco(tmp_path)), str(jsonl)], capture_output=True, text=True,
      check=False, timeout=120)
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout)
  vocab = Vocabulary.load(out)
  assert summary["size"] == len(vocab)
  assert {"red", "circle", "hot dog", "person"} <= set(vocab.tokens)
  assert vocab.counts[vocab.id("star")] == len(COLORS) + 1
  assert [f["format"] for f in summary["files"]] == [
      "coco_instances", "coco_instances", "caption_jsonl"]
  # Bad input: a clear error and a non-zero exit, no traceback.
  bad = tmp_path / "bad.json"
  bad.write_text("{}")
  proc = subprocess.run(
      [sys.executable, "-m", "omnitrain_jax.data.build_vocab",
       f"--out={out}", str(bad)], capture_output=True, text=True,
      check=False, timeout=120)
  assert proc.returncode != 0
  assert "bad.json" in proc.stderr and "Traceback" not in proc.stderr


def test_a_numeric_caption_is_an_error_or_with_nostrict_a_counted_skip(
    tmp_path):
  out = tmp_path / "vocab.txt"
  jsonl = tmp_path / "caps.jsonl"
  jsonl.write_text('{"image": "a.jpg", "caption": "a red star"}\n'
                   '{"image": "b.jpg", "caption": 7}\n')
  cmd = [sys.executable, "-m", "omnitrain_jax.data.build_vocab",
         f"--out={out}", "--max_size=50", str(jsonl)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        timeout=120)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: ") and "caps.jsonl: line 2" in last, last
  # The advice names this binary's option, not the config's.
  assert "--nostrict" in last and "strict=False" not in last, last
  assert "Traceback" not in proc.stderr
  proc = subprocess.run(cmd + ["--nostrict"], capture_output=True, text=True,
                        check=False, timeout=120)
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout)
  assert summary["skipped"] == {"vocabulary/bad caption": 1}
  assert "star" in Vocabulary.load(out).tokens
  assert "skipped 1 bad record" in proc.stderr
