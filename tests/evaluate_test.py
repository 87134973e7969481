"""Whole-program tests of evaluation after a tiny training run.

One training run (`python -m omnitrain_jax.main`, the tiny ShapesWorld
config: tests/conftest.py's `tiny_run`, copied) serves the module. The evaluate binary runs on 2 fake devices, on 2
processes (which must give the same files), and on a COCO file given by
path; the `Evaluator` the trainer uses runs in this process.
"""

import contextlib
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import binaries  # tests/binaries.py

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "shapes_demo.py") + ":tiny"
DET_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "AP_base",
            "AP50_base", "AP_grd_novel", "AP50_grd_novel", "AP_img_novel",
            "AP50_img_novel", "unknown_query_words", "queries_without_tokens",
            "num_images"]
GRD_KEYS = ["acc@0.5", "num_phrases", "unknown_query_words",
            "queries_without_tokens", "num_images"]


def _env(devices=1):
  return binaries.subprocess_env(devices)


def _run(cmd, env, timeout=600):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=str(REPO))
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _evaluate_cmd(workdir, *flags):
  return [sys.executable, "-m", "omnitrain_jax.evaluate",
          f"--workdir={workdir}", *flags]


# The step of the trained run (`tiny_run`'s last), so its eval/ folder.
STEP = str(binaries.REFERENCE_STEPS)


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
  """A trained tiny run: (workdir, cache_dir, dataset root).

  A copy of the shared `tiny_run` without its eval/ folder (the training's
  own evaluation), so what these tests read under eval/ is the evaluate
  binary's.
  """
  src, data_root = tiny_run
  workdir = tmp_path_factory.mktemp("evaluate") / "work"
  shutil.copytree(src, workdir, symlinks=True,
                  ignore=shutil.ignore_patterns("eval"))
  return str(workdir), str(pathlib.Path(data_root).parent), data_root


@pytest.fixture(scope="module")
def evaluated(run):
  """The binary on 2 devices: (eval dir, metrics, its stderr)."""
  workdir, _, _ = run
  proc = _run(_evaluate_cmd(workdir), _env(devices=2))
  out = pathlib.Path(workdir) / "eval" / STEP
  return out, json.loads((out / "metrics.json").read_text()), proc.stderr


def test_files_and_metric_keys(evaluated):
  out, metrics, stderr = evaluated
  for name in ("detections_shapes_det.json", "grounding_shapes_grd.json",
               "queries_shapes_det.json", "queries_shapes_grd.json"):
    assert (out / name).exists(), name
  for key in DET_KEYS:
    assert f"eval/shapes_det/{key}" in metrics, key
  for key in GRD_KEYS:
    assert f"eval/shapes_grd/{key}" in metrics, key
  assert all(isinstance(v, float) for v in metrics.values())
  assert metrics["eval/shapes_det/num_images"] == 12
  assert "images/s" in stderr and "ETA" in stderr  # Console progress.


def test_detections_are_coco_results_scored_like_pycocotools(run, evaluated):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  _, _, data_root = run
  out, metrics, _ = evaluated
  gt_path = str(data_root / "det_val.json")
  gt_json = json.loads(pathlib.Path(gt_path).read_text())
  sizes = {im["id"]: (im["width"], im["height"]) for im in gt_json["images"]}
  dets = json.loads((out / "detections_shapes_det.json").read_text())
  per_image = {}
  for d in dets:
    assert set(d) == {"image_id", "category_id", "bbox", "score"}
    w, h = sizes[d["image_id"]]
    x, y, bw, bh = d["bbox"]
    assert 0 <= x and 0 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
  assert set(per_image) == set(sizes)
  assert max(per_image.values()) == 300  # 16 boxes x 80 categories >= 300.
  splits = json.loads((data_root / "splits.json").read_text())
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(gt_path)
    res = coco.loadRes(str(out / "detections_shapes_det.json"))
    for cats, suffix in ((None, ""), (splits["base_categories"], "_base")):
      ev = COCOeval(coco, res, "bbox")
      if cats is not None:
        ev.params.catIds = cats
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
      assert metrics[f"eval/shapes_det/AP{suffix}"] == pytest.approx(
          ev.stats[0], abs=1e-9)
      assert metrics[f"eval/shapes_det/AP50{suffix}"] == pytest.approx(
          ev.stats[1], abs=1e-9)


def test_grounding_rows_agree_with_the_metric(run, evaluated):
  _, _, data_root = run
  out, metrics, _ = evaluated
  rows = json.loads((out / "grounding_shapes_grd.json").read_text())
  gt = json.loads((data_root / "grd_val.json").read_text())
  assert len(rows) == len(gt["annotations"])  # One box per phrase.
  assert metrics["eval/shapes_grd/num_phrases"] == len(rows)
  hits = [r["hits"]["1"] for r in rows]
  assert metrics["eval/shapes_grd/acc@0.5"] == pytest.approx(np.mean(hits))
  for r in rows:
    assert r["tokens"] and len(r["boxes"]) == 1 and len(r["scores"]) == 1


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_write_the_same_results(run, evaluated, tmp_path):
  workdir, _, _ = run
  out, metrics, _ = evaluated
  copy = tmp_path / "work"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
  port = _free_port()
  procs = [subprocess.Popen(
      _evaluate_cmd(copy, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}"),
      env=_env(devices=1), cwd=str(REPO), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
  out2 = copy / "eval" / STEP
  metrics2 = json.loads((out2 / "metrics.json").read_text())
  for k, v in metrics.items():
    if not k.endswith("images_per_sec"):
      assert metrics2[k] == pytest.approx(v, abs=1e-6), k
  det = lambda d: sorted(json.loads((d / "detections_shapes_det.json")
                                    .read_text()),
                         key=lambda r: (r["image_id"], -r["score"],
                                        r["category_id"], r["bbox"]))
  a, b = det(out), det(out2)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert (x["image_id"], x["category_id"]) == (y["image_id"],
                                                 y["category_id"])
    np.testing.assert_allclose(x["bbox"], y["bbox"], atol=0.02)
  rows = lambda d: json.loads((d / "grounding_shapes_grd.json").read_text())
  assert ([r["hits"] for r in rows(out)] == [r["hits"] for r in rows(out2)])


def test_any_coco_file_by_path(run, tmp_path):
  """The open-vocabulary use: a user's COCO file, names as the queries."""
  workdir, _, data_root = run
  gt = json.loads((data_root / "det_val.json").read_text())
  # LVIS-style names are cleaned; unknown words are reported, not dropped.
  renamed = {1: "red_circle", 2: "red_square_(shape)", 3: "red zebra",
             4: "giraffe"}
  for c in gt["categories"]:
    c["name"] = renamed.get(c["id"], c["name"])
  path = tmp_path / "custom.json"
  path.write_text(json.dumps(gt))
  work = tmp_path / "work"
  shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("eval"))
  _run(_evaluate_cmd(work, f"--dataset_json={path}",
                     f"--image_dir={data_root / 'images'}",
                     "--coco_backend=pycocotools", "--max_detections=50"),
       _env())
  out = work / "eval" / STEP
  metrics = json.loads((out / "metrics.json").read_text())
  assert {k.split("/")[1] for k in metrics} == {"custom"}
  assert metrics["eval/custom/unknown_query_words"] == 2  # zebra, giraffe
  assert metrics["eval/custom/queries_without_tokens"] == 1  # giraffe
  report = json.loads((out / "queries_custom.json").read_text())
  assert report["unknown_words"] == {"zebra": 1, "giraffe": 1}
  assert report["queries_without_tokens"] == ["giraffe"]
  tokens = {q["category_id"]: q["tokens"] for q in report["queries"]}
  assert tokens[1] == [["red", "circle"]] and tokens[2] == [["red", "square"]]
  assert tokens[4] == []
  dets = json.loads((out / "detections_custom.json").read_text())
  assert max(np.unique([d["image_id"] for d in dets],
                       return_counts=True)[1]) == 50
  assert all(d["score"] == 0 for d in dets if d["category_id"] == 4)


def test_lvis_file_by_path(run, tmp_path):
  """An LVIS-format file is detected and scored with the federated protocol."""
  workdir, _, data_root = run
  gt = json.loads((data_root / "det_val.json").read_text())
  for c in gt["categories"]:
    c["frequency"] = "rcf"[c["id"] % 3]
  for im in gt["images"]:
    present = {a["category_id"] for a in gt["annotations"]
               if a["image_id"] == im["id"]}
    im["neg_category_ids"] = [c["id"] for c in gt["categories"]
                              if c["id"] not in present][:20]
    im["not_exhaustive_category_ids"] = []
  path = tmp_path / "lvis_like.json"
  path.write_text(json.dumps(gt))
  work = tmp_path / "work"
  shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("eval"))
  _run(_evaluate_cmd(work, f"--dataset_json={path}",
                     f"--image_dir={data_root / 'images'}"), _env())
  metrics = json.loads((work / "eval" / STEP / "metrics.json").read_text())
  for key in ("AP", "AP50", "APr", "APc", "APf", "AP_fixed", "AP50_fixed",
              "APr_fixed", "APc_fixed", "APf_fixed"):
    assert f"eval/lvis_like/{key}" in metrics, key


def test_nms_and_a_relative_workdir(run, tmp_path):
  """--nms_iou: no two kept detections of one category overlap above it."""
  workdir, _, _ = run
  # A copy, so this run's eval files do not race the other tests' reads.
  work = tmp_path / "work"
  shutil.copytree(workdir, work)
  rel = os.path.relpath(work, REPO)  # The binary runs in REPO.
  _run(_evaluate_cmd(rel, "--nms_iou=0.3", "--datasets=shapes_det"), _env())
  dets = json.loads(
      (work / "eval" / STEP / "detections_shapes_det.json").read_text())
  assert dets
  groups = {}
  for d in dets:
    assert d["score"] >= 0  # Suppressed pairs are not written.
    groups.setdefault((d["image_id"], d["category_id"]), []).append(d["bbox"])
  # Not vacuous: categories keep several (non-overlapping) boxes.
  assert max(len(b) for b in groups.values()) >= 2
  for boxes in groups.values():
    b = np.asarray(boxes, np.float64)
    x0, y0 = b[:, 0], b[:, 1]
    x1, y1 = x0 + b[:, 2], y0 + b[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0),
                 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0),
                 0, None)
    inter = iw * ih
    area = b[:, 2] * b[:, 3]
    iou = inter / np.maximum(area[:, None] + area - inter, 1e-9)
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.3 + 1e-3


def test_evaluator_in_process(run, tmp_path):
  """The trainer's evaluator: returns the metrics, writes, prepares once."""
  import ml_collections
  from omnitrain_jax import checkpointing
  from omnitrain_jax import config_lib
  from omnitrain_jax import model_setup
  from omnitrain_jax.data import preparation
  from omnitrain_jax.evaluation import evaluator as evaluator_lib
  from omnitrain_jax.evaluation import options as options_lib
  workdir, cache, _ = run
  config = config_lib.config_from_workdir(workdir)
  config.data.cache_dir = cache
  config.eval = ml_collections.ConfigDict(
      {"datasets": ["shapes_grd"], "max_batches": 1})
  info = preparation.prepare_data(config.data)
  setup = model_setup.create(config, vocab_size=len(info.vocab),
                             spec=info.spec)
  params, step = checkpointing.restore_params(workdir, setup.abstract_state)

  def make_evaluator(**kwargs):
    return evaluator_lib.Evaluator(
        config, info, model=setup.model, mesh=setup.mesh, rules=setup.rules,
        param_shardings=setup.param_shardings, **kwargs)

  class Writer:
    written = []

    def write_scalars(self, step, scalars):
      self.written.append((step, dict(scalars)))

  writer = Writer()
  evaluator = make_evaluator()
  m1 = evaluator.run(params, step=step, workdir=str(tmp_path), writer=writer)
  task = evaluator._tasks["shapes_grd"]
  m2 = evaluator.run(params, step=step + 1, workdir=None)
  assert evaluator._tasks["shapes_grd"] is task  # Prepared once.
  assert all(k.startswith("eval/shapes_grd/") for k in m1)
  assert set(GRD_KEYS) <= {k.split("/")[-1] for k in m1}
  assert m1["eval/shapes_grd/num_images"] == 8  # One batch of 8.
  assert m1["eval/shapes_grd/acc@0.5"] == m2["eval/shapes_grd/acc@0.5"]
  assert writer.written == [(step, m1)]
  saved = json.loads((tmp_path / "eval" / str(step) / "metrics.json")
                     .read_text())
  assert saved == m1
  assert not (tmp_path / "eval" / str(step + 1)).exists()
  # The same phrases as Flickr30k: Recall@1 is Acc@0.5, recall grows with k.
  options = options_lib.EvalOptions.from_config(
      config, protocols={"shapes_grd": "flickr"})
  flickr = make_evaluator(options=options).run(params, step=step,
                                               workdir=None)
  # Each ShapesWorld phrase is one mention (tokens_positive_eval) of its own
  # one-box entity, so any-box and merged-box agree.
  for v in ("anybox", "mergedbox"):
    r = [flickr[f"eval/shapes_grd/R@{k}_{v}"] for k in (1, 5, 10)]
    assert r[0] == m1["eval/shapes_grd/acc@0.5"]
    assert r[0] <= r[1] <= r[2]
  assert (flickr["eval/shapes_grd/num_phrases"]
          == m1["eval/shapes_grd/num_phrases"])
