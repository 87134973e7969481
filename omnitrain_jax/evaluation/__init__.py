"""Evaluation building blocks; the binary is `omnitrain_jax.evaluate`.

* `queries`: category names / phrases / user text -> token-id queries, with
  unknown-word reports; `TokenUnion` for shared query sets.
* `inference`: jittable scoring of encoded images (chunked union-token
  scoring, top-k detections, per-phrase top-k boxes, image-guided queries).
* `detections`: canvas boxes -> original pixels -> COCO results.
* `coco_metrics`: COCO / LVIS AP with faster-coco-eval or pycocotools.
* `grounding`: RefCOCO Acc@0.5 and Flickr30k Recall@k.
* `draw`: boxes and labels on images (predict's PNGs).
"""
