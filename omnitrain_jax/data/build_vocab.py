r"""Builds a vocabulary file from training annotations.

    python -m omnitrain_jax.data.build_vocab --out=vocab.txt --max_size=200000 \
        instances_train2017.json lvis_v1_train.json \
        final_flickr_separateGT_train.json captions_train2017.json \
        refs\(umd\).p laion_subset.jsonl

Each file's format is sniffed from its content (`formats.sniff_format`; what
is taken from each format: `vocab_inputs`). Category names become concepts
(multi-word names stay whole unless they are compositional in their dataset,
see `vocab.builder`; `--split_categories` splits them all), caption and phrase
words are counted, and the vocabulary is the category concepts followed by the
most frequent words (and, with `--min_bigram_count`, collocated bigrams),
`--max_size` tokens in all. Prints a JSON summary on stdout. Bad input ends it
with one ``Error:`` line naming the file and entry (exit code 1); with
``--nostrict`` captions that are no text (a number) are skipped and counted
instead (``skipped`` in the summary, and a report in the log).
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging

from omnitrain_jax.data import errors
from omnitrain_jax.data import vocab_inputs

_OUT = flags.DEFINE_string("out", None, "Vocabulary file to write.",
                           required=True)
_MAX_SIZE = flags.DEFINE_integer(
    "max_size", 200_000, "Most tokens in total, the 2 reserved ids included "
    "(category concepts are kept even beyond it).")
_SPLIT = flags.DEFINE_boolean(
    "split_categories", False, "Split every multi-word category name into "
    "its words instead of applying the compositionality rule.")
_MIN_COUNT = flags.DEFINE_integer(
    "min_count", 1, "Drop caption words seen fewer times.")
_MIN_PARTNERS = flags.DEFINE_integer(
    "min_partners", 2, "A multi-word category name is split when its "
    "dataset's names form a grid around it: each word swappable with this "
    "many other categories, and the swaps combining in this many (see "
    "vocab/builder.py).")
_MIN_BIGRAM = flags.DEFINE_integer(
    "min_bigram_count", 0, "Add adjacent caption word pairs seen at least "
    "this often (and collocated) as concepts; 0 disables.")
_BIGRAM_NPMI = flags.DEFINE_float(
    "bigram_min_npmi", 0.5, "Normalized PMI in [-1, 1] a bigram needs.")
_STRICT = flags.DEFINE_boolean(
    "strict", True, "A caption or sentence that is no text is an error; "
    "--nostrict skips it and counts it (the summary's 'skipped').")


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("Give one or more annotation files after the flags.")
  skips = errors.SkipCounter()
  # Bad input (DataError too): one line saying which and why, exit code 1.
  with errors.exit_on_user_errors((errors.DataError, FileNotFoundError,
                                   ValueError), lenient="--nostrict"):
    vocab, summary = vocab_inputs.build_from_files(
        paths, strict=_STRICT.value, counter=skips, max_size=_MAX_SIZE.value,
        split_categories=_SPLIT.value, min_count=_MIN_COUNT.value,
        min_partners=_MIN_PARTNERS.value, min_bigram_count=_MIN_BIGRAM.value,
        bigram_min_npmi=_BIGRAM_NPMI.value)
  if skips.total():
    logging.warning("%s", skips.report())
  vocab.save(_OUT.value)
  summary["out"] = _OUT.value
  json.dump(summary, sys.stdout, indent=1, ensure_ascii=False)
  sys.stdout.write("\n")


if __name__ == "__main__":
  app.run(main)
