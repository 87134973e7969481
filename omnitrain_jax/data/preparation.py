"""Data preparation: the ShapesWorld cache, the vocabulary, `DataInfo`.

    info = preparation.prepare_data(config.data)   # data + vocabulary, cached

`prepare_data` generates ShapesWorld into the cache when the config asks for
it (one folder per generator fingerprint), resolves and checks the configured
sources (`sources.source_specs`, `sources.check_files`), and builds the
vocabulary from the training annotation files into the cache unless
``data.vocab.path`` names one. Cache folders and files are written to a
temporary name and renamed into place, so processes sharing a file system can
race safely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any

from absl import logging

from omnitrain_jax.data import errors
from omnitrain_jax.data import formats
from omnitrain_jax.data import readers
from omnitrain_jax.data import schema
from omnitrain_jax.data import shapes_world
from omnitrain_jax.data import sources as sources_lib
from omnitrain_jax.data import vocab_inputs
from omnitrain_jax.vocab import tokenizer as tokenizer_lib
from omnitrain_jax.vocab import vocabulary as vocabulary_lib

# Bump when the vocabulary cache key must change (builder behaviour).
_VOCAB_CACHE_VERSION = 2  # 2: LVIS compounds stay whole (grid rule).
_BUILD_VOCAB = "python -m omnitrain_jax.data.build_vocab"


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Everything `prepare_data` resolved, for the pipelines and the trainer.

  Attributes:
    root: the folder relative source paths were resolved against (for
      ShapesWorld: the generated dataset).
    sources: stream -> source name -> `sources.SourceSpec`.
    vocab_path: the vocabulary file.
    vocab: the loaded `Vocabulary`.
    tokenizer: a `Tokenizer` over it.
    spec: the static shapes (`schema.Spec`).
    splits: ShapesWorld's ``splits.json`` (open-vocabulary split: base and
      novel tokens and categories); None for other data.
    held_out: the train/eval leakage check (`hold_out_eval_images`):
      policy, number of refexp evaluation images, their sources; each det
      source's count is logged when it is opened (and counted as skips
      under ``"drop"``).
  """
  root: str
  sources: dict[str, dict[str, sources_lib.SourceSpec]]
  vocab_path: str
  vocab: vocabulary_lib.Vocabulary
  tokenizer: tokenizer_lib.Tokenizer
  spec: schema.Spec
  splits: dict | None = None
  held_out: dict | None = None


def default_cache_dir() -> str:
  """``$OMNITRAIN_CACHE``, else ``data_cache/`` in a source checkout, else
  ``~/.cache/omnitrain_jax``."""
  env = os.environ.get("OMNITRAIN_CACHE")
  if env:
    return env
  repo = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  if os.path.exists(os.path.join(repo, "setup.py")) and os.access(repo,
                                                                  os.W_OK):
    return os.path.join(repo, "data_cache")
  return os.path.join(os.path.expanduser("~"), ".cache", "omnitrain_jax")


def spec_from_config(config: Any) -> schema.Spec:
  """The static shapes of ``config.data.spec`` (pass ``config.data``)."""
  return schema.Spec(**dict(config.spec))


def _shapes_params(config: Any) -> dict[str, Any]:
  params = dict(config.shapes_world)
  for k, v in params.items():
    if isinstance(v, list):
      params[k] = tuple(v)
  return params


def _atomic_dir(final: str, build) -> None:
  """Builds a folder with ``build(tmp)`` and renames it into place.

  Several processes may race (hosts sharing a file system, parallel tests):
  each builds its own temporary folder; the first rename wins and the others
  delete theirs. A reader never sees a half-written folder.
  """
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
  try:
    build(tmp)
    try:
      os.rename(tmp, final)
      tmp = None
    except OSError:
      if not os.path.isdir(final):
        raise
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


def ensure_shapes_world(params: Mapping[str, Any], cache_dir: str) -> str:
  """The ShapesWorld dataset for `params` in the cache, generated if missing.

  The folder name holds the generator's parameter fingerprint, so changed
  parameters (or a new generator version) generate a new dataset instead of
  reusing a stale one.
  """
  fingerprint = shapes_world.params_fingerprint(**params)
  root = os.path.join(cache_dir, f"shapes_world-{fingerprint}")
  meta = shapes_world.output_paths(root)["meta"]
  if os.path.exists(meta):
    return root
  if os.path.isdir(root):  # Incomplete (an interrupted older layout).
    shutil.rmtree(root, ignore_errors=True)
  logging.info("Generating ShapesWorld %s into %s ...", dict(params), root)
  _atomic_dir(root, lambda tmp: shapes_world.generate(tmp, **params))
  return root


def _vocab_files(sources: Mapping[str, Mapping[str, sources_lib.SourceSpec]],
                 batch: Mapping[str, int]) -> list[str]:
  """The training annotation files of the trained streams' sources."""
  files = []
  for stream, specs in sources.items():
    if not batch.get(stream, 0):
      continue
    for spec in specs.values():
      if not sources_lib.READERS[spec.reader].files:
        # A TFDS dataset is no annotation file the vocabulary can read.
        raise ValueError(
            f"data.sources.{stream}.{spec.name} is a TFDS source "
            f"({spec.reader}), so the vocabulary cannot be built from it. "
            f"Build one from its annotation files with `{_BUILD_VOCAB} "
            "--out=vocab.txt TRAIN_ANNOTATION_FILES...` and set "
            "data.vocab.path.")
      if sources_lib.READERS[spec.reader].shards:
        # Each shard is a file the vocabulary reads (its captions).
        files.extend(p for p in formats.expand_shards(spec.train)
                     if os.path.exists(p))
      else:
        files.append(spec.train)
  return files


def ensure_vocabulary(files: Sequence[str], cache_dir: str, *,
                      max_size: int, split_categories: bool = False,
                      min_count: int = 1, strict: bool = True,
                      skips: errors.SkipCounter | None = None) -> str:
  """A vocabulary built from `files`, cached by the files and the params.

  Args:
    files: training annotation files (see `vocab_inputs`).
    cache_dir: the cache folder (the file goes into ``vocab/``).
    max_size: see `vocab.builder.build_vocabulary`.
    split_categories: see `vocab.builder.build_vocabulary`.
    min_count: see `vocab.builder.build_vocabulary`.
    strict: False: captions that are no text are skipped (`vocab_inputs`).
    skips: where they are counted (also when the vocabulary comes from the
      cache: ``vocab-*.skipped.json`` beside it lists them).

  Returns:
    The vocabulary file: the cached one when the files (path, size, mtime)
    and parameters match, else a new one.
  """
  key = {"version": _VOCAB_CACHE_VERSION, "max_size": max_size,
         "split_categories": split_categories, "min_count": min_count,
         "files": [(os.path.abspath(f), os.path.getsize(f),
                    os.stat(f).st_mtime_ns) for f in files]}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()
                          ).hexdigest()[:16]
  path = os.path.join(cache_dir, "vocab", f"vocab-{digest}.txt")
  skipped_path = path[:-len(".txt")] + ".skipped.json"
  skips = skips if skips is not None else errors.SkipCounter()
  if os.path.exists(path):
    if os.path.exists(skipped_path):  # A lenient build's skips, again.
      with open(skipped_path) as f:
        skipped = [errors.DataError(*fields) for fields in json.load(f)]
      for error in skipped:
        errors.handle(error, strict=strict, counter=skips,
                      source=vocab_inputs.SKIP_SOURCE)
    return path
  logging.info("Building the vocabulary from %s ...", list(files))
  vocab, summary = vocab_inputs.build_from_files(
      list(files), max_size=max_size, split_categories=split_categories,
      min_count=min_count, strict=strict, counter=skips)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if summary.get("skipped_records"):
    logging.warning("Vocabulary: skipped %s (data.strict=False).",
                    summary["skipped"])
    tmp = f"{skipped_path}.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:  # Before the vocabulary: a cache hit has it.
      json.dump(summary["skipped_records"], f)
    os.replace(tmp, skipped_path)
  # Vocabulary.save writes a temporary file and renames it: race-safe.
  tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
  vocab.save(tmp)
  os.replace(tmp, path)
  logging.info("Vocabulary: %d tokens -> %s (%s)", len(vocab), path,
               json.dumps({k: summary[k] for k in list(summary)[:6]},
                          default=str))
  return path


# Readers whose records are COCO images that refexp evaluation may reuse.
_COCO_DET_READERS = ("coco_instances", "lvis")
_REFEXP_NAMES = ("refcoco", "refcoco+", "refcocog")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def refexp_eval_images(spec: sources_lib.SourceSpec
                       ) -> tuple[frozenset[int], str]:
  """COCO image ids of a grounding source's referring-expression eval splits.

  RefCOCO/+/g evaluate on COCO train2014 images, which COCO train2017 (and
  LVIS train) also holds. A ``refcoco`` source (the refer release) gives
  the images of every ref whose split is not ``train`` (val, testA, testB,
  test: the splits papers report), whatever its ``val_split``; an
  ``mdetr_grounding`` source gives the images of its ``val`` file when they
  are RefCOCO/+/g's (COCO file names, or ``dataset_name`` refcoco*; matched
  by `readers.coco_image_id`, else ``original_id``). Other sources (Flickr30k,
  captions, TFDS) give none.

  Returns:
    (image ids, what they are, for messages).
  """
  ids, what = set(), ""
  if spec.reader == "refcoco":
    refs = {}
    for path in dict.fromkeys(p for p in (spec.train, spec.val) if p):
      for r in formats.load_refs(path):
        if (isinstance(r, dict) and r.get("split") != "train"
            and _is_int(r.get("image_id"))):
          refs.setdefault(r["split"], set()).add(int(r["image_id"]))
    for split_ids in refs.values():
      ids |= split_ids
    what = f"{', '.join(sorted(map(str, refs)))} of {spec.name}"
  elif spec.reader == "mdetr_grounding" and spec.val:
    data = formats.load_json(spec.val)
    for im in data.get("images", ()) if isinstance(data, dict) else ():
      if not isinstance(im, dict):
        continue
      cid = readers.coco_image_id(im.get("file_name"))
      if (cid is None and str(im.get("dataset_name", "")).lower()
          in _REFEXP_NAMES and _is_int(im.get("original_id"))):
        cid = int(im["original_id"])
      if cid is not None:
        ids.add(cid)
    what = f"{os.path.basename(spec.val)} of {spec.name}"
  return frozenset(ids), what


def hold_out_eval_images(sources, policy: str):
  """Marks the COCO det train sources with the refexp evaluation images.

  Args:
    sources: stream -> name -> `sources.SourceSpec` (`source_specs`).
    policy: ``config.data.eval_overlap``: ``"drop"``, ``"report"`` or
      ``"off"`` (neither reads the eval files nor checks).

  Returns:
    `sources` with ``held_out_*`` set on the COCO/LVIS det sources (when a
    refexp source is configured), and the report: {"policy", "eval_images",
    "from"}.
  """
  if policy not in ("drop", "report", "off"):
    raise ValueError(f"data.eval_overlap={policy!r}; use 'drop' (the "
                     "default: train without the refexp evaluation images), "
                     "'report' or 'off'.")
  report = {"policy": policy, "eval_images": 0, "from": []}
  if policy == "off":
    return sources, report
  ids, parts = set(), []
  for spec in sources.get("grd", {}).values():
    found, what = refexp_eval_images(spec)
    if found:
      ids |= found
      parts.append(what)
  if not ids:
    return sources, report
  what = "in the evaluation splits (" + "; ".join(parts) + ")"
  out = {stream: dict(specs) for stream, specs in sources.items()}
  for name, spec in sources.get("det", {}).items():
    if spec.reader in _COCO_DET_READERS:
      out["det"][name] = dataclasses.replace(
          spec, held_out_images=frozenset(ids), held_out_policy=policy,
          held_out_from=what)
  report.update(eval_images=len(ids), **{"from": parts})
  return out, report


def prepare_data(config: Any, skips: errors.SkipCounter | None = None
                 ) -> DataInfo:
  """Makes the data ready: generates ShapesWorld if needed, builds the vocab.

  Args:
    config: ``config.data``.
    skips: where the vocabulary build's lenient skips are counted (the
      pipeline's `stats.PipelineStats.skips`, so one report holds them all).

  Returns:
    A `DataInfo`.

  Raises:
    FileNotFoundError: a configured file is missing (the message names it
      and says how to prepare it).
    ValueError: an inconsistent config.
  """
  cache_dir = os.path.expanduser(config.cache_dir or default_cache_dir())
  batch = dict(config.batch)
  if config.dataset == "shapes_world":
    root = ensure_shapes_world(_shapes_params(config), cache_dir)
    with open(shapes_world.output_paths(root)["splits"]) as f:
      splits = json.load(f)
  elif config.dataset == "files":
    root = os.path.expanduser(config.root or os.getcwd())
    splits = None
  else:
    raise ValueError(f"data.dataset={config.dataset!r}; use 'shapes_world' "
                     "or 'files'.")
  sources = sources_lib.source_specs(config, root)
  sources_lib.check_files(sources, batch)
  sources, held_out = hold_out_eval_images(
      sources, config.get("eval_overlap", "drop"))
  if held_out["eval_images"]:
    logging.info("Train/eval leakage check (data.eval_overlap=%r): %d COCO "
                 "images of %s are held out of the COCO/LVIS det train "
                 "sources.", held_out["policy"], held_out["eval_images"],
                 held_out["from"])
  if config.vocab.path:
    vocab_path = os.path.expanduser(config.vocab.path)
    if not os.path.exists(vocab_path):
      raise FileNotFoundError(
          f"data.vocab.path: {vocab_path} does not exist. Build it with "
          f"`{_BUILD_VOCAB} --out=vocab.txt TRAIN_ANNOTATION_FILES...` or set "
          "data.vocab.path='' to build it from the configured sources into "
          "the cache.")
  else:
    vocab_path = ensure_vocabulary(
        _vocab_files(sources, batch), cache_dir,
        max_size=config.vocab.max_size,
        split_categories=config.vocab.split_categories,
        min_count=config.vocab.min_count, strict=config.strict, skips=skips)
  vocab = vocabulary_lib.Vocabulary.load(vocab_path)
  return DataInfo(root=root, sources=sources, vocab_path=vocab_path,
                  vocab=vocab, tokenizer=tokenizer_lib.Tokenizer(vocab),
                  spec=spec_from_config(config), splits=splits,
                  held_out=held_out)
