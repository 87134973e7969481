"""The token vocabulary: file format, normalization, tokenizer, builder.

    vocab = Vocabulary.load("vocab.txt")
    tok = Tokenizer(vocab)
    enc = tok.encode("the hot dog on the left")  # ids, spans, unknown words

Build a vocabulary with `python -m omnitrain_jax.vocab.build` (see `build`).
"""

from omnitrain_jax.vocab.text import clean_category_name
from omnitrain_jax.vocab.text import normalize_concept
from omnitrain_jax.vocab.text import STOP_WORDS
from omnitrain_jax.vocab.tokenizer import Encoding
from omnitrain_jax.vocab.tokenizer import Tokenizer
from omnitrain_jax.vocab.vocabulary import NUM_RESERVED
from omnitrain_jax.vocab.vocabulary import Vocabulary
