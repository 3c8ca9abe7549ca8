"""Sweeps: every combination trains once, preemption stops the sweep, reruns skip or resume."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from configs import pretrain
from mlmjax import run_dirs, sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f'{REPO / "configs" / "pretrain.py"}:tiny'
TIMEOUT_S = 240  # a hung child fails the test instead of hanging it

# The sweep a scheduler would start, with the test's base config passed as JSON overrides.
CHILD = """
import json, sys
from configs import pretrain
from mlmjax import sweep
base = sweep.apply(pretrain.get_config('tiny_classic'), json.loads(sys.argv[1]))
sweep.run_sweep(base, json.loads(sys.argv[2]), sys.argv[3])
"""


def _overrides(config) -> dict:
  """Returns {dotted key: value} where config differs from get_config('tiny_classic')."""
  new, base = run_dirs.flatten(config.to_dict()), run_dirs.flatten(pretrain.get_config('tiny_classic').to_dict())
  return {k: v for k, v in new.items() if base.get(k) != v}


def _train_steps(run_dir: pathlib.Path) -> list[int]:
  return [r['step'] for r in run_dirs.read_metrics(run_dir / 'metrics.jsonl') if 'train/loss' in r]


def _statuses(workdir: pathlib.Path) -> dict[str, str]:
  return {r['name']: r['status'] for r in json.loads((workdir / 'sweep.json').read_text())['runs']}


def _snapshot(run_dir: pathlib.Path) -> dict[str, bytes]:
  return {name: (run_dir / name).read_bytes() for name in ('metrics.jsonl', 'log.txt', 'summary.json')}


@pytest.fixture
def base(make_tiny_config):
  """A shrunk tiny config with enough steps that SIGTERM lands well before a run ends."""
  c = make_tiny_config()
  c.train.num_steps = 60
  c.eval.every_steps = 30
  c.ckpt.every_steps = 30
  return c


@pytest.mark.slow
def test_sweep_stops_on_sigterm_resumes_then_skips(base, tmp_path):
  workdir = tmp_path / 'abl'
  grid = [('masking.rate', [0.15, 0.3])]
  first, second = workdir / 'rate=0.15', workdir / 'rate=0.3'

  # 1. SIGTERM during the first run: it checkpoints, the sweep starts nothing more and exits 0.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=str(REPO))
  proc = subprocess.Popen([sys.executable, '-c', CHILD, json.dumps(_overrides(base)), json.dumps(grid),
                           str(workdir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not (first / 'metrics.jsonl').exists() or not _train_steps(first):
      assert proc.poll() is None, proc.communicate()[0][-3000:]
      assert time.monotonic() < deadline, 'the first run did not start training'
      time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=TIMEOUT_S)[0]
  finally:
    proc.kill()
  assert proc.returncode == 0, out[-3000:]
  assert 'sweep stopped: rate=0.15 was preempted' in out and '1 more run(s) not started' in out
  assert not second.exists()
  assert _statuses(workdir) == {'rate=0.15': 'preempted', 'rate=0.3': 'pending'}
  stopped_at = json.loads((first / 'summary.json').read_text())['step']
  assert 0 < stopped_at < 60

  # 2. The same sweep again resumes the first run where it stopped and trains the second.
  record = sweep.run_sweep(base, grid, workdir)
  assert {r['name']: r['status'] for r in record['runs']} == {'rate=0.15': 'finished', 'rate=0.3': 'finished'}
  assert _statuses(workdir) == {'rate=0.15': 'finished', 'rate=0.3': 'finished'}
  assert f'resumed from step {stopped_at}' in (first / 'log.txt').read_text()
  for run_dir, rate in ((first, 0.15), (second, 0.3)):
    assert _train_steps(run_dir) == list(range(1, 61))  # every step once, none repeated
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['finished'] and summary['masking']['rate'] == rate
  # Same seed and the same token cache (hence the same data order) for every combination.
  configs = [run_dirs.flatten(json.loads((d / 'config.json').read_text())) for d in (first, second)]
  assert configs[0]['seed'] == configs[1]['seed'] == base.seed
  assert {k for k in configs[0] if configs[0][k] != configs[1][k]} == {'masking.rate'}
  summaries = [json.loads((d / 'summary.json').read_text()) for d in (first, second)]
  assert summaries[0]['data']['key'] == summaries[1]['data']['key']

  # 3. A third invocation trains nothing: every file of both runs stays byte for byte the same.
  before = {d: _snapshot(d) for d in (first, second)}
  record = sweep.run_sweep(base, grid, workdir)
  assert [r['status'] for r in record['runs']] == ['skipped', 'skipped']
  assert {d: _snapshot(d) for d in (first, second)} == before

  # SIGTERM outside any training loop (here: while the sweep logs its first run) ends the sweep
  # at once, and the handlers it installed are put back.
  def log(line):
    if line.startswith('[1/2]'):
      os.kill(os.getpid(), signal.SIGTERM)

  handler = signal.getsignal(signal.SIGTERM)
  record = sweep.run_sweep(base, grid, workdir, log=log)
  assert record['stopped_early'] and signal.getsignal(signal.SIGTERM) is handler
  assert json.loads((workdir / 'sweep.json').read_text())['stopped_early']

  # 4. A finished run whose settings differ from what the sweep would run is an error, not a skip.
  changed = sweep.apply(base, {'optim.learning_rate': 1e-3})
  with pytest.raises(ValueError, match=r'rate=0.15 holds a run whose config differs .*optim.learning_rate'):
    sweep.run_sweep(changed, grid, workdir)
  assert {d: _snapshot(d) for d in (first, second)} == before
  # Bookkeeping keys (cadences, cache paths) do not make a run differ.
  assert sweep.run_sweep(sweep.apply(base, {'train.log_every_steps': 7}), grid, workdir)['runs'][0][
      'status'] == 'skipped'


def test_plan_order_names_and_types(tiny_config):
  c = tiny_config
  key, values = sweep.parse_assignment(c, 'masking.split=(0.8,0.1,0.1),(1,0,0)', '--grid', many=True)
  assert key == 'masking.split' and values == [(0.8, 0.1, 0.1), (1, 0, 0)]
  assert sweep.parse_assignment(c, 'train.num_steps=10,20', '--grid', many=True)[1] == [10, 20]
  assert sweep.parse_assignment(c, 'model.pre_layer_norm=true,False', '--grid', many=True)[1] == [True, False]
  assert sweep.parse_assignment(c, "masking.selection=exact,'bernoulli'", '--grid', many=True)[1] == [
      'exact', 'bernoulli']
  assert sweep.parse_assignment(c, 'optim.learning_rate=1e-3', '--set', many=False)[1] == [1e-3]
  with pytest.raises(ValueError, match='train.num_steps'):
    sweep.parse_assignment(c, 'train.num_steps=10,1.5', '--grid', many=True)
  with pytest.raises(KeyError, match='unknown config key masking.nope'):
    sweep.parse_assignment(c, 'masking.nope=1', '--grid', many=True)
  with pytest.raises(ValueError, match='repeated'):
    sweep.parse_assignment(c, 'masking.rate=0.2,0.20', '--grid', many=True)

  runs = sweep.plan(c, [('masking.rate', [0.15, 0.3]), ('masking.split', [(0.8, 0.1, 0.1), (1, 0, 0)]),
                        ('model.pre_layer_norm', [False])])
  assert [r.name for r in runs] == [
      'rate=0.15,split=0.8-0.1-0.1,pre_layer_norm=false', 'rate=0.15,split=1-0-0,pre_layer_norm=false',
      'rate=0.3,split=0.8-0.1-0.1,pre_layer_norm=false', 'rate=0.3,split=1-0-0,pre_layer_norm=false']
  assert [r.index for r in runs] == [0, 1, 2, 3]
  assert runs[3].config.masking.rate == 0.3 and tuple(runs[3].config.masking.split) == (1, 0, 0)
  assert runs[3].config.model.pre_layer_norm is False and runs[3].config.is_locked
  assert c.masking.rate == 0.15 and c.model.pre_layer_norm  # the base is left alone
  # Two keys with the same last part are named in full.
  same_leaf = sweep.plan(c, [('masking.rate', [0.2]), ('eval.rate', [0.2])])
  assert same_leaf[0].name == 'masking.rate=0.2,eval.rate=0.2'
  with pytest.raises(ValueError, match='given twice'):
    sweep.plan(c, [('masking.rate', [0.2]), ('masking.rate', [0.3])])


def test_seeds_multiply_the_grid_with_the_seed_last_in_the_name(tiny_config):
  grid = [('masking.rate', [0.15, 0.3]), ('masking.strategy', ['token', 'span'])]
  runs = sweep.plan(tiny_config, grid, seeds=[0, 1, 2])
  assert len(runs) == 12 and [r.index for r in runs] == list(range(12))
  # Every combination at the first seed comes first (a full grid early), then the next seed.
  assert [r.name for r in runs[:5]] == [
      'rate=0.15,strategy=token,seed=0', 'rate=0.15,strategy=span,seed=0',
      'rate=0.3,strategy=token,seed=0', 'rate=0.3,strategy=span,seed=0',
      'rate=0.15,strategy=token,seed=1']
  assert runs[-1].name == 'rate=0.3,strategy=span,seed=2'
  assert {(r.config.masking.rate, r.config.masking.strategy, r.config.seed) for r in runs} == {
      (rate, strategy, seed) for rate in (0.15, 0.3) for strategy in ('token', 'span')
      for seed in (0, 1, 2)}
  assert runs[5].overrides == {'masking.rate': 0.15, 'masking.strategy': 'span', 'seed': 1}
  # The report's group label of a run is its name without the seed, the way --baseline names it.
  assert run_dirs.settings_label({k: v for k, v in runs[5].overrides.items() if k != 'seed'}) == \
      'rate=0.15,strategy=span'
  # Without --seeds the names (and so the directories of existing sweeps) stay as they were.
  assert [r.name for r in sweep.plan(tiny_config, grid)] == [r.name[:-len(',seed=0')]
                                                             for r in runs[:4]]
  assert [r.name for r in sweep.plan(tiny_config, [], seeds=[3, 4])] == ['seed=3', 'seed=4']
  with pytest.raises(ValueError, match='both --grid and --seeds'):
    sweep.plan(tiny_config, [('seed', [1, 2])], seeds=[0])
  assert sweep.parse_seeds('0, 1,7') == [0, 1, 7]
  for bad, needle in (('0,1,1', 'repeated'), ('0,x', 'distinct integers'), ('1.5', 'integers')):
    with pytest.raises(ValueError, match=needle):
      sweep.parse_seeds(bad)


def test_cli_seeds_dry_run_shards_the_product(tmp_path, capsys):
  workdir = tmp_path / 'abl'
  for i in (0, 1):
    sweep.main(['sweep', '--config', CONFIG, '--grid', 'masking.rate=0.15,0.3', '--seeds', '0,1',
                '--workdir', str(workdir), '--shard', f'{i}/2', '--dry_run'])
  out = capsys.readouterr().out
  assert out.count('4 runs, 2 in shard') == 2
  for index, name in enumerate(('rate=0.15,seed=0', 'rate=0.3,seed=0', 'rate=0.15,seed=1',
                                'rate=0.3,seed=1')):
    assert f'[{index}] {name}: train' in out and f'[{index}] {name}: other shard' in out
  for args, needle in ((['--seeds', '0,1', '--set', 'seed=3'], 'given to --seeds'),
                       (['--seeds', '0,1', '--config.seed=3'], 'given to --seeds'),
                       (['--seeds', '0,1', '--grid', 'seed=1,2'], 'both --grid and --seeds'),
                       (['--seeds', '0,0'], 'repeated')):
    with pytest.raises(SystemExit) as e:
      sweep.main(['sweep', '--config', CONFIG, '--workdir', str(workdir), '--grid',
                  'masking.rate=0.15', *args])
    msg = str(e.value.code)
    assert msg.startswith('error: ') and needle in msg and len(msg.splitlines()) == 1, msg
  assert not workdir.exists()
  # The record of a seeded sweep lists its seeds and is another sweep than the seedless one.
  record = sweep.run_sweep(sweep.apply(pretrain.get_config('tiny_classic'), {}), [('masking.rate', [0.3])],
                           workdir, seeds=[0, 1], dry_run=True, log=lambda _: None)
  assert record['seeds'] == [0, 1] and [r['name'] for r in record['runs']] == [
      'rate=0.3,seed=0', 'rate=0.3,seed=1']


def test_shards_split_the_grid(tiny_config, tmp_path, capsys):
  grid = [('masking.rate', [0.15, 0.3, 0.4]), ('masking.selection', ['exact', 'bernoulli'])]
  owners = {}
  for i in range(4):
    record = sweep.run_sweep(tiny_config, grid, tmp_path / 'w', shard=(i, 4), dry_run=True)
    for r in record['runs']:
      if r['status'] != 'other shard':
        assert r['status'] == 'pending' and r['index'] % 4 == i
        owners.setdefault(r['index'], []).append(i)
  assert owners == {k: [k % 4] for k in range(6)}  # each combination in exactly one shard
  assert not (tmp_path / 'w').exists()  # a dry run writes nothing
  assert sweep.parse_shard('2/3') == (2, 3)
  for bad in ('3/3', '1', '-1/2'):
    with pytest.raises(ValueError, match='--shard'):
      sweep.parse_shard(bad)


def test_cli_dry_run_and_errors(tmp_path, capsys):
  workdir = tmp_path / 'abl'
  sweep.main(['sweep', '--config', CONFIG, '--config.train.num_steps=40', '--set', 'optim.warmup_steps=5',
              '--grid', 'masking.rate=0.15,0.3', '--grid', 'masking.selection=exact,bernoulli',
              '--workdir', str(workdir), '--shard', '1/2', '--dry_run'])
  out = capsys.readouterr().out
  assert f'sweep {workdir}: 4 runs, 2 in shard 1/2' in out
  assert '[1] rate=0.15,selection=bernoulli: train' in out
  assert '[3] rate=0.3,selection=bernoulli: train' in out
  assert '[0] rate=0.15,selection=exact: other shard' in out
  assert not workdir.exists()

  for args, needle in ((['--grid', 'masking.nope=1,2'], 'unknown config key masking.nope'),
                       (['--grid', 'masking.rate=0.1,abc'], "'abc' is not a valid float"),
                       (['--grid', 'masking.rate=0.1,1.5'], 'run rate=1.5: '),
                       (['--set', 'masking.rate=0.2', '--grid', 'masking.rate=0.1'], 'both --set and --grid'),
                       (['--grid', 'masking.rate=0.1', '--shard', '2/2'], '--shard')):
    with pytest.raises(SystemExit) as e:
      sweep.main(['sweep', '--config', CONFIG, '--workdir', str(workdir), *args])
    msg = str(e.value.code)
    assert msg.startswith('error: ') and needle in msg and len(msg.splitlines()) == 1, msg
  assert not workdir.exists()


def test_tpu_launch_dry_run_prints_one_command_per_shard():
  sweep_args = ['--config', 'configs/pretrain.py:tiny_classic', '--grid', 'masking.rate=0.15,0.3,0.4',
                '--grid', 'masking.split=(0.8,0.1,0.1),(1,0,0)', '--workdir', 'runs/abl']
  out = subprocess.run(['bash', str(REPO / 'launch' / 'sweep_tpu.sh'), '--zone', 'us-central2-b',
                        '--vms', 'abl-0,abl-1,abl-2', '--dry_run', '--', *sweep_args],
                       capture_output=True, text=True, timeout=60, check=True).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', f'abl-{i}']
    assert argv[argv.index('--zone') + 1] == 'us-central2-b' and '--worker=all' in argv
    remote = shlex.split(argv[argv.index('--command') + 1])
    at = remote.index('mlmjax.sweep') + 1
    # The sweep arguments reach the VM unchanged, followed by this VM's shard.
    assert remote[at:at + len(sweep_args) + 2] == [*sweep_args, '--shard', f'{i}/3']


def test_record_keeps_other_grids_of_the_same_workdir(tmp_path):
  path = tmp_path / 'sweep.json'
  first = {'grid': {'masking.rate': [0.3]}, 'base_overrides': {}, 'config': 'c', 'runs': ['a']}
  second = {'grid': {'masking.rate': [0.15, 0.4]}, 'base_overrides': {}, 'config': 'c', 'runs': ['b']}
  for record in (first, first, second, second):
    sweep._write_record(path, record)
  on_disk = json.loads(path.read_text())
  assert on_disk['runs'] == ['b'] and [r['runs'] for r in on_disk['other_sweeps']] == [['a']]
  sweep._write_record(path, first)
  on_disk = json.loads(path.read_text())
  assert on_disk['runs'] == ['a'] and [r['runs'] for r in on_disk['other_sweeps']] == [['b']]
