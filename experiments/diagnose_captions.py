r"""Why do captions not teach their words? Measurements on a trained run.

    python experiments/diagnose_captions.py --workdir=runs/demo \
        --out=runs/demo/diagnose_captions.json
    python experiments/diagnose_captions.py --workdir=/tmp/diag_demo \
        --num_batches=50 --grad_batches=4 --max_images=200   # the defaults

Reads a training run's directory (any run trained on ShapesWorld data: its
``config.json``, ``vocab.txt`` and latest finished checkpoint, loaded as
``python -m omnitrain_jax.evaluate`` loads them), prints one JSON object and
writes it to ``--out`` when given. Nothing is trained or changed. On the
demo model (128 px, width 128, depth 4) it took 34 s with the defaults and
51 s with ``--grad_batches=16`` on 2 shared CPU cores (most of it compiling
the per-stream gradients).

The token groups come from the dataset's ``splits.json``: ``caption_only``
(``img_novel_tokens``: ``hexagon``, ``pink`` -- in no det box and no
grounding phrase, only in captions), ``grounding_only``
(``grd_novel_tokens``: ``star``, ``purple``) and ``base`` (the det-trained
colour and shape words). ``det_category_tokens`` are the tokens of the det
training file's category names, tokenized with the run's vocabulary (the
caption-only set must be disjoint from them).

Sections of the JSON:

``pointing`` -- a pointing test on the validation caption (img-stream)
  images. The objects of each image are regenerated from the dataset's
  parameters (``shapes_world.json``; `shapes_world.render_scene` is
  deterministic, and each regenerated caption is checked against the
  image's caption tokens: ``scene_mismatches``). The model scores every
  patch against the image's caption tokens (``OmniDet.__call__`` with the
  caption tokens as the candidates: the per-patch token logits of training
  and inference). For each caption token that is a colour or shape word,
  the argmax patch of its logit is taken and:

  * ``box_hit``: the patch's predicted box has IoU >= 0.5 with an object,
    and the object it overlaps most carries the token (its colour or shape
    is the token); ``on_object``: IoU >= 0.5 with any object;
  * ``centre_hit``: the patch's centre lies inside the box of an object
    carrying the token; ``centre_on_object``: inside any object's box;
  * ``chance``: the fraction of the image's objects that carry the token
    (the hit rate of a random object of the image); ``patch_chance``: the
    fraction of the patches whose centres lie in a carrying object's box
    (the centre-hit rate of a random patch).

  Reported per token and as micro averages over the (image, token) pairs
  of each group; ``lift`` = box_hit_rate / chance. ``images`` lists every
  pair (objects, carriers, hits) so that the aggregates can be recomputed.

``candidate_roles`` -- what the streams do to caption-only rows: over
  ``--num_batches`` training batches of the real pipeline
  (`pipeline.make_train_dataset` with the run's data config; in one
  process its candidates are the trainer's), for each token and stream the
  number of examples where the token is a candidate, split by role:
  ``positive`` (one of the example's box or caption tokens),
  ``known_negative`` (``cand_known`` and not positive), ``bg_negative``
  (``cand_bg`` and not positive; a subset of known_negative), and
  ``sampled_negative`` (neither: batch and vocabulary negatives), split
  into ``sampled_batch_pool`` (a positive of another example of the same
  batch) and ``sampled_vocab`` (not in the batch's pool: drawn from the
  vocabulary by frequency). ``loss_roles`` says which loss each role meets
  under the run's loss config.

``gradients`` -- per-stream gradients at the checkpoint on the first
  ``--grad_batches`` of those batches. The loss is linear in its stream
  terms, so each stream's term is `omni_loss` with the other streams'
  weights set to 0 (the matching is under ``stop_gradient``, so this is
  the exact split; no change to the loss, no masking of the batch); the
  three terms sum to the run's loss (``loss_sum_error``). Gradient norms
  w.r.t. the parameter groups (``backbone``, ``head`` = everything but the
  backbone and the token table, ``shared`` = both, ``token_table``), and
  the cosine similarity between the streams' gradients on each group, per
  batch (mean reported) and of the gradients summed over the batches
  (the consistent part). ``token_rows``: the norm of each stream's gradient
  on each tracked token's row of the table. ``logit_push``: per stream and
  token, split by whether the token is one of the example's positives
  (``positive``) or not (``negative``: any other candidate), minus the loss
  gradient on its per-patch logits, summed over patches whose centre lies
  inside a ground-truth box of the example (``object``; det: every object,
  grd: only the referred objects) and the other patches (``background``;
  img examples have no boxes, so all their patches count as background),
  and on its image logit (``image``): > 0 means the step raises the logit. The model runs with ``train=False`` (no dropout), the
  gradients are of the weighted terms (``weights``), before clipping
  (``grad_clip_norm``) and Adam.

``pointing.phrase_matching`` -- the phrase-matched patch pointing test:
  each caption phrase, repeated by its count, matched to the patches with
  the loss's phrase matcher and the run's ``img_phrase_*`` settings (used
  here whether or not the run trained with it); does the matched patch's box
  land on an object with the phrase's colour and shape (`phrases_and_boxes`).

``pointing.boxes`` -- box recall per colour and shape token on the same
  images: the best IoU of any predicted box with each object carrying the
  token, and the share of those objects with one of IoU >= 0.5 (no
  classification can detect an object that no box covers).

``pointing.boxes_recolored`` (with ``--recolor=pink:red``) -- the same box
  recall on the validation caption images generated again with pink objects
  drawn in red's RGB (ShapesWorld's ``paint``: same scenes, boxes and
  captions; only those pixels change). A caption-only colour whose recall
  rises to the known colours' level when painted as one fails on its colour
  (the box head never saw it boxed), not on its scenes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp

from omnitrain_jax import checkpointing
from omnitrain_jax import config_lib
from omnitrain_jax import matching
from omnitrain_jax import model_setup
from omnitrain_jax import runtime
from omnitrain_jax.data import candidates as candidates_lib
from omnitrain_jax.data import images as images_lib
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import preparation
from omnitrain_jax.data import schema
from omnitrain_jax.data import shapes_world
from omnitrain_jax.evaluation import context as context_lib
from omnitrain_jax.losses import box_ops
from omnitrain_jax.losses import matching_cost
from omnitrain_jax.losses import token_ops
from omnitrain_jax.losses import omni_loss as omni_loss_lib
from omnitrain_jax.models import omnidet
# pylint: enable=g-import-not-at-top,wrong-import-position

GROUPS = ("caption_only", "grounding_only", "base")
ROLES = ("positive", "known_negative", "bg_negative", "sampled_negative",
         "sampled_batch_pool", "sampled_vocab")
PUSH_ROLES = ("positive", "negative")  # Negative: any non-positive role.
PARAM_GROUPS = ("backbone", "head", "shared", "token_table")
IOU_HIT = 0.5
_FLOAT_OUTPUTS = ("pred_logits", "pred_boxes", "image_logits")


def _define_flags() -> None:
  """Flags exist only when this file runs as the program (tests import it)."""
  flags.DEFINE_string("workdir", None, "A training run's directory.")
  flags.DEFINE_string("out", "", "Also write the JSON here.")
  flags.DEFINE_integer("checkpoint_step", None,
                       "Checkpoint step (default: the latest finished).")
  flags.DEFINE_integer("num_batches", 50,
                       "Training batches for the candidate-role counts.")
  flags.DEFINE_integer("grad_batches", 4,
                       "Training batches for the gradients (the first ones; "
                       "0: no gradient measurement).")
  flags.DEFINE_integer("max_images", 0,
                       "Validation caption images (0: all).")
  flags.DEFINE_list("recolor", [],
                    "COLOR:OTHER pairs, e.g. pink:red: also measure the box "
                    "recall on the validation caption images regenerated "
                    "with COLOR's objects painted in OTHER's RGB (the same "
                    "scenes and boxes; `pointing.boxes_recolored`).")
  flags.mark_flags_as_required(["workdir"])


# ----------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run, loaded as the evaluation binary loads it."""
  workdir: str
  config: Any
  info: preparation.DataInfo
  model: omnidet.OmniDet
  loss_config: omni_loss_lib.LossConfig
  params: Any
  step: int


def load_run(workdir: str, step: int | None = None) -> Run:
  """Config, data info (the run's vocabulary), model and params of a run."""
  config = config_lib.config_from_workdir(workdir)
  info = preparation.prepare_data(config.data)
  info = context_lib.with_run_vocab(info, workdir, config)
  setup = model_setup.create(config, vocab_size=len(info.vocab),
                             spec=info.spec)
  params, step = checkpointing.restore_params(
      workdir, setup.abstract_state, step, vocab=info.vocab)
  return Run(workdir=workdir, config=config, info=info, model=setup.model,
             loss_config=model_setup.loss_config(config), params=params,
             step=step)


def scene_config(info: preparation.DataInfo) -> shapes_world.Config:
  """The ShapesWorld parameters the run's data was generated with."""
  meta_path = shapes_world.output_paths(info.root)["meta"]
  if not os.path.exists(meta_path):
    raise ValueError(
        f"{meta_path} does not exist: the run's data root {info.root} is not "
        "a ShapesWorld dataset. This tool needs ShapesWorld data (the "
        "objects of the caption images are regenerated from its "
        "parameters).")
  with open(meta_path) as f:
    meta = json.load(f)
  return shapes_world.make_config(**meta["params"])


def token_sets(info: preparation.DataInfo) -> dict[str, list[str]]:
  """The token groups (from ``splits.json``) and the det category tokens."""
  splits = info.splits
  if splits is None:
    raise ValueError("The run's data has no splits.json (not ShapesWorld).")
  det_tokens = set()
  for spec in info.sources.get("det", {}).values():
    with open(spec.train) as f:
      cats = json.load(f)["categories"]
    for c in cats:
      det_tokens.update(info.vocab.token(t) for t in
                        info.tokenizer.encode_ids(c["name"]))
  return {"caption_only": list(splits["img_novel_tokens"]),
          "grounding_only": list(splits["grd_novel_tokens"]),
          "base": list(splits["base_tokens"]),
          "det_category_tokens": sorted(det_tokens)}


def _tracked(info: preparation.DataInfo, tokens: Mapping[str, list[str]]
             ) -> dict[int, tuple[str, str]]:
  """Token id -> (token, group) of every tracked token in the vocabulary."""
  out = {}
  for group in GROUPS:
    for t in tokens[group]:
      i = info.vocab.id(t)
      if i != schema.UNK_ID:
        out[i] = (t, group)
  return out


def _device_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The schema's arrays (the pipeline's ``_report`` / ``_key`` dropped)."""
  return {k: np.asarray(v) for k, v in batch.items() if not k.startswith("_")}


def _rate(num: float, den: float) -> float | None:
  return float(num) / den if den else None


# ----------------------------------------------------------------- pointing


def _canvas_xyxy(bbox: Sequence[float], scale: float, size: int
                 ) -> np.ndarray:
  """A ``[x, y, w, h]`` box in original pixels -> canvas xyxy in [0, 1]."""
  x, y, w, h = bbox
  return np.array([x, y, x + w, y + h], np.float64) * scale / size


def _patch_centres(grid: int) -> np.ndarray:
  """float64 [N, 2] ``(cx, cy)`` in [0, 1] of the canvas of each prediction
  (prediction n is patch row ``n // grid``, column ``n % grid``)."""
  cen = (np.arange(grid) + 0.5) / grid
  return np.stack([np.tile(cen, grid), np.repeat(cen, grid)], -1)


def pointing_test(run: Run, tokens: Mapping[str, list[str]], *,
                  max_images: int = 0) -> dict[str, Any]:
  """The argmax patch of each caption token vs the objects carrying it."""
  info, model = run.info, run.model
  cfg = scene_config(info)
  tracked = _tracked(info, tokens)
  words = set(cfg.colors) | set(cfg.shapes)
  split = "img_val"
  first_id = shapes_world.image_id(split, 0)
  size, grid = model.image_size, model.grid
  centres = _patch_centres(grid)  # [N, 2]

  @jax.jit
  def forward(params, images, cands):
    """Per caption token: its argmax patch, that patch's box and logit."""
    out = model.apply({"params": params}, images, cands, train=False)
    logits = out["pred_logits"]  # [B, N, C]
    best = jnp.argmax(logits, axis=1)  # [B, C]
    boxes = jnp.take_along_axis(out["pred_boxes"], best[..., None],
                                axis=1)  # [B, C, 4]
    return (best, box_ops.cxcywh_to_xyxy(boxes),
            jnp.take_along_axis(logits, best[:, None], axis=1)[:, 0])

  ds = pipeline.make_eval_dataset(run.config.data, info, stream="img",
                                  process_index=0, process_count=1)
  pairs: list[dict[str, Any]] = []
  images: list[dict[str, Any]] = []
  mismatches = 0
  skipped_tokens = 0
  done = False
  for batch in ds:
    batch = _device_batch(batch)
    best, best_boxes, best_logits = jax.device_get(forward(
        run.params, batch["image"], batch["caption_tokens"]))
    for b in range(batch["image"].shape[0]):
      image_id = int(batch["image_id"][b])
      if image_id < 0:
        continue  # Padding example.
      if max_images and len(images) >= max_images:
        done = True
        break
      scene = shapes_world.render_scene(cfg, split, image_id - first_id)
      cap = [int(t) for t in batch["caption_tokens"][b]]
      got = {t for t in cap if t > schema.UNK_ID}
      want = set(info.tokenizer.encode_ids(scene.caption))
      truncated = cap[-1] != schema.PAD_ID  # max_caption_tokens reached.
      if not (got == want or (truncated and got < want)):
        mismatches += 1  # Not the scene the image was generated from.
        continue
      objs = scene.objects
      scale = float(batch["scale"][b])
      obj_boxes = np.stack([_canvas_xyxy(o.bbox, scale, size)
                            for o in objs])  # [O, 4]
      inside = ((centres[:, None, 0] >= obj_boxes[None, :, 0]) &
                (centres[:, None, 0] <= obj_boxes[None, :, 2]) &
                (centres[:, None, 1] >= obj_boxes[None, :, 1]) &
                (centres[:, None, 1] <= obj_boxes[None, :, 3]))  # [N, O]
      ious = np.asarray(box_ops.pairwise_box_iou(
          jnp.asarray(best_boxes[b]), jnp.asarray(obj_boxes, jnp.float32))
                        )  # [C, O]
      entry = {"image_id": image_id, "objects": len(objs), "tokens": []}
      seen = set()
      for q, t in enumerate(cap):
        if t <= schema.UNK_ID or t in seen:
          continue
        seen.add(t)
        token = info.vocab.token(t)
        if token not in words or t not in tracked:
          skipped_tokens += 1  # Counts, sizes: no object attribute.
          continue
        carries = np.array([token in (o.color, o.shape) for o in objs])
        n, iou = int(best[b, q]), ious[q]  # Argmax patch; IoU [O].
        top = int(np.argmax(iou))
        on_object = bool(iou[top] >= IOU_HIT)
        pair = {
            "token": token,
            "group": tracked[t][1],
            "carriers": int(carries.sum()),
            "on_object": on_object,
            "box_hit": bool(on_object and carries[top]),
            "centre_on_object": bool(inside[n].any()),
            "centre_hit": bool((inside[n] & carries).any()),
            "chance": float(carries.mean()),
            "patch_chance": float((inside & carries).any(-1).mean()),
            "prob": float(1.0 / (1.0 + np.exp(-best_logits[b, q]))),
        }
        pairs.append(pair)
        entry["tokens"].append(pair)
      images.append(entry)
    if done:
      break

  def summary(sel: list[dict[str, Any]]) -> dict[str, Any]:
    k = len(sel)
    out = {"pairs": k}
    for key in ("box_hit", "on_object", "centre_hit", "centre_on_object"):
      out[f"{key}_rate"] = _rate(sum(p[key] for p in sel), k)
    for key in ("chance", "patch_chance", "prob"):
      out[key] = _rate(sum(p[key] for p in sel), k)
    on = sum(p["on_object"] for p in sel)
    out["box_hit_given_on_object"] = _rate(sum(p["box_hit"] for p in sel), on)
    out["lift"] = (out["box_hit_rate"] / out["chance"]
                   if k and out["chance"] else None)
    return out

  by_token = {}
  for t, group in sorted(tracked.values(), key=lambda x: (x[1], x[0])):
    by_token[t] = {"group": group,
                   **summary([p for p in pairs if p["token"] == t])}
  return {
      "split": split,
      "images_scored": len(images),
      "scene_mismatches": mismatches,
      "tokens_skipped": skipped_tokens,
      "iou_threshold": IOU_HIT,
      "per_token": by_token,
      "per_group": {g: summary([p for p in pairs if p["group"] == g])
                    for g in GROUPS},
      "images": images,
  }


# --------------------------------------------- phrase matching and boxes


def _phrase_group(words: set[str], tokens: Mapping[str, list[str]]) -> str:
  """The group of a phrase: its caption-only token(s), else grd, else base."""
  novel = sorted(words & set(tokens["caption_only"]))
  if novel:
    return "+".join(novel)
  return "grounding_only" if words & set(tokens["grounding_only"]) else "base"


def phrases_and_boxes(run: Run, tokens: Mapping[str, list[str]], *,
                      max_images: int = 0) -> dict[str, Any]:
  """The phrase-matched patch pointing test and the box recall per token.

  On the validation caption images, with every token of the vocabulary as a
  candidate:

  * ``phrase_matching``: each caption phrase (the pipeline's
    ``phrase_tokens`` / ``phrase_counts``) is repeated by its count and
    matched one-to-one to the patches with the loss's own pieces
    (`matching_cost.phrase_instances`, `matching_cost.phrase_cost` with the
    run's ``img_phrase_*`` settings, the in-graph Hungarian). Trusted tokens
    are those a det or grd box carries somewhere in training (every token but
    the caption-only ones; in training, those of the batch), conflict tokens
    the det category tokens outside the phrase -- the matching training does
    after the batch has boxed every base token. Per phrase group (its
    caption-only token, else ``grounding_only``, else ``base``): ``matched``
    instances, ``kept`` (trusted-token probability >= the gate), ``hit_rate``
    (the matched patch's box has IoU >= 0.5 with an object, and the object
    it overlaps most has the phrase's colour and shape), ``kept_hit_rate``,
    ``on_object_rate`` and ``chance`` (the share of the image's objects that
    carry the phrase). Phrases with no trusted token are not matched
    (``unmatched_phrases``), as in training.
  * ``boxes``: per colour / shape token, over the objects carrying it,
    ``mean_best_iou`` (the best IoU of any predicted box with the object) and
    ``recall`` (the share with a predicted box of IoU >= 0.5): an AP50
    ceiling that no classification fixes.
  """
  info, model, lc = run.info, run.model, run.loss_config
  cfg = scene_config(info)
  vocab = info.vocab
  all_ids = np.arange(schema.UNK_ID + 1, len(vocab), dtype=np.int32)
  caption_only = {vocab.id(t) for t in tokens["caption_only"]}
  det_ids = {vocab.id(t) for t in tokens["det_category_tokens"]}
  trusted_row = np.array([t not in caption_only for t in all_ids])
  conflict_row = np.array([t in det_ids for t in all_ids])
  kk = min(lc.img_phrase_max_instances, info.spec.max_boxes)
  split = "img_val"
  first_id = shapes_world.image_id(split, 0)
  words_known = set(cfg.colors) | set(cfg.shapes)

  @jax.jit
  def forward(params, images, cands, phrase_tokens, phrase_counts):
    out = model.apply({"params": params}, images, cands, train=False)
    logits = out["pred_logits"]  # [B, N, Q]
    targets = token_ops.candidate_targets(phrase_tokens, cands)  # [B, P, Q]
    trusted = targets & jnp.asarray(trusted_row)[None, None]
    ok = (phrase_counts > 0) & trusted.any(-1)
    index, num = matching_cost.phrase_instances(ok, phrase_counts, kk)
    gather = lambda x: jnp.take_along_axis(x, index[..., None], axis=1)
    conflict = jnp.asarray(conflict_row)[None, None] & ~gather(targets)
    cost, trusted_prob = matching_cost.phrase_cost(
        logits, gather(trusted), conflict,
        conflict_weight=lc.img_phrase_conflict_weight,
        form=lc.img_phrase_cost)  # [B, N, K]
    valid = jnp.arange(kk)[None] < num[:, None]
    cost = jnp.where(valid[:, None], cost, 0.0)
    assign = matching.assignment_matrix(cost, num) * valid[:, None]
    return (assign, trusted_prob, index, ok,
            box_ops.cxcywh_to_xyxy(out["pred_boxes"]))

  ds = pipeline.make_eval_dataset(run.config.data, info, stream="img",
                                  process_index=0, process_count=1)
  phrase_stats: dict[str, dict[str, float]] = {}
  box_iou: dict[str, list[float]] = {}
  unmatched = 0
  scored = 0
  done = False
  for batch in ds:
    batch = _device_batch(batch)
    bsz = batch["image"].shape[0]
    cands = np.broadcast_to(all_ids, (bsz, len(all_ids))).copy()
    assign, tprob, index, ok, boxes = jax.device_get(forward(
        run.params, batch["image"], cands, batch["phrase_tokens"],
        batch["phrase_counts"]))
    for b in range(bsz):
      image_id = int(batch["image_id"][b])
      if image_id < 0:
        continue
      if max_images and scored >= max_images:
        done = True
        break
      scored += 1
      objs = shapes_world.render_scene(cfg, split, image_id - first_id).objects
      scale = float(batch["scale"][b])
      obj_boxes = np.stack([_canvas_xyxy(o.bbox, scale, model.image_size)
                            for o in objs])
      ious = np.asarray(box_ops.pairwise_box_iou(
          jnp.asarray(boxes[b]), jnp.asarray(obj_boxes, jnp.float32)))
      best = ious.max(0)  # [O]: the best predicted box of each object.
      for o, iou in zip(objs, best):
        for word in (o.color, o.shape):
          box_iou.setdefault(word, []).append(float(iou))
      unmatched += int(((batch["phrase_counts"][b] > 0) & ~ok[b]).sum())
      for n, k in zip(*np.nonzero(assign[b])):
        p = int(index[b, k])
        words = {vocab.token(int(t)) for t in batch["phrase_tokens"][b, p]
                 if t > schema.UNK_ID} & words_known
        carries = np.array([words <= {o.color, o.shape} for o in objs])
        if not words or not carries.any():
          continue  # A phrase of no object (truncated caption).
        s = phrase_stats.setdefault(_phrase_group(words, tokens), dict(
            matched=0, kept=0, hit=0, kept_hit=0, on_object=0, chance=0.0))
        top = int(np.argmax(ious[n]))
        on_object = bool(ious[n, top] >= IOU_HIT)
        hit = on_object and bool(carries[top])
        kept = bool(tprob[b, n, k] >= lc.img_phrase_min_trusted_prob)
        s["matched"] += 1
        s["kept"] += kept
        s["hit"] += hit
        s["kept_hit"] += hit and kept
        s["on_object"] += on_object
        s["chance"] += float(carries.mean())
    if done:
      break
  groups = {}
  for g, s in sorted(phrase_stats.items()):
    groups[g] = {"matched": s["matched"], "kept": s["kept"],
                 "hit_rate": _rate(s["hit"], s["matched"]),
                 "kept_hit_rate": _rate(s["kept_hit"], s["kept"]),
                 "on_object_rate": _rate(s["on_object"], s["matched"]),
                 "chance": _rate(s["chance"], s["matched"])}
  tracked = {t: g for g in GROUPS for t in tokens[g]}
  per_token = {w: {"group": tracked.get(w), "objects": len(v),
                   "mean_best_iou": float(np.mean(v)),
                   "recall": float(np.mean(np.asarray(v) >= IOU_HIT))}
               for w, v in sorted(box_iou.items())}
  return {"split": split, "images_scored": scored,
          "phrase_matching": {"min_trusted_prob":
                              lc.img_phrase_min_trusted_prob,
                              "unmatched_phrases": unmatched,
                              "per_group": groups},
          "boxes": {"iou_threshold": IOU_HIT, "per_token": per_token}}


def recolored_boxes(run: Run, tokens: Mapping[str, list[str]],
                    recolor: Mapping[str, str], *, max_images: int = 0
                    ) -> dict[str, Any]:
  """Box recall per token on repainted validation caption images.

  The run's ShapesWorld data is generated again (in a temporary folder, never
  the run's cache) with each colour of `recolor` painted in another's RGB
  (the generator's ``paint``): its random draws do not depend on the RGB
  values, so the scenes, objects and boxes are the same and only those
  objects' pixels change. If a caption-only colour's box recall rises to
  the other colours' when painted as a known one, its boxes fail because
  the box head never saw that colour (no box of it is ever supervised), not
  because of the scenes. (The whole dataset is generated: about a minute
  for the demo's on 2 cores.)

  Args:
    run: `load_run`.
    tokens: `token_sets`.
    recolor: colour name -> the colour whose RGB it gets.
    max_images: validation caption images (0: all).

  Returns:
    ``{"recolor", "changed_pixels", "iou_threshold", "per_token"}``; the
    last two as in `phrases_and_boxes`'s ``boxes``; ``changed_pixels``: the
    share of the repainted images' pixels that differ from the run's.
  """
  with tempfile.TemporaryDirectory(prefix="recolor-") as tmp:
    data = run.config.data.copy_and_resolve_references()
    with data.unlocked():
      data.cache_dir = tmp
      data.shapes_world.paint = tuple(f"{k}:{v}" for k, v in recolor.items())
    info = preparation.prepare_data(data)
    info = context_lib.with_run_vocab(info, run.workdir, run.config)
    painted = dataclasses.replace(run, info=info)
    boxes = phrases_and_boxes(painted, tokens, max_images=max_images)["boxes"]
    changed, total = 0, 0
    ours = shapes_world.output_paths(run.info.root)["image_root"]
    theirs = shapes_world.output_paths(info.root)["image_root"]
    split_dir = os.path.join(theirs, "img_val")
    names = sorted(os.listdir(split_dir))[:max_images or None]
    for name in names:
      a = images_lib.load_image({"image_path": os.path.join(ours, "img_val",
                                                        name)})
      b = images_lib.load_image({"image_path": os.path.join(split_dir, name)})
      changed += int((a != b).any(-1).sum())
      total += a.shape[0] * a.shape[1]
  return {"recolor": dict(recolor), "changed_pixels": _rate(changed, total),
          **boxes}


# ---------------------------------------------------------- candidate roles


def loss_roles(run: Run) -> dict[str, dict[str, str]]:
  """Which loss each candidate role meets, per stream, under the config."""
  lc = run.loss_config
  det_sampled = ("focal negative on matched predictions "
                 "(data.candidates.det_batch_negatives_known)"
                 if run.config.data.candidates.det_batch_negatives_known
                 else "no det loss")
  grd_neg = ("a competitor in the softmax of every matched prediction"
             if lc.grd_softmax == "candidates" else
             "no loss (grd_softmax='phrases': only phrase tokens compete)")
  region = (f"region-term negative (weight {lc.img_region_neg_weight})"
            if lc.img_region_pool != "none" and lc.img_region_weight
            else "no region term")
  return {
      "det": {
          "positive": "focal positive on the matched predictions",
          "known_negative": "focal negative on the matched predictions",
          "bg_negative": "focal negative on the unmatched predictions",
          "sampled_negative": det_sampled,
      },
      "grd": {
          "positive": "cross-entropy target of its boxes' matched "
                      "predictions; a softmax competitor of the other "
                      "phrases' boxes",
          "known_negative": grd_neg,
          "bg_negative": "never (grounding is not exhaustive)",
          "sampled_negative": grd_neg,
      },
      "img": {
          "positive": "image-softmax target and region-term positive",
          "known_negative": f"image-softmax competitor; {region}",
          "bg_negative": "never (captions have no boxes)",
          "sampled_negative": f"image-softmax competitor; {region}",
      },
  }


def _new_roles() -> dict[str, int]:
  return {"examples": 0, "candidate": 0, **{r: 0 for r in ROLES}}


def count_roles(batches: Sequence[Mapping[str, np.ndarray]],
                tracked: Mapping[int, tuple[str, str]]) -> dict[str, Any]:
  """Per tracked token and stream: examples where it is a candidate, by role.

  Args:
    batches: training batches with their candidate fields.
    tracked: token id -> (token, group).

  Returns:
    ``{"per_token": {token: {stream: counts}}, "per_group": {group:
    {stream: counts}}, "examples": {stream: n}}``; ``examples`` in the
    counts is the number of that stream's examples (the denominator).
  """
  per_token = {t: {s: _new_roles() for s in schema.STREAMS}
               for t, _ in tracked.values()}
  examples = {s: 0 for s in schema.STREAMS}
  for batch in batches:
    ids = candidates_lib.positive_ids(batch)  # [B, M * T + C]
    pool = set(candidates_lib.batch_pool(ids).tolist())
    for b in range(ids.shape[0]):
      stream = schema.STREAMS[int(batch["stream"][b])]
      examples[stream] += 1
      pos = set(ids[b].tolist())
      for q, t in enumerate(batch["candidates"][b].tolist()):
        if t not in tracked:
          continue
        c = per_token[tracked[t][0]][stream]
        c["candidate"] += 1
        if t in pos:
          c["positive"] += 1
        elif batch["cand_known"][b, q]:
          c["known_negative"] += 1
          c["bg_negative"] += int(batch["cand_bg"][b, q])
        else:
          c["sampled_negative"] += 1
          # A positive of the batch other than this example's own.
          if t in pool:
            c["sampled_batch_pool"] += 1
          else:
            c["sampled_vocab"] += 1
  for token_counts in per_token.values():
    for s, c in token_counts.items():
      c["examples"] = examples[s]
  per_group = {}
  for group in GROUPS:
    agg = {s: _new_roles() for s in schema.STREAMS}
    for t, g in tracked.values():
      if g != group:
        continue
      for s in schema.STREAMS:
        for k, v in per_token[t][s].items():
          if k != "examples":
            agg[s][k] += v
    for s in schema.STREAMS:
      agg[s]["examples"] = examples[s]
      agg[s]["tokens"] = sum(g == group for _, g in tracked.values())
    per_group[group] = agg
  return {"per_token": per_token, "per_group": per_group,
          "examples": examples}


# --------------------------------------------------------------- gradients


def _param_group(path: tuple[Any, ...]) -> str:
  top = getattr(path[0], "key", str(path[0]))
  if top == omnidet.BACKBONE:
    return "backbone"
  if top == omnidet.TOKEN_TABLE:
    return "token_table"
  return "head"


def _group_vectors(grads: Any) -> dict[str, jax.Array]:
  """A gradient pytree -> one flat vector per parameter group."""
  leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
  parts = {g: [] for g in ("backbone", "head", "token_table")}
  for path, leaf in leaves:
    parts[_param_group(path)].append(jnp.ravel(leaf))
  out = {g: jnp.concatenate(v) if v else jnp.zeros((0,), jnp.float32)
         for g, v in parts.items()}
  out["shared"] = jnp.concatenate([out["backbone"], out["head"]])
  return out


def make_stream_grads(run: Run):
  """Jitted ``(params, batch) -> per-stream gradients and logit pushes``."""
  model, lc = run.model, run.loss_config
  stream_configs = {
      s: dataclasses.replace(lc, **{f"{o}_weight": 0.0
                                    for o in schema.STREAMS if o != s})
      for s in schema.STREAMS}

  def outputs_fn(params, batch):
    out = model.apply({"params": params}, batch["image"], batch["candidates"],
                      train=False)
    return {k: out[k] for k in _FLOAT_OUTPUTS}

  @jax.jit
  def fn(params, batch):
    outputs, vjp = jax.vjp(lambda p: outputs_fn(p, batch), params)
    total = omni_loss_lib.omni_loss(outputs, batch, lc)[0]
    res = {"total_loss": total}
    for s, cfg in stream_configs.items():
      loss, g_out = jax.value_and_grad(
          lambda o, cfg=cfg: omni_loss_lib.omni_loss(o, batch, cfg)[0])(
              outputs)
      (g_params,) = vjp(g_out)
      res[s] = {"loss": loss, "vectors": _group_vectors(g_params),
                "table": g_params[omnidet.TOKEN_TABLE],
                "g_logits": g_out["pred_logits"],
                "g_image": g_out["image_logits"]}
    return res

  return fn


def _cos(a: np.ndarray, b: np.ndarray) -> float | None:
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return float(a @ b / (na * nb)) if na > 0 and nb > 0 else None


def gradient_stats(run: Run, batches: Sequence[Mapping[str, np.ndarray]],
                   tracked: Mapping[int, tuple[str, str]]) -> dict[str, Any]:
  """Per-stream gradient norms, cosines, token rows and logit pushes."""
  fn = make_stream_grads(run)
  grid = run.model.grid
  cx, cy = _patch_centres(grid).T  # [N], [N]
  pairs = [(a, b) for i, a in enumerate(schema.STREAMS)
           for b in schema.STREAMS[i + 1:]]
  per_batch = []
  sums = {s: {} for s in schema.STREAMS}
  rows = {s: {t: [] for t, _ in tracked.values()} for s in schema.STREAMS}
  where = ("object", "background", "image")
  push = {s: {t: {r: dict.fromkeys(where, 0.0) for r in PUSH_ROLES}
              for t, _ in tracked.values()} for s in schema.STREAMS}
  loss_err = 0.0
  for batch in batches:
    res = jax.device_get(fn(run.params, batch))
    loss_err = max(loss_err, abs(float(res["total_loss"]) - sum(
        float(res[s]["loss"]) for s in schema.STREAMS)))
    entry = {"total_loss": float(res["total_loss"]), "streams": {},
             "cosine": {}}
    for s in schema.STREAMS:
      vec = res[s]["vectors"]
      entry["streams"][s] = {
          "loss": float(res[s]["loss"]),
          **{f"norm_{g}": float(np.linalg.norm(vec[g])) for g in PARAM_GROUPS}}
      for g in PARAM_GROUPS:
        sums[s][g] = sums[s].get(g, 0.0) + np.asarray(vec[g], np.float64)
      table = res[s]["table"]
      for i, (t, _) in tracked.items():
        rows[s][t].append(float(np.linalg.norm(table[i])))
    for a, b in pairs:
      entry["cosine"][f"{a}/{b}"] = {
          g: _cos(res[a]["vectors"][g], res[b]["vectors"][g])
          for g in PARAM_GROUPS}
    # Where each stream pushes each tracked token's logits.
    boxes = np.asarray(box_ops.cxcywh_to_xyxy(jnp.asarray(
        batch["boxes"])))  # [B, M, 4]
    in_box = ((cx[None, :, None] >= boxes[:, None, :, 0]) &
              (cx[None, :, None] <= boxes[:, None, :, 2]) &
              (cy[None, :, None] >= boxes[:, None, :, 1]) &
              (cy[None, :, None] <= boxes[:, None, :, 3]) &
              batch["box_mask"][:, None, :]).any(-1)  # [B, N]
    positives = candidates_lib.positive_ids(batch)  # [B, M * T + C]
    for s in schema.STREAMS:
      g_logits, g_image = res[s]["g_logits"], res[s]["g_image"]
      for bi, row in enumerate(batch["candidates"]):
        pos = set(positives[bi].tolist())
        for q, t in enumerate(row.tolist()):
          if t not in tracked:
            continue
          p = push[s][tracked[t][0]][
              "positive" if t in pos else "negative"]
          p["object"] -= float(g_logits[bi, in_box[bi], q].sum())
          p["background"] -= float(g_logits[bi, ~in_box[bi], q].sum())
          p["image"] -= float(g_image[bi, q])
    per_batch.append(entry)

  def mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None

  streams = {}
  for s in schema.STREAMS:
    streams[s] = {
        "loss": mean([e["streams"][s]["loss"] for e in per_batch]),
        **{f"norm_{g}": mean([e["streams"][s][f"norm_{g}"]
                              for e in per_batch]) for g in PARAM_GROUPS},
        **{f"norm_{g}_summed": float(np.linalg.norm(sums[s][g]))
           for g in PARAM_GROUPS}}
  cosine = {f"{a}/{b}": {g: mean([e["cosine"][f"{a}/{b}"][g]
                                  for e in per_batch]) for g in PARAM_GROUPS}
            for a, b in pairs}
  cosine_summed = {f"{a}/{b}": {g: _cos(sums[a][g], sums[b][g])
                                for g in PARAM_GROUPS} for a, b in pairs}
  token_rows = {s: {t: mean(v) for t, v in rows[s].items()}
                for s in schema.STREAMS}
  group_of = {t: g for t, g in tracked.values()}
  push_groups = {
      s: {g: {r: {k: float(sum(push[s][t][r][k] for t in push[s]
                               if group_of[t] == g)) for k in where}
              for r in PUSH_ROLES} for g in GROUPS}
      for s in schema.STREAMS}
  lc = run.loss_config
  return {
      "batches": len(per_batch),
      "weights": {"det": lc.det_weight, "grd": lc.grd_weight,
                  "img": lc.img_weight},
      "grad_clip_norm": float(run.config.optimizer.grad_clip_norm or 0.0),
      "loss_sum_error": loss_err,
      "streams": streams,
      "cosine": cosine,
      "cosine_summed": cosine_summed,
      "token_rows": token_rows,
      "logit_push": {"per_token": push, "per_group": push_groups},
      "per_batch": per_batch,
  }


# -------------------------------------------------------------------- main


def diagnose(workdir: str, *, checkpoint_step: int | None = None,
             num_batches: int = 50, grad_batches: int = 4,
             max_images: int = 0,
             recolor: Mapping[str, str] | None = None) -> dict[str, Any]:
  """All three measurements on a run (see the module docstring)."""
  t0 = time.perf_counter()
  run = load_run(workdir, checkpoint_step)
  tokens = token_sets(run.info)
  tracked = _tracked(run.info, tokens)
  pointing = pointing_test(run, tokens, max_images=max_images)
  pointing.update(phrases_and_boxes(run, tokens, max_images=max_images))
  if recolor:
    pointing["boxes_recolored"] = recolored_boxes(run, tokens, recolor,
                                                  max_images=max_images)
  t_point = time.perf_counter()
  it = iter(pipeline.make_train_dataset(run.config.data, run.info,
                                        process_index=0, process_count=1))
  batches = [_device_batch(next(it))
             for _ in range(max(num_batches, grad_batches))]
  roles = count_roles(batches[:num_batches], tracked)
  roles["batches"] = min(num_batches, len(batches))
  roles["loss_roles"] = loss_roles(run)
  t_roles = time.perf_counter()
  # --grad_batches=0 skips the gradients (the slowest part to compile).
  grads = (gradient_stats(run, batches[:grad_batches], tracked)
           if grad_batches > 0 else None)
  t_grads = time.perf_counter()
  return {
      "workdir": os.path.abspath(workdir),
      "step": run.step,
      "data_root": run.info.root,
      "batch": dict(run.config.data.batch),
      "tokens": {**tokens,
                 "not_in_vocab": sorted(t for g in GROUPS for t in tokens[g]
                                        if t not in run.info.vocab)},
      "pointing": pointing,
      "candidate_roles": roles,
      "gradients": grads,
      "seconds": {"total": time.perf_counter() - t0,
                  "pointing": t_point - t0, "roles": t_roles - t_point,
                  "gradients": t_grads - t_roles},
  }


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.quiet_library_logs()
  recolor = {}
  for pair in f.recolor:
    name, sep, other = pair.partition(":")
    if not sep:
      raise app.UsageError(f"--recolor={pair}: expected COLOR:OTHER, e.g. "
                           "pink:red.")
    recolor[name] = other
  result = diagnose(f.workdir, checkpoint_step=f.checkpoint_step,
                    num_batches=f.num_batches, grad_batches=f.grad_batches,
                    max_images=f.max_images, recolor=recolor)
  text = json.dumps(result, indent=1)
  if f.out:
    os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
    with open(f.out, "w") as fh:
      fh.write(text + "\n")
  print(text)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
