r"""Vocabulary benchmark: build, save/load and tokenize at V=1k and V=500k.

    python benchmarks/vocab.py                 # full size (~30 s, ~0.5 GB)
    python benchmarks/vocab.py --scale=0.01    # smoke run

Prints one JSON object:
  * build: seconds to build a `vocab_size`-token vocabulary from synthetic
    annotation files (a COCO-style instances JSON with `num_categories`
    categories, a third of them multi-word, and a COCO-captions JSON whose
    captions hold more distinct words than `vocab_size`), file reading
    included;
  * save / load: seconds for `Vocabulary.save` / `Vocabulary.load`,
    and the mirror map;
  * tokenize: phrases/s of `Tokenizer.encode` and `encode_ids` over
    `num_phrases` phrases (3-8 words: vocabulary words by a Zipf law, stop
    words, multi-word categories, plurals, capitals, punctuation, an unknown
    word now and then), at V=1k and at V=`vocab_size`, side by side with the
    naive baseline `[index[w] for w in text.lower().split() if w in index]`
    (which gets no multi-word concepts, plurals, punctuation, spans or
    unknown-word reports right); `naive_speedup` is naive/ours.

Timings are process CPU seconds (single-threaded work; less noisy than wall
time on a shared machine), best of `repeats`.
"""

import argparse
import json
import tempfile
import time

import numpy as np

from omnitrain_jax.data import vocab_inputs
from omnitrain_jax.vocab.tokenizer import Tokenizer
from omnitrain_jax.vocab.vocabulary import Vocabulary

_SYLLABLES = [c + v for c in "bdfgklmnprtvz" for v in "aeiou"]  # 65
_STOP = ["the", "a", "of", "on", "in", "with", "two", "and"]


def _lexicon(n: int) -> list[str]:
  """`n` distinct made-up words of 4 syllables ("kapotumi"), never plural."""
  out, s = [], len(_SYLLABLES)
  for i in range(n):
    out.append("".join(_SYLLABLES[(i // s**k) % s] for k in range(4)))
  return out


def _write_annotations(tmp: str, rng: np.random.Generator, lexicon,
                       num_categories: int, num_captions: int):
  """An instances JSON and a captions JSON; returns their paths."""
  cats = []
  for i in range(num_categories):
    name = lexicon[i] if i % 3 else f"{lexicon[i]} {lexicon[i + 1]}"
    cats.append({"id": i + 1, "name": name})
  anns = [{"id": j, "image_id": 0, "category_id": int(c), "bbox": [0, 0, 1, 1]}
          for j, c in enumerate(rng.integers(1, num_categories + 1,
                                             10 * num_categories))]
  det = f"{tmp}/instances.json"
  with open(det, "w") as f:
    json.dump({"images": [{"id": 0}], "annotations": anns,
               "categories": cats}, f)
  # Each caption: 3 "coverage" words walking through the lexicon (so the
  # number of distinct words exceeds the vocabulary size) + 5 Zipf words.
  zipf = np.minimum(rng.zipf(1.3, (num_captions, 5)), len(lexicon)) - 1
  captions = []
  for j in range(num_captions):
    words = [lexicon[(3 * j + k) % len(lexicon)] for k in range(3)]
    words += [lexicon[z] for z in zipf[j]]
    words.insert(int(rng.integers(0, 8)), _STOP[j % len(_STOP)])
    captions.append({"id": j, "image_id": 0, "caption": " ".join(words)})
  cap = f"{tmp}/captions.json"
  with open(cap, "w") as f:
    json.dump({"images": [{"id": 0}], "annotations": captions}, f)
  return det, cap


def _phrases(rng: np.random.Generator, vocab: Vocabulary, n: int) -> list[str]:
  """Query-like phrases over `vocab`'s tokens."""
  concepts = vocab.tokens[vocab.num_reserved:]
  idx = np.minimum(rng.zipf(1.2, (n, 8)), len(concepts)) - 1
  lengths = rng.integers(3, 9, n)
  out = []
  for j in range(n):
    words = []
    for k in range(lengths[j]):
      r = rng.random()
      if r < 0.25:
        words.append(_STOP[(j + k) % len(_STOP)])
      elif r < 0.3:
        words.append("zzunknownzz")
      else:
        w = concepts[idx[j, k]]
        words.append(w.upper() if r > 0.95 else (w + "s" if r > 0.9 else w))
    out.append(" ".join(words) + ("." if j % 2 else ""))
  return out


def _best(fn, repeats: int):
  """Best-of-`repeats` seconds of `fn()` (CPU time, see `_timer`), result."""
  best, result = float("inf"), None
  for _ in range(repeats):
    t = _timer()
    result = fn()
    best = min(best, _timer() - t)
  return best, result


def _timer() -> float:
  # Process CPU time: on a machine shared with other jobs it is far less
  # noisy than wall time, and everything measured here is single-threaded
  # CPU work (file I/O excepted, which is small here and in the page cache).
  return time.process_time()


def _tokenize_row(vocab: Vocabulary, phrases: list[str], repeats: int) -> dict:
  t_init, tok = _best(lambda: Tokenizer(vocab), 1)
  index = vocab.index

  # Results are consumed, not kept: a pipeline tokenizes and moves on (and
  # keeping 100k result objects would time the garbage collector).
  def naive():
    for p in phrases:
      [index[w] for w in p.lower().split() if w in index]  # pylint: disable=expression-not-assigned

  def encode():
    for p in phrases:
      tok.encode(p)

  def encode_ids():
    for p in phrases:
      tok.encode_ids(p)

  t_enc, _ = _best(encode, repeats)
  t_ids, _ = _best(encode_ids, repeats)
  t_naive, _ = _best(naive, repeats)
  encs = [tok.encode(p) for p in phrases]
  n = len(phrases)
  return {
      "vocab_size": len(vocab),
      "phrases": n,
      "tokenizer_init_s": round(t_init, 4),
      "encode_phrases_per_s": round(n / t_enc),
      "encode_ids_phrases_per_s": round(n / t_ids),
      "naive_phrases_per_s": round(n / t_naive),
      "naive_speedup": round(t_enc / t_naive, 2),
      "tokens_per_phrase": round(sum(len(e.ids) for e in encs) / n, 2),
      "unknown_per_phrase": round(sum(len(e.unknown) for e in encs) / n, 2),
  }


def run(scale: float = 1.0, repeats: int = 2, seed: int = 0) -> dict:
  """Runs every measurement; returns the JSON-able results."""
  vocab_size = max(1100, int(500_000 * scale))
  num_categories = max(30, int(1200 * scale))
  num_captions = max(200, int(200_000 * scale))
  num_phrases = max(100, int(100_000 * scale))
  rng = np.random.default_rng(seed)
  lexicon = _lexicon(int(vocab_size * 1.3))
  results = {"scale": scale, "repeats": repeats}
  with tempfile.TemporaryDirectory() as tmp:
    det, cap = _write_annotations(tmp, rng, lexicon, num_categories,
                                  num_captions)
    t_build, (vocab, summary) = _best(
        lambda: vocab_inputs.build_from_files([det, cap], max_size=vocab_size),
        1)
    results["build"] = {
        "seconds": round(t_build, 3), "captions": num_captions,
        "categories": num_categories, "size": summary["size"],
        "cut_by_max_size": summary["cut_by_max_size"],
        "multiword_concepts": summary["multiword_concepts"]}
    path = f"{tmp}/vocab.txt"
    t_save, _ = _best(lambda: vocab.save(path), repeats)
    t_load, loaded = _best(lambda: Vocabulary.load(path), repeats)
    assert loaded.tokens == vocab.tokens
    fresh = Vocabulary(vocab.tokens)  # mirror_map() is cached per instance.
    t_mirror, _ = _best(fresh.mirror_map, 1)
    results["io"] = {"vocab_size": len(vocab), "save_s": round(t_save, 3),
                     "load_s": round(t_load, 3),
                     "mirror_map_s": round(t_mirror, 3)}
  small = Vocabulary(vocab.tokens[:1000], vocab.counts[:1000])
  results["tokenize"] = [
      _tokenize_row(v, _phrases(rng, v, num_phrases), repeats)
      for v in (small, vocab)]
  return results


def main():
  # argparse, not absl flags: importing this file (its smoke test) must not
  # register global flags.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--scale", type=float, default=1.0,
                      help="Multiplies every size.")
  parser.add_argument("--repeats", type=int, default=2,
                      help="Timing repeats (best of).")
  parser.add_argument("--seed", type=int, default=0, help="Data seed.")
  args = parser.parse_args()
  print(json.dumps(run(args.scale, args.repeats, args.seed), indent=1))


if __name__ == "__main__":
  main()
