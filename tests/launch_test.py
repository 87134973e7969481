"""Tests for launch/tpu_pod.sh and launch/gpu.sh.

Dry runs are parsed back with shlex (twice for the remote `--command`), which
checks the quoting as well as the content; real runs go to fake gcloud/git/srun
executables that record their argv, so "dry run prints exactly what a real run
executes" is tested too.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
_TPU = _REPO / 'launch' / 'tpu_pod.sh'
_GPU = _REPO / 'launch' / 'gpu.sh'
_WORKDIR = "gs://bucket/run 'one'"  # A space and quotes, to test quoting.
_TPU_FLAGS = [
    '--name=omni-b16', '--zone=us-central2-b', '--accelerator_type=v4-32',
    '--version=tpu-ubuntu2204-base', '--config=configs/omnidet_b16.py:tiny',
    f'--workdir={_WORKDIR}'
]


def _run(script, *args, env=None):
  return subprocess.run(['bash', str(script), *args], cwd=_REPO,
                        capture_output=True, text=True, env=env, timeout=60,
                        check=False)


def _commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def _remote(argv):
  """The tokens of the shell command passed to gcloud ssh --command."""
  return shlex.split(argv[argv.index('--command') + 1])


@pytest.mark.parametrize('script', [_TPU, _GPU])
def test_scripts_parse(script):
  assert subprocess.run(['bash', '-n', str(script)], check=False).returncode == 0


def test_tpu_dry_run_prints_every_step():
  result = _run(_TPU, *_TPU_FLAGS, '--spot', '--dry_run', '--',
                '--config.seed=1', '--config.note=a b')
  assert result.returncode == 0, result.stderr
  create, archive, scp, install, main = _commands(result.stdout)

  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create',
                        'omni-b16']
  assert {'--zone=us-central2-b', '--accelerator-type=v4-32',
          '--version=tpu-ubuntu2204-base', '--spot'} <= set(create)

  assert archive[:2] == ['git', '-C'] and archive[-1] == 'HEAD'
  tarball = next(a for a in archive if a.startswith('--output='))[9:]
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert tarball in scp and '--worker=all' in scp

  assert install[4:6] == ['ssh', 'omni-b16'] and '--worker=all' in install
  install_cmd = _remote(install)
  assert ['pip', 'install', '-q', '-e', '.[tpu]'] == install_cmd[-5:]
  assert 'tar' in install_cmd

  assert main[4:6] == ['ssh', 'omni-b16'] and '--worker=all' in main
  assert '--zone=us-central2-b' in main
  remote = _remote(main)
  start = remote.index('python3')
  assert remote[start:] == [
      'python3', '-m', 'omnitrain_jax.main',
      '--config=configs/omnidet_b16.py:tiny', f'--workdir={_WORKDIR}',
      '--config.seed=1', '--config.note=a b'
  ]


def test_tpu_skip_create_and_detach():
  result = _run(_TPU, '--name=omni', '--zone=z', '--config=c.py',
                '--workdir=gs://b/r', '--skip_create', '--skip_install',
                '--detach', '--project=my-proj', '--dry_run')
  assert result.returncode == 0, result.stderr
  (main,) = _commands(result.stdout)
  assert 'create' not in main and '--project=my-proj' in main
  remote = _remote(main)
  assert remote[remote.index('nohup') + 1:][:3] == [
      'python3', '-m', 'omnitrain_jax.main']
  assert remote[-1] == '&'


@pytest.mark.parametrize('drop, message', [
    ('--workdir', '--workdir'),
    ('--name', '--name'),
    ('--version', '--version'),
])
def test_tpu_missing_required_flag_fails_with_usage(drop, message):
  flags = [f for f in _TPU_FLAGS if not f.startswith(drop + '=')]
  result = _run(_TPU, *flags, '--dry_run')
  assert result.returncode != 0
  assert 'Missing required flag' in result.stderr and message in result.stderr
  assert 'Usage:' in result.stderr
  assert not result.stdout


def test_tpu_help_and_bad_flags():
  result = _run(_TPU, '--help')
  assert result.returncode == 0 and 'Usage:' in result.stdout
  result = _run(_TPU, *_TPU_FLAGS, '--workers=3', '--dry_run')
  assert result.returncode != 0 and 'Unknown flag --workers' in result.stderr
  result = _run(_TPU, *_TPU_FLAGS, '--remote_dir=../oops', '--dry_run')
  assert result.returncode != 0 and '--remote_dir' in result.stderr


def _fake_bin(tmp_path, names):
  """Executables that append their argv (as JSON) to tmp_path/calls.jsonl."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'calls.jsonl'
  for name in names:
    path = bin_dir / name
    path.write_text(
        f'#!{sys.executable}\n'
        'import json, os, sys\n'
        f'with open({str(log)!r}, "a") as f:\n'
        '  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:])'
        ' + "\\n")\n')
    path.chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  return env, log


def _calls(log):
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


def test_tpu_real_run_executes_the_dry_run_commands(tmp_path):
  env, log = _fake_bin(tmp_path, ['gcloud', 'git'])
  dry = _run(_TPU, *_TPU_FLAGS, '--dry_run', env=env)
  assert dry.returncode == 0, dry.stderr
  # The dry run only reads `git status` (for the uncommitted-changes warning).
  assert all(c[0] == 'git' and 'status' in c for c in _calls(log))

  real = _run(_TPU, *_TPU_FLAGS, env=env)
  assert real.returncode == 0, real.stderr
  executed = [c for c in _calls(log) if c[0] == 'gcloud' or 'archive' in c]
  assert executed == _commands(dry.stdout)


def test_gpu_slurm_dry_run():
  result = _run(_GPU, '--nodes=2', '--gpus_per_node=8', '--partition=gpu',
                '--config=configs/omnidet_b16.py', f'--workdir={_WORKDIR}',
                '--install', '--dry_run', '--', '--config.seed=3')
  assert result.returncode == 0, result.stderr
  install, srun = _commands(result.stdout)
  assert install[:5] == ['python3', '-m', 'pip', 'install', '-q']
  assert install[-1].endswith('[gpu]')
  assert srun[0] == 'srun'
  assert {'--nodes=2', '--ntasks-per-node=8', '--gpus-per-node=8',
          '--partition=gpu'} <= set(srun)
  start = srun.index('python3')
  assert srun[start:] == [
      'python3', '-m', 'omnitrain_jax.main',
      '--config=configs/omnidet_b16.py', f'--workdir={_WORKDIR}',
      '--config.seed=3'
  ]


def test_gpu_explicit_coordinator_dry_run():
  result = _run(_GPU, '--coordinator_address=10.0.0.1:12345',
                '--num_processes=2', '--process_id=1', '--config=c.py:tiny',
                '--workdir=/shared/run', '--dry_run')
  assert result.returncode == 0, result.stderr
  (main,) = _commands(result.stdout)
  assert main == [
      'python3', '-m', 'omnitrain_jax.main', '--config=c.py:tiny',
      '--workdir=/shared/run', '--coordinator_address=10.0.0.1:12345',
      '--num_processes=2', '--process_id=1'
  ]


@pytest.mark.parametrize('args, message', [
    (['--nodes=2', '--config=c', '--workdir=w'], '--gpus_per_node'),
    (['--coordinator_address=h:1', '--num_processes=2', '--config=c',
      '--workdir=w'], '--process_id'),
    (['--nodes=2', '--gpus_per_node=8', '--config=c'], '--workdir'),
    (['--coordinator_address=h:1', '--num_processes=2', '--process_id=2',
      '--config=c', '--workdir=w'], '--process_id=2'),
    (['--coordinator_address=nohost', '--num_processes=2', '--process_id=0',
      '--config=c', '--workdir=w'], 'HOST:PORT'),
])
def test_gpu_bad_flags_fail_with_usage(args, message):
  result = _run(_GPU, *args, '--dry_run')
  assert result.returncode != 0
  assert message in result.stderr and 'Usage' in result.stderr
  assert not result.stdout


def test_gpu_real_run_executes_the_dry_run_command(tmp_path):
  env, log = _fake_bin(tmp_path, ['srun'])
  args = ['--nodes=1', '--gpus_per_node=2', '--config=c.py',
          f'--workdir={_WORKDIR}']
  dry = _run(_GPU, *args, '--dry_run', env=env)
  assert dry.returncode == 0 and not _calls(log)
  real = _run(_GPU, *args, env=env)
  assert real.returncode == 0, real.stderr
  assert _calls(log) == _commands(dry.stdout)
