r"""The OmniTrain claim at small scale: which streams teach novel concepts?

    python experiments/ablation.py --out=runs/ablation            # all mixes, seeds 0,1
    python experiments/ablation.py --out=runs/ablation --jobs=2   # 2 runs at a time
    python experiments/ablation.py --out=/tmp/a --mixes=det,det+grd --seeds=0 \
        --config=configs/shapes_demo.py:tiny                       # a quick check

Trains the same model, steps and seeds on ShapesWorld with different stream
mixes (the det share of every batch is the same in all runs; grd and img add
their shares on top):

  det                  detection only
  det+grd              + grounding phrases (the only place `star`, `purple` get boxes)
  det+img              + captions (the only place `hexagon`, `pink` appear)
  det+grd+img          all three (the default recipe)
  det+grd+img/no_phrase   all three, without caption phrase-region matching
                          (``loss.img_phrase_weight=0``: the recipe before it)
  det+grd+img/partial     all three, each caption naming about half its
                          objects (ShapesWorld ``caption_drop_fraction=0.5``;
                          real captions mention some objects, not all)
  det+grd+img/no_region   all three, without the caption loss's region term
  det+grd+img/no_jitter   all three, without the demo config's colour
                          jitter of half the det images
                          (``data.augment.color_jitter_prob=0``: the recipe
                          before it)
  det+grd+img/no_selftrain all three, without the config's in-run
                          self-training (``self_train.steps=()``)
  det+grd+img/maxsize     all three, Detic's max-size image-label loss
                          instead of phrase matching (not in the default
                          mixes)

A variant (after ``/``) applies to any mix: ``det+img/partial``.

and evaluates each run on the validation set:

* base / grd-novel / img-novel / all-category AP50 (categories named by their
  colour + shape query, e.g. `purple star`);
* grounding Acc@0.5;
* chance references: the AP50 of the *bare novel token* (`star` scored against
  every star box, whatever its colour), per novel group. A det-only model has
  never seen these tokens, so its values of the same numbers are the level
  that colour tokens and objectness alone reach.

Writes ``OUT/ablation.json`` (every run's metrics, and mean/std per mix),
``OUT/ablation.md`` (the table) and ``OUT/ablation.png`` (novel AP50 by mix).
Runs are resumable: a finished run is only re-evaluated if its metrics are
missing.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

def _define_flags() -> None:
  """Flags exist only when this file runs as the program (tests import it)."""
  flags.DEFINE_string("out", "runs/ablation", "Output folder.")
  flags.DEFINE_string("config", os.path.join(REPO, "configs", "shapes_demo.py"),
                      "Base config (path[:variant]).")
  flags.DEFINE_list("mixes", ["det", "det+grd", "det+img", "det+grd+img",
                              "det+grd+img/no_phrase",
                              "det+grd+img/no_jitter",
                              "det+grd+img/partial"],
                    "Stream mixes to train.")
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds (model and data).")
  flags.DEFINE_string("cache_dir", "", "ShapesWorld cache folder.")
  flags.DEFINE_multi_string("override", [], "Extra --config.x=y for every run.")
  flags.DEFINE_integer("jobs", 1, "Runs trained at the same time, each "
                       "pinned to its own share of the CPU cores (Linux).")
  flags.DEFINE_bool("per_token", False, "Also evaluate each novel token "
                    "alone (columns bare_<token>_AP50: `hexagon` and `pink` "
                    "apart, as issue 12's goals ask).")
  flags.DEFINE_bool("replot", False, "Only redraw OUT/ablation.{md,png} from "
                    "OUT/ablation.json.")


# The variants of a mix ("det+grd+img/partial"): their config overrides.
VARIANTS = {
    "": [],
    "no_region": ["--config.loss.img_region_weight=0"],
    "no_phrase": ["--config.loss.img_phrase_weight=0"],
    "partial": ["--config.data.shapes_world.caption_drop_fraction=0.5"],
    "no_jitter": ["--config.data.augment.color_jitter_prob=0"],
    "no_selftrain": ["--config.self_train.steps=()"],
    # Detic's max-size image-label loss in place of phrase matching, with
    # phrase matching's weight and warm-up.
    "maxsize": ["--config.loss.img_phrase_weight=0",
                "--config.loss.img_maxsize_weight=2",
                "--config.loss.img_maxsize_warmup_steps=500"],
}


def mix_overrides(mix: str, base_batch: dict[str, int]) -> list[str]:
  """Config overrides for a stream mix ("det+grd", "det+grd+img/partial")."""
  streams, _, variant = mix.partition("/")
  names = streams.split("+")
  unknown = set(names) - {"det", "grd", "img"}
  if unknown or "det" not in names or variant not in VARIANTS:
    raise ValueError(f"Bad mix {mix!r}: streams from det/grd/img (det "
                     "always), optional '/VARIANT' with VARIANT one of "
                     f"{sorted(v for v in VARIANTS if v)}.")
  batch = {s: (base_batch[s] if s in names else 0) for s in base_batch}
  out = [f"--config.data.batch.{s}={n}" for s, n in batch.items()]
  out.append(f"--config.batch_size={sum(batch.values())}")
  return out + VARIANTS[variant]


def apply_data_overrides(config, overrides: list[str]) -> list[str]:
  """Applies the ``data.*`` entries of ``--override`` to `config` in place.

  The runs get every override as a flag; the data this program prepares
  itself (the vocabulary, the bare-token val files) must come from the same
  generated dataset, so e.g. ``--override=data.shapes_world.seed=7`` makes
  the token sets from seed 7's validation file too. Returns the applied keys.
  """
  import ast  # pylint: disable=g-import-not-at-top
  applied = []
  for entry in overrides:
    key, sep, text = entry.partition("=")
    if not sep:
      raise ValueError(f"--override={entry!r}: use KEY=VALUE, e.g. "
                       "loss.grd_weight=0.1.")
    if not key.startswith("data."):
      continue
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise ValueError(f"--override={entry!r}: config has no field {key}.")
    old = node[leaf]
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    if isinstance(old, float) and isinstance(value, int):
      value = float(value)
    if old is not None and type(value) is not type(old):
      raise ValueError(f"--override={entry!r}: {key} is of type "
                       f"{type(old).__name__}, got {value!r}.")
    node[leaf] = value
    applied.append(key)
  return applied


def token_dataset(det_val: str, tokens: list[str], out_path: str) -> str:
  """det_val.json with one category per token: every box whose name has it."""
  data = json.load(open(det_val))
  names = {c["id"]: c["name"].split() for c in data["categories"]}
  cats = [{"id": i + 1, "name": t} for i, t in enumerate(tokens)]
  anns = []
  for ann in data["annotations"]:
    for i, t in enumerate(tokens):
      if t in names[ann["category_id"]]:
        anns.append({**ann, "id": len(anns) + 1, "category_id": i + 1})
  json.dump({"images": data["images"], "annotations": anns,
             "categories": cats}, open(out_path, "w"))
  return out_path


def core_groups(jobs: int) -> list[set[int] | None]:
  """This process's CPU cores split into `jobs` disjoint groups.

  Small models use several cores poorly (on 2 cores, two single-core runs
  train about 1.2x as many steps per second as one run on both), so
  concurrent runs each get their own cores rather than sharing all of them.
  None (no pinning) where the OS cannot pin or there are fewer cores than
  jobs.
  """
  if jobs <= 1 or not hasattr(os, "sched_getaffinity"):
    return [None] * max(jobs, 1)
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < jobs:
    return [None] * jobs
  return [set(cores[i::jobs]) for i in range(jobs)]


def _run(cmd: list[str], log_path: str,
         cores: set[int] | None = None) -> None:
  # Pinned from the parent, not with preexec_fn (unsafe in a threaded
  # program): right after the child starts, long before JAX creates threads
  # (they inherit the main thread's affinity).
  with open(log_path, "a") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    if cores:
      try:
        os.sched_setaffinity(proc.pid, cores)
      except OSError:  # Already exited; its return code tells.
        pass
    proc.wait()
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed; see {log_path}")


def _latest_metrics(workdir: str) -> dict[str, float]:
  eval_dir = os.path.join(workdir, "eval")
  steps = sorted(int(p) for p in os.listdir(eval_dir) if p.isdigit())
  with open(os.path.join(eval_dir, str(steps[-1]), "metrics.json")) as f:
    return json.load(f)


def summarize(metrics: dict[str, float]) -> dict[str, float]:
  g = metrics.get
  bare = {f"{k.split('/')[1]}_AP50": v for k, v in sorted(metrics.items())
          if k.startswith("eval/bare_") and k.endswith("/AP50")}
  return {
      "base_AP50": g("eval/shapes_det/AP50_base"),
      "grd_novel_AP50": g("eval/shapes_det/AP50_grd_novel"),
      "img_novel_AP50": g("eval/shapes_det/AP50_img_novel"),
      "all_AP": g("eval/shapes_det/AP"),
      "grounding_acc50": g("eval/shapes_grd/acc@0.5"),
      "grd_token_AP50": g("eval/grd_tokens/AP50"),
      "img_token_AP50": g("eval/img_tokens/AP50"),
      **bare,  # --per_token: bare_<token>_AP50
  }


COLUMNS = ("base_AP50", "grd_novel_AP50", "img_novel_AP50", "all_AP",
           "grounding_acc50", "grd_token_AP50", "img_token_AP50")


def _columns(runs) -> tuple[str, ...]:
  """COLUMNS, then the per-token columns (--per_token) that any run has."""
  bare = sorted({k for r in runs for k in r if k.startswith("bare_")})
  return COLUMNS + tuple(bare)


def markdown(per_mix: dict[str, dict[str, list[float]]]) -> str:
  columns = tuple(next(iter(per_mix.values()))) if per_mix else COLUMNS
  head = "| mix | " + " | ".join(columns) + " |"
  lines = [head, "|" + "---|" * (len(columns) + 1)]
  for mix, cols in per_mix.items():
    cells = [f"{np.mean(cols[c]):.3f} ± {np.std(cols[c]):.3f}"
             if cols.get(c) else "-" for c in columns]
    lines.append(f"| {mix} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(per_mix, path: str) -> None:
  """Grouped bars: base / grd-novel / img-novel AP50 per mix (PIL only)."""
  keys = (("base_AP50", (90, 90, 90)), ("grd_novel_AP50", (40, 110, 200)),
          ("img_novel_AP50", (220, 120, 30)))
  w, h, left, bottom = 120 * len(per_mix) + 80, 360, 50, 60
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  top = 20
  # The y axis ends at the next 0.05 above the highest value (small APs
  # would be unreadable on a 0..1 axis).
  highest = max([v for cols in per_mix.values() for k, _ in keys
                 for v in cols[k] if v is not None] + [0.05])
  ymax = float(np.ceil(highest * 1.1 / 0.05) * 0.05)
  scale = (h - bottom - top) / ymax
  for v in np.linspace(0.0, ymax, 5):
    y = h - bottom - v * scale
    d.line([(left, y), (w - 10, y)], fill=(225, 225, 225))
    d.text((5, y - 6), f"{v:.3f}", fill="black")
  for i, (mix, cols) in enumerate(per_mix.items()):
    x0 = left + 10 + 120 * i
    for j, (k, color) in enumerate(keys):
      vals = [v for v in cols[k] if v is not None]
      m = float(np.mean(vals)) if vals else 0.0
      x = x0 + 30 * j
      d.rectangle([x, h - bottom - max(m, 0) * scale, x + 26, h - bottom],
                  fill=color)
      for v in vals:  # Each seed as a tick.
        y = h - bottom - v * scale
        d.line([(x + 4, y), (x + 22, y)], fill="black")
    d.text((x0, h - bottom + 8), mix.replace("/", "\n/"), fill="black")
  for j, (k, color) in enumerate(keys):
    d.rectangle([left + 10 + 150 * j, h - 18, left + 22 + 150 * j, h - 6],
                fill=color)
    d.text((left + 26 + 150 * j, h - 19), k, fill="black")
  img.save(path)


def _per_mix(runs):
  per_mix = {}
  columns = _columns(runs)
  for r in runs:
    cols = per_mix.setdefault(r["mix"], {c: [] for c in columns})
    for c in columns:
      if r.get(c) is not None:
        cols[c].append(r[c])
  return per_mix


def main(argv):
  del argv
  f = flags.FLAGS
  if f.replot:
    out = os.path.abspath(f.out)
    with open(os.path.join(out, "ablation.json")) as f:
      per_mix = _per_mix(json.load(f)["runs"])
    with open(os.path.join(out, "ablation.md"), "w") as f:
      f.write(markdown(per_mix) + "\n")
    plot(per_mix, os.path.join(out, "ablation.png"))
    return
  import runpy  # pylint: disable=g-import-not-at-top
  from omnitrain_jax.data import preparation  # pylint: disable=g-import-not-at-top
  from omnitrain_jax.data import shapes_world  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(f.out)
  os.makedirs(out, exist_ok=True)
  path, _, variant = f.config.partition(":")
  base = runpy.run_path(path)["get_config"](variant or None)
  base.unlock()
  if f.cache_dir:
    base.data.cache_dir = f.cache_dir
  apply_data_overrides(base, f.override)
  cache_flag = ([f"--config.data.cache_dir={f.cache_dir}"]
                if f.cache_dir else [])
  # One vocabulary for every run, built from all three streams' annotations
  # (a det-only run would otherwise build one without `star`, and could not
  # even be asked about it): novel tokens then exist in every model, and a
  # run that never trained them shows their chance level.
  info = preparation.prepare_data(base.data)
  vocab_flag = [f"--config.data.vocab.path={info.vocab_path}"]
  paths = shapes_world.output_paths(info.root)
  splits = info.splits
  token_sets = {
      "grd_tokens": token_dataset(paths["det_val"], splits["grd_novel_tokens"],
                                  os.path.join(out, "grd_tokens.json")),
      "img_tokens": token_dataset(paths["det_val"], splits["img_novel_tokens"],
                                  os.path.join(out, "img_tokens.json")),
  }
  if f.per_token:
    for tok in (*splits["grd_novel_tokens"], *splits["img_novel_tokens"]):
      token_sets[f"bare_{tok}"] = token_dataset(
          paths["det_val"], [tok], os.path.join(out, f"bare_{tok}.json"))
  def train_and_evaluate(mix: str, seed: str, cores) -> dict:
    workdir = os.path.join(out, mix.replace("+", "_").replace("/", "-"),
                           f"seed{seed}")
    log = workdir + ".log"
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    t0 = time.time()
    _run([sys.executable, "-m", "omnitrain_jax.main",
          f"--config={f.config}", f"--workdir={workdir}",
          f"--config.seed={seed}", f"--config.data.seed={seed}",
          *cache_flag, *vocab_flag, *mix_overrides(mix, dict(base.data.batch)),
          *[f"--config.{o}" for o in f.override]], log, cores)
    for name, json_path in token_sets.items():
      _run([sys.executable, "-m", "omnitrain_jax.evaluate",
            f"--workdir={workdir}", f"--dataset_json={json_path}",
            f"--image_dir={paths['image_root']}", f"--dataset_name={name}"],
           log, cores)
    run = {"mix": mix, "seed": int(seed), "workdir": workdir,
           "seconds": time.time() - t0, **summarize(_latest_metrics(workdir))}
    print(json.dumps(run), flush=True)
    return run

  start = time.time()
  todo = [(mix, seed) for mix in f.mixes for seed in f.seeds]
  groups = core_groups(f.jobs)
  free = list(range(len(groups)))  # Core groups not in use.
  lock = threading.Lock()

  def task(mix_seed):
    with lock:
      slot = free.pop()
    try:
      return train_and_evaluate(*mix_seed, groups[slot])
    finally:
      with lock:
        free.append(slot)

  with concurrent.futures.ThreadPoolExecutor(max(f.jobs, 1)) as pool:
    runs = list(pool.map(task, todo))  # In `todo` order; raises on failure.
  per_mix = _per_mix(runs)
  result = {"config": f.config, "overrides": f.override,
            "seeds": f.seeds, "wall_seconds": time.time() - start,
            "runs": runs,
            "mean": {m: {c: float(np.mean(v)) if v else None
                         for c, v in cols.items()} for m, cols in per_mix.items()},
            "std": {m: {c: float(np.std(v)) if v else None
                        for c, v in cols.items()} for m, cols in per_mix.items()}}
  with open(os.path.join(out, "ablation.json"), "w") as f:
    json.dump(result, f, indent=1)
  table = markdown(per_mix)
  with open(os.path.join(out, "ablation.md"), "w") as f:
    f.write(table + "\n")
  plot(per_mix, os.path.join(out, "ablation.png"))
  print(table)
  print(f"wall time {result['wall_seconds'] / 60:.1f} min; {out}/ablation."
        "{json,md,png}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
