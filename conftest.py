"""pytest set-up shared by all tests."""

from absl import flags

# grain's multiprocessing reads absl flags; tests don't go through app.run.
flags.FLAGS.mark_as_parsed()
