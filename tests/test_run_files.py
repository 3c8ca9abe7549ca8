"""Tests for mlmjax/run_files.py: metrics truncation on resume, config notes, resume checks."""

import json
import time
import types

import pytest

from mlmjax import run_files


def _lines(path):
  return path.read_text().splitlines()


def test_resume_drops_metrics_past_the_restored_step_and_cut_lines(tmp_path):
  metrics = tmp_path / 'metrics.jsonl'
  records = [{'step': s, 'train/loss': 10.0 - s} for s in (50, 100, 150, 200)]
  # A crash cut the last line short: it goes whatever the step.
  metrics.write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"step": 250, "tr')
  before = metrics.read_bytes()
  reporter = run_files.Reporter(tmp_path, enabled=True)
  assert metrics.read_bytes() == before  # nothing changes until the run knows its restored step
  reporter.truncate_metrics(100)
  assert [json.loads(l)['step'] for l in _lines(metrics)] == [50, 100]
  reporter.write(150, {'train/loss': 1.5, 'note': 'text is kept out of TensorBoard'})
  reporter.close()
  assert json.loads(_lines(metrics)[-1]) == {'step': 150, 'train/loss': 1.5,
                                             'note': 'text is kept out of TensorBoard'}
  assert list((tmp_path / 'tensorboard').iterdir())


def test_a_fresh_start_in_an_old_workdir_keeps_no_metrics(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 0, "eval/loss": 7.0}\n{"step": 10}\n')
  run_files.Reporter(tmp_path, enabled=True).truncate_metrics(0)
  assert (tmp_path / 'metrics.jsonl').read_text() == ''


def test_a_disabled_reporter_writes_nothing(tmp_path):
  reporter = run_files.Reporter(tmp_path, enabled=False)
  reporter.truncate_metrics(0)
  reporter.log('a line')
  reporter.write(1, {'x': 1.0})
  reporter.close()
  assert list(tmp_path.iterdir()) == []


def test_log_appends_to_log_txt(tmp_path, capsys):
  reporter = run_files.Reporter(tmp_path, enabled=True)
  reporter.log('first')
  reporter.log('second')
  assert _lines(tmp_path / 'log.txt') == ['first', 'second']
  assert capsys.readouterr().out == 'first\nsecond\n'


@pytest.mark.parametrize('seconds, text', [(0, '0m00s'), (59.9, '0m59s'), (61, '1m01s'),
                                           (3600, '1h00m'), (7322, '2h02m'), (-5, '0m00s')])
def test_fmt_time(seconds, text):
  assert run_files.fmt_time(seconds) == text


def test_write_config_notes_the_keys_that_changed(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict({'seed': 0, 'train': {'num_steps': 10, 'seq_len': 64}})
  notes = []
  run_files.write_config(tmp_path, c, notes.append)
  assert notes == [] and json.loads((tmp_path / 'config.json').read_text()) == c.to_dict()
  c.train.num_steps, c.seed = 20, 1
  run_files.write_config(tmp_path, c, notes.append)
  assert notes == ['note: config differs from the previous run in this workdir: seed, '
                   'train.num_steps']
  assert json.loads((tmp_path / 'config.json').read_text())['train']['num_steps'] == 20
  assert not list(tmp_path.glob('*.tmp'))


def test_resume_checks_refuse_another_tokenizer_and_warn_on_other_data_or_seed():
  tok = types.SimpleNamespace(fingerprint='abc', model_path='runs/x/tokenizer.model')
  config = types.SimpleNamespace(seed=0)
  notes = []
  meta = {'tokenizer': 'abc', 'cache_key': 'rows-1', 'seed': 0}
  run_files.check_resume_meta(meta, 'rows-1', tok, config, notes.append)
  assert notes == []
  run_files.check_resume_meta({**meta, 'cache_key': 'rows-2', 'seed': 3}, 'rows-1', tok, config,
                              notes.append)
  assert len(notes) == 2 and 'data order will not continue' in notes[0] and '3 to 0' in notes[1]
  with pytest.raises(ValueError, match='different tokenizer than runs/x/tokenizer.model'):
    run_files.check_resume_meta({**meta, 'tokenizer': 'zzz'}, 'rows-1', tok, config, notes.append)
  run_files.check_resume_meta({}, 'rows-1', tok, config, notes.append)  # older checkpoints: no meta
  assert len(notes) == 2


# ---------------------------------------------------------------------------------------------
# Provenance and fatal errors


def test_provenance_names_the_code_libraries_command_and_devices():
  import importlib.metadata
  import subprocess
  import jax
  p = run_files.provenance(['mlmjax.train', '--config', 'configs/pretrain.py:tiny', '--x=a b'])
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                        cwd=run_files.__file__.rsplit('/mlmjax/', 1)[0]).stdout.strip()
  assert p['commit'] == (head or None) and isinstance(p['dirty'], (bool, type(None)))
  for name in ('jax', 'flax', 'optax', 'orbax-checkpoint'):
    assert p['versions'][name] == importlib.metadata.version(name)
  assert p['versions']['runtime']
  assert p['command'] == "mlmjax.train --config configs/pretrain.py:tiny '--x=a b'"
  assert p['devices'] == {'platform': jax.devices()[0].platform,
                          'kind': jax.devices()[0].device_kind, 'count': jax.device_count(),
                          'local_count': jax.local_device_count()}
  assert p['process_count'] == jax.process_count()
  json.dumps(p)  # written to provenance.json and summary.json as it is


def test_record_provenance_appends_one_entry_per_start(tmp_path):
  run_files.record_provenance(tmp_path, {'start_step': 0})
  run_files.record_provenance(tmp_path, {'start_step': 5})
  assert json.loads((tmp_path / 'provenance.json').read_text()) == [{'start_step': 0},
                                                                    {'start_step': 5}]


def test_log_fatal_writes_one_line_for_a_users_error_and_a_traceback_otherwise(tmp_path):
  (tmp_path / 'log.txt').write_text('step 1\n')
  run_files.log_fatal(tmp_path, ValueError('train.batch_size=0 must be positive'), (ValueError,))
  try:
    {}['missing']
  except KeyError as e:
    run_files.log_fatal(tmp_path, e, (ValueError,))
  lines = _lines(tmp_path / 'log.txt')
  assert lines[:2] == ['step 1', 'error: train.batch_size=0 must be positive']
  assert lines[2] == 'fatal: Traceback (most recent call last):' and lines[-1] == "KeyError: 'missing'"
  run_files.log_fatal(tmp_path / 'nowhere', ValueError('x'), (ValueError,))  # no workdir: nothing
  assert not (tmp_path / 'nowhere').exists()


def _wandb_section(**kw):
  from mlmjax import schema
  c = schema.defaults().wandb
  c.update(kw)
  return c


def test_wandb_run_gets_settings_metrics_and_summary_and_resumes(tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  cfg = _wandb_section(project='mlmjax-test', mode='offline', name='first')
  reporter = run_files.Reporter(tmp_path, enabled=True, wandb=cfg)
  reporter.hparams({'masking.rate': 0.3, 'model.size': 'tiny'}, ['eval/loss'])
  reporter.write(10, {'train/loss': 2.5, 'note': 'text stays out'})
  reporter.finish({'eval/loss': 2.25, 'finished': True})
  run_id = (tmp_path / 'wandb_run_id').read_text().strip()
  logs = list((tmp_path / 'wandb').glob(f'offline-run-*-{run_id}/run-{run_id}.wandb'))
  assert len(logs) == 1
  texts = (b'train/loss', b'masking.rate', b'mlmjax-test', b'eval/loss')
  for _ in range(120):  # wandb's service process writes the log after finish() returns
    data = logs[0].read_bytes()
    if all(t in data for t in texts):
      break
    time.sleep(0.25)
  for text in texts:
    assert text in data, text
  assert b'text stays out' not in data
  # A resumed run continues the same W&B run.
  again = run_files.Reporter(tmp_path, enabled=True, wandb=cfg)
  again.hparams({'masking.rate': 0.3}, ['eval/loss'])
  again.write(20, {'train/loss': 2.0})
  again.finish()
  assert (tmp_path / 'wandb_run_id').read_text().strip() == run_id
  assert len(list((tmp_path / 'wandb').glob(f'offline-run-*-{run_id}'))) >= 1


def test_wandb_is_never_required(tmp_path, monkeypatch):
  monkeypatch.setitem(__import__('sys').modules, 'wandb', None)  # as if not installed
  reporter = run_files.Reporter(tmp_path, enabled=True, wandb=_wandb_section(project='p'))
  reporter.hparams({'a': 1}, ['eval/loss'])
  reporter.write(1, {'train/loss': 1.0})
  reporter.finish()
  assert 'the wandb package is not installed' in (tmp_path / 'log.txt').read_text()
  assert (tmp_path / 'metrics.jsonl').read_text().count('train/loss') == 1
  off = tmp_path / 'off'  # no project: no W&B whatever is installed
  off.mkdir()
  reporter = run_files.Reporter(off, enabled=True, wandb=_wandb_section())
  reporter.hparams({'a': 1}, ['eval/loss'])
  reporter.finish()
  assert not (off / 'wandb_run_id').exists() and not (off / 'log.txt').exists()
