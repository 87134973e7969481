"""The token vocabulary: file format, normalization, tokenizer, builder.

    vocab = Vocabulary.load("vocab.txt")
    tok = Tokenizer(vocab)
    enc = tok.encode("the hot dog on the left")  # ids, spans, unknown words

A leaf package: it imports nothing from the rest of omnitrain_jax. Build a
vocabulary file from annotation files with `python -m
omnitrain_jax.data.build_vocab` (the files are read on the data side,
`data/vocab_inputs.py`; `builder` only counts).
"""

from omnitrain_jax.vocab.text import clean_category_name
from omnitrain_jax.vocab.text import normalize_concept
from omnitrain_jax.vocab.text import STOP_WORDS
from omnitrain_jax.vocab.tokenizer import Encoding
from omnitrain_jax.vocab.tokenizer import Tokenizer
from omnitrain_jax.vocab.vocabulary import NUM_RESERVED
from omnitrain_jax.vocab.vocabulary import Vocabulary
