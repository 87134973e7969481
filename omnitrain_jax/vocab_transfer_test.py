"""Tests for vocab_transfer.py on hand-built tables, and the restore path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnitrain_jax import checkpointing
from omnitrain_jax import vocab_transfer
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

D = 4


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _source():
  # Rows of different lengths, so normalising before averaging matters.
  vocab = vocabulary_lib.Vocabulary(
      ["red", "circle", "star", "left", "rare"], counts=[9, 8, 7, 6, 0])
  table = np.array([
      [0.0, 0.0, 0.0, 9.0],   # <pad>
      [0.0, 0.0, 7.0, 0.0],   # <unk>
      [2.0, 0.0, 0.0, 0.0],   # red
      [0.0, 1.0, 0.0, 0.0],   # circle
      [0.0, 0.0, 3.0, 0.0],   # star
      [1.0, 1.0, 0.0, 0.0],   # left
      [0.0, 0.0, 0.0, 5.0],   # rare (count 0: not a trained row)
  ], np.float32)
  return vocab, table


def test_shared_rows_are_copied_and_reserved_ids_kept():
  source, table = _source()
  # Reordered, one dropped ("left"), "rare" kept.
  target = vocabulary_lib.Vocabulary(["star", "rare", "red", "circle"])
  new, report = vocab_transfer.transfer_table(table, source, target)
  assert new.shape == (len(target), D) and new.dtype == np.float32
  for token in target.tokens:  # Reserved tokens included, bit for bit.
    np.testing.assert_array_equal(new[target.id(token)],
                                  table[source.id(token)])
  np.testing.assert_array_equal(new[:2], table[:2])
  assert report.kept == 4 and report.added == () and report.from_pieces == ()
  assert report.dropped == ("left",)
  assert not report.same_ids


def test_new_rows_follow_the_documented_initialisation():
  source, table = _source()
  target = vocabulary_lib.Vocabulary(
      ["red", "lemon", "red circle", "red lemon", "star", "kite"])
  new, report = vocab_transfer.transfer_table(table, source, target)
  trained = table[2:6].astype(np.float64)  # count > 0: not "rare".
  mean = _unit(_unit(trained).mean(0))
  norm = np.median(np.linalg.norm(trained, axis=-1))
  np.testing.assert_allclose(
      new[target.id("red circle")],
      _unit(_unit(table[source.id("red")]) + _unit(table[source.id(
          "circle")])) * norm, rtol=1e-6)
  # An unknown word contributes the mean direction.
  np.testing.assert_allclose(
      new[target.id("red lemon")],
      _unit(_unit(table[source.id("red")]) + mean) * norm, rtol=1e-6)
  for word in ("lemon", "kite"):  # No known piece: the mean direction.
    np.testing.assert_allclose(new[target.id(word)], mean * norm, rtol=1e-6)
  np.testing.assert_array_equal(new[target.id("star")],
                                table[source.id("star")])
  # The mean direction is not the (unused) row of the untrained "rare".
  assert abs(mean @ _unit(table[source.id("rare")])) < 0.5
  assert report.added == ("lemon", "red circle", "red lemon", "kite")
  assert report.from_pieces == ("red circle", "red lemon")
  assert report.dropped == ("circle", "left", "rare")
  assert report.kept == 2
  assert (report.source_size, report.target_size) == (7, 8)


def test_all_rows_count_when_no_count_is_positive():
  vocab = vocabulary_lib.Vocabulary(["a", "b"])  # Hand-written: counts 0.
  table = np.array([[0, 0], [0, 0], [1, 0], [0, 3]], np.float32)
  new, _ = vocab_transfer.transfer_table(
      table, vocab, vocabulary_lib.Vocabulary(["a", "b", "c"]))
  np.testing.assert_allclose(new[4], _unit([1, 1]) * 2.0, rtol=1e-6)


def test_identical_vocabularies_and_a_mismatched_table():
  source, table = _source()
  new, report = vocab_transfer.transfer_table(table, source, source)
  np.testing.assert_array_equal(new, table)
  assert report.same_ids and report.kept == 5
  assert not report.added and not report.dropped
  with pytest.raises(ValueError, match="not the one this table"):
    vocab_transfer.transfer_table(table[:5], source, source)


def test_summary_names_counts_and_examples():
  source, table = _source()
  target = vocabulary_lib.Vocabulary(
      ["red"] + [f"new{i}" for i in range(7)] + ["red circle"])
  _, report = vocab_transfer.transfer_table(table, source, target)
  line = report.summary()
  assert "token rows 7 -> 11" in line
  assert "1 kept" in line and "8 new" in line
  assert "'new0'" in line and "'new4'" in line and "'new5'" not in line
  assert "3 more" in line
  assert "1 from their word pieces ('red circle')" in line
  assert "4 dropped ('circle', 'star', 'left', 'rare')" in line
  assert report.to_json()["added"][0] == "new0"


def _params(table):
  return {"params": {checkpointing.TOKEN_TABLE: jnp.asarray(table),
                     "w": jnp.arange(3.0)}}


def _abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def test_restore_matches_token_rows_by_string(tmp_path, monkeypatch):
  source, table = _source()
  run = tmp_path / "run"
  with checkpointing.Checkpointer(run, save_every_steps=1) as ckpt:
    ckpt.maybe_save(3, _params(table))
  target = vocabulary_lib.Vocabulary(["star", "red circle", "red"])
  abstract = _abstract(_params(np.zeros((len(target), D), np.float32)))
  # No vocab.txt in the source workdir: the rows cannot be matched.
  with pytest.raises(checkpointing.CheckpointError, match="keeps no vocab.txt"):
    checkpointing.restore_params_from(run, abstract, vocab=target)
  source.save(vocab_transfer.workdir_vocab_path(run))
  got = checkpointing.restore_params_from(run, abstract, vocab=target)
  expected, report = vocab_transfer.transfer_table(table, source, target)
  np.testing.assert_array_equal(
      got.state["params"][checkpointing.TOKEN_TABLE], expected)
  np.testing.assert_array_equal(got.state["params"]["w"], np.arange(3.0))
  assert got.vocab_report == report and report.added == ("red circle",)
  monkeypatch.chdir(tmp_path)  # A relative init_from (orbax wants absolute).
  relative = checkpointing.restore_params_from("run", abstract, vocab=target)
  np.testing.assert_array_equal(
      relative.state["params"][checkpointing.TOKEN_TABLE], expected)
  # Evaluation / prediction read the same way.
  params, step = checkpointing.restore_params(str(run), abstract,
                                              vocab=target)
  assert step == 3
  np.testing.assert_array_equal(params[checkpointing.TOKEN_TABLE], expected)
  # The same vocabulary: the table as saved, no report.
  same = checkpointing.restore_params_from(run, _abstract(_params(table)),
                                           vocab=source)
  assert same.vocab_report is None
  np.testing.assert_array_equal(
      same.state["params"][checkpointing.TOKEN_TABLE], table)
