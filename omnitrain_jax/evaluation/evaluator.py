"""The evaluation run loop: every dataset, one pass, files and metrics.

`Evaluator(config, info, model=..., mesh=..., rules=..., param_shardings=...)`
prepares one task evaluator per dataset on first use (`det_evaluator`,
`grd_evaluator`: queries and a jitted encode+score function whose batch is
sharded over the mesh's ``data`` axis) and keeps them, so periodic evaluation
compiles once. `run(params, step=..., workdir=...)` evaluates each dataset in
file order: every process feeds its share of each batch, the small per-image
outputs are gathered to the hosts (`multihost_utils.process_allgather`) while
the next batch computes, and process 0 writes ``WORKDIR/eval/STEP/``
(``detections_<name>.json``, ``grounding_<name>.json``,
``queries_<name>.json``, ``metrics.json`` merged with what an earlier run
wrote for the same step) and computes the metrics, which every process
receives.

It receives the model's pieces, not a trainer: the trainer builds one on
first use, the evaluation binary builds one from `model_setup`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from omnitrain_jax import progress
from omnitrain_jax import runtime
from omnitrain_jax import sharding
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import preparation
from omnitrain_jax.data import sources as sources_lib
from omnitrain_jax.evaluation import context as context_lib
from omnitrain_jax.evaluation import datasets as datasets_lib
from omnitrain_jax.evaluation import det_evaluator
from omnitrain_jax.evaluation import grd_evaluator
from omnitrain_jax.evaluation import options as options_lib
from omnitrain_jax.models import omnidet

EVAL_SUBDIR = "eval"
METRICS_FILE = "metrics.json"


class Evaluator:
  """Prepares each dataset once; `run` evaluates a set of params."""

  def __init__(self, config: Any, info: preparation.DataInfo, *,
               model: omnidet.OmniDet, mesh: jax.sharding.Mesh,
               rules: sharding.LogicalRules, param_shardings: Any,
               datasets: Sequence[datasets_lib.EvalDataset] | None = None,
               options: options_lib.EvalOptions | None = None):
    """Creates the evaluator (nothing is read or compiled yet).

    Args:
      config: the full config (``data`` and ``eval``).
      info: the run's data info (sources, tokenizer); extend it with
        `datasets.with_dataset_json` for another COCO file.
      model: the `OmniDet`.
      mesh: the device mesh.
      rules: logical axis rules (activation constraints).
      param_shardings: the params' shardings.
      datasets: what to evaluate (default `datasets.eval_datasets`).
      options: default ``EvalOptions.from_config(config)``.
    """
    self.config, self.info, self.mesh = config, info, mesh
    self.options = options or options_lib.EvalOptions.from_config(config)
    self.datasets = list(datasets if datasets is not None else
                         datasets_lib.eval_datasets(config, info,
                                                    self.options))
    self.batch_size = self.options.batch_size or config.data.eval_batch_size
    sharding.check_batch_size(
        self.batch_size, mesh,
        "config.eval.batch_size (or data.eval_batch_size)")
    batch = sharding.batch_sharding(mesh)

    def jit(fn):
      return sharding.jit_in_mesh(
          fn, mesh, rules,
          in_shardings=(param_shardings, batch, sharding.replicated(mesh)),
          out_shardings=batch)

    self.context = context_lib.EvalContext(
        model=model, jit=jit, tokenizer=info.tokenizer, options=self.options)
    self._tasks: dict[str, Any] = {}

  # ------------------------------------------------------------ preparing

  def _task(self, ds: datasets_lib.EvalDataset):
    """The dataset's task evaluator, built on first use."""
    if ds.name not in self._tasks:
      start = time.monotonic()
      spec = self.info.sources[ds.stream][ds.source]
      source = sources_lib.open_source(spec, "val",
                                       strict=self.config.data.strict)
      if ds.protocol in options_lib.DET_PROTOCOLS:
        task = det_evaluator.DetEvaluator(self.context, ds, source, spec.val)
      else:
        task = grd_evaluator.GrdEvaluator(self.context, ds, source,
                                          spec.val)
      if runtime.is_lead():
        task.report.log()
        logging.info("%s: %d records, %s protocol, prepared in %.1f s.",
                     ds.name, task.num_records, ds.protocol,
                     time.monotonic() - start)
      self._tasks[ds.name] = task
    return self._tasks[ds.name]

  # ------------------------------------------------------------ running

  def _batches(self, ds: datasets_lib.EvalDataset, task):
    """(batch number, local feed dict) of this process, in file order."""
    batches = pipeline.make_eval_dataset(
        self.config.data, self.info, stream=ds.stream, source=ds.source,
        batch_size=self.batch_size)
    pi, pc = jax.process_index(), jax.process_count()
    local = self.batch_size // pc
    # make_eval_dataset gives process p records p, p + P, ... then padding.
    num_real = len(range(pi, task.num_records, pc))
    it = iter(batches)
    try:
      for j, batch in enumerate(it):
        if (self.options.max_batches is not None
            and j >= self.options.max_batches):
          break
        feed = {k: np.asarray(batch[k]) for k in context_lib.FEED_KEYS}
        pos = j * local + np.arange(local)
        records = np.where(pos < num_real, pi + pos * pc, -1)
        yield j, task.feed(records, feed)
    finally:
      # Also when a stop request (`runtime.StopRequested`) ends the
      # evaluation: no reader thread is left behind to block the exit.
      if hasattr(it, "close"):
        it.close()

  def _run_dataset(self, ds: datasets_lib.EvalDataset, params,
                   out_dir: epath.Path | None) -> dict[str, float]:
    task = self._task(ds)
    task.reset()
    total = task.num_records
    if self.options.max_batches is not None:
      total = min(total, self.options.max_batches * self.batch_size)
    report = progress.ReportProgress(
        total, every_secs=self.options.progress_every_secs, name=ds.name,
        unit="images")
    lead = runtime.is_lead()

    def consume(out, done):
      out = multihost_utils.process_allgather(out, tiled=True)
      if lead:
        task.consume(out)
      report(min(done, total))

    start = time.monotonic()
    pending, done = None, 0
    for j, feed in self._batches(ds, task):
      out = task.fn(params, sharding.host_to_global(feed, self.mesh),
                    task.consts)
      if pending is not None:  # Overlap: gather j - 1 while j computes.
        consume(pending, done)
      pending, done = out, (j + 1) * self.batch_size
    if pending is not None:
      consume(pending, done)
    seconds = time.monotonic() - start
    metrics = {}
    if lead:
      metrics = task.finish(out_dir)
      metrics.update(task.report.metrics())
      metrics["num_images"] = float(min(done, total))
      if report.mean_rate:
        metrics["images_per_sec"] = report.mean_rate
      logging.info("%s: evaluated in %.1f s: %s", ds.name, seconds,
                   ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
      if out_dir is not None:
        context_lib.write_json(
            out_dir / f"queries_{ds.name}.json",
            {**task.report.to_json(), "queries": task.queries_file()})
    return {f"eval/{ds.name}/{k}": float(v) for k, v in metrics.items()}

  def run(self, params, *, step: int, workdir: str | None,
          writer: Any = None) -> dict[str, float]:
    """Evaluates `params` on every dataset; writes files; returns metrics.

    Every process must call it (the batches are sharded over all devices);
    process 0 writes the files and computes the metrics, which every process
    receives.

    Args:
      params: the model params, with the state's shardings.
      step: the checkpoint/training step (names ``WORKDIR/eval/STEP``).
      workdir: where ``eval/STEP/`` goes; None writes nothing.
      writer: a `metric_writers.MetricWriter` to also write the metrics to.

    Returns:
      ``eval/<dataset>/<metric>`` -> float.
    """
    out_dir = None
    if workdir is not None and runtime.is_lead():
      out_dir = epath.Path(workdir) / EVAL_SUBDIR / str(int(step))
      out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    for ds in self.datasets:
      metrics.update(self._run_dataset(ds, params, out_dir))
    if out_dir is not None:
      path = out_dir / METRICS_FILE
      merged = json.loads(path.read_text()) if path.exists() else {}
      merged.update(metrics)
      context_lib.write_json(path, merged)
      logging.info("Wrote %s", path)
    metrics = runtime.share_from_lead(metrics)
    if writer is not None and metrics:
      writer.write_scalars(int(step), metrics)
    return metrics
