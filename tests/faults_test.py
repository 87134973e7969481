"""Whole-program fault tests: damaged checkpoints, a full disk, two trainers on
one workdir, resuming with a changed config.

Each case runs the real entry point (`python -m omnitrain_jax.main`) on the
tiny ShapesWorld config and ends either in one clear error or in a reported
recovery after which the per-step losses equal those of the uninterrupted run.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import binaries  # tests/binaries.py

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "shapes_demo.py") + ":tiny"
# Checkpoints at 2, 4, 6, 8 (the last 3 kept), a metrics line every step: the
# flags of the shared reference run (tests/conftest.py's `reference_run`).
FLAGS = binaries.REFERENCE_FLAGS


def _env() -> dict[str, str]:
  return binaries.subprocess_env(devices=1)


def _cmd(workdir, cache_dir, *overrides) -> list[str]:
  return [sys.executable, "-m", "omnitrain_jax.main", f"--config={CONFIG}",
          f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
          *FLAGS, *overrides]


def _run(cmd, check=True, timeout=600) -> subprocess.CompletedProcess:
  proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True,
                        timeout=timeout, cwd=str(REPO))
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _rows(workdir) -> list[dict]:
  """The train lines of metrics.jsonl, in order (each must be valid JSON)."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [row for row in map(json.loads, lines) if "loss" in row]


def _losses(workdir) -> dict[int, dict]:
  """step -> its last train line (a resumed run logs redone steps again)."""
  return {row["step"]: row for row in _rows(workdir)}


def _committed(workdir) -> list[int]:
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / "commit_success.txt").exists())


def _assert_same_losses(workdir, reference):
  got = _losses(workdir)
  assert sorted(got) == sorted(reference) == list(range(1, 9))
  for step, row in reference.items():
    assert got[step]["data/fingerprint"] == row["data/fingerprint"], step
    assert got[step]["loss"] == row["loss"], step


@pytest.fixture(scope="module")
def cache_dir(reference_run):
  """The data cache of the reference run: the generated tiny ShapesWorld is
  in it (`_files_copy` copies it)."""
  return str(reference_run[1])


@pytest.fixture(scope="module")
def reference(reference_run):
  """(workdir, losses) of the uninterrupted 8-step run (read-only: the tests
  copy it), trained once per test run for these tests and train_test.py's."""
  workdir = reference_run[0]
  assert _committed(workdir) == [4, 6, 8]
  return workdir, _losses(workdir)


def _copy(workdir, dest) -> pathlib.Path:
  shutil.copytree(workdir, dest, symlinks=True)
  return dest


def _flip_bytes(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  path = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def test_bit_flipped_latest_checkpoint_falls_back_with_the_same_losses(
    tmp_path, cache_dir, reference):
  ref_dir, ref_losses = reference
  work = _copy(ref_dir, tmp_path / "work")
  _flip_bytes(work / "checkpoints" / "8")
  proc = _run(_cmd(work, cache_dir))
  step8 = work / "checkpoints" / "8"
  assert f"Checkpoint {step8} is damaged" in proc.stderr
  assert "checksum mismatch" in proc.stderr
  assert "falling back to step 6" in proc.stderr
  # Steps 7 and 8 ran again from step 6 and match the first run exactly.
  assert "Starting at step 6 of 8" in proc.stderr
  _assert_same_losses(work, ref_losses)
  assert _committed(work) == [4, 6, 8]  # Step 8 saved again, good.
  assert (work / "checkpoints" / "8.damaged").is_dir()


def test_no_good_checkpoint_is_one_error_naming_each(tmp_path, cache_dir,
                                                     reference):
  work = _copy(reference[0], tmp_path / "work")
  for step in (4, 6, 8):
    (work / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
  proc = _run(_cmd(work, cache_dir), check=False)
  assert proc.returncode != 0
  assert "No usable checkpoint" in proc.stderr
  for step in (4, 6, 8):
    assert f"{work / 'checkpoints' / str(step) / 'state' / '_METADATA'}: " \
           "missing" in proc.stderr
  assert _committed(work) == [4, 6, 8]  # Nothing moved or deleted.


@pytest.fixture
def small_disk(tmp_path):
  """A 1400 KiB tmpfs: the first checkpoint (~0.9 MiB) fits, not the second."""
  mount = tmp_path / "disk"
  mount.mkdir()
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs",
                         str(mount)], capture_output=True, text=True,
                        check=False)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_a_clear_error_and_the_restart_loses_nothing(
    tmp_path, cache_dir, reference, small_disk):
  work = small_disk / "work"
  proc = _run(_cmd(work, cache_dir), check=False)
  assert proc.returncode != 0
  assert _last_line(proc.stderr).startswith(
      "Error: Disk full: saving checkpoint step 4"), proc.stderr[-3000:]
  assert str(work / "checkpoints") in proc.stderr
  # Orbax's and tensorstore's tracebacks (37 of them, ~500 lines) are gone:
  # its errors are one line each, "Event loop is closed" reports dropped.
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(proc.stderr.splitlines()) < 200
  # The logs written before are intact: every line parses, steps in order.
  steps = [r["step"] for r in _rows(work)]
  assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
  assert _committed(work) == [2]
  # Restarted on a larger disk, the run resumes from step 2 (the torn step-4
  # save is never restored) and loses nothing.
  moved = _copy(work, tmp_path / "moved")
  proc = _run(_cmd(moved, cache_dir))
  assert "Starting at step 2 of 8" in proc.stderr
  _assert_same_losses(moved, reference[1])


def test_second_trainer_is_refused_and_a_killed_one_leaves_no_lock(
    tmp_path, cache_dir, reference):
  work = tmp_path / "work"
  first = subprocess.Popen(_cmd(work, cache_dir), env=_env(), cwd=str(REPO),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  try:
    deadline = time.time() + 300
    while not (work / "metrics.jsonl").exists():
      assert first.poll() is None, first.stderr.read()[-3000:]
      assert time.time() < deadline
      time.sleep(0.1)
    second = _run(_cmd(work, cache_dir), check=False)
    assert first.poll() is None  # Still the first run's workdir.
  finally:
    first.send_signal(signal.SIGKILL)  # A crash, holding the lock.
    first.communicate()
  assert second.returncode != 0
  assert (f"is in use by pid {first.pid} on host {socket.gethostname()}"
          in second.stderr), second.stderr[-3000:]
  # The killed run's lock is gone with it: the next run resumes and ends with
  # the uninterrupted run's losses.
  _run(_cmd(work, cache_dir))
  _assert_same_losses(work, reference[1])


def test_changed_config_refuses_shapes_and_keeps_the_old_config(
    tmp_path, cache_dir, reference):
  work = _copy(reference[0], tmp_path / "work")
  old_config = (work / "config.json").read_text()
  proc = _run(_cmd(work, cache_dir, "--config.model.width=48",
                   "--config.data.spec.max_boxes=10"), check=False)
  assert proc.returncode != 0
  assert "model.width: 32 -> 48" in proc.stderr
  assert "data.spec.max_boxes: 8 -> 10" in proc.stderr
  assert "--workdir" in proc.stderr and "init_from" in proc.stderr
  assert (work / "config.json").read_text() == old_config
  # Other changes are accepted, logged and the old config kept beside.
  proc = _run(_cmd(work, cache_dir, "--config.total_steps=9",
                   "--config.optimizer.learning_rate=0.0005"))
  assert "total_steps: 8 -> 9" in proc.stderr
  assert "optimizer.learning_rate: 0.001 -> 0.0005" in proc.stderr
  assert (work / "config.8.json").read_text() == old_config
  assert json.loads((work / "config.json").read_text())["total_steps"] == 9
  assert max(_losses(work)) == 9


# ---------------------------------------------------------------------------
# Bad data, stop requests and one-line errors in every binary.


def _files_copy(tmp_path, cache_dir, name="data"):
  """A copy of the cached tiny ShapesWorld and the flags that train on it as
  a "files" dataset."""
  src, = pathlib.Path(cache_dir).glob("shapes_world-*")
  root = tmp_path / name
  shutil.copytree(src, root)
  flags = ("--config.data.dataset=files", f"--config.data.root={root}",
           "--config.data.vocab.path=")
  return root, flags


def _images_of(root, stream_file) -> list[pathlib.Path]:
  images = json.loads((root / stream_file).read_text())["images"]
  return [root / "images" / im["file_name"] for im in images]


def _stall(paths):
  """Replaces image files by FIFOs: opening one blocks (a hung mount)."""
  for path in paths:
    path.unlink()
    os.mkfifo(path)


def _last_line(text) -> str:
  return text.strip().splitlines()[-1]


def _assert_one_line_error(proc, *parts, code=1):
  assert proc.returncode == code, proc.stderr[-3000:]
  last = _last_line(proc.stderr)
  assert last.startswith("Error: "), proc.stderr[-3000:]
  for part in parts:
    assert part in last, last
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return last


def test_bad_images_are_one_line_and_a_source_without_readable_records_ends(
    tmp_path, cache_dir):
  root, data = _files_copy(tmp_path, cache_dir)
  for path in _images_of(root, "det_train.json"):
    path.unlink()
  # Strict: the first missing image, one line, with main's lenient option.
  proc = _run(_cmd(tmp_path / "strict", cache_dir, *data), check=False,
              timeout=300)
  last = _assert_one_line_error(proc, "missing image file",
                                "pass --config.data.strict=False")
  assert "set strict=False" not in last
  # Lenient: every det record is bad. This looped forever (no batch, no
  # error); now one line names the source, the count and the reason.
  proc = _run(_cmd(tmp_path / "lenient", cache_dir, *data,
                   "--config.data.strict=False"), check=False, timeout=300)
  _assert_one_line_error(proc, "data source det/shapes_det",
                         "the last 79 records read were all skipped",
                         "'missing image file'")


def _start(cmd, log):
  """Starts `cmd` with stderr to the file `log`."""
  return subprocess.Popen(cmd, env=_env(), cwd=str(REPO),
                          stdout=subprocess.DEVNULL, stderr=log)


def _wait_for(log_path, text, proc, timeout=300):
  deadline = time.time() + timeout
  while text not in pathlib.Path(log_path).read_text():
    assert proc.poll() is None, pathlib.Path(log_path).read_text()[-3000:]
    assert time.time() < deadline, f"no {text!r} after {timeout} s"
    time.sleep(0.1)


def _stopped_within(proc, seconds) -> float:
  start = time.time()
  try:
    proc.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f"still running {seconds} s after SIGTERM")
  return time.time() - start


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_stops_a_stalled_input_pipeline(tmp_path, cache_dir, signals):
  root, data = _files_copy(tmp_path, cache_dir)
  _stall(_images_of(root, "det_train.json"))
  log_path = tmp_path / "stderr.txt"
  with open(log_path, "w") as log:
    proc = _start(_cmd(tmp_path / "work", cache_dir, *data,
                       "--config.stop_grace_secs=2"), log)
    try:
      _wait_for(log_path, "Starting at step 0 of 8", proc)
      time.sleep(1)  # In the loop, blocked on the first image.
      proc.send_signal(signal.SIGTERM)
      if signals == 2:  # A second signal does not wait for the grace.
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
      # Before: the flag was checked only after a step, which never came.
      seconds = _stopped_within(proc, 30)
    finally:
      if proc.poll() is None:
        proc.kill()
  stderr = log_path.read_text()
  assert proc.returncode == 143, stderr[-3000:]  # 128 + SIGTERM.
  last = _last_line(stderr)
  assert last.startswith("Error: Stopped by SIGTERM while waiting for the "
                         "input pipeline (batch of step 1)."), last
  assert "resume from the last checkpoint" in last
  if signals == 2:
    assert "A second signal" in last and seconds < 2, (seconds, last)
  else:
    assert seconds < 2 + 5, seconds  # The grace, then a prompt exit.


def test_sigterm_during_evaluation_ends_it_and_saves_the_step(
    tmp_path, cache_dir):
  root, data = _files_copy(tmp_path, cache_dir)
  _stall(_images_of(root, "det_val.json"))
  work = tmp_path / "work"
  log_path = tmp_path / "stderr.txt"
  with open(log_path, "w") as log:
    proc = _start(_cmd(work, cache_dir, *data, "--config.eval_every_steps=4"),
                  log)
    try:
      _wait_for(log_path, "protocol, prepared in", proc)
      time.sleep(1)  # Blocked on the first validation image.
      proc.send_signal(signal.SIGTERM)
      _stopped_within(proc, 30)
    finally:
      if proc.poll() is None:
        proc.kill()
  stderr = log_path.read_text()
  assert proc.returncode == 0, stderr[-3000:]
  assert "Stopped by SIGTERM while evaluating step 4." in stderr
  assert "The evaluation of step 4 was not finished." in stderr
  assert "saved step 4, exiting" in stderr
  assert _committed(work) == [2, 4]
  assert max(_losses(work)) == 4


def test_lenient_vocabulary_build_skips_a_numeric_caption(tmp_path, cache_dir):
  root, data = _files_copy(tmp_path, cache_dir)
  img = json.loads((root / "img_train.json").read_text())
  img["annotations"][0]["caption"] = 7
  (root / "img_train.json").write_text(json.dumps(img))
  proc = _run(_cmd(tmp_path / "strict", cache_dir, *data), check=False,
              timeout=300)
  _assert_one_line_error(proc, "img_train.json", "bad caption")
  # Before: the vocabulary build failed in lenient mode too.
  proc = _run(_cmd(tmp_path / "work", cache_dir, *data,
                   "--config.data.strict=False"),
              timeout=300)
  report = proc.stderr[proc.stderr.rindex("skipped "):]
  assert "vocabulary: 1 x bad caption" in report, report
  assert "shapes_img: 1 x bad caption" in report, report


def test_evaluate_predict_and_inspect_print_one_line_errors(
    tmp_path, cache_dir, reference):
  python = [sys.executable, "-m"]
  proc = _run(python + ["omnitrain_jax.evaluate",
                        f"--workdir={tmp_path / 'nothing'}"], check=False,
              timeout=300)
  _assert_one_line_error(proc, "config.json")
  # A DataError in predict: the advice is predict's (it has no lenient mode).
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 not a jpeg")
  proc = _run(python + ["omnitrain_jax.predict", f"--workdir={reference[0]}",
                        f"--image={broken}", f"--query_image={broken}",
                        "--query_box=1,1,5,5", f"--out={tmp_path / 'out'}"],
              check=False, timeout=300)
  last = _assert_one_line_error(proc, "broken.jpg")
  assert "strict=False" not in last and "leave it out" in last, last
  root, data = _files_copy(tmp_path, cache_dir)
  _images_of(root, "det_train.json")[0].unlink()
  proc = _run(python + ["omnitrain_jax.data.inspect", f"--config={CONFIG}",
                        f"--config.data.cache_dir={cache_dir}", *data,
                        "--num_batches=12"], check=False, timeout=300)
  _assert_one_line_error(proc, "missing image file",
                         "pass --config.data.strict=False")
