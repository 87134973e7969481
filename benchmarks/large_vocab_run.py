r"""The demo trained with its own vocabulary vs a 500k-token one; prints JSON.

  .venv/bin/python benchmarks/large_vocab_run.py                 # 500k, sparse
  .venv/bin/python benchmarks/large_vocab_run.py --extra_tokens=500000 \
      --steps=300 --updates=sparse,dense

Issue 11's end-to-end check: `python -m omnitrain_jax.main` on the ShapesWorld
demo config (`configs/shapes_demo.py`), first with the vocabulary it builds
from its data (a few dozen tokens), then with that vocabulary plus
``--extra_tokens`` made-up tokens (a long tail of counts, as a real 500k
vocabulary has) passed as ``--config.data.vocab.path=...``, per table update
rule. The demo's examples only use their own tokens, so the extra rows are
what a large vocabulary costs: the table (and its moments), vocabulary
negatives drawn from 500k ids, the update. It reads the trainer's own
``steps_per_sec`` from ``metrics.jsonl`` (the mean over the logged windows
after the first, which holds the compilation) and reports each run's rate
and its ratio to the small vocabulary's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import string
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "shapes_demo.py")


def filler_tokens(n: int) -> list[str]:
  """`n` distinct lower-case made-up words ('zqaaaa', 'zqaaab', ...)."""
  letters = string.ascii_lowercase
  out = []
  for i in range(n):
    word = []
    for _ in range(5):
      i, r = divmod(i, 26)
      word.append(letters[r])
    out.append("zq" + "".join(reversed(word)))
  return out


def write_large_vocab(small: pathlib.Path, out: pathlib.Path,
                      extra: int) -> int:
  """`small`'s lines, then `extra` tokens with Zipf-like counts; returns V."""
  lines = small.read_text(encoding="utf-8").rstrip("\n").split("\n")
  counts = np.maximum(1, (1e6 / np.arange(1, extra + 1)).astype(np.int64))
  words = filler_tokens(extra)
  lines += [f"{w}\t{c}" for w, c in zip(words, counts.tolist())]
  out.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return len(lines)


def run_main(config: str, workdir: pathlib.Path, steps: int, log_every: int,
             overrides: list[str], cache_dir: str) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "omnitrain_jax.main", f"--config={config}",
         f"--workdir={workdir}", f"--config.total_steps={steps}",
         f"--config.log_every_steps={log_every}",
         f"--config.checkpoint_every_steps={steps}",
         f"--config.eval_every_steps={steps}",
         # The step's cost only: no self-training labelling passes.
         "--config.self_train.steps=()", *overrides]
  if cache_dir:
    cmd.append(f"--config.data.cache_dir={cache_dir}")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True,
                        text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  rates, rows = [], 0
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "steps_per_sec" in row and "loss" in row:
      rows += 1
      if rows > 1:  # The first window holds the compilation.
        rates.append(row["steps_per_sec"])
  if not rates:
    raise RuntimeError(f"no steps_per_sec after the first window in "
                       f"{workdir}/metrics.jsonl; raise --steps.")
  return {"steps_per_sec": float(np.mean(rates)),
          "steps_per_sec_windows": rates, "wall_s": wall}


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--extra_tokens", type=int, default=500_000)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--log_every", type=int, default=50)
  parser.add_argument("--updates", default="sparse",
                      help="table update rules to run at the large V")
  parser.add_argument("--cache_dir", default="",
                      help="the data cache (default: the config's)")
  parser.add_argument("--config_variant", default="",
                      help="shapes_demo variant ('' = the demo, 'tiny')")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args(argv)
  config = CONFIG + (f":{args.config_variant}" if args.config_variant else "")
  report: dict[str, Any] = {"benchmark": "large_vocab_run",
                            "config": config, "steps": args.steps}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    small = run_main(config, tmp / "small", args.steps, args.log_every, [],
                     args.cache_dir)
    small_vocab = tmp / "small" / "vocab.txt"
    v_small = len(small_vocab.read_text().rstrip("\n").split("\n"))
    big = tmp / "vocab_large.txt"
    v_big = write_large_vocab(small_vocab, big, args.extra_tokens)
    runs = {f"V={v_small} (own vocabulary, sparse)": small}
    for update in args.updates.split(","):
      name = f"V={v_big} ({update})"
      runs[name] = run_main(
          config, tmp / f"large_{update}", args.steps, args.log_every,
          [f"--config.data.vocab.path={big}",
           f"--config.optimizer.token_table_update={update}"], args.cache_dir)
      runs[name]["time_per_step_ratio_to_own_vocab"] = (
          small["steps_per_sec"] / runs[name]["steps_per_sec"])
  report["runs"] = runs
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)
  return report


if __name__ == "__main__":
  main()
