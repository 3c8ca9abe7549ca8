"""End-to-end adaptation through train.run: init_from, DAPT's second validation, early stopping, tasks."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from mlmjax import checkpoint, predict, train
from mlmjax import tokenizer as tok


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, make_tiny_config):
  """Returns (config, workdir) of a finished 8-step tiny MLM run on Python's help topics."""
  c = make_tiny_config()
  workdir = tmp_path_factory.mktemp('pretrained')
  train.run(c, workdir)
  return c, workdir


def _finetune_config(make_tiny_config, task_cfg):
  """Returns configs/finetune.py:task_cfg shrunk to the tiny test shapes (vocab 1000, 4 steps)."""
  from configs import finetune
  base = make_tiny_config()
  c = finetune.get_config(task_cfg)
  c.data.cache_dir = base.data.cache_dir
  c.train.seq_len, c.train.batch_size, c.train.num_steps = 32, 8, 4
  c.train.log_every_steps = 2
  c.optim.warmup_steps = 1
  c.eval.every_steps, c.ckpt.every_steps, c.eval.batch_size = 2, 2, 16
  c.task_data.max_examples = 300
  return c


@pytest.mark.slow
def test_dapt_validates_both_domains_and_stops_early(pretrained, make_tiny_config, tmp_path,
                                                     topics_corpus):
  _, pre_dir = pretrained
  c = make_tiny_config()
  # The "new domain" is Python source (mlmjax/*.py); the original stays the help topics. data.*
  # settings stay those of the pretraining run, so the topics' held-out documents are its own.
  code = tmp_path / 'new_domain.txt'
  code.write_text('\n\n'.join(p.read_text() for p in sorted(pathlib.Path(train.__file__).parent.glob('*.py'))))
  c.data.corpus = str(code)
  c.init_from = str(pre_dir)
  c.eval.other_corpus = str(topics_corpus)
  c.eval.other_name = 'topics'
  c.eval.at_start = True
  c.train.num_steps, c.eval.every_steps, c.ckpt.every_steps = 12, 2, 2
  # No improvement of at least 10 nats ever counts: the first evaluation after the start stops it.
  c.early_stop.patience, c.early_stop.min_delta = 1, 10.0
  work = tmp_path / 'dapt'
  summary = train.run(c, work)
  assert summary['early_stopped'] and summary['finished'] and summary['step'] == 2
  assert summary['best_step'] == 0 and summary['best_metric'] == 'loss'
  records = [json.loads(l) for l in (work / 'metrics.jsonl').read_text().splitlines()]
  evals = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [0, 2]
  for r in evals:  # both domains at every evaluation
    assert np.isfinite(r['eval/loss']) and np.isfinite(r['eval_topics/loss'])
    assert 0 <= r['eval_topics/accuracy_at_mask'] <= 1
  # The starting point is the pretrained model: on its own validation text it scores as it did.
  pre_summary = json.loads((pre_dir / 'summary.json').read_text())
  assert evals[0]['eval_topics/loss'] == pytest.approx(pre_summary['eval/loss'], rel=1e-5)
  # best/ holds the step-0 state, the pretrained parameters themselves.
  best = predict.load_run(work, 'best')
  pre = predict.load_run(pre_dir)
  assert best.step == 0
  np.testing.assert_array_equal(np.asarray(best.params['encoder']['token_embed']),
                                np.asarray(pre.params['encoder']['token_embed']))
  log = (work / 'log.txt').read_text()
  assert 'early stopping at step 2' in log and 'tokenizer from init_from' in log
  # A rerun of an early-stopped run trains no more.
  again = train.run(c, work)
  assert again['step'] == 2 and again['early_stopped']


@pytest.mark.slow
def test_patience_counts_evaluations_without_improvement(make_tiny_config, tmp_path):
  c = make_tiny_config()
  c.train.num_steps, c.eval.every_steps, c.ckpt.every_steps = 8, 2, 2
  c.early_stop.patience = 2
  c.early_stop.metric = 'accuracy_at_mask'  # mode from the name: max
  summary = train.run(c, tmp_path / 'run')
  evals = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  acc = [(r['step'], r['eval/accuracy_at_mask']) for r in evals if 'eval/loss' in r]
  # Replay the rule on the logged values: stop once `patience` evaluations did not beat the best.
  best, since, stop = None, 0, None
  for step, v in acc:
    if best is None or v > best:
      best, since = v, 0
    else:
      since += 1
      if since >= 2 and step < 8:
        stop = step
        break
  assert summary['early_stopped'] == (stop is not None)
  assert summary['step'] == (stop if stop is not None else 8)
  assert summary['best_value'] == pytest.approx(best)


@pytest.mark.slow
def test_classify_from_pretrained_loads_encoder_and_tokenizer(pretrained, make_tiny_config,
                                                               tmp_path):
  _, pre_dir = pretrained
  c = _finetune_config(make_tiny_config, 'tiny')  # embedded docstrings by library: no ../shared
  c.init_from = str(pre_dir)
  c.optim.learning_rate = 1e-9  # after 4 steps the encoder is still the pretrained one
  work = tmp_path / 'cls'
  summary = train.run(c, work)
  assert summary['finished'] and summary['task'] == 'classify'
  for key in ('test/accuracy', 'test/macro_f1', 'baseline/majority_accuracy', 'eval/accuracy'):
    assert 0.0 <= summary[key] <= 1.0, key
  assert set(summary['test/per_class']) == set(json.loads((work / 'task.json').read_text())['labels'])
  ours = predict.load_run(work, 'latest')
  pre = predict.load_run(pre_dir)
  assert ours.tokenizer.fingerprint == pre.tokenizer.fingerprint
  np.testing.assert_allclose(np.asarray(ours.params['encoder']['token_embed']),
                             np.asarray(pre.params['encoder']['token_embed']), atol=1e-6)
  assert 'classifier' in ours.params and 'mlm_head' not in ours.params
  # Resume order: this workdir's checkpoint first, init_from only for a fresh start.
  c.train.num_steps = 6
  again = train.run(c, work)
  assert again['step'] == 6
  assert 'resumed from step 4' in (work / 'log.txt').read_text()
  labels = predict.classify(ours, ['Return the logger with the given name.'])
  assert labels[0][0][0] in summary['test/per_class']


@pytest.mark.slow
def test_init_from_adopts_the_model_and_names_every_explicit_mismatch(pretrained, make_tiny_config,
                                                                      tmp_path, topics_corpus):
  pre_cfg, pre_dir = pretrained
  c = _finetune_config(make_tiny_config, 'tiny')  # no model flags: the pretrained run's are taken
  c.init_from = str(pre_dir)
  c.model.size, c.model.pre_layer_norm, c.model.layer_norm_eps = 'small', False, 1e-5
  c.train.num_steps = 2
  summary = train.run(c, tmp_path / 'adopted')
  recorded = json.loads((tmp_path / 'adopted' / 'config.json').read_text())['model']
  for key in ('size', 'pre_layer_norm', 'layer_norm_eps'):
    assert recorded[key] == pre_cfg.model[key] and f'model.{key}' in summary['adapted']
  assert recorded['dropout_rate'] == 0.1  # this run's regularizer, not the pretrained run's
  log = (tmp_path / 'adopted' / 'log.txt').read_text()
  assert "note: model from init_from" in log and "model.size='tiny'" in log
  # Keys set explicitly are kept, and every one that cannot work is named at once.
  c = _finetune_config(make_tiny_config, 'tiny')
  c.init_from = str(pre_dir)
  c.model.num_heads = 4 if pre_cfg.model.get('num_heads', 0) != 4 else 8
  c.model.size, c.model.pre_layer_norm = 'custom', not pre_cfg.model.pre_layer_norm
  c.model.hidden_size, c.model.num_layers, c.model.intermediate_size = 128, 3, 512
  explicit = {f'model.{k}' for k in ('num_heads', 'size', 'pre_layer_norm', 'hidden_size',
                                     'num_layers', 'intermediate_size')}
  with pytest.raises(ValueError) as e:
    train.run(c, tmp_path / 'heads', explicit=explicit)
  msg = str(e.value)
  assert len(msg.splitlines()) == 1 and 'differs from' in msg and '3 key(s)' in msg, msg
  for key in ('model.num_layers=3', 'model.num_heads=', 'model.pre_layer_norm='):
    assert key in msg, msg
  c = _finetune_config(make_tiny_config, 'tiny')
  c.init_from = str(pre_dir)
  c.tokenizer.path = str(tmp_path / 'other.model')
  tok.train_tokenizer(topics_corpus.read_text().split('\n\n'), c.tokenizer.path, vocab_size=500)
  with pytest.raises(ValueError, match='tokenizer'):
    train.run(c, tmp_path / 'tok')
  c = _finetune_config(make_tiny_config, 'tiny')
  c.init_from = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='init_from'):
    train.run(c, tmp_path / 'missing_run')
  c = _finetune_config(make_tiny_config, 'tiny')  # neither init_from nor tokenizer.path
  with pytest.raises(ValueError, match='needs a tokenizer'):
    train.run(c, tmp_path / 'no_tok')


@pytest.mark.slow
def test_untied_run_feeds_fine_tuning_and_dapt_must_match_it(make_tiny_config, tmp_path):
  c = make_tiny_config()
  c.model.tie_embeddings = False
  c.train.num_steps, c.eval.every_steps, c.ckpt.every_steps = 2, 2, 2
  train.run(c, tmp_path / 'untied')
  pre = predict.load_run(tmp_path / 'untied')
  assert pre.params['mlm_head']['decoder'].shape == pre.params['encoder']['token_embed'].shape
  dapt = make_tiny_config()  # tied by default, set explicitly: the MLM head would not fit
  dapt.init_from = str(tmp_path / 'untied')
  with pytest.raises(ValueError, match=r'model.tie_embeddings=True \(theirs False\)'):
    train.run(dapt, tmp_path / 'dapt', explicit={'model.tie_embeddings'})
  ft = _finetune_config(make_tiny_config, 'tiny')  # a task model keeps only the encoder
  ft.init_from = str(tmp_path / 'untied')
  ft.train.num_steps, ft.optim.learning_rate = 2, 1e-9
  train.run(ft, tmp_path / 'cls')
  ours = predict.load_run(tmp_path / 'cls', 'latest')
  np.testing.assert_allclose(np.asarray(ours.params['encoder']['token_embed']),
                             np.asarray(pre.params['encoder']['token_embed']), atol=1e-6)


@pytest.mark.slow
def test_init_from_a_step_directory_loads_that_step(pretrained, make_tiny_config, tmp_path):
  _, pre_dir = pretrained  # checkpoints at steps 4 and 8
  c = make_tiny_config()
  c.train.num_steps, c.eval.every_steps, c.ckpt.every_steps = 2, 2, 2
  c.init_from = str(pre_dir / 'checkpoints' / '4')
  train.run(c, tmp_path / 'from4')
  assert 'checkpoints/4 (fresh optimizer)' in (tmp_path / 'from4' / 'log.txt').read_text()


@pytest.mark.slow
@pytest.mark.parametrize('task_cfg', ['retrieve_tiny'])
def test_retrieval_from_scratch_with_the_pretrained_tokenizer(pretrained, make_tiny_config,
                                                              tmp_path, task_cfg):
  _, pre_dir = pretrained
  c = _finetune_config(make_tiny_config, task_cfg)
  c.tokenizer.path = str(pre_dir / 'tokenizer.model')
  summary = train.run(c, tmp_path / 'ret')
  for key in ('test/recall_at_1', 'test/recall_at_10', 'test/mrr', 'baseline/overlap_mrr'):
    assert 0.0 <= summary[key] <= 1.0, key
  assert summary['best_metric'] == 'mrr'
  best = checkpoint.Checkpointer(tmp_path / 'ret' / 'best', async_save=False)
  assert best.all_steps() == [summary['best_step']]
  best.close()


@pytest.mark.slow
def test_prediction_and_init_from_read_only_the_parameters(pretrained, make_tiny_config, tmp_path):
  """A workdir whose optimizer state is deleted still predicts and still starts a fine-tuning run."""
  _, pre_dir = pretrained
  bare = tmp_path / 'bare'
  shutil.copytree(pre_dir, bare)
  removed = [shutil.rmtree(d) or d for d in bare.glob('checkpoints/*/opt_state')]
  assert removed and not list(bare.glob('checkpoints/*/opt_state'))
  want = predict.fill_mask(predict.load_run(pre_dir), 'The [MASK] of the function.', top_k=3)
  assert predict.fill_mask(predict.load_run(bare), 'The [MASK] of the function.', top_k=3) == want
  c = _finetune_config(make_tiny_config, 'tiny')
  c.init_from = str(bare)
  c.train.num_steps = 2
  summary = train.run(c, tmp_path / 'cls')
  assert summary['finished']
  ours = predict.load_run(tmp_path / 'cls', 'latest')
  assert ours.step == 2 and 'classifier' in ours.params
