"""Tests for context.py: where evaluation and prediction find the vocabulary."""

import ml_collections
import pytest

from omnitrain_jax import vocab_transfer
from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema
from omnitrain_jax.evaluation import context
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib


def _config(path=""):
  return ml_collections.ConfigDict({"data": {"vocab": {"path": path}}})


def _info(vocab, path):
  return preparation.DataInfo(
      root="", sources={}, vocab_path=str(path), vocab=vocab,
      tokenizer=tokenizer_lib.Tokenizer(vocab), spec=schema.Spec())


def test_resolve_vocab_order(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  config_vocab, flag_vocab = tmp_path / "config.txt", tmp_path / "flag.txt"
  for path in (config_vocab, flag_vocab):
    vocabulary_lib.Vocabulary(["a"]).save(path)
  # No workdir copy: the config's file, then a default.
  assert context.resolve_vocab(str(workdir), _config(str(config_vocab))) == (
      str(config_vocab))
  assert context.resolve_vocab(str(workdir), _config(), default=str(
      flag_vocab)) == str(flag_vocab)
  run_vocab = vocab_transfer.workdir_vocab_path(workdir)
  vocabulary_lib.Vocabulary(["a"]).save(run_vocab)
  # The run's own copy beats the config; --vocab beats both.
  assert context.resolve_vocab(str(workdir), _config(str(config_vocab))) == (
      run_vocab)
  assert context.resolve_vocab(str(workdir), _config(str(config_vocab)),
                               str(flag_vocab)) == str(flag_vocab)
  with pytest.raises(FileNotFoundError, match="--vocab="):
    context.resolve_vocab(str(workdir), _config(), str(tmp_path / "no.txt"))


def test_with_run_vocab_replaces_vocabulary_and_tokenizer(tmp_path):
  built = vocabulary_lib.Vocabulary(["red", "circle"])
  built_path = tmp_path / "built.txt"
  built.save(built_path)
  info = _info(built, built_path)
  workdir = tmp_path / "run"
  workdir.mkdir()
  # Same tokens in the run's copy: nothing changes.
  built.save(vocab_transfer.workdir_vocab_path(workdir))
  assert context.with_run_vocab(info, str(workdir), _config()) is info
  grown = vocabulary_lib.Vocabulary(["red", "circle", "lemon"])
  grown_path = tmp_path / "grown.txt"
  grown.save(grown_path)
  got = context.with_run_vocab(info, str(workdir), _config(), str(grown_path))
  assert got.vocab.tokens == grown.tokens and got.vocab_path == str(grown_path)
  assert got.tokenizer.encode("a lemon").ids == [grown.id("lemon")]
  assert got.spec == info.spec and got.sources == info.sources
