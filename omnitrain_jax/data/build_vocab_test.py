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
