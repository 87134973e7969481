"""The trainer: mesh -> data -> abstract state -> shardings -> jitted init -> loop.

`train_and_evaluate(config, workdir)` runs unchanged on one CPU, on many
(fake) devices, on several processes and on TPU pods / GPU clusters:

* **Mesh, model, state.** `model_setup.create` (the one place that turns a
  config into a model on a mesh): ``config.mesh`` (axes ``data`` x
  ``model``); the model's logical axis names map to mesh axes by
  ``config.logical_rules`` (default: data + tensor parallel; ``fsdp``:
  parameters' ``embed`` axis also over ``data``).
* **Data.** Each process builds its own share of every global batch (fixed
  det/grd/img composition); its candidate tokens are drawn over the *global*
  batch's positives, gathered from all processes (`GlobalCandidates`), so
  that they do not depend on the number of processes; the shares are then
  assembled into global arrays (`jax.make_array_from_process_local_data`).
* **State.** Built abstract (`jax.eval_shape`), its logical specs turned into
  shardings, then initialised by `jax.jit(init, out_shardings=...)`, so no
  device ever holds the whole state unless the rules say so.
* **Step.** One `jax.jit` with explicit in/out shardings, the state donated.
* **Evaluation.** Every ``config.eval_every_steps`` and at the end, by an
  `evaluation.evaluator.Evaluator` built on first use (the evaluation
  binary's code; files under ``WORKDIR/eval/STEP/``).
* **Resume-first.** Latest checkpoint in the workdir > ``config.init_from`` >
  scratch. The grain iterator is saved with the state, so a resumed run sees
  the same batches and, the step being deterministic, the same losses.
* **Self-training.** At each of ``config.self_train.steps`` the caption
  images are labelled with the current parameters (`self_training`) and the
  data switches to a pipeline with those boxes as a det source; the saved
  iterator state names the labels' step (`self_training.PhasedData`).
* **Stops.** SIGTERM (preemption) and SIGINT (Ctrl-C; single-process runs and
  runs without JAX's preemption service) save at the end of the step and exit;
  during start-up it stops at once, during an evaluation it ends the
  evaluation and saves the step, and while the input pipeline delivers
  nothing for ``config.stop_grace_secs`` after the signal (a stalled source)
  it stops without a save (the position inside a batch cannot be saved):
  `runtime.StopRequested`, exit code 143 (130 for Ctrl-C). A second signal
  stops at once.
  ``config.max_consecutive_nonfinite`` skipped (NaN/inf) steps in a row stop
  the run with an error naming the step and the non-finite parameter
  groups.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax._src import distributed  # The coordination service's client.
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from omnitrain_jax import checkpointing
from omnitrain_jax import metric_writers
from omnitrain_jax import model_setup
from omnitrain_jax import progress
from omnitrain_jax import runtime
from omnitrain_jax import self_training
from omnitrain_jax import sharding
from omnitrain_jax import workdir as workdir_lib
from omnitrain_jax.data import candidates as candidates_lib
from omnitrain_jax.data import pipeline
from omnitrain_jax.data import preparation
from omnitrain_jax.data import sources as sources_lib
from omnitrain_jax.data import stats as stats_lib
from omnitrain_jax.evaluation import evaluator as evaluator_lib
from omnitrain_jax.evaluation import predictor as predictor_lib
from omnitrain_jax.models import pretrained


class NonFiniteError(RuntimeError):
  """Too many non-finite steps in a row."""


def check_config(config) -> None:
  """Fails early, with the values and the fix, on inconsistent fields."""
  composition = dict(config.data.batch)
  if sum(composition.values()) != config.batch_size:
    raise ValueError(
        f"config.batch_size={config.batch_size} must equal the sum of the "
        f"per-stream composition config.data.batch={composition} "
        f"(= {sum(composition.values())}).")
  for name in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
    if int(config[name]) < 1:
      raise ValueError(f"config.{name}={config[name]} must be >= 1.")
  steps = tuple((config.get("self_train") or {}).get("steps") or ())
  if steps:
    self_training.resolve_steps(steps, int(config.total_steps))
    if jax.process_count() > 1:
      raise ValueError(
          f"config.self_train.steps={steps} labels on one process, and this "
          f"run has {jax.process_count()}. On several hosts, label offline "
          "(experiments/self_train.py on a checkpoint) and add the file as a "
          "det source (configs/shapes_selftrain.py shows how).")


def batch_fingerprint(local_batch) -> float:
  """A number that changes when the batch's images or their order change."""
  ids = np.asarray(local_batch["image_id"], np.int64).ravel()
  weights = np.arange(1, ids.size + 1, dtype=np.int64)
  return float((ids * weights).sum() % 1_000_003)


class GlobalCandidates:
  """Adds each local batch's candidates, drawn over the *global* batch.

  The pool of batch negatives is the global batch's positives: each process
  contributes its examples' positive ids (int32 [B_local, M * T + C], a few
  KB) to one host all-gather per step; the draws are keyed by each example's
  identity (``_key``). So every example gets the same candidates for any
  number of processes (`candidates.py`, "Determinism").

  The all-gather goes through the coordination service's key-value store
  (host to host) rather than `multihost_utils.process_allgather`: a device
  all-gather would queue behind the step in flight and so make the host wait
  for the device at every step, where it otherwise prepares the next batch
  while the device computes.

  Args:
    builder: the candidate builder (`candidates.candidates_from_config`).
  """

  _runs = itertools.count()  # The same on every process: a key space per run.
  timeout_s = 3600.0  # Others may be compiling the step, or restoring.

  def __init__(self, builder: candidates_lib.Candidates):
    self.builder = builder
    self._prefix = f"omnitrain/candidate_pool/{next(self._runs)}"

  def __call__(self, local: dict[str, np.ndarray], step: int
               ) -> dict[str, np.ndarray]:
    """`local` (the batch of `step` + 1) with its candidate fields."""
    ids = candidates_lib.positive_ids(local)  # [B_local, M * T + C]
    if jax.process_count() > 1:
      ids = self._allgather(ids, step)  # [P, B_local, M * T + C]
    return self.builder.build(local, pool=ids)

  def _allgather(self, ids: np.ndarray, step: int) -> np.ndarray:
    client = distributed.global_state.client
    if client is None:  # Several processes without the service: the device.
      return multihost_utils.process_allgather(ids)
    me, count = jax.process_index(), jax.process_count()
    client.key_value_set_bytes(f"{self._prefix}/{step}/{me}", ids.tobytes())
    parts = []
    for p in range(count):
      raw = ids.tobytes() if p == me else self._get(client, step, p)
      parts.append(np.frombuffer(raw, ids.dtype).reshape(ids.shape))
    # Every process read this process's previous key before it sent its key
    # of this step, which this process has just read: safe to delete.
    client.key_value_delete(f"{self._prefix}/{step - 1}/{me}")
    return np.stack(parts)

  def _get(self, client, step: int, p: int) -> bytes:
    # One-second waits: a signal's handler (a stop) runs between them.
    deadline = time.monotonic() + self.timeout_s
    while True:
      try:
        return client.blocking_key_value_get_bytes(
            f"{self._prefix}/{step}/{p}", 1000)
      except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):
          raise
        if time.monotonic() > deadline:
          raise RuntimeError(
              f"Process {p} did not send the positive ids of its batch of "
              f"step {step + 1} within {self.timeout_s:.0f} s (the global "
              "candidate pool): it stopped or hangs; see its log.") from e


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(history)
  keys = stacked[0].keys()
  return {k: float(np.mean([np.asarray(m[k]) for m in stacked])) for k in keys}


def _check_nonfinite(history, first_step: int, limit: int, run: int) -> int:
  """Raises when `limit` steps in a row were skipped as non-finite.

  Args:
    history: the metrics of steps ``first_step + 1 ...``, in order.
    first_step: the step before ``history[0]``.
    limit: how many non-finite steps in a row stop the run.
    run: non-finite steps in a row just before ``history[0]``.

  Returns:
    The run length after the last step of `history`.
  """
  flags = [float(m["nonfinite"]) > 0 for m in jax.device_get(history)]
  for i, bad in enumerate(flags):
    run = run + 1 if bad else 0
    if run >= limit:
      bad_metrics = jax.device_get(history[i])
      what = [k for k, v in bad_metrics.items()
              if k.startswith("nonfinite_") and float(v) > 0]
      raise NonFiniteError(
          f"{limit} non-finite steps in a row, the last at step "
          f"{first_step + i + 1}: non-finite {', '.join(what) or 'values'} "
          f"(loss={float(bad_metrics['loss'])}). The parameters are those of "
          "the last finite step. Lower the learning rate, check the data "
          "(python -m omnitrain_jax.data.inspect), or raise "
          "config.max_consecutive_nonfinite.")
  return run


def _label(config, info, setup, state, step: int, workdir: str) -> str:
  """Self-training's pseudo-boxes of `step` (`self_training.label_run`)."""
  st = config.self_train
  specs = info.sources["img"]
  if st.get("source"):
    if st.source not in specs:
      raise ValueError(f"config.self_train.source={st.source!r} is not an img "
                       f"source; the img sources are {sorted(specs)}.")
    specs = {st.source: specs[st.source]}
  if not specs:
    raise ValueError("config.self_train.steps is set but the run has no img "
                     "(caption) source to label; add one or set "
                     "config.self_train.steps=().")
  records = []
  for spec in specs.values():
    src = sources_lib.open_source(spec, "train", strict=config.data.strict)
    records.extend(src[i] for i in range(len(src)))
  predictor = predictor_lib.Predictor(
      model=setup.model, params=state.params, mesh=setup.mesh,
      param_shardings=setup.param_shardings, rules=setup.rules,
      tokenizer=info.tokenizer, step=step)
  return self_training.label_run(predictor, records, config=st,
                                 seed=config.seed, workdir=workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming if `workdir` has a checkpoint); returns the last metrics.

  Refuses to start when another trainer holds the workdir
  (`workdir_lib.WorkdirLock`, taken by process 0) or when resuming with a
  config that changes the shapes of the saved state.
  """
  workdir = os.path.abspath(workdir) if "://" not in workdir else workdir
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0), \
      checkpointing.PreemptionGuard() as guard:
    # A signal before the loop stops at once: there is nothing to save.
    guard.set_section("starting up (data, model, checkpoint restore)")
    return _train_and_evaluate(config, workdir, guard)


def _train_and_evaluate(config, workdir: str,
                        guard: checkpointing.PreemptionGuard
                        ) -> dict[str, Any]:
  lead = jax.process_index() == 0
  check_config(config)
  # Resuming: refuses config changes that change shapes, logs the others.
  old_config = workdir_lib.check_resume(workdir, config)
  # ---------------------------------------------------------------- data
  # One report of what was skipped: the vocabulary build's, the readers'
  # and the pipeline's.
  stats = stats_lib.PipelineStats()
  info = preparation.prepare_data(config.data, skips=stats.skips)
  workdir_lib.check_resume_vocab(workdir, info.vocab)
  self_train = config.get("self_train") or {}
  label_steps = self_training.resolve_steps(self_train.get("steps") or (),
                                            int(config.total_steps))
  if label_steps and not config.data.batch.get("img", 0):
    # Labels of the caption images would bring captions into a run that
    # trains without them (a det-only or det+grd reference).
    logging.info("config.self_train.steps=%s: off, the run has no img "
                 "examples (config.data.batch.img=0).", label_steps)
    label_steps = []

  def make_iter(label_step):
    path = (self_training.pseudo_path(workdir, label_step)
            if label_step is not None else None)
    if path and not os.path.exists(path):
      raise FileNotFoundError(
          f"The checkpoint's data position is in the pipeline of the "
          f"self-training labels of step {label_step}, but {path} is gone. "
          "Restore it, or move the checkpoints after that step away to "
          "resume from an earlier one.")
    data = config.data
    if label_step is not None:  # A fresh order and augmentation per labels.
      data = copy.deepcopy(config.data)
      data.seed = pipeline.derive_seed(config.data.seed, "self_train",
                                       label_step)
    return iter(pipeline.make_train_dataset(
        data, self_training.with_pseudo(
            info, path, float(self_train.get("weight", 0.5))),
        stats=stats, with_candidates=False))

  # The iterator's saved state names the step of the self-training labels
  # it mixes in (None: none), so a resumed run rebuilds that pipeline -- also
  # when self-training was turned off since (the labels are kept, no new
  # ones are made).
  train_iter = self_training.PhasedData(make_iter)
  candidates = GlobalCandidates(candidates_lib.candidates_from_config(
      config.data, info.vocab, stats.candidates))
  # ------------------------------------- mesh, model, state, jitted step
  setup = model_setup.create(config, vocab_size=len(info.vocab),
                             spec=info.spec)
  # ----------------------------------------------------- restore or init
  ckpt = checkpointing.Checkpointer(
      workdir, save_every_steps=config.checkpoint_every_steps,
      max_to_keep=config.keep_checkpoints)
  restored = checkpointing.restore_or_init(
      ckpt, setup.abstract_state, train_iter, init_from=config.init_from or None,
      vocab=info.vocab)  # init_from's token rows, matched by token string.
  if restored is not None and restored.source == "workdir":
    state, start_step = restored.state, restored.step
  else:
    state, start_step = setup.init_fn(config.seed), 0
    if restored is not None:
      state = checkpointing.replace_fields(state, restored.state)
    elif config.backbone_npz:
      logging.info("Loading the backbone from %s", config.backbone_npz)
      state = state.replace(params=pretrained.load_backbone(
          state.params, config.backbone_npz))
  if lead:
    logging.info("Starting at step %d of %d in %s", start_step,
                 config.total_steps, workdir)
    if old_config is not None:  # The config until this step, kept.
      kept = epath.Path(workdir) / f"config.{start_step}.json"
      kept.write_text(old_config)
      logging.info("Kept the previous config as %s.", kept)
    (epath.Path(workdir) / "config.json").write_text(
        config.to_json_best_effort(indent=2))
    # With the config, the vocabulary makes the workdir self-contained for
    # evaluate/predict on a machine without the training data.
    info.vocab.save(epath.Path(workdir) / "vocab.txt")
  writer = metric_writers.create_default_writer(workdir, start_step=start_step)
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  report = progress.ReportProgress(config.total_steps,
                                   every_steps=config.log_every_steps,
                                   every_secs=None)
  profiler = progress.Profiler(workdir, config.get("profile_steps") or None)
  meta = {"config": config.to_dict()}
  evaluator = None  # Built on the first evaluation (queries, compilation).
  # ---------------------------------------------------------------- loop
  step = start_step
  history: list[dict[str, jax.Array]] = []
  last: dict[str, Any] = {}
  nonfinite_run = 0
  guard.set_section(None)  # From here a signal stops at a step's end.
  ok = False  # No error on the way out: then log-flush errors are raised.
  try:
    while step < config.total_steps:
      if step in label_steps and train_iter.label_step != step:
        # Self-training: label the caption images with this step's model;
        # the det stream mixes the boxes in from the next batch on. A stop
        # here saves this step (its data position is before the labels).
        try:
          with guard.interruptible(f"self-training: labelling at step {step}"):
            _label(config, info, setup, state, step, workdir)
        except runtime.StopRequested as e:
          if e.detail:
            raise
          logging.warning("%s Labelling at step %d was not finished.", e, step)
          ckpt.maybe_save(step, state, train_iter, meta, force=True)
          logging.info("Preemption/stop requested: saved step %d, exiting.",
                       step)
          break
        train_iter.switch(step)
      profiler(step, block_on=state)
      # A stalled pipeline never ends the step: a stop then cannot wait.
      with guard.interruptible(
          f"waiting for the input pipeline (batch of step {step + 1})",
          grace_s=config.get("stop_grace_secs", 5.0),
          detail="The position inside a batch cannot be saved: rerun the "
          "same command to resume from the last checkpoint."):
        local = candidates(next(train_iter), step)
      batch = sharding.host_to_global(local, setup.mesh)
      state, metrics = setup.train_step(state, batch)
      # Which examples this step saw (resume tests compare it step by step).
      history.append({**metrics, "data/fingerprint": batch_fingerprint(local)})
      step += 1
      stop = guard.should_stop(step)
      at_end = step == config.total_steps
      if step % config.log_every_steps == 0 or at_end or stop:
        nonfinite_run = _check_nonfinite(history, step - len(history),
                                         config.max_consecutive_nonfinite,
                                         nonfinite_run)
        last = _mean_metrics(history)
        # Per-group flags only matter when set (the error names them).
        last = {k: v for k, v in last.items()
                if not (k.startswith("nonfinite_grad/") and v == 0)}
        last["skipped_steps"] = float(jax.device_get(state.skipped_steps))
        last.update({f"data/{k}": float(v) for k, v in stats.counts().items()})
        rates = report(step)
        if rates:
          last.update(rates)
        writer.write_scalars(step, last)
        history = []
      if not stop and (at_end or (config.eval_every_steps and
                                  step % config.eval_every_steps == 0)):
        # The evaluation binary's code path: COCO JSON + metrics.json under
        # WORKDIR/eval/STEP/, metrics also to the logs. A stop ends it; the
        # step is then saved as after any stop.
        try:
          with guard.interruptible(f"evaluating step {step}"):
            if evaluator is None:
              evaluator = evaluator_lib.Evaluator(
                  config, info, model=setup.model, mesh=setup.mesh,
                  rules=setup.rules, param_shardings=setup.param_shardings)
            last.update(evaluator.run(state.params, step=step,
                                      workdir=workdir, writer=writer))
        except runtime.StopRequested as e:
          if e.detail:  # A second signal: no save either.
            raise
          logging.warning("%s The evaluation of step %d was not finished.",
                          e, step)
          stop = True
      ckpt.maybe_save(step, state, train_iter, meta, force=stop or at_end)
      if stop:
        logging.info("Preemption/stop requested: saved step %d, exiting.", step)
        break
    ok = True
  finally:
    profiler.stop()
    try:
      ckpt.close()  # Raises a failed last save (e.g. DiskFullError)...
    except Exception:
      ok = False
      raise
    finally:  # ...after the logs are flushed.
      try:
        writer.flush()
        writer.close()
      except OSError:
        if ok:
          raise
        # E.g. the full disk of the error being raised: that one is the news.
        logging.exception("Could not flush the logs after the error below.")
  if lead:
    logging.info("%s", stats.report())
  return {"step": step, **last}
