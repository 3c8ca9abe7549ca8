"""Tests of launch/tpu.sh through its dry run: the gcloud commands it prints, quoting, errors."""

import os
import pathlib
import shlex
import subprocess
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'launch' / 'tpu.sh'


@pytest.fixture
def tpu(tmp_path):
  """Returns a function running launch/tpu.sh in dry-run mode; a gcloud on PATH records any real call."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  marker = tmp_path / 'gcloud_was_called'
  for tool in ('gcloud', 'gsutil'):
    (bin_dir / tool).write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\nexit 99\n')
    (bin_dir / tool).chmod(0o755)
  base_env = {k: v for k, v in os.environ.items()
              if not k.startswith(('TPU_', 'REPO_', 'DRY_RUN', 'TRAIN_LOG'))}
  base_env.update(PATH=f'{bin_dir}:{os.environ["PATH"]}', TPU_NAME='mlm-test',
                  TPU_ZONE='us-central2-b')

  def run(*args, env=None, dry_env=True, check=True):
    full_env = dict(base_env, **(env or {}))
    if dry_env:
      full_env['DRY_RUN'] = '1'
    proc = subprocess.run(['bash', str(SCRIPT), *args], env=full_env, capture_output=True,
                          text=True, timeout=60)
    assert not marker.exists(), f'a dry run called gcloud: {marker.read_text()}'
    if check:
      assert proc.returncode == 0, proc.stderr
      return [shlex.split(line) for line in proc.stdout.splitlines()]
    return proc

  return run


def _remote(cmd: list[str]) -> str:
  """Returns the --command string of a printed `gcloud ... ssh` command."""
  return cmd[cmd.index('--command') + 1]


def test_create_defaults_to_a_v5e_slice_with_its_runtime(tpu):
  (cmd,) = tpu('create')
  assert cmd == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'mlm-test', '--zone',
                 'us-central2-b', '--accelerator-type', 'v5litepod-8', '--version',
                 'v2-alpha-tpuv5-lite']


@pytest.mark.parametrize('accelerator,version', [
    ('v4-32', 'tpu-ubuntu2204-base'), ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e')])
def test_create_a_pod_slice_spot_in_a_project(tpu, accelerator, version):
  (cmd,) = tpu('--accelerator', accelerator, '--spot', '--project', 'proj-1', 'create')
  assert cmd[cmd.index('--accelerator-type') + 1] == accelerator
  assert cmd[cmd.index('--version') + 1] == version
  assert cmd[cmd.index('--project') + 1] == 'proj-1' and cmd[-1] == '--spot'


def test_dry_run_flag_equals_the_environment_variable(tpu):
  assert tpu('create', '--dry_run', dry_env=False) == tpu('create')


def test_install_copies_this_checkout_to_every_worker(tpu, tmp_path):
  pack, scp, ssh = tpu('install')
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert scp[5] == '/tmp/mlmjax-src-mlm-test.tgz' and scp[6] == 'mlm-test:mlmjax-src.tgz'
  assert ssh[4] == 'ssh' and '--worker=all' in ssh
  remote = _remote(ssh)
  assert 'tar -xzf mlmjax-src.tgz -C mlmjax' in remote
  assert "pip install -e '.[tpu]'" in remote
  pipeline = (f'git -C {REPO} ls-files -z --cached --others --exclude-standard | '
              f'tar -C {REPO} --null -T - -czf /tmp/mlmjax-src-mlm-test.tgz')
  assert pack == shlex.split(pipeline)
  # The local packing step is a real command: run it into tmp_path and look inside.
  pipeline = pipeline.replace('/tmp/mlmjax-src-mlm-test.tgz', str(tmp_path / 'src.tgz'))
  subprocess.run(['bash', '-o', 'pipefail', '-c', pipeline], check=True, timeout=120)
  with tarfile.open(tmp_path / 'src.tgz') as tar:
    names = set(tar.getnames())
  assert {'setup.cfg', 'mlmjax/train.py', 'configs/pretrain.py', 'launch/tpu.sh'} <= names
  assert not any(n.startswith(('.venv/', 'runs/')) or '__pycache__' in n for n in names)


def test_install_from_a_git_url(tpu):
  (ssh,) = tpu('install', '--repo_url', 'https://github.com/me/mlmjax.git', '--branch', 'dev',
               '--repo_dir', 'src/mlm')
  remote = _remote(ssh)
  assert 'git clone --branch dev https://github.com/me/mlmjax.git src/mlm' in remote
  assert 'git -C src/mlm pull --ff-only' in remote and 'cd src/mlm &&' in remote


def test_run_starts_the_same_command_on_all_workers_with_arguments_intact(tpu):
  args = ['--config', 'configs/pretrain.py:base', '--workdir', '/mnt/b/runs/base',
          '--config.data.corpus=/data/my corpus.txt', "--config.init_from=it's"]
  (ssh,) = tpu('run', '--', *args)
  assert '--worker=all' in ssh
  remote = _remote(ssh)
  words = shlex.split(remote)
  start = words.index('mlmjax.train') + 1
  assert words[start:start + len(args)] == args  # spaces and quotes survive two shells
  assert words[:3] == ['cd', 'mlmjax', '&&'] and words[3:6] == ['nohup', 'python3', '-m']
  assert '> $HOME/mlmjax-train.log 2>&1 < /dev/null &' in remote
  assert remote.endswith('echo $! > $HOME/mlmjax-train.log.pid')


def test_logs_stop_fetch_delete(tpu):
  (logs,) = tpu('logs')
  assert '--worker=0' in logs and _remote(logs) == 'tail -n 200 -F $HOME/mlmjax-train.log'
  (logs3,) = tpu('logs', '3')
  assert '--worker=3' in logs3
  (stop,) = tpu('stop')
  assert '--worker=all' in stop and _remote(stop) == 'kill -TERM $(cat $HOME/mlmjax-train.log.pid)'
  (fetch,) = tpu('fetch', 'runs/base', '/tmp/out')
  assert fetch[4:8] == ['scp', '--recurse', 'mlm-test:mlmjax/runs/base', '/tmp/out']
  assert '--worker=0' in fetch
  (fetch_abs,) = tpu('fetch', '/mnt/b/runs/base')
  assert fetch_abs[6:8] == ['mlm-test:/mnt/b/runs/base', '.']
  (fetch_gs,) = tpu('fetch', 'gs://bucket/runs/base', '/tmp/out')
  assert fetch_gs == ['gsutil', '-m', 'rsync', '-r', 'gs://bucket/runs/base', '/tmp/out/base']
  (delete,) = tpu('delete')
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'mlm-test', '--zone',
                    'us-central2-b', '--quiet']


def test_mount_a_bucket_on_every_worker(tpu):
  (ssh,) = tpu('mount', 'gs://my-bucket')
  remote = _remote(ssh)
  assert '--worker=all' in ssh
  assert 'gcsfuse --implicit-dirs my-bucket /mnt/my-bucket' in remote
  assert remote.startswith('command -v gcsfuse >/dev/null ||')  # installs only where missing


@pytest.mark.parametrize('args,env,needle', [
    (('create',), {'TPU_NAME': ''}, '--name'),
    (('create',), {'TPU_ZONE': ''}, '--zone'),
    (('launch',), {}, 'unknown subcommand launch'),
    (('--colour', 'red', 'create'), {}, 'unknown option --colour'),
    (('--accelerator', 'v9-8', 'create'), {}, 'no default --version for accelerator v9-8'),
    (('run',), {}, 'usage'),
    (('fetch',), {}, 'usage'),
])
def test_errors_say_what_to_set(tpu, args, env, needle):
  proc = tpu(*args, env=env, check=False)
  assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
  assert proc.stdout == ''
