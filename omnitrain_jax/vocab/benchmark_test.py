"""Smoke test of benchmarks/vocab.py at tiny sizes (no timing checked)."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "vocab.py"


def test_vocab_benchmark_runs_at_tiny_scale():
  spec = importlib.util.spec_from_file_location("vocab_benchmark", _PATH)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.run(scale=0.001, repeats=1)
  size = out["build"]["size"]
  assert 100 < size <= 1100 and out["io"]["vocab_size"] == size
  assert [r["vocab_size"] for r in out["tokenize"]] == [min(1000, size), size]
  for row in out["tokenize"]:
    assert row["encode_phrases_per_s"] > 0 and row["naive_phrases_per_s"] > 0
    assert row["tokens_per_phrase"] > 1
