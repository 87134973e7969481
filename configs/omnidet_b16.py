r"""OmniDet ViT-B/16 at 768 px: COCO + LVIS, RefCOCOg + Flickr30k, captions.

    python -m omnitrain_jax.main --config=configs/omnidet_b16.py --workdir=gs://BUCKET/omni \
        --config.data.root=/data --config.init_from=...   # every host of a pod
    launch/tpu_pod.sh ... --config=configs/omnidet_b16.py --workdir=gs://BUCKET/omni

Variants:
  (default)  real data under ``data.root`` (the layout below); a fresh machine
             without it fails early with the missing file and how to get it.
  ``shapes`` the same model, resolution and batch on ShapesWorld (generated
             on first use), e.g. to check a pod end to end before the data
             is copied.

Expected layout under ``data.root`` (override any path with
``--config.data.sources.det.coco.train=...``)::

  coco/annotations/instances_{train,val}2017.json   coco/{train,val}2017/*.jpg
  lvis/lvis_v1_{train,val}.json                     (images: coco/, via coco_url)
  mdetr/final_refcocog_{train,val}.json             (images: coco/train2014/)
  mdetr/final_flickr_separateGT_{train,val}.json    flickr30k/images/*.jpg
  captions/cc12m.jsonl                              ({"image": ..., "caption": ...})
  vocab.txt   built once with `python -m omnitrain_jax.data.build_vocab --out
              vocab.txt --max_size 250000 <the train files above>`

Where the values come from (none tuned here: no COCO-scale compute):
  * 768 px, batch 256, 100 boxes per image, focal alpha/gamma, prior 0.01,
    warmup 1000, Adam b1/b2, global-norm clip 1: OWL-ViT's B/16 detection
    fine-tuning recipe (scenic ``owl_vit/configs/clip_b32_finetune.py``:
    base LR 5e-5 on image tower + heads, 16k steps, 50 random negatives).
  * The backbone runs at OWL-ViT's 5e-5; the head and the token table are new
    (random) and run 4x higher.
  * 128 det + 64 grd + 64 img: the design's composition (DESIGN.md section 5).
  * 100k steps: OWL-ViT fine-tunes a CLIP tower for 16k steps; here the token
    table learns language from scratch, so we start longer (unverified).
"""

import ml_collections

from omnitrain_jax import config_lib


def _real_sources() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      det=dict(
          coco=dict(reader="coco_instances",
                    train="coco/annotations/instances_train2017.json",
                    val="coco/annotations/instances_val2017.json",
                    image_dir="coco/train2017", weight=1.0),
          lvis=dict(reader="lvis", train="lvis/lvis_v1_train.json",
                    val="lvis/lvis_v1_val.json", image_dir="coco",
                    weight=1.0),
      ),
      grd=dict(
          refcocog=dict(reader="mdetr_grounding",
                        train="mdetr/final_refcocog_train.json",
                        val="mdetr/final_refcocog_val.json",
                        image_dir="coco/train2014", weight=1.0),
          flickr=dict(reader="mdetr_grounding",
                      train="mdetr/final_flickr_separateGT_train.json",
                      val="mdetr/final_flickr_separateGT_val.json",
                      image_dir="flickr30k/images", weight=1.0),
      ),
      img=dict(
          cc12m=dict(reader="caption_jsonl", train="captions/cc12m.jsonl",
                     image_dir="captions", weight=1.0),
      ),
  ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (real data) or "shapes" (ShapesWorld at the same size)."""
  if arg not in (None, "", "shapes"):
    raise ValueError(f"Unknown variant {arg!r}; use configs/omnidet_b16.py or "
                     "configs/omnidet_b16.py:shapes.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  # --------------------------------------------------------------- data ---
  data = config_lib.data_config()
  if arg == "shapes":
    data.shapes_world.num_images = 20000
    data.shapes_world.image_size = 768
  else:
    data.dataset = "files"
    data.root = ""  # Set on the command line: --config.data.root=/data.
    data.sources = _real_sources()
    data.vocab.path = ""  # vocab.txt under data.root is recommended (below).
    data.vocab.max_size = 250_000
    data.vocab.split_categories = False
  data.batch = ml_collections.ConfigDict(dict(det=128, grd=64, img=64))
  data.eval_batch_size = 64
  data.spec = ml_collections.ConfigDict(dict(
      image_size=768,
      max_boxes=100,         # OWL-ViT's num_instances; more are counted.
      max_box_tokens=8,
      max_caption_tokens=32,
      max_neg_tokens=128,    # COCO: the 80 names' tokens; LVIS: neg ids.
      num_candidates=384,    # Positives + known + 50+ sampled negatives.
  ))
  data.augment.crop_min_scale = 0.6  # OWL-ViT's min_area_fraction 0.6.
  # Colour jitter of half the det images, their colour words unlabelled, as
  # in the demo config, where it let caption-only colours get boxes (README,
  # "Colour-jittered boxes"); measured there only (a from-scratch backbone,
  # colour as the main cue). COCO's "orange" loses its label on the jittered
  # images (its boxes still train the box head).
  data.augment.color_jitter_prob = 0.5
  data.strict = False  # Web-scale captions always have some broken files.
  data.num_threads = 16
  data.num_workers = 0
  config.data = data
  # ------------------------------------------------------ model / train ---
  model = config_lib.model_config("B/16", 768, dtype="bfloat16", remat=True,
                                  droppath=0.2)
  config_lib.add_training_sections(config, total_steps=100_000, batch_size=256,
                                   model=model)
  config.loss.focal_alpha = 0.3  # OWL-ViT.
  # Each stream's loss is a mean over its own targets; weight grd and img by
  # their share of the batch relative to det (64 / 128). On ShapesWorld this
  # beat equal weights on base and novel AP (README, "What the demo reaches").
  config.loss.grd_weight = 0.5
  config.loss.img_weight = 0.5
  # Grounding as GLIP's per-token sigmoid focal loss, matched on det's
  # focal cost: MDETR's uniform-target softmax pushes a phrase word det
  # scores high down towards the phrase's weakest word. On ShapesWorld it
  # (with grd at half its batch share) closed the base AP that mixing cost
  # (README, "What mixing cost base AP"); not measured on real data, and the
  # weight stays at the batch share here.
  config.loss.grd_token_loss = "focal"
  config.loss.grd_cost_class = config.loss.cost_class
  # Caption phrase-region matching (losses/omni_loss.py), as in the demo
  # config where it lifted img-novel AP50 (README, "Phrase-region
  # matching"); weight and a 10% warm-up taken from there, not tuned on real
  # captions (their phrases come from vocab/phrases.py's chunker).
  config.loss.img_phrase_weight = 2.0
  config.loss.img_phrase_warmup_steps = 10_000
  # In-run self-training (config.self_train, README "Self-training") stays
  # off here: its labelling runs on one process, and this config is for
  # pods. On one host: --config.self_train.steps='(60000,80000)' with
  # --config.self_train.max_images (a subset of the caption images). On a
  # pod: label offline (experiments/self_train.py on a checkpoint) and add
  # the file as a det source (configs/shapes_selftrain.py shows how).
  config.optimizer.learning_rate = 2e-4
  config.optimizer.backbone_lr_multiplier = 0.25  # 5e-5, OWL-ViT's rate.
  config.optimizer.warmup_steps = 1000
  config.optimizer.weight_decay = 0.0  # OWL-ViT fine-tunes without decay.
  config.checkpoint_every_steps = 2000
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  # Set --config.backbone_npz to an AugReg ImageNet-21k ViT-B/16 .npz (e.g.
  # B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz); the
  # trainer's init_from instead takes an omnitrain_jax checkpoint.
  config.lock()
  return config
