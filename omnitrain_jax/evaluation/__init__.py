"""Evaluation and prediction; the binaries are `omnitrain_jax.evaluate` and
`omnitrain_jax.predict`.

* `options`: ``config.eval`` (`EvalOptions`) and the protocols.
* `datasets`: which datasets an evaluation scores (`eval_datasets`,
  `with_dataset_json`).
* `evaluator`: the run loop (`Evaluator`): one pass over each dataset,
  sharded batches, gathered outputs, files and metrics.
* `context`: what a task evaluator receives (`EvalContext`: the model's
  functions, a jit, the tokenizer, the options).
* `det_evaluator` / `grd_evaluator`: one evaluator per task (COCO/LVIS AP;
  RefCOCO Acc@0.5 and Flickr30k Recall@k).
* `inference`: jittable query scoring, top-k and NMS (shared with
  prediction).
* `queries`: category names / phrases / user text -> token-id queries, with
  unknown-word reports; `TokenUnion` for shared query sets.
* `detections`: canvas boxes -> original pixels -> COCO results.
* `coco_metrics`: COCO / LVIS AP with faster-coco-eval or pycocotools.
* `grounding_metrics`: RefCOCO Acc@0.5 and Flickr30k Recall@k.
* `predictor`: a trained run ready for images and text / image queries.
* `draw`: boxes and labels on images (predict's PNGs).
"""
