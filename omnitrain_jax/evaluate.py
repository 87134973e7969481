r"""Evaluation: a checkpoint -> detections/grounding files -> standard metrics.

    python -m omnitrain_jax.evaluate --workdir=runs/demo [--config=CONFIG] \
        [--checkpoint_step=N] [--datasets=shapes_det,shapes_grd]
    python -m omnitrain_jax.evaluate --workdir=runs/demo \
        --dataset_json=instances_val2017.json --image_dir=val2017

Every process of a multi-host job runs the same command (as for training).
It restores only the params of the latest (or the named) checkpoint onto the
config's mesh, runs each evaluation dataset once, in file order, with one
jitted encode+score function whose batch is sharded over the mesh's ``data``
axis, gathers the small per-image results to the hosts
(`multihost_utils.process_allgather`), and process 0 writes
``WORKDIR/eval/STEP/``:

* ``detections_<dataset>.json``: COCO results (``image_id``, ``category_id``,
  ``bbox`` ``[x, y, w, h]`` in original-image pixels, ``score``), the
  ``eval.max_detections`` (300) best (box, category) pairs per image;
* ``grounding_<dataset>.json``: per phrase its query tokens, top-k boxes
  (``[x, y, w, h]`` px), scores, ground truth and hits;
* ``queries_<dataset>.json``: how the queries tokenized, the unknown words
  and the queries without any known token;
* ``metrics.json``: a flat dict of floats, merged with what an earlier run
  wrote for the same step, e.g. ``eval/shapes_det/AP50_base``,
  ``eval/shapes_grd/acc@0.5``.

Without ``--config`` the run's own ``WORKDIR/config.json`` (written by the
trainer) is used; ``--config.x=y`` overrides need ``--config``. The
vocabulary is ``--vocab``, else the run's ``WORKDIR/vocab.txt``, else the
config's (``data.vocab.path`` or built from its training files); one that is
not the checkpoint's is matched to its token rows by token string (new
tokens start from their word pieces, `omnitrain_jax.vocab_transfer`), e.g.
``--vocab=FINETUNE_WORKDIR/vocab.txt`` scores new class names zero-shot.

Datasets and protocols (``config.eval``; every field optional):

* Every det and grd source with a ``val`` file is evaluated (or those named
  in ``eval.datasets``). det: COCO AP/AP50/AP75/APs/m/l; ``lvis`` reader:
  LVIS federated AP and APr/APc/APf (faster-coco-eval ``lvis_style``);
  ShapesWorld: AP and AP50 also per open-vocabulary group (``base``,
  ``grd_novel``, ``img_novel`` from ``splits.json``). grd: RefCOCO-style
  Acc@0.5 (``refexp``) or, for sources whose name or file mentions
  "flickr", Flickr30k Recall@1/5/10 (``flickr``); override per source with
  ``eval.protocols={"name": "flickr"}``.
* ``--dataset_json=PATH --image_dir=DIR``: any COCO (or LVIS) file, its
  category names being the text queries -- the open-vocabulary use: names,
  no training. Names are cleaned like training names (LVIS ``hot_dog`` ->
  ``hot dog``, ``bow_(weapon)`` -> ``bow``; ``Monitor/TV`` -> the best of
  both).

Queries. Category names and phrases are tokenized with the run's vocabulary;
unknown words are logged once per dataset with counts and counted in the
metrics (``unknown_query_words``, ``queries_without_tokens``); a query with no
known token scores 0 (a grounding phrase without tokens counts as a miss). A
box's score for a query is the geometric mean of its token probabilities
(soft AND). Detection scores logits only for the union of the dataset's query
tokens, in chunks of ``eval.token_chunk`` tokens (`evaluation/inference.py`).

The library is `omnitrain_jax.evaluation` (`evaluator.Evaluator`, one task
evaluator per stream); the trainer's periodic evaluation runs the same
`Evaluator`. This module is only the binary: flags -> `model_setup` -> the
evaluator.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import logging

from omnitrain_jax import checkpointing
from omnitrain_jax import config_lib
from omnitrain_jax import model_setup
from omnitrain_jax import runtime
from omnitrain_jax.data import errors as data_errors
from omnitrain_jax.data import preparation
from omnitrain_jax.evaluation import coco_metrics
from omnitrain_jax.evaluation import context as context_lib
from omnitrain_jax.evaluation import datasets as datasets_lib
from omnitrain_jax.evaluation import evaluator as evaluator_lib
from omnitrain_jax.evaluation import options as options_lib


# Flags are defined only when this module runs as the program.
def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Config file (default: WORKDIR/config.json).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_integer("checkpoint_step", None,
                       "Checkpoint step (default: the latest finished).")
  flags.DEFINE_list("datasets", None,
                    "Source names to evaluate (default: config.eval.datasets,"
                    " else every det/grd source with a val file).")
  flags.DEFINE_string("dataset_json", None,
                      "Evaluate this COCO/LVIS instances file instead, its "
                      "category names as the queries.")
  flags.DEFINE_string("image_dir", None, "Image folder of --dataset_json.")
  flags.DEFINE_string("vocab", None,
                      "Vocabulary file (default: WORKDIR/vocab.txt, else the "
                      "config's). Another vocabulary than the checkpoint's "
                      "keeps the trained rows of shared tokens; new tokens "
                      "start from their word pieces.")
  flags.DEFINE_string("dataset_name", None,
                      "Name of --dataset_json (default: the file's stem).")
  flags.DEFINE_enum("dataset_format", "auto", ["auto", "coco", "lvis"],
                    "--dataset_json format (auto: LVIS when images have "
                    "neg_category_ids or categories have synonyms or "
                    "frequency).")
  flags.DEFINE_integer("max_detections", None,
                       "Detections per image (default: config.eval, 300).")
  flags.DEFINE_float("nms_iou", None,
                     "Per-category NMS IoU of detections (default: "
                     "config.eval, 0 = none).")
  flags.DEFINE_enum("coco_backend", None, list(coco_metrics.BACKENDS),
                    "COCO AP tool (default: config.eval, faster_coco_eval).")
  flags.DEFINE_integer("batch_size", None,
                       "Global evaluation batch (default: config).")
  flags.DEFINE_integer("max_batches", None,
                       "Stop each dataset after this many batches.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs "
                      "outside TPU pods/SLURM.")
  flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
  flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.quiet_library_logs()
  runtime.initialize_distributed(f.coordinator_address, f.num_processes,
                                 f.process_id)
  config = f.config or config_lib.config_from_workdir(f.workdir)
  options = options_lib.EvalOptions.from_config(
      config, datasets=f.datasets, max_detections=f.max_detections,
      nms_iou=f.nms_iou, coco_backend=f.coco_backend, batch_size=f.batch_size,
      max_batches=f.max_batches)
  info = preparation.prepare_data(config.data)
  # The run's WORKDIR/vocab.txt (or --vocab); another vocabulary than the
  # checkpoint's gets its token rows by token string (restore_params).
  info = context_lib.with_run_vocab(info, f.workdir, config, f.vocab)
  setup = model_setup.create(config, vocab_size=len(info.vocab),
                             spec=info.spec)
  datasets = None
  if f.dataset_json:
    if not f.image_dir:
      raise app.UsageError("--dataset_json needs --image_dir (the folder its "
                           "file_names are relative to).")
    info, ds = datasets_lib.with_dataset_json(
        info, f.dataset_json, f.image_dir, name=f.dataset_name,
        fmt=f.dataset_format)
    datasets = [ds]
  evaluator = evaluator_lib.Evaluator(
      config, info, model=setup.model, mesh=setup.mesh, rules=setup.rules,
      param_shardings=setup.param_shardings, datasets=datasets,
      options=options)
  params, step = checkpointing.restore_params(f.workdir, setup.abstract_state,
                                              f.checkpoint_step,
                                              vocab=info.vocab)
  if runtime.is_lead():
    logging.info("Evaluating step %d of %s on %s.", step, f.workdir,
                 [d.name for d in evaluator.datasets])
  metrics = evaluator.run(params, step=step, workdir=f.workdir)
  if runtime.is_lead():
    for k, v in sorted(metrics.items()):
      logging.info("%-48s %.4f", k, v)


def _main(argv: Sequence[str]) -> None:
  """`main`, with user-facing errors as one line (``--verbosity=1``: the
  traceback)."""
  with data_errors.exit_on_user_errors(
      (*runtime.USER_ERRORS, checkpointing.CheckpointError),
      lenient="--config=CONFIG --config.data.strict=False"):
    main(argv)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main)
